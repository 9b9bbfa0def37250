//! A size cap on the images dbuild keeps on a worker's daemon (`dbuild-stage:*`,
//! `dbuild-cache:*`, `dbuild-paths:*`): least recently used first, never one used in the
//! last [`RECENT`] (a running stage's inputs, or outputs its consumers are about to read).
//! An evicted stage image is only a local loss: the pool sends every input's artifacts
//! with each task, and the worker imports what its daemon lacks. Stage images the worker
//! parked beside the daemon (`daemon/park.rs`) count against the same cap, by the size
//! of their archives, and go the same way.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::daemon::Daemon;

/// Images used this recently are never evicted.
pub const RECENT: Duration = Duration::from_secs(600);

const OURS: [&str; 3] = ["dbuild-stage:", "dbuild-cache:", "dbuild-paths:"];

/// What one enforcement did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CapReport {
    /// Bytes of dbuild's images before: what each adds over the longest image it extends
    /// (its base image, or the previous instruction's image).
    pub bytes_before: u64,
    pub images_removed: usize,
    pub bytes_freed: u64,
}

/// Why the cap could not be enforced.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error("listing images: {0}")]
    ListImages(#[source] bollard::errors::Error),
    #[error("listing parked images: {0}")]
    ListParked(#[source] std::io::Error),
    #[error("removing a parked image: {0}")]
    RemoveParked(#[source] std::io::Error),
}

/// One of dbuild's images, as the cap weighs it.
struct Candidate {
    /// Last use; `None` while a running task uses it (never evicted then).
    last: Option<SystemTime>,
    /// What it adds over the longest image it extends.
    own: u64,
    layers: Vec<String>,
    tags: Vec<String>,
}

pub struct ImageCap {
    daemon: Daemon,
    cap: u64,
    /// Tag → last use, for the tags this process has used (others count by creation).
    used: Mutex<HashMap<String, SystemTime>>,
    /// Image id → layer diff ids.
    layers: Mutex<HashMap<String, Vec<String>>>,
    enforcing: AtomicBool,
    /// Running tasks, by id, with the tags they read and write: never evicted while they
    /// run, however long (dbuild's images carry no creation time to go by).
    running: Mutex<HashMap<String, Vec<String>>>,
    /// Tag prefixes of the images it manages.
    prefixes: Vec<String>,
    recent: Duration,
    parked: Option<crate::executor::park::Parked>,
}

impl ImageCap {
    pub fn new(daemon: Daemon, cap: u64) -> Self {
        ImageCap {
            daemon,
            cap,
            used: Mutex::default(),
            layers: Mutex::default(),
            enforcing: AtomicBool::new(false),
            running: Mutex::default(),
            prefixes: OURS.iter().map(|p| p.to_string()).collect(),
            recent: RECENT,
            parked: None,
        }
    }

    /// Counts (and evicts) the images parked in `parked` too.
    pub fn with_parked(mut self, parked: Option<crate::executor::park::Parked>) -> Self {
        self.parked = parked;
        self
    }

    /// Manages the images tagged with these prefixes instead of dbuild's, and protects
    /// those used within `recent` (tests use both to stay off the daemon's real cache).
    pub fn scoped(mut self, prefixes: &[&str], recent: Duration) -> Self {
        self.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        self.recent = recent;
        self
    }

    /// Marks tags as used now.
    pub fn touch(&self, tags: impl IntoIterator<Item = String>) {
        let now = SystemTime::now();
        let mut used = self.used.lock();
        for t in tags {
            used.insert(t, now);
        }
    }

    /// A task began: the images it reads and writes (`tags`) are kept until it ends.
    pub fn begin(&self, task_id: &str, tags: Vec<String>) {
        self.touch(tags.iter().cloned());
        self.running.lock().insert(task_id.to_string(), tags);
    }

    pub fn end(&self, task_id: &str) {
        self.running.lock().remove(task_id);
    }

    /// Removes dbuild's least recently used images until they fit the cap. Runs once at a
    /// time (a call while one runs returns at once, with nothing done).
    pub async fn enforce(&self) -> Result<CapReport, CapError> {
        if self.enforcing.swap(true, Ordering::SeqCst) {
            return Ok(CapReport::default());
        }
        let r = self.enforce_now().await;
        self.enforcing.store(false, Ordering::SeqCst);
        r
    }

    async fn enforce_now(&self) -> Result<CapReport, CapError> {
        let images = self
            .daemon
            .list_images()
            .await
            .map_err(CapError::ListImages)?;
        // Layer lists (immutable per image id) of every image, to find what each of ours
        // adds over the longest image it extends (its base or the previous instruction).
        let mut by_prefix: HashMap<Vec<String>, u64> = HashMap::new();
        let mut layers_of: HashMap<String, Vec<String>> = HashMap::new();
        for i in &images {
            let layers = self.layers(&i.id).await;
            by_prefix.insert(layers.clone(), i.size.max(0) as u64);
            layers_of.insert(i.id.clone(), layers);
        }
        let now = SystemTime::now();
        let used = self.used.lock().clone();
        let in_use: std::collections::HashSet<String> =
            self.running.lock().values().flatten().cloned().collect();
        // Each image carrying only dbuild's tags.
        let mut ours: Vec<Candidate> = images
            .into_iter()
            .filter(|i| {
                !i.repo_tags.is_empty()
                    && i.repo_tags
                        .iter()
                        .all(|t| self.prefixes.iter().any(|p| t.starts_with(p.as_str())))
            })
            .map(|i| {
                let created = SystemTime::UNIX_EPOCH + Duration::from_secs(i.created.max(0) as u64);
                let last = i
                    .repo_tags
                    .iter()
                    .filter_map(|t| used.get(t).copied())
                    .chain([created])
                    .max()
                    .unwrap_or(created);
                // A running task's image: never a candidate.
                let last = if i.repo_tags.iter().any(|t| in_use.contains(t)) {
                    None
                } else {
                    Some(last)
                };
                let layers = layers_of.remove(&i.id).unwrap_or_default();
                let size = i.size.max(0) as u64;
                let below = (0..layers.len())
                    .rev()
                    .find_map(|n| by_prefix.get(&layers[..n]))
                    .copied()
                    .unwrap_or(0);
                Candidate {
                    last,
                    own: size.saturating_sub(below),
                    layers,
                    tags: i.repo_tags,
                }
            })
            .collect();
        let parked = match &self.parked {
            Some(p) => p.archives().map_err(CapError::ListParked)?,
            None => Vec::new(),
        };
        let mut report = CapReport {
            bytes_before: ours.iter().map(|c| c.own).sum::<u64>()
                + parked.iter().map(|a| a.bytes).sum::<u64>(),
            ..Default::default()
        };
        let mut total = report.bytes_before;
        ours.sort_by_key(|c| c.last);
        let extends = |a: &[String], b: &[String]| b.len() > a.len() && b.starts_with(a);
        for k in 0..ours.len() {
            if total <= self.cap {
                break;
            }
            let Candidate {
                last,
                own,
                layers,
                tags,
            } = &ours[k];
            let Some(last) = last else { continue };
            if now.duration_since(*last).unwrap_or_default() < self.recent {
                continue;
            }
            let mut removed = true;
            for t in tags {
                // Without force: an image a container still uses stays.
                if self.daemon.remove_image(t, true).await.is_err() {
                    removed = false;
                }
            }
            if !removed {
                continue;
            }
            report.images_removed += 1;
            let mut used = self.used.lock();
            for t in tags {
                used.remove(t);
            }
            // Its top layer stays while a later image of the chain extends it.
            if !ours[k + 1..].iter().any(|c| extends(layers, &c.layers)) {
                total = total.saturating_sub(*own);
                report.bytes_freed += own;
            }
        }
        if let (Some(dir), true) = (&self.parked, total > self.cap) {
            let last = |a: &crate::executor::park::ParkedArchive| {
                a.names
                    .iter()
                    .filter_map(|n| used.get(n).copied())
                    .chain([a.modified])
                    .max()
                    .unwrap_or(a.modified)
            };
            let mut parked = parked;
            parked.sort_by_key(|a| last(a));
            for a in &parked {
                if total <= self.cap {
                    break;
                }
                let busy = a.names.iter().any(|n| in_use.contains(n));
                if busy || now.duration_since(last(a)).unwrap_or_default() < self.recent {
                    continue;
                }
                dir.unpark(&a.archive).map_err(CapError::RemoveParked)?;
                report.images_removed += 1;
                report.bytes_freed += a.bytes;
                total = total.saturating_sub(a.bytes);
            }
        }
        Ok(report)
    }

    /// The image's layer diff ids (cached: an image id never changes its layers).
    async fn layers(&self, id: &str) -> Vec<String> {
        if let Some(l) = self.layers.lock().get(id) {
            return l.clone();
        }
        let l = self.daemon.image_layers(id).await;
        self.layers.lock().insert(id.to_string(), l.clone());
        l
    }
}
