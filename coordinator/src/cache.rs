//! The stage cache: one record per stage key in the index ([`Tree::Stages`]), pointing at
//! the blobs consumers need (the exported image, the tar of each copied path), with size,
//! build duration, last use and the workers holding the stage locally.
//!
//! Invariants: a record is only a hit when every blob it names is in the blob store (a
//! record whose blob went missing or was found corrupt loses that blob and is a miss for
//! whoever needs it); records are written only from what a worker reported (artifacts it
//! uploaded and the store verified, a stage it finished), never from a client; evicting a
//! record removes the blobs no other record names.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{BlobStore, SledStore, Store, StoreError, Tree};
use model::digest::BlobDigest;
use model::keys::StageKey;

/// The schema of the records below, kept in [`Tree::Meta`] under `stage_records_schema`.
pub const SCHEMA: &str = "stage-records/1";

pub use model::task::{Artifact, Export};

/// A blob a record names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// The records `CacheService.List` sends, most recently used first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRecords(pub Vec<StageRecord>);

impl wire::Doc for StageRecords {
    const KIND: &'static str = "StageRecords/1";
}
impl wire::Doc for CacheStats {
    const KIND: &'static str = "CacheStats/1";
}
impl wire::Doc for PruneOptions {
    const KIND: &'static str = "PruneOptions/1";
}
impl wire::Doc for PruneReport {
    const KIND: &'static str = "PruneReport/1";
}

/// Everything the cache knows of one stage key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    /// The stage's name when it was last built or used (`stage-N` when unnamed).
    pub name: String,
    /// The image id (the same on every daemon: it is the digest of its config).
    pub image_id: String,
    /// The exported image, when a consumer needed it: an `ImageParts/1` index (or, from
    /// an older worker, a whole `docker save` archive).
    pub image: Option<BlobRef>,
    /// The layer blobs the image index names (shared with other records that have the
    /// same layers).
    #[serde(default)]
    pub image_parts: Vec<BlobRef>,
    /// Exported paths of the stage's filesystem.
    pub paths: BTreeMap<String, BlobRef>,
    /// Bytes this record accounts for: its blobs, or the image on the daemon when it has
    /// none (the embedded build keeps stages as images only).
    pub size: u64,
    pub duration_ms: u64,
    pub created_ms: u64,
    pub last_used_ms: u64,
    pub hits: u64,
    /// Workers whose daemon holds the stage image.
    pub holders: BTreeSet<String>,
    /// Tags naming the stage's images on those daemons (the stage and each instruction),
    /// removed with the record by an embedded prune.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Content digests of paths consumers read with `COPY --from` (see
    /// [`model::keys::Contents`]): a hit hands them on, so its consumers keep their keys.
    #[serde(default)]
    pub contents: BTreeMap<String, String>,
}

impl StageRecord {
    fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.image
            .iter()
            .chain(&self.image_parts)
            .chain(self.paths.values())
    }

    /// Whether the record holds every artifact `need` names.
    pub fn covers(&self, need: &Export) -> bool {
        (!need.image || self.image.is_some())
            && need.paths.iter().all(|p| self.paths.contains_key(p))
    }

    fn blob_bytes(&self) -> u64 {
        self.blobs().map(|b| b.size).sum()
    }

    /// The artifacts of the record, as the pool hands them to workers.
    pub fn artifacts(&self) -> Vec<Artifact> {
        let Some(key) = StageKey::from_hex(&self.key) else {
            return Vec::new();
        };
        let mut out: Vec<Artifact> = self
            .paths
            .iter()
            .map(|(p, b)| Artifact {
                stage_key: key,
                path: p.clone(),
                digest: b.digest.clone(),
                size: b.size,
            })
            .collect();
        if let Some(b) = &self.image {
            out.push(Artifact {
                stage_key: key,
                path: String::new(),
                digest: b.digest.clone(),
                size: b.size,
            });
        }
        out
    }
}

/// Totals over the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    /// Stages built (a lookup that found nothing usable).
    pub misses: u64,
    /// Sum of the sizes of the stages reused instead of built.
    pub bytes_saved: u64,
    /// Sum of the build durations of the stages reused instead of built.
    pub time_saved_ms: u64,
}

impl CacheStats {
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// What to prune: `all`, or down to `keep_bytes`, and/or everything unused for
/// `older_than`. Least recently used first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneOptions {
    pub keep_bytes: Option<u64>,
    pub older_than: Option<Duration>,
    pub all: bool,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub removed: Vec<StageRecord>,
    /// Bytes of the removed records and of the unreferenced blobs swept.
    pub bytes_freed: u64,
    pub blobs_removed: u64,
    /// Blobs no record named (build contexts), older than the grace period and used by
    /// no running build, removed.
    #[serde(default)]
    pub unreferenced_removed: u64,
}

/// What records occupy: with a blob store, the distinct blobs they name (counted by the
/// records naming each); without one (the embedded cache), each record's image size.
struct BlobRefs {
    with_blobs: bool,
    count: BTreeMap<String, (usize, u64)>,
    total: u64,
}

impl BlobRefs {
    fn of(with_blobs: bool, records: &[StageRecord]) -> Self {
        let mut refs = BlobRefs {
            with_blobs,
            count: BTreeMap::new(),
            total: 0,
        };
        for r in records {
            if !with_blobs {
                refs.total += r.size;
                continue;
            }
            for b in Self::distinct(r) {
                let e = refs.count.entry(b.digest.clone()).or_insert((0, b.size));
                if e.0 == 0 {
                    refs.total += b.size;
                }
                e.0 += 1;
            }
        }
        refs
    }

    fn distinct(r: &StageRecord) -> Vec<&BlobRef> {
        let mut seen = BTreeSet::new();
        r.blobs().filter(|b| seen.insert(&b.digest)).collect()
    }

    /// Drops a record's references; returns the bytes no other record still names.
    fn release(&mut self, r: &StageRecord) -> u64 {
        if !self.with_blobs {
            return r.size;
        }
        let mut freed = 0;
        for b in Self::distinct(r) {
            if let Some(e) = self.count.get_mut(&b.digest) {
                e.0 -= 1;
                if e.0 == 0 {
                    freed += e.1;
                }
            }
        }
        freed
    }
}

/// How long a blob no record names is kept: a client uploads a context before it submits,
/// and the build names its blobs only once submitted.
pub const UNREFERENCED_GRACE: Duration = Duration::from_secs(3600);

/// Blobs a running build reads (its context): never swept while this lives.
pub struct BlobPins {
    cache: Arc<StageCache>,
    id: u64,
}

impl Drop for BlobPins {
    fn drop(&mut self) {
        self.cache.pins.lock().unwrap().remove(&self.id);
    }
}

/// A stage a worker finished, as [`StageCache::stage_built`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Built<'a> {
    pub key: &'a StageKey,
    pub name: &'a str,
    pub image_id: &'a str,
    pub image_size: u64,
    pub duration: Duration,
    pub worker: &'a str,
    pub tags: &'a [String],
    pub contents: &'a BTreeMap<String, String>,
}

/// The stage cache over an index and (on a coordinator) a blob store.
pub struct StageCache {
    index: Arc<dyn Store>,
    blobs: Option<BlobStore>,
    /// Serialises read-modify-write of records within this process.
    lock: Mutex<()>,
    /// Size cap enforced after every write (`None`: no cap).
    max_bytes: Option<u64>,
    /// Blobs hashed since this process started, with the (size, mtime) they had then: a
    /// blob is hashed again only when its file changed.
    verified: Mutex<std::collections::HashMap<String, (u64, std::time::SystemTime)>>,
    /// Blobs running builds read, by pin id ([`BlobPins`]).
    pins: Mutex<BTreeMap<u64, BTreeSet<String>>>,
    /// When unreferenced blobs were last swept.
    last_sweep: Mutex<Option<std::time::Instant>>,
    /// An upper bound of the cache's bytes (a record's shared blobs count in full), kept
    /// from the last full pass plus what records grew by since; `None` until a first pass.
    /// The cap lists every record only once this passes it, not after every write.
    approx_bytes: Mutex<Option<u64>>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const HITS: &[u8] = b"hits";
const MISSES: &[u8] = b"misses";
const BYTES_SAVED: &[u8] = b"bytes_saved";
const TIME_SAVED: &[u8] = b"time_saved_ms";

impl StageCache {
    /// The cache over `<data_dir>/index` and, with `with_blobs`, `<data_dir>/blobs`.
    pub fn open(data_dir: &Path, with_blobs: bool) -> Result<Self, StoreError> {
        let index = SledStore::open(&data_dir.join("index"))?;
        let blobs = if with_blobs {
            Some(BlobStore::open(&data_dir.join("blobs"))?)
        } else {
            None
        };
        Self::new(Arc::new(index), blobs)
    }

    pub fn new(index: Arc<dyn Store>, blobs: Option<BlobStore>) -> Result<Self, StoreError> {
        match index.get(Tree::Meta, b"stage_records_schema")? {
            Some(v) if v == SCHEMA.as_bytes() => {}
            Some(other) => {
                // Records of another schema cannot be read: start over rather than fail
                // every build (the blobs stay and are found again by their digests).
                tracing::warn!(
                    found = %String::from_utf8_lossy(&other),
                    "stage records of another schema: dropping them"
                );
                for (k, _) in index.scan_prefix(Tree::Stages, b"")? {
                    index.remove(Tree::Stages, &k)?;
                }
                index.put(Tree::Meta, b"stage_records_schema", SCHEMA.as_bytes())?;
            }
            None => index.put(Tree::Meta, b"stage_records_schema", SCHEMA.as_bytes())?,
        }
        Ok(StageCache {
            index,
            blobs,
            lock: Mutex::new(()),
            max_bytes: None,
            verified: Mutex::default(),
            pins: Mutex::default(),
            last_sweep: Mutex::new(None),
            approx_bytes: Mutex::new(None),
        })
    }

    /// Evict least recently used records whenever the cache grows past `max`.
    pub fn with_max_bytes(mut self, max: Option<u64>) -> Self {
        self.max_bytes = max;
        self
    }

    pub fn index(&self) -> &Arc<dyn Store> {
        &self.index
    }

    pub fn blobs(&self) -> Option<&BlobStore> {
        self.blobs.as_ref()
    }

    pub fn get(&self, key: &StageKey) -> Result<Option<StageRecord>, StoreError> {
        Ok(self
            .index
            .get(Tree::Stages, key.to_hex().as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn put(&self, r: &StageRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(r).expect("records serialize");
        self.index.put(Tree::Stages, r.key.as_bytes(), &v)
    }

    /// Counts a record's growth into the size bound. Only the writers that add to a record
    /// (`add_artifacts`, `stage_built`) call it: every other write keeps or shrinks one.
    fn grew(&self, from: u64, to: u64) {
        if let Some(b) = self.approx_bytes.lock().unwrap().as_mut() {
            *b = b.saturating_add(to.saturating_sub(from));
        }
    }

    fn add(&self, counter: &[u8], n: u64) -> Result<(), StoreError> {
        let old = self.counter(counter)?;
        self.index
            .put(Tree::Meta, counter, &old.saturating_add(n).to_be_bytes())
    }

    fn counter(&self, counter: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .index
            .get(Tree::Meta, counter)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Whether the blob is in the store, intact (always true without a blob store:
    /// nothing to check). A blob is hashed on its first lookup in this process and again
    /// whenever its file changed; a corrupt one is deleted, so it is never served.
    fn blob_ok(&self, b: &BlobRef) -> bool {
        let (Some(store), Some(d)) = (&self.blobs, BlobDigest::from_hex(&b.digest)) else {
            return self.blobs.is_none();
        };
        let Some(meta) = store.metadata(&d) else {
            return false;
        };
        let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if self.verified.lock().unwrap().get(&b.digest) == Some(&stamp) {
            return true;
        }
        match store.verify(&d) {
            Ok(()) => {
                self.verified
                    .lock()
                    .unwrap()
                    .insert(b.digest.clone(), stamp);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cached blob unusable: the stage will be built again");
                self.verified.lock().unwrap().remove(&b.digest);
                false
            }
        }
    }

    /// The record of a stage if it can serve a consumer needing `need`: every needed
    /// artifact present and every blob it names on disk. Blobs found missing are dropped
    /// from the record for good.
    pub fn find(&self, key: &StageKey, need: &Export) -> Result<Option<StageRecord>, StoreError> {
        let _g = self.lock.lock().unwrap();
        let Some(mut r) = self.get(key)? else {
            return Ok(None);
        };
        let before = r.clone();
        // The image is usable only with its index and every layer it names.
        if r.image.as_ref().is_some_and(|b| !self.blob_ok(b))
            || r.image_parts.iter().any(|b| !self.blob_ok(b))
        {
            r.image = None;
            r.image_parts.clear();
        }
        r.paths.retain(|_, b| self.blob_ok(b));
        if r != before {
            tracing::warn!(key = %r.key, "stage record named blobs that are gone; dropped them");
            if self.blobs.is_some() {
                r.size = r.blob_bytes();
            }
            self.put(&r)?;
        }
        Ok((!r.image_id.is_empty() && r.covers(need)).then_some(r))
    }

    /// Records a stage the executor holds but the index does not know (built by a
    /// process that could not open the index), so later hits count and prune sees it.
    pub fn adopt(
        &self,
        key: &StageKey,
        name: &str,
        image_id: &str,
        worker: &str,
        tags: &[String],
    ) -> Result<(), StoreError> {
        let _g = self.lock.lock().unwrap();
        if self.get(key)?.is_some() {
            return Ok(());
        }
        let now = now_ms();
        self.put(&StageRecord {
            key: key.to_hex(),
            name: name.to_string(),
            image_id: image_id.to_string(),
            created_ms: now,
            last_used_ms: now,
            holders: [worker.to_string()].into(),
            tags: tags.iter().cloned().collect(),
            ..Default::default()
        })
    }

    /// Counts a stage reused instead of built, and touches its record.
    pub fn count_hit(&self, key: &StageKey, name: &str) -> Result<(), StoreError> {
        let _g = self.lock.lock().unwrap();
        let Some(mut r) = self.get(key)? else {
            return Ok(());
        };
        r.hits += 1;
        r.last_used_ms = now_ms();
        r.name = name.to_string();
        self.put(&r)?;
        self.add(HITS, 1)?;
        self.add(BYTES_SAVED, r.size)?;
        self.add(TIME_SAVED, r.duration_ms)
    }

    /// Records artifacts a worker uploaded for a stage (a later export of the same path
    /// replaces the earlier one).
    pub fn add_artifacts(&self, artifacts: &[Artifact], worker: &str) -> Result<(), StoreError> {
        let _g = self.lock.lock().unwrap();
        let now = now_ms();
        let mut by_key: BTreeMap<StageKey, Vec<&Artifact>> = BTreeMap::new();
        for a in artifacts {
            by_key.entry(a.stage_key).or_default().push(a);
        }
        for (key, list) in by_key {
            let mut r = self.get(&key)?.unwrap_or_else(|| StageRecord {
                key: key.to_hex(),
                created_ms: now,
                ..Default::default()
            });
            for a in list {
                let b = BlobRef {
                    digest: a.digest.clone(),
                    size: a.size,
                };
                if a.path.is_empty() {
                    r.image_parts = self.parts_of(&b);
                    r.image = Some(b);
                } else {
                    r.paths.insert(a.path.clone(), b);
                }
            }
            r.holders.insert(worker.to_string());
            r.last_used_ms = now;
            let before = r.size;
            r.size = r.blob_bytes();
            self.put(&r)?;
            self.grew(before, r.size);
        }
        drop(_g);
        self.enforce_cap()
    }

    /// The layer blobs an image index names (none for a whole-image archive).
    fn parts_of(&self, image: &BlobRef) -> Vec<BlobRef> {
        let Some(blobs) = &self.blobs else {
            return Vec::new();
        };
        // An index is small; a whole archive is not read.
        if image.size > 4 << 20 {
            return Vec::new();
        }
        let Some(bytes) = BlobDigest::from_hex(&image.digest).and_then(|d| blobs.read(&d).ok())
        else {
            return Vec::new();
        };
        model::image_parts::ImageParts::parse(&bytes)
            .map(|p| {
                p.layers
                    .into_iter()
                    .map(|l| BlobRef {
                        digest: l.digest,
                        size: l.size,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a stage a worker finished. `image_size` counts when the record has no
    /// blobs (an embedded build's stage lives as an image on the daemon).
    pub fn stage_built(&self, b: &Built<'_>) -> Result<(), StoreError> {
        let Built {
            key,
            name,
            image_id,
            image_size,
            duration,
            worker,
            tags,
            contents,
        } = *b;
        let _g = self.lock.lock().unwrap();
        let now = now_ms();
        let mut r = self.get(key)?.unwrap_or_else(|| StageRecord {
            key: key.to_hex(),
            created_ms: now,
            ..Default::default()
        });
        // A rebuild of the same key (--no-cache) may give another image id when its
        // commands are not reproducible; either result is valid for the key, and the
        // artifacts the worker just reported are already in the record. Contents describe
        // one image: another image drops the old ones.
        if r.image_id != image_id {
            r.contents.clear();
        }
        r.image_id = image_id.to_string();
        r.name = name.to_string();
        r.duration_ms = duration.as_millis() as u64;
        r.last_used_ms = now;
        r.holders.insert(worker.to_string());
        r.tags.extend(tags.iter().cloned());
        r.contents
            .extend(contents.iter().map(|(k, v)| (k.clone(), v.clone())));
        let before = r.size;
        r.size = if self.blobs.is_some() {
            r.blob_bytes()
        } else {
            image_size
        };
        self.put(&r)?;
        self.grew(before, r.size);
        self.add(MISSES, 1)?;
        drop(_g);
        self.enforce_cap()
    }

    /// Adds content digests an executor computed from image `image_id` for a record found
    /// without them (ignored if the record now names another image).
    pub fn add_contents(
        &self,
        key: &StageKey,
        image_id: &str,
        contents: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let _g = self.lock.lock().unwrap();
        let Some(mut r) = self.get(key)?.filter(|r| r.image_id == image_id) else {
            return Ok(());
        };
        r.contents
            .extend(contents.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.put(&r)
    }

    /// Every record, most recently used first.
    pub fn list(&self) -> Result<Vec<StageRecord>, StoreError> {
        let mut out: Vec<StageRecord> = self
            .index
            .scan_prefix(Tree::Stages, b"")?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        out.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    pub fn stats(&self) -> Result<CacheStats, StoreError> {
        let list = self.list()?;
        Ok(CacheStats {
            entries: list.len() as u64,
            bytes: BlobRefs::of(self.blobs.is_some(), &list).total,
            hits: self.counter(HITS)?,
            misses: self.counter(MISSES)?,
            bytes_saved: self.counter(BYTES_SAVED)?,
            time_saved_ms: self.counter(TIME_SAVED)?,
        })
    }

    fn enforce_cap(&self) -> Result<(), StoreError> {
        if let Some(max) = self.max_bytes {
            if self.approx_bytes.lock().unwrap().is_some_and(|b| b <= max) {
                return Ok(());
            }
            let r = self.prune_inner(
                &PruneOptions {
                    keep_bytes: Some(max),
                    ..Default::default()
                },
                false,
            )?;
            if !r.removed.is_empty() {
                tracing::info!(
                    records = r.removed.len(),
                    bytes = r.bytes_freed,
                    "cache over its size cap: evicted the least recently used stages"
                );
            }
        }
        Ok(())
    }

    /// Removes records (least recently used first) and the blobs only they name, then the
    /// blobs no record names (contexts) that are past [`UNREFERENCED_GRACE`] (all of
    /// them with `all`) and no running build pinned.
    pub fn prune(&self, opts: &PruneOptions) -> Result<PruneReport, StoreError> {
        self.prune_inner(opts, true)
    }

    fn prune_inner(&self, opts: &PruneOptions, explicit: bool) -> Result<PruneReport, StoreError> {
        let _g = self.lock.lock().unwrap();
        let mut list = self.list()?;
        // Oldest last use first.
        list.reverse();
        // With a blob store, bytes are those of the distinct blobs the records name (a
        // layer several stage images share counts once, and is freed with the last).
        let mut refs = BlobRefs::of(self.blobs.is_some(), &list);
        let mut total = refs.total;
        let now = now_ms();
        let mut report = PruneReport::default();
        let mut keep = Vec::new();
        for r in list {
            let old = opts
                .older_than
                .is_some_and(|d| now.saturating_sub(r.last_used_ms) >= d.as_millis() as u64);
            let over = opts.keep_bytes.is_some_and(|k| total > k);
            if opts.all || old || over {
                let freed = refs.release(&r);
                total -= freed;
                self.index.remove(Tree::Stages, r.key.as_bytes())?;
                report.bytes_freed += freed;
                report.removed.push(r);
            } else {
                keep.push(r);
            }
        }
        *self.approx_bytes.lock().unwrap() = Some(total);
        if let Some(blobs) = &self.blobs {
            let kept: BTreeSet<&str> = keep
                .iter()
                .flat_map(|r| r.blobs().map(|b| b.digest.as_str()))
                .collect();
            let gone: BTreeSet<&str> = report
                .removed
                .iter()
                .flat_map(|r| r.blobs().map(|b| b.digest.as_str()))
                .filter(|d| !kept.contains(d))
                .collect();
            for d in gone {
                if let Some(d) = BlobDigest::from_hex(d) {
                    if blobs.remove(&d)? {
                        report.blobs_removed += 1;
                    }
                }
            }
            // Context blobs belong to no record: swept once past the grace period (at
            // once for --all), at most every ten minutes when the cap is enforced.
            let due = self
                .last_sweep
                .lock()
                .unwrap()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(600));
            if explicit || due {
                let grace = if opts.all {
                    Duration::ZERO
                } else {
                    UNREFERENCED_GRACE
                };
                self.sweep(blobs, &kept, grace, &mut report)?;
            }
        }
        self.index.flush()?;
        Ok(report)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.index.flush()
    }

    /// Records the blob (docker save) of an external image pinned to `id`.
    pub fn set_base_image(&self, id: &str, blob: &BlobRef) -> Result<(), StoreError> {
        let json = serde_json::to_vec(blob).expect("blob refs serialize");
        self.index
            .put(Tree::Blobs, format!("image:{id}").as_bytes(), &json)
    }

    /// The blob of the external image `id`, if the store holds it (and marks it used, so
    /// the sweep of unreferenced blobs keeps it for another grace period).
    pub fn base_image(&self, id: &str) -> Option<BlobRef> {
        let blobs = self.blobs.as_ref()?;
        let key = format!("image:{id}");
        let b: BlobRef = self
            .index
            .get(Tree::Blobs, key.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())?;
        let d = BlobDigest::from_hex(&b.digest)?;
        if !blobs.contains(&d) {
            let _ = self.index.remove(Tree::Blobs, key.as_bytes());
            return None;
        }
        blobs.touch(&d);
        Some(b)
    }

    /// Ids of the external images whose blobs the store holds.
    pub fn base_image_ids(&self) -> Vec<String> {
        let Ok(entries) = self.index.scan_prefix(Tree::Blobs, b"image:") else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|(k, v)| {
                let id = String::from_utf8(k)
                    .ok()?
                    .strip_prefix("image:")?
                    .to_string();
                let b: BlobRef = serde_json::from_slice(&v).ok()?;
                let d = BlobDigest::from_hex(&b.digest)?;
                self.blobs.as_ref()?.contains(&d).then_some(id)
            })
            .collect()
    }

    /// Keeps `digests` (a running build's context) from being swept until the guard drops.
    pub fn pin_blobs(self: &Arc<Self>, digests: impl IntoIterator<Item = String>) -> BlobPins {
        let mut pins = self.pins.lock().unwrap();
        let id = pins.keys().next_back().map_or(0, |k| k + 1);
        pins.insert(id, digests.into_iter().collect());
        BlobPins {
            cache: Arc::clone(self),
            id,
        }
    }

    /// Removes blobs no record in `kept` names, older than `grace` and pinned by no build.
    fn sweep(
        &self,
        blobs: &BlobStore,
        kept: &BTreeSet<&str>,
        grace: Duration,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        // Held to the end: a build pinning its blobs meanwhile waits for the sweep.
        let pins = self.pins.lock().unwrap();
        let pinned: BTreeSet<&String> = pins.values().flatten().collect();
        let now = std::time::SystemTime::now();
        for (d, size) in blobs.list()? {
            let hex = d.to_hex();
            if kept.contains(hex.as_str()) || pinned.contains(&hex) {
                continue;
            }
            let age = blobs
                .metadata(&d)
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            if age >= grace && blobs.remove(&d)? {
                report.unreferenced_removed += 1;
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        *self.last_sweep.lock().unwrap() = Some(std::time::Instant::now());
        Ok(())
    }
}

/// Parses a size: `500MB`, `2GiB`, `1.5G`, `1024` (bytes). Decimal and binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 500MB, 2GiB, 1024)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "{s:?}: unknown size unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult).round() as u64)
}

/// Parses a duration: `30s`, `15m`, `24h`, `7d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30m, 24h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "w" => n * 7 * 86400,
        other => {
            return Err(format!(
                "{s:?}: unknown duration unit {other:?} (use s, m, h, d, w)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_size("lots").is_err());
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("1y").is_err());
    }
}
