//! One stage's task, as the scheduler spawns it: take the key's single-flight claim (and
//! look again once it is held), run the stage on the executor while forwarding its logs
//! as events, record what it built, and hold the claim until the image is written.
use std::sync::{Arc, Mutex};

use model::task::{BuildInputs, Executor, StageError, StageLog, StageTask};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::BuildEvent;
use super::flight::{claim, Claim, HeldLock};
use super::lookup::{lookup, stage_tags, Done};
use crate::cache::{Built, StageCache};
use crate::sync::lock;

/// Claims still held for images being written; the build awaits them all before it ends.
pub(super) type Releases = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// Everything one stage's task needs, moved into it.
pub(super) struct StageJob {
    pub index: usize,
    pub task: StageTask,
    pub name: Option<String>,
    pub key_hex: String,
    /// The executor's name; replaced by the worker an executor that places stages chose.
    pub worker: String,
    pub executor: Arc<dyn Executor>,
    pub inputs: BuildInputs,
    pub events: mpsc::UnboundedSender<BuildEvent>,
    pub cache: Option<Arc<StageCache>>,
    pub flights: Option<std::path::PathBuf>,
    pub releases: Releases,
    pub cancel: CancellationToken,
    /// Whether this task's start is the stage's start (not when its first segment
    /// already announced it).
    pub announce: bool,
    /// This task is the stage's first segment, run ahead of the stages it reads.
    pub segment: bool,
    /// The name its cache record gets.
    pub record_name: String,
}

/// What a stage's task returns.
pub(super) struct StageDone {
    pub index: usize,
    pub segment: bool,
    pub result: Result<Done, StageError>,
    /// The worker that ran it.
    pub worker: String,
}

impl StageJob {
    pub(super) async fn run(self) -> StageDone {
        let (index, segment) = (self.index, self.segment);
        let done = |result, worker| StageDone {
            index,
            segment,
            result,
            worker,
        };
        // A --no-cache build claims the key too (it never reuses), so two builders never
        // write one key's image and record at once.
        let claim = match &self.flights {
            Some(dir) => match claim(dir, &self.task.key, &self.cancel).await {
                Claim::Cancelled => return done(Err(StageError::cancelled()), self.worker),
                // Whoever held the key may have finished it since this build looked
                // (waiting or not): look again.
                Claim::Held(held) => {
                    // A segment is looked up by its stage's task instead (per instruction).
                    if !self.task.no_cache && !self.segment {
                        if let Some(hit) =
                            lookup(&*self.executor, self.cache.as_deref(), &self.task).await
                        {
                            return done(Ok(Done::Cached(hit)), self.worker);
                        }
                    }
                    Some(held)
                }
                Claim::Unavailable => None,
            },
            None => None,
        };
        if !self.executor.places_stages() && self.announce {
            self.started(self.worker.clone());
        }
        let (result, worker) = self.build(claim).await;
        done(result.map(Done::Built), worker)
    }

    fn started(&self, worker: String) {
        let _ = self.events.send(BuildEvent::StageStarted {
            stage: self.index,
            name: self.name.clone(),
            key: self.key_hex.clone(),
            worker,
        });
    }

    /// Runs the stage, forwarding its logs here so that all of a stage's lines precede
    /// its result; records a built stage and keeps `claim` until its image is written.
    async fn build(
        &self,
        claim: Option<HeldLock>,
    ) -> (Result<model::task::StageResult, StageError>, String) {
        let task = self.task.clone();
        let (stage_key, stage_name, tags) = (task.key, self.record_name.clone(), stage_tags(&task));
        let mut worker = self.worker.clone();
        let mut forward = |l: StageLog| {
            if let Some(placed) = l.placed_on {
                worker = placed;
                if self.announce {
                    self.started(worker.clone());
                }
                return;
            }
            let _ = self.events.send(BuildEvent::Log {
                stage: l.stage,
                name: self.name.clone(),
                key: self.key_hex.clone(),
                worker: worker.clone(),
                line: l.line,
            });
        };
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<StageLog>();
        let run = self
            .executor
            .run_stage(task, self.inputs.clone(), log_tx, self.cancel.clone());
        tokio::pin!(run);
        // Cancel safety: only `log_rx.recv()` is dropped when the stage finishes first,
        // and `recv` is cancel safe (no line is lost; the rest are drained below). `run`
        // is pinned outside the loop and polled to completion, never dropped.
        let r = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(l) = log_rx.recv() => forward(l),
            }
        };
        while let Ok(l) = log_rx.try_recv() {
            forward(l);
        }
        // Recorded before the claim is released, so a build waiting for this key finds
        // the record.
        if let (Ok(res), Some(c)) = (&r, &self.cache) {
            if let Err(e) = c.stage_built(&Built {
                key: &stage_key,
                name: &stage_name,
                image_id: &res.image_id,
                image_size: res.size,
                duration: res.duration,
                worker: &worker,
                tags: &tags,
                contents: &res.contents,
            }) {
                tracing::warn!(error = %e, "could not record the stage in the cache");
            }
        }
        if let (Ok(res), Some(claim)) = (&r, claim) {
            let (id, executor) = (res.image_id.clone(), Arc::clone(&self.executor));
            let release = tokio::spawn(async move {
                if let Err(e) = executor.written(&id).await {
                    tracing::warn!(error = %e.message, "a stage image was not written");
                }
                drop(claim);
            });
            lock(&self.releases).push(release);
        }
        (r, worker)
    }
}
