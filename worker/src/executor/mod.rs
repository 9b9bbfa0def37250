//! [`DockerExecutor`]: builds one stage on a Docker daemon through the container and
//! image API only (create, put archive, start, wait, commit, load), never the daemon's
//! builder. BuildKit's output for the same Dockerfile is the reference for every rule.
mod config;
mod copy;
mod diff_layer;

mod fetch;
mod layer_read;
mod layers;
mod mounts;
pub use crate::daemon::park;
mod prefetch;
mod run;
mod run_step;
pub mod sha256;
mod stage;
mod steps;
mod tree;
pub mod upper;
mod users;
mod vars;

use std::sync::Arc;

use model::keys::StageKey;
use model::task::{
    stage_image_tag, BuildInputs, Executor, StageError, StageLog, StageResult, StageTask,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::daemon::ImageState;
pub use config::{ImageConfig, DEFAULT_PATH};
pub use vars::StageVars;

use crate::daemon::{Daemon, Resources};
pub(crate) use stage::StageRun;

/// Runs stage tasks on one Docker daemon.
///
/// Guarantees: every container and temporary volume it makes is removed when
/// `run_stage` returns (success, failure or cancel), and every temporary image once the
/// stage's images are written (in the background: [`Self::settle_all`] waits for that);
/// cache-mount volumes (`dbuild-cache-*`) are kept on purpose. Result images are tagged
/// [`instruction_image_tag`](model::task::instruction_image_tag) per instruction and [`stage_image_tag`] per stage.
pub struct DockerExecutor {
    daemon: Daemon,
    name: String,
    locks: run::CacheLocks,
    /// Network mode of a RUN without `--network` (`None`: the daemon's default).
    run_network: Option<String>,
    /// `COPY --from` reads by (image id, path), shared by contents and consumers.
    trees: parking_lot::Mutex<tree::TreeCache>,
}

impl DockerExecutor {
    /// Connects to `docker_host` (`unix://...`, `tcp://...`) or the local default socket,
    /// negotiates the API version and raises the request timeout to 600 s.
    pub async fn connect(docker_host: Option<&str>, name: &str) -> Result<Self, StageError> {
        Ok(DockerExecutor {
            daemon: Daemon::connect(docker_host).await?.for_worker(name),
            name: name.to_string(),
            locks: Default::default(),
            run_network: None,
            trees: Default::default(),
        })
    }

    /// Runs every RUN without `--network` in this Docker network mode (e.g. `none` on
    /// machines without a bridge); `RUN --network=none|host` still wins.
    pub fn with_run_network(mut self, mode: &str) -> Self {
        self.run_network = Some(mode.to_string());
        self
    }

    /// Takes none of the shortcuts open beside the daemon (see [`Self::with_scratch_dir`]):
    /// RUN layers come from the daemon's change list and archive API, and every RUN
    /// gets the daemon's own network sandbox, as on a daemon of another host.
    pub fn without_local_shortcuts(mut self) -> Self {
        self.daemon.local_shortcuts = false;
        self
    }

    /// Takes every local shortcut but reading RUN layers from upper directories (the
    /// daemon's change list instead), as beside a daemon whose storage is not overlay.
    pub fn without_upper_dirs(mut self) -> Self {
        self.daemon.read_upper = false;
        self
    }

    /// Parks the images of stages the build reads only through `COPY --from` under `dir`
    /// instead of loading them (see `park.rs`); a directory that cannot be made turns
    /// parking off.
    pub fn with_park_dir(mut self, dir: &std::path::Path) -> Self {
        match park::Parked::open(dir) {
            Ok(p) => self.daemon.parked = Some(p),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "not parking stage images"),
        }
        self
    }

    /// Where this executor parks images, if it does.
    pub fn parked(&self) -> Option<&park::Parked> {
        self.daemon.parked.as_ref()
    }

    /// Where to write files the daemon bind-mounts into RUN containers (default: the
    /// system's temporary directory). It must be a directory the daemon sees at the same
    /// path; when it refuses one, RUNs go on without the shortcut.
    pub fn with_scratch_dir(mut self, dir: &std::path::Path) -> Self {
        // A bind mount's source is an absolute path.
        self.daemon.scratch = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        self
    }

    /// `path` in `container` with symlinks followed, as COPY follows a source that is
    /// one (the archive API would hand over the link itself).
    pub async fn resolve_path(&self, container: &str, path: &str) -> Result<String, StageError> {
        self.resolve_link(container, path).await
    }

    /// The archive of `path` in image `image_id` as `download_from_container` gives it
    /// (the root entry named after the path's last component, everything below it under
    /// that name), written from the tree the stage's contents left in the tree cache, or
    /// `None` when the cache holds no single tree of bytes for it. Types, modes, owners,
    /// link targets and bytes are the image's; mtimes are 0, as in every layer the
    /// executor writes from a tree, so a consumer's `COPY --from` writes the same layer.
    pub fn cached_path_archive(&self, image_id: &str, path: &str) -> Option<Vec<u8>> {
        let trees = self.trees.lock().get(image_id, &config::clean_abs(path))?;
        let [t] = trees.as_slice() else {
            return None;
        };
        tree::tree_archive(t).ok()?
    }

    /// Waits until every image this executor writes in the background is on the
    /// daemon (before handing an image to anything outside the executor, and before the
    /// process ends); the first failed write is the error.
    pub async fn settle_all(&self) -> Result<(), StageError> {
        self.daemon.settle_all().await
    }

    /// What `COPY --from` reads at `path` (absolute, clean) of the parked image `id`, from
    /// the layers its archive holds ([`layer_read::tree_from_layers`]), without loading it;
    /// `None` when the image is not parked or those layers do not settle the path.
    pub(crate) async fn parked_tree(&self, id: &str, path: &str) -> Option<tree::SourceTree> {
        let parked = self.daemon.parked.clone()?;
        let entry = parked.peek(id)?;
        if entry.layers.is_empty() {
            return None;
        }
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            let wanted: Vec<&str> = entry.layers.iter().map(|l| l.file.as_str()).collect();
            let mut files = parked.layer_files(&entry.archive, &wanted).ok()?;
            let views: Vec<layer_read::LayerView> = entry
                .layers
                .iter()
                .map(|l| layer_read::LayerView {
                    tar: files.remove(&l.file).map(Arc::new),
                    whole: Arc::new(l.whole.clone()),
                })
                .collect();
            layer_read::tree_from_layers(&views, &path)
        })
        .await
        .ok()
        .flatten()
    }

    /// Writes an image of one layer (`layer`, which holds each exported path of
    /// `paths` at its place) under `reference`, in the background, and returns its id at
    /// once (the digest of its config). What `COPY --from` reads at each path is taken
    /// from the path's own archive (`paths`: absolute path, its archive as the archive
    /// API gives it) into the tree cache under that id, so a consumer reads it without
    /// waiting for the load; anything that needs the image on the daemon waits for it.
    pub fn load_paths_image(
        &self,
        reference: &str,
        platform: &str,
        layer: Vec<u8>,
        paths: &[(String, Vec<u8>)],
    ) -> Result<String, StageError> {
        let mut state = ImageState::empty(platform);
        let diff = format!("sha256:{}", sha256::hex(&layer));
        state.layers.push(diff.clone());
        let mut layers = crate::daemon::NewLayers::new();
        layers.insert(diff, Arc::new(layer));
        let (ids, _done) = self
            .daemon
            .load_later(&[(&state, vec![reference.to_string()], None)], &mut layers)?;
        let id = ids.into_iter().next().expect("one image");
        for (path, data) in paths {
            let abs = config::clean_abs(path);
            match tree::tar_tree(data, &abs) {
                // A symlink is read through the image (COPY follows it).
                Ok(t) if !matches!(t.root().kind, tree::Kind::Symlink(_)) => {
                    self.trees.lock().put(&id, &abs, vec![t]);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(path = %abs, error = %e, "artifact not read ahead"),
            }
        }
        Ok(id)
    }

    /// Whether the daemon holds `reference` or it is parked here (not loaded for this).
    pub async fn holds_image(&self, reference: &str) -> bool {
        matches!(self.daemon.peek_id(reference).await, Ok(Some(_)))
    }

    /// Waits until `reference` (a tag or image id), if the executor is writing it in the
    /// background, is on the daemon.
    pub async fn settle(&self, reference: &str) -> Result<(), StageError> {
        self.daemon.settle(reference).await
    }

    /// The daemon handle every Docker call of this executor goes through (the farm
    /// agent's calls go through it too).
    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// The prefix of every container and temporary volume name this executor makes.
    pub fn name_prefix(&self) -> &str {
        &self.daemon.prefix
    }
}

#[async_trait::async_trait]
impl Executor for DockerExecutor {
    fn name(&self) -> &str {
        &self.name
    }

    async fn contents(
        &self,
        image_id: &str,
        paths: &[String],
    ) -> std::collections::BTreeMap<String, String> {
        let res = Resources::default();
        let out = self.image_contents(&res, image_id, paths).await;
        res.cleanup(&self.daemon).await;
        out
    }

    async fn resolve_image(&self, reference: &str, pull: bool) -> Result<String, StageError> {
        if reference.eq_ignore_ascii_case("scratch") {
            return Err(StageError::new(
                "scratch is not an image: it is never resolved",
            ));
        }
        if !pull {
            if let Some((id, _)) = self.daemon.inspect(reference).await? {
                return Ok(id);
            }
        }
        let pull_error = self
            .daemon
            .pull(reference)
            .await
            .err()
            .map(|e| e.to_string());
        let local = self.daemon.inspect(reference).await?;
        match (pull_error, local) {
            (None, Some((id, _))) => Ok(id),
            // `docker build --pull` fails when the registry cannot be asked, even with a
            // copy on the daemon: the user asked for the registry's current image, and a
            // stale local one would be built on silently.
            (Some(e), Some(_)) if pull => Err(StageError::new(format!(
                "--pull: image {reference} could not be pulled ({e}); the Docker daemon of worker {} has a local copy, which --pull does not use: build without --pull to use it, or make the registry reachable",
                self.name
            ))),
            (Some(e), Some((id, _))) => {
                tracing::warn!(image = reference, error = %e, "pull failed; using the local image");
                Ok(id)
            }
            (e, None) => Err(StageError::new(format!(
                "image {reference} is missing on the Docker daemon of worker {} and could not be pulled ({}); provide it with `docker load -i <archive>` or `docker tag <existing-image> {reference}` on that daemon",
                self.name,
                e.unwrap_or_else(|| "no error reported, but the image is still absent".into())
            ))),
        }
    }

    async fn written(&self, image_id: &str) -> Result<(), StageError> {
        // A parked image is written once parked: it is not loaded for this.
        self.daemon.settle_pending(image_id).await
    }

    async fn stage_image(&self, key: &StageKey) -> Option<String> {
        // A parked stage image counts without being loaded: a consumer that needs it on
        // the daemon loads it then.
        self.daemon
            .peek_id(&stage_image_tag(key))
            .await
            .ok()
            .flatten()
    }

    async fn run_stage(
        &self,
        task: StageTask,
        inputs: BuildInputs,
        logs: tokio::sync::mpsc::UnboundedSender<StageLog>,
        cancel: CancellationToken,
    ) -> Result<StageResult, StageError> {
        let res = Resources::default();
        let span = tracing::debug_span!("stage", n = task.stage);
        let result = self
            .stage(&task, &inputs, &logs, &cancel, &res)
            .instrument(span.clone())
            .await;
        // Temporary images may hold layers the stage's background load refers to: they
        // go once it is done (after the containers made from them, removed now).
        let later = res.take_load().map(|load| (load, res.take_images()));
        crate::daemon::timed("cleanup", res.cleanup(&self.daemon))
            .instrument(span)
            .await;
        if let Some((load, images)) = later {
            self.daemon.remove_after_load(load, images);
        }
        match result {
            Err(e) if cancel.is_cancelled() && !e.cancelled => Err(StageError::cancelled()),
            r => r,
        }
    }
}
