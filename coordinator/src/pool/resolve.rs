//! Pinning a build's external images: a resolve job to one live worker, then the next
//! for what it could not resolve.
use std::collections::{BTreeMap, BTreeSet};

use model::ids::{TaskId, WorkerId};
use tokio::sync::oneshot;

use super::{Job, ResolveJob, Resolved, WorkerPool, HEARTBEAT_INTERVAL, RESOLVE_TIMEOUT};
use crate::sync::lock;

/// No worker could pin every base image; says, per reference, what each worker answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no worker could resolve the base image: {why}")]
pub struct PinError {
    pub why: String,
}

impl WorkerPool {
    /// Pins external image references to ids: asks a live worker to resolve them on its
    /// daemon (and upload each image the store lacks), and asks the next worker for those
    /// it could not resolve, so a mixed farm resolves what any of its daemons holds. Waits
    /// for a worker when none is live. The error names each reference and every worker's
    /// answer.
    pub async fn resolve_on_workers(
        &self,
        references: &[String],
        pull: bool,
    ) -> Result<BTreeMap<String, String>, PinError> {
        let mut remaining: Vec<String> = references.to_vec();
        let mut pinned = BTreeMap::new();
        let mut tried: BTreeSet<WorkerId> = BTreeSet::new();
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while !remaining.is_empty() {
            let (worker, queue) = loop {
                let changed = self.changed.notified();
                self.expire_leases();
                let choice = {
                    let st = lock(&self.state);
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
                        return Err(PinError {
                            why: why.join("; "),
                        });
                    }
                    // Cancel safety: both branches are only waits; the next round looks
                    // at the workers again.
                    None => tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                    },
                }
            };
            tried.insert(worker.clone());
            let (tx, rx) = oneshot::channel();
            let task_id = {
                let mut st = lock(&self.state);
                st.next_task += 1;
                let id = TaskId(format!("resolve-{}", st.next_task));
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
                lock(&self.state).resolving.remove(&task_id);
                continue;
            }
            // A lost worker drops the reply (expire_leases); a pull may take long, but a
            // worker whose answer never comes (it could not report) is given up on.
            let mut rx = rx;
            let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
            let answers = loop {
                // Cancel safety: `rx` is borrowed, so the sleeps winning never drops the
                // answer; a fresh heartbeat sleep each round only paces lease checks.
                tokio::select! {
                    r = &mut rx => break r.ok(),
                    _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => self.expire_leases(),
                    _ = tokio::time::sleep_until(deadline) => {
                        lock(&self.state).resolving.remove(&task_id);
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
        let mut st = lock(&self.state);
        match st.resolving.get(task_id) {
            Some((w, _)) if w.as_str() == worker => {}
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
}
