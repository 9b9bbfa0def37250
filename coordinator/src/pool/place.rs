//! The pool as an [`Executor`]: a stage is placed on a live worker with a free slot (the
//! one holding most of its inputs first), sent with the artifacts and base images it
//! needs, and awaited; a stage whose worker is lost is placed again.
use std::collections::{BTreeMap, BTreeSet};

use model::ids::{TaskId, WorkerId};
use model::keys::StageKey;
use model::task::{
    BuildInputs, Executor, StageError, StageLog, StageResult, StageTask, TaskBase, TaskSource,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Artifact, Assignment, BlobRef, Job, Report, Running, TaskEnd, WorkerPool, HEARTBEAT_INTERVAL,
    LEASE_TIMEOUT,
};
use crate::sync::lock;

/// A stage placed on a worker, its slot taken.
struct Placed {
    worker: WorkerId,
    queue: mpsc::UnboundedSender<Job>,
    imports: Vec<Artifact>,
    task_id: TaskId,
    reply: oneshot::Receiver<TaskEnd>,
}

impl WorkerPool {
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

    /// The stage keys a task reads from other stages (and its first segment, whose
    /// worker holds the images it continues from).
    fn inputs_of(task: &StageTask) -> Vec<StageKey> {
        let mut keys: Vec<StageKey> = task.after.into_iter().collect();
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

    /// Picks a live worker with a free slot, preferring the one holding most inputs, and
    /// takes the slot in the same critical section: two stages never both see one
    /// worker's last free slot.
    fn place(&self, task: &StageTask, logs: &mpsc::UnboundedSender<StageLog>) -> Option<Placed> {
        let inputs = Self::inputs_of(task);
        // Read from the index before taking the lock.
        let held: BTreeMap<StageKey, Vec<Artifact>> =
            inputs.iter().map(|k| (*k, self.artifacts_of(k))).collect();
        let mut st = lock(&self.state);
        let best = st
            .workers
            .values()
            .filter(|w| w.has_free_slot())
            .max_by_key(|w| {
                // The worker that ran the stage's first segment continues from its
                // images; the others would build that part again.
                let continues = task.after.is_some_and(|k| w.holds.contains(&k));
                let held = inputs.iter().filter(|k| w.holds.contains(k)).count();
                (
                    continues,
                    held,
                    std::cmp::Reverse(w.running.len()),
                    std::cmp::Reverse(w.name.clone()),
                )
            })?;
        let (worker, queue) = (best.name.clone(), best.queue.clone()?);
        st.next_task += 1;
        let task_id = TaskId(format!("{}-{}-{}", task.build_id, task.stage, st.next_task));
        let (reply_tx, reply) = oneshot::channel();
        st.running.insert(
            task_id.clone(),
            Running {
                worker: worker.clone(),
                reply: reply_tx,
                logs: logs.clone(),
                stage: task.stage,
                cancelled: false,
            },
        );
        st.workers.get_mut(&worker)?.running.insert(task_id.clone());
        // Every input's artifacts, even those the worker should hold: its daemon may have
        // dropped the image since (its image cap, an operator's prune); it imports only
        // what it lacks.
        let imports = inputs
            .iter()
            .flat_map(|k| held.get(k).cloned().unwrap_or_default())
            .collect();
        Some(Placed {
            worker,
            queue,
            imports,
            task_id,
            reply,
        })
    }

    /// Waits for a free slot (a worker registering, finishing, or being lost) and takes it.
    ///
    /// **Cancel safety**: cancel safe; nothing is placed until it returns.
    async fn place_when_free(
        &self,
        task: &StageTask,
        logs: &mpsc::UnboundedSender<StageLog>,
        cancel: &CancellationToken,
    ) -> Option<Placed> {
        loop {
            let changed = self.changed.notified();
            self.expire_leases();
            if let Some(p) = self.place(task, logs) {
                return Some(p);
            }
            // Cancel safety: every branch may be dropped; a `notified` that is dropped
            // loses nothing, as the next round looks again.
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }

    fn drop_task(&self, task_id: &TaskId, worker: &WorkerId) {
        let mut st = lock(&self.state);
        st.running.remove(task_id);
        if let Some(w) = st.workers.get_mut(worker) {
            w.running.remove(task_id);
        }
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

    /// One resolve job on a live worker (then the next, for what it could not pin).
    async fn pin_images(
        &self,
        references: &[String],
        pull: bool,
    ) -> Result<BTreeMap<String, String>, StageError> {
        self.resolve_on_workers(references, pull)
            .await
            .map_err(|e| StageError::new(e.to_string()))
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
            let Some(placed) = self.place_when_free(&task, &logs, &cancel).await else {
                return Err(StageError::cancelled());
            };
            let Placed {
                worker,
                queue,
                imports,
                task_id,
                mut reply,
            } = placed;
            let _ = logs.send(StageLog {
                stage: task.stage,
                line: String::new(),
                placed_on: Some(worker.to_string()),
            });
            let assignment = Assignment {
                task_id: task_id.clone(),
                task: task.clone(),
                export: task.export.clone(),
                imports,
                base_images: self.base_images_of(&task),
                inputs: inputs.clone(),
            };
            if queue.send(Job::Stage(Box::new(assignment))).is_err() {
                self.drop_task(&task_id, &worker);
                continue;
            }
            // Cancel safety: `&mut reply` is only borrowed by the select, so the reply
            // survives the cancel branch, which goes on waiting for it.
            let end = tokio::select! {
                r = &mut reply => r,
                _ = cancel.cancelled() => {
                    // The worker learns of the cancel on its next heartbeat; wait for it to
                    // clean up and report, but not for ever.
                    if let Some(r) = lock(&self.state).running.get_mut(&task_id) {
                        r.cancelled = true;
                    }
                    match tokio::time::timeout(LEASE_TIMEOUT * 2, &mut reply).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.drop_task(&task_id, &worker);
                            return Err(StageError::cancelled());
                        }
                    }
                }
            };
            match end {
                Ok(TaskEnd::Reported(Report { outcome, .. })) => return outcome,
                Ok(TaskEnd::WorkerLost(lost)) if !cancel.is_cancelled() => {
                    let _ = logs.send(StageLog {
                        stage: task.stage,
                        line: format!("worker {lost} stopped answering; placing the stage again"),
                        placed_on: None,
                    });
                }
                Ok(TaskEnd::WorkerLost(lost)) => {
                    return Err(StageError::new(format!("worker {lost} stopped answering")))
                }
                // The reply was dropped without an answer: place the stage again.
                Err(_) => {}
            }
        }
    }
}
