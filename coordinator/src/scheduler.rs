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

use crate::frontend::plan::{Plan, StageRef};
use crate::keys::{BaseResolver, StageKey, StageKeys};
use crate::task::{
    BuildInputs, Executor, StageError, StageLog, StageResult, StageTask, TaskBase, TaskInstruction,
    TaskSource,
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
    let plan = &req.plan;
    let stage = &plan.stages[index];
    let keys = &req.keys[index];
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
            key: req.keys[*i].key,
        },
    };
    let base = match source(&stage.base) {
        TaskSource::Scratch => TaskBase::Scratch,
        TaskSource::Image { reference, id } => TaskBase::Image { reference, id },
        TaskSource::Stage { index, key } => TaskBase::Stage { index, key },
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
        no_cache: req.no_cache,
        build_args: plan.build_args.clone(),
    }
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
}

impl Scheduler {
    pub fn new(executor: Arc<dyn Executor>, jobs: usize) -> Self {
        Scheduler {
            executor,
            jobs: jobs.max(1),
        }
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
        let mut running: JoinSet<(usize, Result<StageResult, StageError>, String)> = JoinSet::new();
        let stages_cancel = cancel.child_token();
        let mut failure: Option<BuildError> = None;
        let ev = |e: BuildEvent| {
            let _ = events.send(e);
        };
        let key_hex = |i: usize| req.keys[i].key.to_hex();
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
                    if !req.no_cache {
                        if let Some(id) = self.executor.stage_image(&req.keys[i].key).await {
                            pending.remove(&i);
                            ev(BuildEvent::StageCached {
                                stage: i,
                                name: name(i),
                                key: key_hex(i),
                                worker: worker.clone(),
                                image_id: id.clone(),
                            });
                            cached.insert(i);
                            done.insert(i, id);
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
                    if !places {
                        ev(BuildEvent::StageStarted {
                            stage: i,
                            name: name(i),
                            key: key_hex(i),
                            worker: worker.clone(),
                        });
                    }
                    let task = stage_task(req, i);
                    let executor = Arc::clone(&self.executor);
                    let inputs = inputs.clone();
                    let token = stages_cancel.child_token();
                    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<StageLog>();
                    let events = events.clone();
                    let (n, k, w) = (name(i), key_hex(i), worker.clone());
                    running.spawn(async move {
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
                        (i, r, w)
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
                Ok(r) => {
                    ev(BuildEvent::StageFinished {
                        stage: i,
                        name: name(i),
                        key: key_hex(i),
                        worker: placed,
                        image_id: r.image_id.clone(),
                        executed: r.executed,
                        reused: r.reused,
                        duration_ms: r.duration.as_millis() as u64,
                        command_ms: r.command_time.as_millis() as u64,
                    });
                    done.insert(i, r.image_id.clone());
                    results.insert(i, r);
                }
                Err(error) => {
                    let cancelled = error.cancelled;
                    ev(BuildEvent::StageFailed {
                        stage: i,
                        name: name(i),
                        key: key_hex(i),
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
        let duration = started.elapsed();
        let target = plan.target;
        let outcome = match (failure, done.get(&target)) {
            (Some(f), _) => Err(f),
            (None, Some(id)) => Ok(BuildOutcome {
                target,
                target_key: req.keys[target].key,
                image_id: id.clone(),
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
            key: key_hex(target),
            worker,
            image_id: outcome.as_ref().ok().map(|o| o.image_id.clone()),
            duration_ms: duration.as_millis() as u64,
        });
        outcome
    }
}
