//! `docker load` in the background: a stage's images are written while its consumers
//! start, batched with whatever else waits, and everything that names one of them through
//! the handle waits for its load first (`settle`).
use std::sync::Arc;

use bollard::query_parameters::RemoveImageOptionsBuilder;
use futures::FutureExt;
use model::task::StageError;

use super::image::{config_id, send_load};
use super::{timed, Daemon, ImageState, NewLayers};

/// A background `docker load` (and the removal of the temporary images whose layers it
/// refers to), awaited by whoever needs one of its images.
pub type LoadDone =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<(), StageError>>>;

impl Daemon {
    /// [`Self::load`] in the background: returns the ids the images will have (a loaded
    /// image's id is the digest of its config), at once. Whoever then names one of the
    /// images or tags through this daemon waits for the load ([`Self::settle`]); the
    /// `temporary` images (whose layers the archive may refer to) are removed after it.
    ///
    /// Loads asked for while one is being sent go together in the next `docker load`.
    /// The daemon takes concurrent loads one at a time anyway (six one-layer stage images
    /// loaded at once took 0.3-0.46 s each here, one alone 0.1 s), and one archive of
    /// several images costs it about half as much per image as separate loads: the
    /// final stage of a fan-out no longer waits behind its inputs' loads one by one.
    pub fn load_later(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        new_layers: &mut NewLayers,
    ) -> Result<(Vec<String>, LoadDone), StageError> {
        let mut layers = NewLayers::new();
        for (state, _, _) in images {
            for diff in &state.layers {
                if let Some(data) = new_layers.remove(diff) {
                    layers.insert(diff.clone(), data);
                }
            }
        }
        let ids: Vec<String> = images
            .iter()
            .map(|(state, _, comment)| config_id(&state.to_json(*comment)))
            .collect();
        let names: Vec<String> = images
            .iter()
            .flat_map(|(_, tags, _)| tags.iter().cloned())
            .chain(ids.iter().cloned())
            .collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: LoadDone = async move {
            rx.await
                .unwrap_or_else(|_| Err(StageError::new("the image writer stopped")))
        }
        .boxed()
        .shared();
        let start = {
            let mut q = self.queue.lock();
            q.waiting.push(QueuedLoad {
                images: images
                    .iter()
                    .map(|(s, t, c)| ((*s).clone(), t.clone(), c.map(str::to_string)))
                    .collect(),
                layers,
                done: tx,
            });
            !std::mem::replace(&mut q.sending, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.send_queued().await });
        }
        self.track(names.clone(), done.clone());
        self.unpark_names(&names);
        Ok((ids, done))
    }

    /// Sends the queued background loads, all that wait as one archive, until none is left.
    async fn send_queued(&self) {
        loop {
            let batch = {
                let mut q = self.queue.lock();
                if q.waiting.is_empty() {
                    q.sending = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let result = self.send_batch(&batch).await;
            if result.is_err() && batch.len() > 1 {
                // Each on its own, so a failure is reported to the load it belongs to
                // (those the batch wrote are written again at no cost).
                for one in batch {
                    let r = self.send_batch(std::slice::from_ref(&one)).await;
                    let _ = one.done.send(r);
                }
                continue;
            }
            for one in batch {
                let _ = one.done.send(result.clone());
            }
        }
    }

    async fn send_batch(&self, batch: &[QueuedLoad]) -> Result<(), StageError> {
        let mut layers = NewLayers::new();
        let mut images = Vec::new();
        for one in batch {
            layers.extend(one.layers.iter().map(|(d, l)| (d.clone(), l.clone())));
            images.extend(
                one.images
                    .iter()
                    .map(|(s, t, c)| (s, t.clone(), c.as_deref())),
            );
        }
        let a = self.archive(&images, &layers)?;
        send_load(&self.docker, a.bytes).await
    }

    /// Removes the temporary `images` (whose layers the background `load` may refer to)
    /// once that load is done; [`Self::settle_all`] waits for this too.
    pub fn remove_after_load(&self, load: LoadDone, images: Vec<String>) {
        if images.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        let name = self.unique("temporaries");
        let done: LoadDone = async move {
            let _ = load.await;
            for i in images.iter().rev() {
                let opts = RemoveImageOptionsBuilder::default().noprune(true).build();
                let _ = timed("rm_image", docker.remove_image(i, Some(opts), None)).await;
            }
            Ok(())
        }
        .boxed()
        .shared();
        self.track(vec![name], done);
    }

    pub(super) fn pending_load(&self, reference: &str) -> Option<LoadDone> {
        self.pending.lock().get(reference).cloned()
    }

    /// Registers `done` under `names` until it finishes, and drives it.
    pub(super) fn track(&self, names: Vec<String>, done: LoadDone) {
        {
            let mut pending = self.pending.lock();
            for n in &names {
                pending.insert(n.clone(), done.clone());
            }
        }
        let pending = Arc::clone(&self.pending);
        tokio::spawn(async move {
            if let Err(e) = done.clone().await {
                // Left in place: whoever names these images (or waits for all writes)
                // gets this error, not a missing image.
                tracing::warn!(error = %e, images = ?names, "a background docker load failed");
                return;
            }
            let mut p = pending.lock();
            for n in &names {
                if p.get(n).is_some_and(|f| f.ptr_eq(&done)) {
                    p.remove(n);
                }
            }
        });
    }

    /// Makes sure the daemon holds `reference` (a tag or an image id) if this executor
    /// wrote it: waits for a background load that writes it, if one is running (its
    /// failure is this call's error), and loads it if it is parked.
    pub async fn settle(&self, reference: &str) -> Result<(), StageError> {
        self.settle_pending(reference).await?;
        self.unpark(reference).await
    }

    /// Waits for a background load that writes `reference` (a tag or an image id), if
    /// one is running; its failure is this call's error.
    pub async fn settle_pending(&self, reference: &str) -> Result<(), StageError> {
        match self.pending_load(reference) {
            Some(done) => done
                .await
                .map_err(|e| StageError::new(format!("writing the image {reference} failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits for every background load; the first failure is the error.
    pub async fn settle_all(&self) -> Result<(), StageError> {
        let all: Vec<LoadDone> = self.pending.lock().values().cloned().collect();
        let mut first = Ok(());
        for done in all {
            if let Err(e) = done.await {
                if first.is_ok() {
                    first = Err(StageError::new(format!(
                        "writing a stage image failed: {e}"
                    )));
                }
            }
        }
        first
    }
}

/// Background loads waiting for the one being sent (see [`Daemon::load_later`]).
#[derive(Default)]
pub(super) struct LoadQueue {
    waiting: Vec<QueuedLoad>,
    /// Whether a task is sending (it takes whatever waits when its load is done).
    sending: bool,
}

pub(super) struct QueuedLoad {
    images: Vec<(ImageState, Vec<String>, Option<String>)>,
    /// The layers the daemon does not have yet that these images name.
    layers: NewLayers,
    done: tokio::sync::oneshot::Sender<Result<(), StageError>>,
}
