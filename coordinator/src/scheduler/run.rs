//! The [`Scheduler`], and one build's loop: start every ready stage (critical path first,
//! at most `jobs` at once) after looking it up, then take each stage's end as it comes.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use model::frontend::plan::StageRef;
use model::keys::{content_paths, rekey_stage, StageKey, StageKeys};
use model::task::{BuildInputs, Executor, StageError, StageTask};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::events::{BuildError, BuildEvent, BuildOutcome};
use super::lookup::{lookup, Done, Hit};
use super::request::{critical_path, split_point, stage_task_keyed, BuildRequest};
use super::stage::{Releases, StageDone, StageJob};
use crate::cache::StageCache;
use crate::sync::lock;

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
    /// [`Executor::held_image`]) and records every stage built there. Without a cache the
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
        let mut build = BuildRun::new(self, req, inputs, events, cancel);
        loop {
            if build.failure.is_none() && !build.cancel.is_cancelled() {
                build.start_ready().await;
                // Stages that became ready through cache hits: go round again.
                if build.running.is_empty() && build.any_ready() {
                    continue;
                }
            }
            if build.running.is_empty() {
                break;
            }
            // Cancel safety: `join_next` is cancel safe (a task that ends meanwhile stays
            // in the set for the next call); the cancel branch only cancels the stages.
            let joined = tokio::select! {
                j = build.running.join_next() => j,
                _ = build.cancel.cancelled(), if !build.stages_cancel.is_cancelled() => {
                    build.stages_cancel.cancel();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            build.stage_ended(joined);
        }
        build.finish().await
    }
}

/// A stage's first segment, run ahead by this build.
struct Segment {
    done: bool,
    key: StageKey,
    /// How many of the stage's instructions it holds.
    len: usize,
}

/// One build's state while the scheduler runs it.
struct BuildRun<'a> {
    scheduler: &'a Scheduler,
    req: &'a BuildRequest,
    inputs: BuildInputs,
    events: mpsc::UnboundedSender<BuildEvent>,
    cancel: CancellationToken,
    /// Cancels the running stages (the build's cancel, or the first failure).
    stages_cancel: CancellationToken,
    started: Instant,
    worker: String,
    priority: Vec<usize>,
    pending: BTreeSet<usize>,
    /// Image ids of the stages found or built so far.
    done: BTreeMap<usize, String>,
    results: BTreeMap<usize, model::task::StageResult>,
    cached: BTreeSet<usize>,
    running: JoinSet<StageDone>,
    /// Claims held until the executor has written a built stage's image (see
    /// `Executor::written`); all are let go before the build ends.
    releases: Releases,
    failure: Option<BuildError>,
    /// Keys as built: a stage is re-keyed when it becomes ready, on the final keys and
    /// reported contents of the stages it reads.
    keys: Vec<StageKeys>,
    contents: BTreeMap<usize, BTreeMap<String, String>>,
    rekeyed: BTreeSet<usize>,
    /// What later stages read from each stage, which it reports the contents of.
    reads: BTreeMap<usize, BTreeSet<String>>,
    /// Stages whose first segment (what comes before their first read of another stage)
    /// this build ran ahead, and whether it is done; its key.
    segments: BTreeMap<usize, Segment>,
    /// Stages whose start was announced (by their first segment).
    announced: BTreeSet<usize>,
}

impl<'a> BuildRun<'a> {
    fn new(
        scheduler: &'a Scheduler,
        req: &'a BuildRequest,
        inputs: BuildInputs,
        events: mpsc::UnboundedSender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Self {
        let plan = &req.plan;
        BuildRun {
            scheduler,
            req,
            inputs,
            events,
            stages_cancel: cancel.child_token(),
            cancel,
            started: Instant::now(),
            worker: scheduler.executor.name().to_string(),
            priority: critical_path(plan),
            pending: (0..plan.stages.len()).filter(|i| plan.built[*i]).collect(),
            done: BTreeMap::new(),
            results: BTreeMap::new(),
            cached: BTreeSet::new(),
            running: JoinSet::new(),
            releases: Arc::default(),
            failure: None,
            keys: req.keys.to_vec(),
            contents: BTreeMap::new(),
            rekeyed: BTreeSet::new(),
            reads: content_paths(plan),
            segments: BTreeMap::new(),
            announced: BTreeSet::new(),
        }
    }

    fn ev(&self, e: BuildEvent) {
        let _ = self.events.send(e);
    }

    fn name(&self, i: usize) -> Option<String> {
        self.req.plan.stages[i].name.clone()
    }

    fn key_hex(&self, i: usize) -> String {
        self.keys[i].key.to_hex()
    }

    fn is_ready(&self, i: usize) -> bool {
        // A stage whose first segment runs waits for it, then continues from its images.
        !matches!(self.segments.get(&i), Some(Segment { done: false, .. }))
            && self.req.plan.stages[i]
                .depends_on
                .iter()
                .all(|d| self.done.contains_key(d))
    }

    /// Whether stage `i`'s base is there (it may start its first segment).
    fn base_ready(&self, i: usize) -> bool {
        match self.req.plan.stages[i].base {
            StageRef::Stage(b) => self.done.contains_key(&b),
            _ => true,
        }
    }

    fn any_ready(&self) -> bool {
        self.pending.iter().any(|i| self.is_ready(*i))
    }

    /// Starts every ready stage while there are free slots, critical path first; a stage
    /// the cache serves is done at once.
    async fn start_ready(&mut self) {
        let mut ready: Vec<usize> = self
            .pending
            .iter()
            .copied()
            .filter(|i| self.is_ready(*i))
            .collect();
        ready.sort_by_key(|i| (std::cmp::Reverse(self.priority[*i]), *i));
        let plan = &self.req.plan;
        for i in ready {
            // Once, when ready (it may wait for a slot and come round again).
            if self.rekeyed.insert(i) {
                self.keys[i] = rekey_stage(
                    plan,
                    i,
                    &self.keys,
                    &self.inputs.manifest,
                    &self.req.pinned,
                    &self.contents,
                );
            }
            let mut task = stage_task_keyed(
                self.req,
                &self.keys,
                &self.contents,
                &self.done,
                self.reads.get(&i),
                i,
            );
            if let Some(seg) = self.segments.get(&i) {
                // Continues from what its first segment built (under --no-cache too).
                task.reuse = seg.len;
                task.after = Some(seg.key);
            }
            if !self.req.skips_cache(i) {
                let executor = &*self.scheduler.executor;
                if let Some(hit) = lookup(executor, self.scheduler.cache.as_deref(), &task).await {
                    self.pending.remove(&i);
                    self.cached_stage(i, self.worker.clone(), hit);
                    continue;
                }
            }
            if self.running.len() >= self.scheduler.jobs {
                break;
            }
            self.pending.remove(&i);
            let record_name = self.req.plan.stages[i].display_name();
            self.spawn(i, task, false, record_name);
        }
        self.start_segments().await;
    }

    /// Runs stage `i`'s task, or its first segment's, on the executor.
    fn spawn(&mut self, i: usize, task: StageTask, segment: bool, record_name: String) {
        let job = StageJob {
            index: i,
            task,
            name: self.name(i),
            key_hex: self.key_hex(i),
            worker: self.worker.clone(),
            executor: Arc::clone(&self.scheduler.executor),
            inputs: self.inputs.clone(),
            events: self.events.clone(),
            cache: self.scheduler.cache.clone(),
            flights: self.scheduler.flights.clone(),
            releases: Arc::clone(&self.releases),
            cancel: self.stages_cancel.child_token(),
            announce: self.announced.insert(i),
            segment,
            record_name,
        };
        self.running.spawn(job.run());
    }

    /// Runs ahead, while there are free slots, the first segment of each stage that
    /// still waits for a stage it reads but whose base is there: its instructions up to
    /// that read need nothing else (BuildKit schedules instructions, not stages). The
    /// stage's own task then reuses what the segment built, instruction by instruction.
    async fn start_segments(&mut self) {
        let plan = &self.req.plan;
        let mut waiting: Vec<usize> = self
            .pending
            .iter()
            .copied()
            .filter(|i| !self.segments.contains_key(i) && !self.is_ready(*i) && self.base_ready(*i))
            .collect();
        waiting.sort_by_key(|i| (std::cmp::Reverse(self.priority[*i]), *i));
        for i in waiting {
            if self.running.len() >= self.scheduler.jobs {
                break;
            }
            let Some(k) = split_point(plan, i) else {
                continue;
            };
            // Keyed as the stage will be: its base's key is final, and nothing before
            // the split reads a stage that is not done.
            let keys = rekey_stage(
                plan,
                i,
                &self.keys,
                &self.inputs.manifest,
                &self.req.pinned,
                &self.contents,
            );
            let mut task =
                stage_task_keyed(self.req, &self.keys, &self.contents, &self.done, None, i);
            task.instructions.truncate(k);
            for (ti, link) in task.instructions.iter_mut().zip(&keys.chain[1..]) {
                ti.key = link.key;
            }
            task.key = StageKey(keys.chain[k].key.0);
            task.park = false;
            task.export = Default::default();
            task.digest_paths = Vec::new();
            let key = task.key;
            // Already built (by an earlier build of this prefix): nothing to run ahead.
            if !self.req.skips_cache(i) && self.scheduler.executor.stage_image(&key).await.is_some()
            {
                self.segments.insert(
                    i,
                    Segment {
                        done: true,
                        key,
                        len: k,
                    },
                );
                continue;
            }
            self.segments.insert(
                i,
                Segment {
                    done: false,
                    key,
                    len: k,
                },
            );
            let record_name = format!(
                "{} (to line {})",
                plan.stages[i].display_name(),
                plan.stages[i].instructions[k - 1].start_line
            );
            self.spawn(i, task, true, record_name);
        }
    }

    fn cached_stage(&mut self, i: usize, worker: String, hit: Hit) {
        self.ev(BuildEvent::StageCached {
            stage: i,
            name: self.name(i),
            key: self.key_hex(i),
            worker,
            image_id: hit.image_id.clone(),
        });
        self.cached.insert(i);
        self.contents.insert(i, hit.contents);
        self.done.insert(i, hit.image_id);
    }

    /// Takes one stage's end: done (built or found), or failed, which cancels the rest.
    fn stage_ended(&mut self, joined: Result<StageDone, tokio::task::JoinError>) {
        let (i, result, placed) = match joined {
            Ok(StageDone {
                index,
                segment: true,
                result,
                worker,
            }) => {
                match result {
                    Ok(_) => {
                        if let Some(seg) = self.segments.get_mut(&index) {
                            seg.done = true;
                        }
                    }
                    Err(error) => self.failed(index, worker, error),
                }
                return;
            }
            Ok(StageDone {
                index,
                result,
                worker,
                ..
            }) => (index, result, worker),
            Err(e) => {
                self.failure.get_or_insert(BuildError::Stage {
                    stage: usize::MAX,
                    name: "?".into(),
                    error: StageError::new(format!("stage task panicked: {e}")),
                });
                self.stages_cancel.cancel();
                return;
            }
        };
        match result {
            Ok(Done::Cached(hit)) => self.cached_stage(i, placed, hit),
            Ok(Done::Built(r)) => {
                self.ev(BuildEvent::StageFinished {
                    stage: i,
                    name: self.name(i),
                    key: self.key_hex(i),
                    worker: placed,
                    image_id: r.image_id.clone(),
                    executed: r.executed,
                    reused: r.reused,
                    duration_ms: r.duration.as_millis() as u64,
                    command_ms: r.command_time.as_millis() as u64,
                });
                self.done.insert(i, r.image_id.clone());
                self.contents.insert(i, r.contents.clone());
                self.results.insert(i, r);
            }
            Err(error) => self.failed(i, placed, error),
        }
    }

    /// Stage `i` (or its first segment) failed: the build fails and the rest stop.
    fn failed(&mut self, i: usize, worker: String, error: StageError) {
        let cancelled = error.cancelled;
        self.ev(BuildEvent::StageFailed {
            stage: i,
            name: self.name(i),
            key: self.key_hex(i),
            worker,
            error: error.message.clone(),
            line: error.line,
            log_tail: error.log_tail.clone(),
        });
        if !cancelled && self.failure.is_none() {
            self.failure = Some(BuildError::Stage {
                stage: i,
                name: self.req.plan.stages[i].display_name(),
                error,
            });
        }
        self.stages_cancel.cancel();
    }

    /// Lets every claim go once its image is written, then says how the build ended.
    async fn finish(mut self) -> Result<BuildOutcome, BuildError> {
        let claimed = std::mem::take(&mut *lock(&self.releases));
        for release in claimed {
            let _ = release.await;
        }
        let duration = self.started.elapsed();
        let target = self.req.plan.target;
        let outcome = match (self.failure.take(), self.done.get(&target)) {
            (Some(f), _) => Err(f),
            (None, Some(id)) => Ok(BuildOutcome {
                target,
                target_key: self.keys[target].key,
                image_id: id.clone(),
                keys: self.keys.clone(),
                results: std::mem::take(&mut self.results),
                cached: std::mem::take(&mut self.cached),
                duration,
            }),
            (None, None) => Err(BuildError::Cancelled),
        };
        self.ev(BuildEvent::BuildFinished {
            ok: outcome.is_ok(),
            stage: target,
            name: self.name(target),
            key: self.key_hex(target),
            worker: self.worker.clone(),
            image_id: outcome.as_ref().ok().map(|o| o.image_id.clone()),
            duration_ms: duration.as_millis() as u64,
        });
        outcome
    }
}
