//! The worker pool: registered workers, their slots and leases, and the [`Executor`] that
//! places each stage task on a worker — a free one that already holds the stage's inputs
//! first. The scheduler drives it exactly as it drives the local executor.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use model::keys::StageKey;
use model::task::{
    BuildInputs, Executor, StageError, StageLog, StageResult, StageTask, TaskBase, TaskSource,
};

/// How often workers heartbeat, and how long a silent worker keeps its stages.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may take to pin a build's base images (pulls included).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(600);

use crate::cache::StageCache;
pub use crate::cache::{Artifact, BlobRef, Export};

/// A task handed to a worker: the stage plus what to import first and export after.
#[derive(Clone)]
pub struct Assignment {
    pub task_id: String,
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
    pub task_id: String,
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

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    pub address: String,
    pub slots: usize,
    pub running: usize,
    pub state: &'static str,
}

struct Worker {
    name: String,
    address: String,
    slots: usize,
    running: BTreeSet<String>,
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
}

struct Running {
    worker: String,
    reply: oneshot::Sender<Report>,
    logs: mpsc::UnboundedSender<StageLog>,
    stage: usize,
    cancelled: bool,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, Worker>,
    running: BTreeMap<String, Running>,
    /// Per build: what each stage must export.
    /// Resolve jobs awaiting their worker's answer: task id → (worker, reply).
    resolving: BTreeMap<String, (String, oneshot::Sender<Vec<Resolved>>)>,
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
    ) -> String {
        let mut st = self.state.lock().unwrap();
        let w = st
            .workers
            .entry(name.to_string())
            .or_insert_with(|| Worker {
                name: name.to_string(),
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
        name.to_string()
    }

    /// Opens the worker's assignment queue (its `Tasks` stream).
    pub fn attach(&self, worker: &str) -> Option<mpsc::UnboundedReceiver<Job>> {
        let mut st = self.state.lock().unwrap();
        let w = st.workers.get_mut(worker)?;
        let (tx, rx) = mpsc::unbounded_channel();
        w.queue = Some(tx);
        // A resolve job sent down the worker's previous stream gets no answer.
        st.resolving.retain(|_, (name, _)| name != worker);
        let w = st.workers.get_mut(worker)?;
        w.last_seen = Instant::now();
        drop(st);
        self.changed.notify_waiters();
        Some(rx)
    }

    /// Ends every worker's task stream (the coordinator is shutting down).
    pub fn detach_all(&self) {
        let mut st = self.state.lock().unwrap();
        for w in st.workers.values_mut() {
            w.queue = None;
        }
        st.resolving.clear();
    }

    /// Renews the worker's lease; returns the task ids it should stop.
    pub fn heartbeat(&self, worker: &str) -> Option<Vec<String>> {
        let mut st = self.state.lock().unwrap();
        st.workers.get_mut(worker)?.last_seen = Instant::now();
        Some(
            st.running
                .iter()
                .filter(|(_, r)| r.worker == worker && r.cancelled)
                .map(|(id, _)| id.clone())
                .collect(),
        )
    }

    /// A log line from a worker for one of its tasks.
    pub fn log(&self, worker: &str, task_id: &str, line: String) {
        let st = self.state.lock().unwrap();
        if let Some(r) = st.running.get(task_id).filter(|r| r.worker == worker) {
            let _ = r.logs.send(StageLog {
                stage: r.stage,
                line,
                placed_on: None,
            });
        }
    }

    /// A worker's result. Refused (false) when the task is not, or no longer, that worker's.
    pub fn report(&self, worker: &str, task_id: &str, report: Report) -> bool {
        let mut st = self.state.lock().unwrap();
        match st.running.get(task_id) {
            Some(r) if r.worker == worker => {}
            _ => return false,
        }
        let r = st.running.remove(task_id).expect("checked");
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
        let _ = r.reply.send(report);
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
        let st = self.state.lock().unwrap();
        st.workers
            .values()
            .map(|w| WorkerStatus {
                name: w.name.clone(),
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
        let st = self.state.lock().unwrap();
        st.workers
            .values()
            .filter(|w| w.alive())
            .map(|w| w.slots)
            .sum()
    }

    /// Fails the tasks of workers whose lease ran out, so the scheduler can place them again.
    pub fn expire_leases(&self) {
        let mut st = self.state.lock().unwrap();
        let lost: Vec<String> = st
            .workers
            .values()
            .filter(|w| w.queue.is_some() && w.last_seen.elapsed() >= LEASE_TIMEOUT)
            .map(|w| w.name.clone())
            .collect();
        for name in &lost {
            tracing::warn!(worker = %name, "worker lease expired; its stages will be placed again");
            let w = st.workers.get_mut(name).expect("listed");
            w.queue = None;
            // Dropping the reply tells pin_images to ask another worker.
            st.resolving.retain(|_, (worker, _)| worker != name);
            let w = st.workers.get_mut(name).expect("listed");
            let tasks: Vec<String> = std::mem::take(&mut w.running).into_iter().collect();
            for t in tasks {
                if let Some(r) = st.running.remove(&t) {
                    let _ = r.reply.send(Report {
                        outcome: Err(StageError::new(format!("worker {name} stopped answering"))),
                        artifacts: Vec::new(),
                    });
                }
            }
        }
        if !lost.is_empty() {
            drop(st);
            self.changed.notify_waiters();
        }
    }

    /// Pins external image references to ids: asks a live worker to resolve them on its
    /// daemon (and upload each image the store lacks), and asks the next worker for those
    /// it could not resolve, so a mixed farm resolves what any of its daemons holds. Waits
    /// for a worker when none is live. The error names each reference and every worker's
    /// answer.
    pub async fn pin_images(
        &self,
        references: &[String],
        pull: bool,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut remaining: Vec<String> = references.to_vec();
        let mut pinned = BTreeMap::new();
        let mut tried: BTreeSet<String> = BTreeSet::new();
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while !remaining.is_empty() {
            let (worker, queue) = loop {
                let changed = self.changed.notified();
                self.expire_leases();
                let choice = {
                    let st = self.state.lock().unwrap();
                    st.workers
                        .values()
                        .filter(|w| w.alive() && !tried.contains(&w.name))
                        .min_by_key(|w| (w.running.len(), w.name.clone()))
                        .and_then(|w| Some((w.name.clone(), w.queue.clone()?)))
                };
                match choice {
                    Some(c) => break c,
                    None if !tried.is_empty() => {
                        let why: Vec<String> = remaining
                            .iter()
                            .map(|r| {
                                let e = errors.get(r).map(|e| e.join("; "));
                                format!("{r}: {}", e.unwrap_or_else(|| "no answer".into()))
                            })
                            .collect();
                        return Err(format!(
                            "no worker could resolve the base image: {}",
                            why.join("; ")
                        ));
                    }
                    None => tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                    },
                }
            };
            tried.insert(worker.clone());
            let (tx, rx) = oneshot::channel();
            let task_id = {
                let mut st = self.state.lock().unwrap();
                st.next_task += 1;
                let id = format!("resolve-{}", st.next_task);
                st.resolving.insert(id.clone(), (worker.clone(), tx));
                id
            };
            let job = ResolveJob {
                task_id: task_id.clone(),
                references: remaining.clone(),
                pull,
                stored_ids: self.cache.base_image_ids(),
            };
            if queue.send(Job::Resolve(job)).is_err() {
                self.state.lock().unwrap().resolving.remove(&task_id);
                continue;
            }
            // A lost worker drops the reply (expire_leases); a pull may take long, but a
            // worker whose answer never comes (it could not report) is given up on.
            let mut rx = rx;
            let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
            let answers = loop {
                tokio::select! {
                    r = &mut rx => break r.ok(),
                    _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => self.expire_leases(),
                    _ = tokio::time::sleep_until(deadline) => {
                        self.state.lock().unwrap().resolving.remove(&task_id);
                        for r in &remaining {
                            errors.entry(r.clone()).or_default().push(format!(
                                "worker {worker}: no answer in {} s",
                                RESOLVE_TIMEOUT.as_secs()
                            ));
                        }
                        break None;
                    }
                }
            };
            let Some(answers) = answers else { continue };
            for a in answers {
                match a.id {
                    Ok(id) => {
                        remaining.retain(|r| *r != a.reference);
                        pinned.insert(a.reference, id);
                    }
                    Err(e) => errors
                        .entry(a.reference)
                        .or_default()
                        .push(format!("worker {worker}: {e}")),
                }
            }
        }
        Ok(pinned)
    }

    /// A worker's answer to a resolve job: records the images it uploaded. Refused (false)
    /// when the job is not, or no longer, that worker's.
    pub fn report_resolved(&self, worker: &str, task_id: &str, answers: Vec<Resolved>) -> bool {
        let mut st = self.state.lock().unwrap();
        match st.resolving.get(task_id) {
            Some((w, _)) if w == worker => {}
            _ => return false,
        }
        let (_, reply) = st.resolving.remove(task_id).expect("checked");
        drop(st);
        for a in &answers {
            if let (Ok(id), Some(blob)) = (&a.id, &a.image) {
                if let Err(e) = self.cache.set_base_image(id, blob) {
                    tracing::error!(error = %e, "could not record a base image blob");
                }
            }
        }
        let _ = reply.send(answers);
        true
    }

    /// The external images a task reads, pinned, with the blobs the store has for them.
    fn base_images_of(&self, task: &StageTask) -> Vec<(String, BlobRef)> {
        let mut ids: BTreeSet<&str> = BTreeSet::new();
        if let TaskBase::Image { id, .. } = &task.base {
            ids.insert(id);
        }
        for ti in &task.instructions {
            for s in ti.copy_from.iter().chain(ti.mount_from.iter().flatten()) {
                if let TaskSource::Image { id, .. } = s {
                    ids.insert(id);
                }
            }
        }
        ids.into_iter()
            .filter_map(|id| Some((id.to_string(), self.cache.base_image(id)?)))
            .collect()
    }

    /// The stage keys a task reads from other stages.
    fn inputs_of(task: &StageTask) -> Vec<StageKey> {
        let mut keys = Vec::new();
        if let TaskBase::Stage { key, .. } = &task.base {
            keys.push(*key);
        }
        for ti in &task.instructions {
            for s in ti.copy_from.iter().chain(ti.mount_from.iter().flatten()) {
                if let TaskSource::Stage { key, .. } = s {
                    keys.push(*key);
                }
            }
        }
        keys
    }

    /// Picks a live worker with a free slot, preferring the one holding most inputs.
    fn place(
        &self,
        task: &StageTask,
    ) -> Option<(String, mpsc::UnboundedSender<Job>, Vec<Artifact>)> {
        let inputs = Self::inputs_of(task);
        let held: BTreeMap<StageKey, Vec<Artifact>> =
            inputs.iter().map(|k| (*k, self.artifacts_of(k))).collect();
        let st = self.state.lock().unwrap();
        let best = st
            .workers
            .values()
            .filter(|w| w.alive() && w.running.len() < w.slots)
            .max_by_key(|w| {
                let held = inputs.iter().filter(|k| w.holds.contains(k)).count();
                (
                    held,
                    std::cmp::Reverse(w.running.len()),
                    std::cmp::Reverse(w.name.clone()),
                )
            })?;
        // Every input's artifacts, even those the worker should hold: its daemon may have
        // dropped the image since (its image cap, an operator's prune); it imports only
        // what it lacks.
        let imports = inputs
            .iter()
            .flat_map(|k| held.get(k).cloned().unwrap_or_default())
            .collect();
        Some((best.name.clone(), best.queue.clone()?, imports))
    }
}

#[async_trait::async_trait]
impl Executor for WorkerPool {
    fn name(&self) -> &str {
        "farm"
    }

    fn places_stages(&self) -> bool {
        true
    }

    async fn resolve_image(&self, reference: &str, _pull: bool) -> Result<String, StageError> {
        // Workers pin images on their own daemons; the coordinator never talks to Docker.
        Ok(reference.to_string())
    }

    async fn stage_image(&self, key: &StageKey) -> Option<String> {
        self.cache
            .get(key)
            .ok()
            .flatten()
            .map(|r| r.image_id)
            .filter(|id| !id.is_empty())
    }

    /// A record the cache found covers the build's needs with blobs on disk: any worker
    /// can import them, so the record's image stands in.
    async fn held_image(&self, _task: &StageTask, record_image_id: &str) -> Option<String> {
        Some(record_image_id.to_string())
    }

    async fn run_stage(
        &self,
        task: StageTask,
        inputs: BuildInputs,
        logs: mpsc::UnboundedSender<StageLog>,
        cancel: CancellationToken,
    ) -> Result<StageResult, StageError> {
        loop {
            // Wait for a free slot (a worker registering, finishing, or being lost).
            let placed = loop {
                let changed = self.changed.notified();
                self.expire_leases();
                if let Some(p) = self.place(&task) {
                    break p;
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                    _ = cancel.cancelled() => return Err(StageError::cancelled()),
                }
            };
            let (worker, queue, imports) = placed;
            let (reply_tx, reply_rx) = oneshot::channel();
            let task_id = {
                let mut st = self.state.lock().unwrap();
                st.next_task += 1;
                let id = format!("{}-{}-{}", task.build_id, task.stage, st.next_task);
                st.running.insert(
                    id.clone(),
                    Running {
                        worker: worker.clone(),
                        reply: reply_tx,
                        logs: logs.clone(),
                        stage: task.stage,
                        cancelled: false,
                    },
                );
                st.workers
                    .get_mut(&worker)
                    .expect("placed on a known worker")
                    .running
                    .insert(id.clone());
                id
            };
            let export = task.export.clone();
            let _ = logs.send(StageLog {
                stage: task.stage,
                line: String::new(),
                placed_on: Some(worker.clone()),
            });
            if queue
                .send(Job::Stage(Box::new(Assignment {
                    task_id: task_id.clone(),
                    task: task.clone(),
                    export,
                    imports,
                    base_images: self.base_images_of(&task),
                    inputs: inputs.clone(),
                })))
                .is_err()
            {
                self.drop_task(&task_id, &worker);
                continue;
            }
            let reply_rx = reply_rx;
            tokio::pin!(reply_rx);
            let report = tokio::select! {
                r = &mut reply_rx => r,
                _ = cancel.cancelled() => {
                    // The worker learns of the cancel on its next heartbeat; wait for it to
                    // clean up and report, but not for ever.
                    if let Some(r) = self.state.lock().unwrap().running.get_mut(&task_id) {
                        r.cancelled = true;
                    }
                    match tokio::time::timeout(LEASE_TIMEOUT * 2, &mut reply_rx).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.drop_task(&task_id, &worker);
                            return Err(StageError::cancelled());
                        }
                    }
                }
            };
            match report {
                Ok(Report { outcome, .. }) => match outcome {
                    Err(e) if e.message.contains("stopped answering") && !cancel.is_cancelled() => {
                        let _ = logs.send(StageLog {
                            stage: task.stage,
                            line: format!("{}; placing the stage again", e.message),
                            placed_on: None,
                        });
                        continue;
                    }
                    other => return other,
                },
                Err(_) => continue,
            }
        }
    }
}

impl WorkerPool {
    fn drop_task(&self, task_id: &str, worker: &str) {
        let mut st = self.state.lock().unwrap();
        st.running.remove(task_id);
        if let Some(w) = st.workers.get_mut(worker) {
            w.running.remove(task_id);
        }
    }
}

/// What every stage of a plan must export for its consumers on other workers: the image
/// for FROM consumers and the target (when the client wants it back), the copied paths for COPY --from and mount from=
/// consumers (the image when a path has wildcards).
pub fn exports(plan: &model::frontend::plan::Plan, target_image: bool) -> BTreeMap<usize, Export> {
    use model::frontend::instructions::Instruction;
    use model::frontend::plan::StageRef;
    let mut out: BTreeMap<usize, Export> = BTreeMap::new();
    if target_image {
        out.entry(plan.target).or_default().image = true;
    }
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        if let StageRef::Stage(p) = s.base {
            out.entry(p).or_default().image = true;
        }
        for pi in &s.instructions {
            if let (Some(StageRef::Stage(src)), Instruction::Copy(c)) =
                (&pi.copy_from, &pi.instruction)
            {
                let e = out.entry(*src).or_default();
                for p in &c.sources {
                    if p.contains(['*', '?', '[', '$']) {
                        e.image = true;
                    } else {
                        e.paths.insert(absolute(p));
                    }
                }
            }
            if let Instruction::Run(r) = &pi.instruction {
                for (m, from) in r.mounts.iter().zip(&pi.mount_from) {
                    if let Some(StageRef::Stage(src)) = from {
                        let p = m.source.clone().unwrap_or_else(|| "/".into());
                        out.entry(*src).or_default().paths.insert(absolute(&p));
                    }
                }
            }
        }
    }
    out
}

fn absolute(p: &str) -> String {
    let clean = model::keys::clean_source(p);
    format!("/{clean}")
}
