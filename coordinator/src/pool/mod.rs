//! The worker pool: registered workers, their slots and leases, and the
//! [`Executor`](model::task::Executor) that places each stage task on a worker — a free
//! one that already holds the stage's inputs first. The scheduler drives it exactly as it
//! drives the local executor.
//!
//! - this file: workers, leases, logs and reports;
//! - `place`: the `Executor` (placing a stage, waiting for its report, placing it again
//!   when its worker is lost);
//! - `resolve`: pinning base images through a worker;
//! - `exports`: what each stage must leave in the blob store.
mod exports;
mod place;
mod resolve;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::ids::{TaskId, WorkerId};
use model::keys::StageKey;
use model::task::{BuildInputs, StageError, StageLog, StageResult, StageTask};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::cache::StageCache;
pub use crate::cache::{Artifact, BlobRef, Export};
use crate::sync::lock;
pub use exports::exports;
pub use resolve::PinError;

/// How often workers heartbeat, and how long a silent worker keeps its stages.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may take to pin a build's base images (pulls included).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(600);

/// A task handed to a worker: the stage plus what to import first and export after.
#[derive(Clone)]
pub struct Assignment {
    pub task_id: TaskId,
    pub task: StageTask,
    pub export: Export,
    pub imports: Vec<Artifact>,
    /// External images the task reads, by pinned id, with their blob where the store has
    /// one (the worker loads those its daemon lacks).
    pub base_images: Vec<(String, BlobRef)>,
    pub inputs: BuildInputs,
}

/// A request to pin image references on a worker's daemon.
#[derive(Clone, Debug)]
pub struct ResolveJob {
    pub task_id: TaskId,
    pub references: Vec<String>,
    pub pull: bool,
    /// Image ids the store holds already (the worker does not upload them again).
    pub stored_ids: Vec<String>,
}

/// What goes down a worker's task stream.
#[derive(Clone)]
pub enum Job {
    Stage(Box<Assignment>),
    Resolve(ResolveJob),
}

/// A worker's answer for one reference of a [`ResolveJob`].
#[derive(Clone, Debug)]
pub struct Resolved {
    pub reference: String,
    /// `Err`: why this worker could not resolve it.
    pub id: Result<String, String>,
    /// The image's blob, when the worker uploaded it.
    pub image: Option<BlobRef>,
}

/// How a worker finished a task.
#[derive(Debug)]
pub struct Report {
    pub outcome: Result<StageResult, StageError>,
    pub artifacts: Vec<Artifact>,
}

/// How a placed task ended, as its placement learns it.
#[derive(Debug)]
enum TaskEnd {
    /// The worker reported.
    Reported(Report),
    /// The worker's lease expired first: the stage is placed again.
    WorkerLost(WorkerId),
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub address: String,
    pub slots: usize,
    pub running: usize,
    pub state: &'static str,
}

struct Worker {
    name: WorkerId,
    address: String,
    slots: usize,
    running: BTreeSet<TaskId>,
    last_seen: Instant,
    /// Where assignments go (the worker's open `Tasks` stream).
    queue: Option<mpsc::UnboundedSender<Job>>,
    /// Stage keys whose images the worker's daemon holds.
    holds: BTreeSet<StageKey>,
}

impl Worker {
    fn alive(&self) -> bool {
        self.queue.is_some() && self.last_seen.elapsed() < LEASE_TIMEOUT
    }

    fn has_free_slot(&self) -> bool {
        self.alive() && self.running.len() < self.slots
    }
}

struct Running {
    worker: WorkerId,
    reply: oneshot::Sender<TaskEnd>,
    logs: mpsc::UnboundedSender<StageLog>,
    stage: usize,
    cancelled: bool,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<WorkerId, Worker>,
    running: BTreeMap<TaskId, Running>,
    /// Resolve jobs awaiting their worker's answer: task id → (worker, reply).
    resolving: BTreeMap<TaskId, (WorkerId, oneshot::Sender<Vec<Resolved>>)>,
    next_task: u64,
}

/// Registered workers and the tasks they run. Artifacts workers report go into the
/// stage cache (the coordinator's index and blob store), where later builds find them.
pub struct WorkerPool {
    state: Mutex<State>,
    changed: Notify,
    cache: Arc<StageCache>,
}

impl WorkerPool {
    pub fn new(cache: Arc<StageCache>) -> Arc<Self> {
        Arc::new(WorkerPool {
            state: Mutex::default(),
            changed: Notify::new(),
            cache,
        })
    }

    pub fn cache(&self) -> &Arc<StageCache> {
        &self.cache
    }

    /// Registers (or re-registers) a worker; its id is its name.
    pub fn register(
        &self,
        name: &str,
        address: &str,
        slots: usize,
        holds: Vec<StageKey>,
    ) -> WorkerId {
        let id = WorkerId::from(name);
        let mut st = lock(&self.state);
        let w = st.workers.entry(id.clone()).or_insert_with(|| Worker {
            name: id.clone(),
            address: address.to_string(),
            slots,
            running: BTreeSet::new(),
            last_seen: Instant::now(),
            queue: None,
            holds: BTreeSet::new(),
        });
        w.address = address.to_string();
        w.slots = slots.max(1);
        w.last_seen = Instant::now();
        w.holds.extend(holds);
        drop(st);
        self.changed.notify_waiters();
        id
    }

    /// Opens the worker's assignment queue (its `Tasks` stream).
    pub fn attach(&self, worker: &str) -> Option<mpsc::UnboundedReceiver<Job>> {
        let mut st = lock(&self.state);
        let w = st.workers.get_mut(worker)?;
        let (tx, rx) = mpsc::unbounded_channel();
        w.queue = Some(tx);
        w.last_seen = Instant::now();
        // A resolve job sent down the worker's previous stream gets no answer.
        st.resolving.retain(|_, (name, _)| name.as_str() != worker);
        drop(st);
        self.changed.notify_waiters();
        Some(rx)
    }

    /// Ends every worker's task stream (the coordinator is shutting down).
    pub fn detach_all(&self) {
        let mut st = lock(&self.state);
        for w in st.workers.values_mut() {
            w.queue = None;
        }
        st.resolving.clear();
    }

    /// Renews the worker's lease; returns the task ids it should stop.
    pub fn heartbeat(&self, worker: &str) -> Option<Vec<String>> {
        let mut st = lock(&self.state);
        st.workers.get_mut(worker)?.last_seen = Instant::now();
        Some(
            st.running
                .iter()
                .filter(|(_, r)| r.worker.as_str() == worker && r.cancelled)
                .map(|(id, _)| id.to_string())
                .collect(),
        )
    }

    /// A log line from a worker for one of its tasks.
    pub fn log(&self, worker: &str, task_id: &str, line: String) {
        let st = lock(&self.state);
        if let Some(r) = st
            .running
            .get(task_id)
            .filter(|r| r.worker.as_str() == worker)
        {
            let _ = r.logs.send(StageLog {
                stage: r.stage,
                line,
                placed_on: None,
            });
        }
    }

    /// A worker's result. Refused (false) when the task is not, or no longer, that worker's.
    pub fn report(&self, worker: &str, task_id: &str, report: Report) -> bool {
        let mut st = lock(&self.state);
        match st.running.get(task_id) {
            Some(r) if r.worker.as_str() == worker => {}
            _ => return false,
        }
        let Some(r) = st.running.remove(task_id) else {
            return false;
        };
        if let Some(w) = st.workers.get_mut(worker) {
            w.running.remove(task_id);
            if let Ok(res) = &report.outcome {
                w.holds.insert(res.key);
            }
        }
        drop(st);
        if !report.artifacts.is_empty() {
            if let Err(e) = self.cache.add_artifacts(&report.artifacts, worker) {
                tracing::error!(error = %e, "could not record the stage's artifacts in the index");
            }
        }
        let _ = r.reply.send(TaskEnd::Reported(report));
        self.changed.notify_waiters();
        true
    }

    /// The artifacts of a stage in the blob store (the image has an empty path).
    pub fn artifacts_of(&self, key: &StageKey) -> Vec<Artifact> {
        match self.cache.get(key) {
            Ok(Some(r)) => r.artifacts(),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "index unreadable");
                Vec::new()
            }
        }
    }

    pub fn workers(&self) -> Vec<WorkerStatus> {
        let st = lock(&self.state);
        st.workers
            .values()
            .map(|w| WorkerStatus {
                name: w.name.to_string(),
                address: w.address.clone(),
                slots: w.slots,
                running: w.running.len(),
                state: if !w.alive() {
                    "lost"
                } else if w.running.len() >= w.slots {
                    "busy"
                } else {
                    "ready"
                },
            })
            .collect()
    }

    /// Total slots of the live workers.
    pub fn slots(&self) -> usize {
        let st = lock(&self.state);
        st.workers
            .values()
            .filter(|w| w.alive())
            .map(|w| w.slots)
            .sum()
    }

    /// Fails the tasks of workers whose lease ran out, so the scheduler can place them again.
    pub fn expire_leases(&self) {
        let mut st = lock(&self.state);
        let lost: Vec<WorkerId> = st
            .workers
            .values()
            .filter(|w| w.queue.is_some() && w.last_seen.elapsed() >= LEASE_TIMEOUT)
            .map(|w| w.name.clone())
            .collect();
        for name in &lost {
            tracing::warn!(worker = %name, "worker lease expired; its stages will be placed again");
            // Dropping the reply tells pin_images to ask another worker.
            st.resolving.retain(|_, (worker, _)| worker != name);
            let tasks = match st.workers.get_mut(name) {
                Some(w) => {
                    w.queue = None;
                    std::mem::take(&mut w.running)
                }
                None => continue,
            };
            for t in tasks {
                if let Some(r) = st.running.remove(&t) {
                    let _ = r.reply.send(TaskEnd::WorkerLost(name.clone()));
                }
            }
        }
        if !lost.is_empty() {
            drop(st);
            self.changed.notify_waiters();
        }
    }
}
