//! The scheduler: turns a keyed [`Plan`] into stage tasks and runs every stage the target
//! needs on an [`Executor`], independent stages at the same time, critical path first.
//! It never reads the Dockerfile and never talks to Docker itself.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::{Built, StageCache};
use model::frontend::plan::{Plan, StageRef};
use model::keys::{content_paths, rekey_stage, BaseResolver, StageKey, StageKeys};
use model::task::{
    instruction_image_tag, stage_image_tag, BuildInputs, Executor, StageError, StageLog,
    StageResult, StageTask, TaskBase, TaskInstruction, TaskSource,
};

/// External image references pinned to immutable ids for one build.
#[derive(Debug, Clone, Default)]
pub struct PinnedImages(pub BTreeMap<String, String>);

impl BaseResolver for PinnedImages {
    fn resolve(&self, reference: &str) -> Option<String> {
        self.0.get(reference).cloned()
    }
}

/// Every external image the stages the target needs read: FROM, COPY --from, mount from.
pub fn external_images(plan: &Plan) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        if let StageRef::Image(r) = &s.base {
            out.insert(r.clone());
        }
        for pi in &s.instructions {
            for r in pi.copy_from.iter().chain(pi.mount_from.iter().flatten()) {
                if let StageRef::Image(r) = r {
                    out.insert(r.clone());
                }
            }
        }
    }
    out
}

/// One build as the scheduler sees it.
pub struct BuildRequest {
    pub build_id: String,
    pub plan: Arc<Plan>,
    /// Keys computed with `pinned` as the resolver.
    pub keys: Arc<Vec<StageKeys>>,
    pub pinned: PinnedImages,
    /// Ignore results already on the executor (every stage runs).
    pub no_cache: bool,
    /// Stages that look nothing up (`--no-cache-filter`); their results are still stored.
    pub no_cache_stages: BTreeSet<usize>,
    /// `--network` for RUN (`none`, `host`; `None`: the daemon's default). Not in keys:
    /// like BuildKit, the network a command ran with does not make another result.
    pub network: Option<String>,
    /// What each stage must leave behind for this build's consumers (empty on one
    /// daemon, which needs nothing beyond the images it holds; see `pool::exports`).
    pub exports: BTreeMap<usize, model::task::Export>,
}

impl BuildRequest {
    /// Whether stage `i` is built without looking anything up.
    pub fn skips_cache(&self, i: usize) -> bool {
        self.no_cache || self.no_cache_stages.contains(&i)
    }
}

/// How a stage task ended well: built, or found in the cache after waiting for another
/// build of the same key.
enum Done {
    Built(StageResult),
    Cached(Hit),
}

/// A stage found in the cache: its image id and the contents of the paths its consumers
/// read.
struct Hit {
    image_id: String,
    contents: BTreeMap<String, String>,
}

/// The stage's image id (and the contents of its `digest_paths`) if the cache (or,
/// without one, the executor) can stand in for building it. A hit is counted in the cache.
async fn lookup(
    executor: &dyn Executor,
    cache: Option<&StageCache>,
    task: &StageTask,
) -> Option<Hit> {
    let (image_id, mut contents) = find(executor, cache, task).await?;
    let more = fill_contents(executor, &image_id, &mut contents, &task.digest_paths).await;
    if let (Some(c), false) = (cache, more.is_empty()) {
        if let Err(e) = c.add_contents(&task.key, &image_id, &more) {
            tracing::warn!(error = %e, "could not record a stage's contents");
        }
    }
    Some(Hit { image_id, contents })
}

/// Completes `contents` with the digests of those `paths` it lacks, read by the executor
/// from `image_id`; returns what it added (for the cache record).
pub async fn fill_contents(
    executor: &dyn Executor,
    image_id: &str,
    contents: &mut BTreeMap<String, String>,
    paths: &[String],
) -> BTreeMap<String, String> {
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !contents.contains_key(*p))
        .cloned()
        .collect();
    if missing.is_empty() {
        return BTreeMap::new();
    }
    let more = executor.contents(image_id, &missing).await;
    contents.extend(more.clone());
    more
}

async fn find(
    executor: &dyn Executor,
    cache: Option<&StageCache>,
    task: &StageTask,
) -> Option<(String, BTreeMap<String, String>)> {
    let Some(cache) = cache else {
        let id = executor.stage_image(&task.key).await?;
        return Some((id, BTreeMap::new()));
    };
    let need = &task.export;
    match cache.find(&task.key, need) {
        Ok(Some(record)) => {
            let id = executor.held_image(task, &record.image_id).await?;
            if let Err(e) = cache.count_hit(&task.key, &task.display_name()) {
                tracing::warn!(error = %e, "could not count a cache hit");
            }
            // The record's contents describe its image; another image held under the key
            // (rebuilt by another process) is read as it is.
            let contents = if id == record.image_id {
                record.contents
            } else {
                BTreeMap::new()
            };
            return Some((id, contents));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cache index unreadable: asking the executor"),
    }
    // No usable record, but nothing beyond the image is needed and the executor still
    // holds it (built by a process that could not write the index): reuse it.
    if *need == model::task::Export::default() {
        let id = executor.stage_image(&task.key).await?;
        let name = task.display_name();
        let adopted = cache
            .adopt(&task.key, &name, &id, executor.name(), &stage_tags(task))
            .and_then(|()| cache.count_hit(&task.key, &name));
        if let Err(e) = adopted {
            tracing::warn!(error = %e, "could not record a stage found on the executor");
        }
        return Some((id, BTreeMap::new()));
    }
    None
}

/// The tags naming a stage's images on an executor's daemon.
fn stage_tags(task: &StageTask) -> Vec<String> {
    std::iter::once(stage_image_tag(&task.key))
        .chain(
            task.instructions
                .iter()
                .map(|t| instruction_image_tag(&t.key)),
        )
        .collect()
}

/// A claim on building one stage key (single-flight): an exclusive lock on
/// `<dir>/<key>.lock`, which works across builds in one process and across processes.
/// The holder deletes the file before it lets go, so locks do not pile up; a waiter that
/// then gets the lock on the deleted file sees it no longer at the path and tries again.
enum Claim {
    Held(HeldLock),
    /// No lock could be taken (the directory is unusable): build without one.
    Unavailable,
    Cancelled,
}

/// A held single-flight lock; dropping it deletes the lock file, then unlocks.
struct HeldLock {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `file` (locked) is still the file at `path`.
fn still_at(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

async fn claim(dir: &std::path::Path, key: &StageKey, cancel: &CancellationToken) -> Claim {
    let path = dir.join(format!("{}.lock", key.to_hex()));
    'open: loop {
        let file = std::fs::create_dir_all(dir).and_then(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no single-flight lock");
                return Claim::Unavailable;
            }
        };
        loop {
            match file.try_lock() {
                // The previous holder deleted it on release: lock the new one.
                Ok(()) if !still_at(&file, &path) => continue 'open,
                Ok(()) => return Claim::Held(HeldLock { _file: file, path }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = cancel.cancelled() => return Claim::Cancelled,
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "no single-flight lock");
                    return Claim::Unavailable;
                }
            }
        }
    }
}

/// Progress of a build. Serialized as `{"event": "stage_started", "stage": 0, ...}`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    StageStarted {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
    },
    StageCached {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: String,
    },
    StageFinished {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: String,
        executed: usize,
        reused: usize,
        duration_ms: u64,
        /// Time spent inside RUN commands; the rest is dbuild's and Docker's overhead.
        command_ms: u64,
    },
    StageFailed {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        error: String,
        line: Option<usize>,
        log_tail: Vec<String>,
    },
    Log {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        line: String,
    },
    /// `stage`, `name` and `key` are the target's.
    BuildFinished {
        ok: bool,
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: Option<String>,
        duration_ms: u64,
    },
}

/// How a successful build ended.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub target: usize,
    pub target_key: StageKey,
    /// The target's image id on the executor's daemon.
    pub image_id: String,
    /// Every stage's keys as built: a stage reading another with `COPY --from` is keyed on
    /// the contents it read once that stage is done, so these can differ from the plan's.
    pub keys: Vec<StageKeys>,
    pub results: BTreeMap<usize, StageResult>,
    pub cached: BTreeSet<usize>,
    pub duration: Duration,
}

/// Why a build failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("stage {name} (#{stage}) failed: {error}")]
    Stage {
        stage: usize,
        name: String,
        error: StageError,
    },
    #[error("build cancelled")]
    Cancelled,
}

/// Builds the task for stage `index` of a keyed plan.
pub fn stage_task(req: &BuildRequest, index: usize) -> StageTask {
    let reads = content_paths(&req.plan);
    stage_task_keyed(
        req,
        &req.keys,
        &model::keys::NoContents,
        &BTreeMap::new(),
        reads.get(&index),
        index,
    )
}

/// Builds the task for stage `index` with `all_keys` (the build's current keys), the
/// contents the stages it reads reported (what its `--from` reads are keyed on), the
/// images found or built so far, and the paths later stages read from it.
fn stage_task_keyed(
    req: &BuildRequest,
    all_keys: &[StageKeys],
    contents: &dyn model::keys::Contents,
    done: &BTreeMap<usize, String>,
    read_paths: Option<&BTreeSet<String>>,
    index: usize,
) -> StageTask {
    let plan = &req.plan;
    let stage = &plan.stages[index];
    let keys = &all_keys[index];
    let source = |r: &StageRef| match r {
        StageRef::Scratch => TaskSource::Scratch,
        StageRef::Image(reference) => TaskSource::Image {
            reference: reference.clone(),
            id: req
                .pinned
                .resolve(reference)
                .unwrap_or_else(|| reference.clone()),
        },
        StageRef::Stage(i) => TaskSource::Stage {
            index: *i,
            key: all_keys[*i].key,
            image_id: done.get(i).cloned(),
        },
    };
    let base = match source(&stage.base) {
        TaskSource::Scratch => TaskBase::Scratch,
        TaskSource::Image { reference, id } => TaskBase::Image { reference, id },
        TaskSource::Stage { index, key, .. } => TaskBase::Stage { index, key },
    };
    let instructions = stage
        .instructions
        .iter()
        .zip(&keys.chain[1..])
        .map(|(pi, link)| TaskInstruction {
            instruction: pi.instruction.clone(),
            raw: pi.raw.clone(),
            args: pi.args.clone(),
            key: link.key,
            source: pi.source.clone(),
            line: pi.start_line,
            copy_from: pi.copy_from.as_ref().map(source),
            from_contents: from_contents(pi, link, contents),
            mount_from: pi
                .mount_from
                .iter()
                .map(|m| m.as_ref().map(source))
                .collect(),
        })
        .collect();
    StageTask {
        build_id: req.build_id.clone(),
        stage: index,
        name: stage.name.clone(),
        key: keys.key,
        base,
        platform: stage
            .platform
            .clone()
            .unwrap_or_else(|| plan.platform.to_string()),
        instructions,
        escape: req.plan.escape,
        no_cache: req.skips_cache(index),
        build_args: plan.build_args.clone(),
        network: req.network.clone(),
        digest_paths: read_paths.into_iter().flatten().cloned().collect(),
        park: parkable(plan, index),
        export: req.exports.get(&index).cloned().unwrap_or_default(),
    }
}

/// Whether the build reads stage `index` only through plain `COPY --from` paths (see
/// [`StageTask::park`]).
fn parkable(plan: &model::frontend::plan::Plan, index: usize) -> bool {
    use model::frontend::plan::StageRef;
    if index == plan.target {
        return false;
    }
    let exports = crate::pool::exports(plan, false);
    let mounted = plan
        .stages
        .iter()
        .filter(|s| plan.built[s.index])
        .flat_map(|s| &s.instructions)
        .flat_map(|pi| &pi.mount_from)
        .any(|from| matches!(from, Some(StageRef::Stage(i)) if *i == index));
    matches!(exports.get(&index), Some(e) if !e.image && !e.paths.is_empty()) && !mounted
}

/// The digests an instruction's `--from` reads were keyed on (those its key link names as
/// `content`), by path.
fn from_contents(
    pi: &model::frontend::plan::PlannedInstruction,
    link: &model::keys::ChainLink,
    contents: &dyn model::keys::Contents,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (stage, paths) in model::keys::from_reads(pi) {
        for p in paths.into_iter().flatten() {
            if let Some(d) = contents.digest(stage, &p) {
                if link
                    .inputs
                    .iter()
                    .any(|i| i.value == format!("content {d}"))
                {
                    out.insert(p, d);
                }
            }
        }
    }
    out
}

/// The longest chain of stages from each stage to the target (itself included): what is
/// on the critical path goes first.
fn critical_path(plan: &Plan) -> Vec<usize> {
    let n = plan.stages.len();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for s in &plan.stages {
        for d in &s.depends_on {
            dependents[*d].push(s.index);
        }
    }
    let mut len = vec![1usize; n];
    // Stages only depend on earlier ones, so reverse index order is a topological order.
    for i in (0..n).rev() {
        len[i] = 1 + dependents[i]
            .iter()
            .filter(|d| plan.built[**d])
            .map(|d| len[*d])
            .max()
            .unwrap_or(0);
    }
    len
}

/// Runs builds on one executor, at most `jobs` stages at a time.
pub struct Scheduler {
    executor: Arc<dyn Executor>,
    jobs: usize,
    cache: Option<Arc<StageCache>>,
    flights: Option<std::path::PathBuf>,
}

impl Scheduler {
    pub fn new(executor: Arc<dyn Executor>, jobs: usize) -> Self {
        Scheduler {
            executor,
            jobs: jobs.max(1),
            cache: None,
            flights: None,
        }
    }

    /// Looks stages up in `cache` (a hit needs the executor's agreement, see
    /// [`Executor::holds`]) and records every stage built there. Without a cache the
    /// executor alone says what it still holds.
    pub fn with_cache(mut self, cache: Arc<StageCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Single-flight: a stage key being built by another build (in this process or any
    /// other using `dir`) is waited for and then reused, not built twice.
    pub fn with_single_flight(mut self, dir: std::path::PathBuf) -> Self {
        self.flights = Some(dir);
        self
    }

    /// Builds every stage the target needs and returns the target's image.
    ///
    /// **Cancel safety**: not cancel safe (dropping the future can orphan containers).
    /// Cancel through `cancel` and keep awaiting: running stages are cancelled, cleaned up,
    /// and the result is [`BuildError::Cancelled`]. The first failing stage cancels the others.
    pub async fn run(
        &self,
        req: &BuildRequest,
        inputs: BuildInputs,
        events: mpsc::UnboundedSender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<BuildOutcome, BuildError> {
        let started = Instant::now();
        let plan = &req.plan;
        let worker = self.executor.name().to_string();
        let priority = critical_path(plan);
        let mut pending: BTreeSet<usize> =
            (0..plan.stages.len()).filter(|i| plan.built[*i]).collect();
        let mut done: BTreeMap<usize, String> = BTreeMap::new();
        let mut results = BTreeMap::new();
        let mut cached = BTreeSet::new();
        let mut running: JoinSet<(usize, Result<Done, StageError>, String)> = JoinSet::new();
        // Claims held until the executor has written a built stage's image (see
        // `Executor::written`); all are let go before the build ends.
        let releases: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let stages_cancel = cancel.child_token();
        let mut failure: Option<BuildError> = None;
        let ev = |e: BuildEvent| {
            let _ = events.send(e);
        };
        // Keys as built: a stage is re-keyed when it becomes ready, on the final keys and
        // reported contents of the stages it reads.
        let mut keys: Vec<StageKeys> = req.keys.to_vec();
        let mut contents: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
        let mut rekeyed: BTreeSet<usize> = BTreeSet::new();
        // What later stages read from each stage, which it reports the contents of.
        let reads = content_paths(plan);
        let key_hex = |keys: &[StageKeys], i: usize| keys[i].key.to_hex();
        let name = |i: usize| plan.stages[i].name.clone();

        loop {
            // Start every ready stage while there are free slots, critical path first.
            if failure.is_none() && !cancel.is_cancelled() {
                let mut ready: Vec<usize> = pending
                    .iter()
                    .copied()
                    .filter(|i| {
                        plan.stages[*i]
                            .depends_on
                            .iter()
                            .all(|d| done.contains_key(d))
                    })
                    .collect();
                ready.sort_by_key(|i| (std::cmp::Reverse(priority[*i]), *i));
                for i in ready {
                    // Once, when ready (it may wait for a slot and come round again).
                    if rekeyed.insert(i) {
                        keys[i] =
                            rekey_stage(plan, i, &keys, &inputs.manifest, &req.pinned, &contents);
                    }
                    let task = stage_task_keyed(req, &keys, &contents, &done, reads.get(&i), i);
                    if !req.skips_cache(i) {
                        if let Some(hit) =
                            lookup(&*self.executor, self.cache.as_deref(), &task).await
                        {
                            pending.remove(&i);
                            ev(BuildEvent::StageCached {
                                stage: i,
                                name: name(i),
                                key: key_hex(&keys, i),
                                worker: worker.clone(),
                                image_id: hit.image_id.clone(),
                            });
                            cached.insert(i);
                            contents.insert(i, hit.contents);
                            done.insert(i, hit.image_id);
                            continue;
                        }
                    }
                    if running.len() >= self.jobs {
                        break;
                    }
                    pending.remove(&i);
                    // An executor that places stages announces the worker it chose; the
                    // stage starts (for progress) when it is placed.
                    let places = self.executor.places_stages();
                    let executor = Arc::clone(&self.executor);
                    let inputs = inputs.clone();
                    let token = stages_cancel.child_token();
                    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<StageLog>();
                    let events = events.clone();
                    let (n, k, w) = (name(i), key_hex(&keys, i), worker.clone());
                    let cache = self.cache.clone();
                    let flights = self.flights.clone();
                    let releases = Arc::clone(&releases);
                    running.spawn(async move {
                        // A --no-cache build claims the key too (it never reuses), so two
                        // builders never write one key's image and record at once.
                        let claim = match &flights {
                            Some(dir) => match claim(dir, &task.key, &token).await {
                                Claim::Cancelled => return (i, Err(StageError::cancelled()), w),
                                // Whoever held the key may have finished it since this
                                // build looked (waiting or not): look again.
                                Claim::Held(held) => {
                                    if !task.no_cache {
                                        if let Some(hit) =
                                            lookup(&*executor, cache.as_deref(), &task).await
                                        {
                                            return (i, Ok(Done::Cached(hit)), w);
                                        }
                                    }
                                    Some(held)
                                }
                                Claim::Unavailable => None,
                            },
                            None => None,
                        };
                        if !places {
                            let _ = events.send(BuildEvent::StageStarted {
                                stage: i,
                                name: n.clone(),
                                key: k.clone(),
                                worker: w.clone(),
                            });
                        }
                        let (stage_key, stage_name) = (task.key, task.display_name());
                        let tags = stage_tags(&task);
                        // Forward logs here, so all of a stage's lines precede its result.
                        let mut w = w;
                        let mut forward = |l: StageLog| {
                            if let Some(placed) = l.placed_on {
                                w = placed;
                                let _ = events.send(BuildEvent::StageStarted {
                                    stage: l.stage,
                                    name: n.clone(),
                                    key: k.clone(),
                                    worker: w.clone(),
                                });
                                return;
                            }
                            let _ = events.send(BuildEvent::Log {
                                stage: l.stage,
                                name: n.clone(),
                                key: k.clone(),
                                worker: w.clone(),
                                line: l.line,
                            });
                        };
                        let run = executor.run_stage(task, inputs, log_tx, token);
                        tokio::pin!(run);
                        let r = loop {
                            tokio::select! {
                                r = &mut run => break r,
                                Some(l) = log_rx.recv() => forward(l),
                            }
                        };
                        while let Ok(l) = log_rx.try_recv() {
                            forward(l);
                        }
                        // Recorded before the claim is released, so a build waiting for
                        // this key finds the record.
                        if let (Ok(res), Some(c)) = (&r, &cache) {
                            if let Err(e) = c.stage_built(&Built {
                                key: &stage_key,
                                name: &stage_name,
                                image_id: &res.image_id,
                                image_size: res.size,
                                duration: res.duration,
                                worker: &w,
                                tags: &tags,
                                contents: &res.contents,
                            }) {
                                tracing::warn!(error = %e, "could not record the stage in the cache");
                            }
                        }
                        if let (Ok(res), Some(claim)) = (&r, claim) {
                            let (id, executor) = (res.image_id.clone(), Arc::clone(&executor));
                            let release = tokio::spawn(async move {
                                if let Err(e) = executor.written(&id).await {
                                    tracing::warn!(error = %e.message, "a stage image was not written");
                                }
                                drop(claim);
                            });
                            releases.lock().unwrap().push(release);
                        }
                        (i, r.map(Done::Built), w)
                    });
                }
                // Stages that became ready through cache hits: go round again.
                if running.is_empty()
                    && pending.iter().any(|i| {
                        plan.stages[*i]
                            .depends_on
                            .iter()
                            .all(|d| done.contains_key(d))
                    })
                {
                    continue;
                }
            }
            if running.is_empty() {
                break;
            }
            let joined = tokio::select! {
                j = running.join_next() => j,
                _ = cancel.cancelled(), if !stages_cancel.is_cancelled() => {
                    stages_cancel.cancel();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            let (i, result, placed) = match joined {
                Ok(r) => r,
                Err(e) => {
                    failure.get_or_insert(BuildError::Stage {
                        stage: usize::MAX,
                        name: "?".into(),
                        error: StageError::new(format!("stage task panicked: {e}")),
                    });
                    stages_cancel.cancel();
                    continue;
                }
            };
            match result {
                Ok(Done::Cached(hit)) => {
                    ev(BuildEvent::StageCached {
                        stage: i,
                        name: name(i),
                        key: key_hex(&keys, i),
                        worker: placed,
                        image_id: hit.image_id.clone(),
                    });
                    cached.insert(i);
                    contents.insert(i, hit.contents);
                    done.insert(i, hit.image_id);
                }
                Ok(Done::Built(r)) => {
                    ev(BuildEvent::StageFinished {
                        stage: i,
                        name: name(i),
                        key: key_hex(&keys, i),
                        worker: placed,
                        image_id: r.image_id.clone(),
                        executed: r.executed,
                        reused: r.reused,
                        duration_ms: r.duration.as_millis() as u64,
                        command_ms: r.command_time.as_millis() as u64,
                    });
                    done.insert(i, r.image_id.clone());
                    contents.insert(i, r.contents.clone());
                    results.insert(i, r);
                }
                Err(error) => {
                    let cancelled = error.cancelled;
                    ev(BuildEvent::StageFailed {
                        stage: i,
                        name: name(i),
                        key: key_hex(&keys, i),
                        worker: placed,
                        error: error.message.clone(),
                        line: error.line,
                        log_tail: error.log_tail.clone(),
                    });
                    if !cancelled && failure.is_none() {
                        failure = Some(BuildError::Stage {
                            stage: i,
                            name: plan.stages[i].display_name(),
                            error,
                        });
                    }
                    stages_cancel.cancel();
                }
            }
        }
        let claimed = std::mem::take(&mut *releases.lock().unwrap());
        for release in claimed {
            let _ = release.await;
        }
        let duration = started.elapsed();
        let target = plan.target;
        let outcome = match (failure, done.get(&target)) {
            (Some(f), _) => Err(f),
            (None, Some(id)) => Ok(BuildOutcome {
                target,
                target_key: keys[target].key,
                image_id: id.clone(),
                keys: keys.clone(),
                results,
                cached,
                duration,
            }),
            (None, None) => Err(BuildError::Cancelled),
        };
        ev(BuildEvent::BuildFinished {
            ok: outcome.is_ok(),
            stage: target,
            name: name(target),
            key: key_hex(&keys, target),
            worker,
            image_id: outcome.as_ref().ok().map(|o| o.image_id.clone()),
            duration_ms: duration.as_millis() as u64,
        });
        outcome
    }
}
