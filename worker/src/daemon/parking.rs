//! The handle's side of parking (`park.rs`): parking a stage's images instead of
//! loading them, loading a parked image when something needs it on the daemon, and
//! looking an image up without loading it.
use std::collections::HashMap;
use std::sync::Arc;

use model::task::StageError;

use super::image::{config_id, send_load};
use super::{derr, is_not_found, timed, Daemon, ImageState, NewLayers};

impl Daemon {
    /// Loads `reference` if it is parked (see `park.rs`).
    pub(super) async fn unpark(&self, reference: &str) -> Result<(), StageError> {
        let Some(parked) = &self.parked else {
            return Ok(());
        };
        if parked.peek(reference).is_none() {
            return Ok(());
        }
        let _one = self.unparking.lock().await;
        let warn = |e: std::io::Error| tracing::warn!(error = %e, "could not drop a parked image");
        // Looked up again each time: another task or process may have loaded it (the
        // name is gone) or parked it again (it names another archive) meanwhile.
        for _ in 0..3 {
            let Some(entry) = parked.peek(reference) else {
                return Ok(());
            };
            // What the daemon holds under the name wins: written there since (a rebuild
            // under the same key), the parked name is stale.
            if self.present(reference).await? {
                parked.forget(&[reference.to_string()]).unwrap_or_else(warn);
                return Ok(());
            }
            // Without its base the archive cannot load: it is dropped, and whoever asked
            // finds no such image (a rebuild), not an error.
            if let Some(base) = &entry.base {
                if !self.present(base).await? {
                    tracing::warn!(
                        reference,
                        base,
                        "a parked image's base left the daemon: dropped"
                    );
                    parked.unpark(&entry.archive).unwrap_or_else(warn);
                    return Ok(());
                }
            }
            let (p, archive) = (parked.clone(), entry.archive.clone());
            let read = tokio::task::spawn_blocking(move || p.read(&archive))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match read {
                Ok(bytes) => {
                    if let Err(e) = send_load(&self.docker, bytes).await {
                        parked.unpark(&entry.archive).unwrap_or_else(warn);
                        return Err(StageError::new(format!(
                            "writing the cached image {reference} to the Docker daemon failed \
                             ({}); it is dropped from the cache, so the next build makes it again",
                            e.message
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(StageError::new(format!(
                        "reading the cached image {reference}: {e}"
                    )))
                }
            }
            parked.unpark(&entry.archive).unwrap_or_else(warn);
            return Ok(());
        }
        Err(StageError::new(format!(
            "the cached image {reference} kept changing under another build: run again"
        )))
    }

    /// Whether the daemon holds `reference` (a tag or an image id).
    pub(super) async fn present(&self, reference: &str) -> Result<bool, StageError> {
        Ok(self.daemon_id(reference).await?.is_some())
    }

    /// The id of the image the daemon holds under `reference`, if any (nothing waited
    /// for, nothing loaded).
    pub(super) async fn daemon_id(&self, reference: &str) -> Result<Option<String>, StageError> {
        match timed("inspect_image", self.docker.inspect_image(reference)).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(derr(format!("inspect image {reference}"), e)),
        }
    }

    /// Drops the parked names of images written to the daemon now (see [`Self::unpark`]).
    pub(super) fn unpark_names(&self, names: &[String]) {
        if let Some(parked) = &self.parked {
            if let Err(e) = parked.forget(names) {
                tracing::warn!(error = %e, "could not drop parked names");
            }
        }
    }

    /// The id of `reference` if the daemon holds it or it is parked here (without loading
    /// it). A parked image whose base image left the daemon counts as gone.
    pub async fn peek_id(&self, reference: &str) -> Result<Option<String>, StageError> {
        self.settle_pending(reference).await?;
        if let Some(id) = self.daemon_id(reference).await? {
            return Ok(Some(id));
        }
        let Some(entry) = self.parked.as_ref().and_then(|p| p.peek(reference)) else {
            return Ok(None);
        };
        if let Some(base) = &entry.base {
            if !self.present(base).await? {
                return Ok(None);
            }
        }
        Ok(Some(entry.id))
    }

    /// Parks images instead of loading them (see `park.rs`): `layers` must hold every
    /// layer of theirs that `base` (an image on the daemon) lacks. Returns their ids.
    /// `above` is how many of their bottom layers `base` holds; `whole` the paths a layer
    /// holds whole, by diff id (kept so a `COPY --from` can read the archive's layers).
    pub async fn park(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        layers: &NewLayers,
        base: (usize, Option<&str>),
        whole: &HashMap<String, Arc<Vec<String>>>,
    ) -> Result<Vec<String>, StageError> {
        let parked = self
            .parked
            .as_ref()
            .ok_or_else(|| StageError::new("no directory to park images in"))?;
        let a = self.archive(images, layers)?;
        let mut names = Vec::new();
        let mut ids = Vec::new();
        for (state, tags, comment) in images {
            let id = config_id(&state.to_json(*comment));
            // Its layers above the base, top first, if the archive holds each.
            let top: Option<Vec<super::park::ParkedLayer>> = state
                .layers
                .iter()
                .skip(base.0)
                .rev()
                .map(|d| {
                    Some(super::park::ParkedLayer {
                        file: a.files.get(d)?.clone(),
                        whole: whole.get(d).map(|w| w.to_vec()).unwrap_or_default(),
                    })
                })
                .collect();
            let entry = super::park::ParkedName {
                name: String::new(),
                archive: String::new(),
                id: id.clone(),
                base: base.1.map(str::to_string),
                layers: top.unwrap_or_default(),
            };
            names.extend(tags.iter().map(|t| (t.clone(), entry.clone())));
            names.push((id.clone(), entry));
            ids.push(id);
        }
        let parked = parked.clone();
        tokio::task::spawn_blocking(move || parked.put(&a.bytes, &names))
            .await
            .map_err(|e| StageError::new(format!("park the stage's images: {e}")))?
            .map_err(|e| StageError::new(format!("park the stage's images: {e}")))?;
        Ok(ids)
    }
}
