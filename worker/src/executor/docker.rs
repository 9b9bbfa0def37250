//! The daemon side: connecting, images as (layers, config), loading configs, and the
//! containers, volumes and images a stage makes (removed whatever happens).
//!
//! Why `docker load` for configs: `POST /commit` merges the container's config into the
//! one given (a RUN's command leaks into `Cmd`, nothing can be unset), and creating a
//! container merges the image's config (VOLUMEs become anonymous volumes). So containers
//! are created from a *bare* image (same layers, empty config) and every result image is
//! written with `docker load` from its exact config; the daemon reuses layers it already
//! has by chain id, so the archive holds only JSON.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, ContainerArchiveInfoOptionsBuilder,
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, ImportImageOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, RemoveVolumeOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures::{FutureExt, StreamExt};
use model::task::StageError;
use serde_json::json;

use super::config::ImageConfig;

/// An image as the executor sees it: its layer chain and its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageState {
    /// Uncompressed layer digests (`RootFS.Layers`), bottom first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub author: Option<String>,
}

impl ImageState {
    /// An empty image (no layers) for `os/arch[/variant]`, with an empty config.
    pub fn empty(platform: &str) -> Self {
        let mut parts = platform.split('/');
        ImageState {
            layers: Vec::new(),
            config: ImageConfig::default(),
            os: parts.next().unwrap_or("linux").to_string(),
            architecture: parts.next().unwrap_or("amd64").to_string(),
            variant: parts.next().map(str::to_string),
            author: None,
        }
    }

    /// The image config JSON `docker load` stores (the image id is its sha256).
    pub(crate) fn to_json(&self, comment: Option<&str>) -> Vec<u8> {
        let mut v = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": self.config,
            "rootfs": { "type": "layers", "diff_ids": self.layers },
        });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        if let Some(a) = &self.author {
            v["author"] = json!(a);
        }
        if let Some(c) = comment {
            v["comment"] = json!(c);
        }
        serde_json::to_vec(&v).expect("config serializes")
    }
}

/// Awaits `f`, logging how long it took at debug level (`docker_call`, `what`, `ms`).
pub async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = std::time::Instant::now();
    let out = f.await;
    tracing::debug!(what, ms = t.elapsed().as_secs_f64() * 1000.0, "docker call");
    out
}

/// Whether this process can read the daemon's storage directory
/// (`<DockerRootDir>/<driver>`).
async fn sees_storage(docker: &Docker) -> bool {
    let Ok(info) = docker.info().await else {
        return false;
    };
    let (Some(root), Some(driver)) = (info.docker_root_dir, info.driver) else {
        return false;
    };
    let seen = std::fs::read_dir(std::path::Path::new(&root).join(&driver)).is_ok();
    tracing::debug!(root, driver, seen, "the daemon's storage, seen from here");
    seen
}

/// Whether this process holds `CAP_SYS_ADMIN` (bit 21 of `CapEff` in
/// `/proc/self/status`).
fn has_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

/// Layers written by the executor that the daemon does not have yet: diff id → tar.
pub type NewLayers = HashMap<String, Arc<Vec<u8>>>;

/// A Docker error as a stage error, saying what was being done.
pub fn derr(what: impl std::fmt::Display, e: bollard::errors::Error) -> StageError {
    StageError::new(format!("{what}: {e}"))
}

/// Whether a bollard error is the daemon's 404.
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A file's stat inside a container (`HEAD /containers/{id}/archive`).
#[derive(Debug, Clone)]
pub struct PathStat {
    pub is_dir: bool,
    pub is_symlink: bool,
    /// For a symlink: the target fully resolved inside the container, absolute.
    pub link_target: String,
}

/// Go's `os.ModeDir` and `os.ModeSymlink` bits as Docker sends them.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// Containers, volumes and images made for one stage; `cleanup` removes them all.
#[derive(Default)]
pub struct Resources {
    containers: Mutex<Vec<String>>,
    volumes: Mutex<Vec<String>>,
    images: Mutex<Vec<String>>,
    /// Host directories a container bind-mounts (kept until it is removed: the archive
    /// API mounts them again on every read of the container).
    dirs: Mutex<Vec<tempfile::TempDir>>,
    /// The stage's background image write, if one was started.
    load: Mutex<Option<LoadDone>>,
}

impl Resources {
    pub fn container(&self, id: &str) {
        self.containers.lock().push(id.to_string());
    }
    pub fn volume(&self, name: &str) {
        self.volumes.lock().push(name.to_string());
    }
    pub fn image(&self, reference: &str) {
        self.images.lock().push(reference.to_string());
    }
    /// Keeps `dir` until the containers are removed.
    pub fn keep_dir(&self, dir: tempfile::TempDir) {
        self.dirs.lock().push(dir);
    }
    /// Notes the stage's background image write.
    pub fn set_load(&self, load: LoadDone) {
        *self.load.lock() = Some(load);
    }
    pub fn take_load(&self) -> Option<LoadDone> {
        self.load.lock().take()
    }

    /// Hands the registered images over (to be removed after a background load that
    /// may refer to their layers).
    pub fn take_images(&self) -> Vec<String> {
        std::mem::take(&mut *self.images.lock())
    }

    /// Removes everything registered, containers first (they pin volumes and images),
    /// newest image first (a committed image is the child of the bare one it came from).
    pub async fn cleanup(&self, docker: &Docker) {
        let containers = std::mem::take(&mut *self.containers.lock());
        for c in containers.iter().rev() {
            let opts = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            if let Err(e) = timed("rm_container", docker.remove_container(c, Some(opts))).await {
                if !is_not_found(&e) {
                    tracing::warn!(container = %c, error = %e, "could not remove container");
                }
            }
        }
        self.dirs.lock().clear();
        let volumes = std::mem::take(&mut *self.volumes.lock());
        for v in volumes.iter().rev() {
            let opts = RemoveVolumeOptionsBuilder::default().force(true).build();
            if let Err(e) = docker.remove_volume(v, Some(opts)).await {
                if !is_not_found(&e) {
                    tracing::warn!(volume = %v, error = %e, "could not remove volume");
                }
            }
        }
        let images = std::mem::take(&mut *self.images.lock());
        for i in images.iter().rev() {
            // Never prune: a committed image's parent can be the state's own image (a RUN
            // or COPY container made from it directly), which is not ours to remove. Every
            // image made here is registered and removed explicitly.
            let opts = RemoveImageOptionsBuilder::default().noprune(true).build();
            if let Err(e) = timed("rm_image", docker.remove_image(i, Some(opts), None)).await {
                if !is_not_found(&e) {
                    tracing::debug!(image = %i, error = %e, "could not remove image");
                }
            }
        }
    }
}

/// The daemon connection plus the names this executor gives to what it makes.
#[derive(Clone)]
pub struct Daemon {
    pub docker: Docker,
    /// `dbuild-w-<worker>`: prefix of every container and temporary volume name.
    pub prefix: String,
    counter: Arc<AtomicU64>,
    /// Whether the shortcuts open to a worker beside its daemon may be taken when this
    /// process sees the daemon's storage: a RUN's layer read from the container's upper
    /// directory (`upper.rs`), a `--network=none` RUN without a network sandbox
    /// (`run.rs`). `DBUILD_LOCAL_SHORTCUTS=0` turns them off.
    pub local_shortcuts: bool,
    /// Whether RUN layers may come from upper directories (off: the change list only,
    /// other shortcuts kept; for tests).
    pub read_upper: bool,
    /// Whether the daemon's storage directory is readable here (asked once).
    sees_storage: Arc<tokio::sync::OnceCell<bool>>,
    /// Where files the daemon bind-mounts into a RUN are written (a directory the
    /// daemon sees too: the worker's data directory).
    pub scratch: std::path::PathBuf,
    /// Cleared when the daemon refused a bind mount of `scratch` (it cannot see it).
    pub scratch_visible: Arc<std::sync::atomic::AtomicBool>,
    /// Loads still running in the background, by every tag and image id they write.
    pending: Arc<Mutex<HashMap<String, LoadDone>>>,
    /// Background loads not sent yet (see [`Self::load_later`]).
    queue: Arc<Mutex<LoadQueue>>,
    /// Where stage images no one needs on the daemon yet are parked (`park.rs`), if
    /// anywhere.
    pub parked: Option<super::park::Parked>,
    /// Held while a parked archive is being loaded (one at a time).
    unparking: Arc<tokio::sync::Mutex<()>>,
    /// Whether this process holds `CAP_SYS_ADMIN` (read once, at connect).
    sys_admin: bool,
}

/// A background `docker load` (and the removal of the temporary images whose layers it
/// refers to), awaited by whoever needs one of its images.
pub type LoadDone =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

impl Daemon {
    /// Connects (`unix://`, `tcp://`/`http://` or the local defaults), negotiates the API
    /// version and raises the request timeout to 600 s (loads and uploads can be big).
    pub async fn connect(docker_host: Option<&str>, name: &str) -> Result<Self, StageError> {
        let timeout = 600;
        let docker = match docker_host {
            None => Docker::connect_with_local_defaults(),
            Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
                Docker::connect_with_unix(h, timeout, bollard::API_DEFAULT_VERSION)
            }
            Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => {
                Docker::connect_with_http(h, timeout, bollard::API_DEFAULT_VERSION)
            }
            Some(h) => Docker::connect_with_host(h),
        }
        .map_err(|e| derr("cannot connect to the Docker daemon", e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| derr("cannot reach the Docker daemon", e))?
            .with_timeout(Duration::from_secs(timeout));
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let local_shortcuts = std::env::var("DBUILD_LOCAL_SHORTCUTS").map_or(true, |v| v != "0");
        let seen: Arc<tokio::sync::OnceCell<bool>> = Default::default();
        if local_shortcuts {
            // Asked now, so the first RUN does not wait for it.
            let (seen, docker) = (seen.clone(), docker.clone());
            tokio::spawn(async move {
                seen.get_or_init(|| sees_storage(&docker)).await;
            });
        }
        Ok(Daemon {
            docker,
            prefix: format!("dbuild-w-{clean}"),
            counter: Arc::new(AtomicU64::new(0)),
            local_shortcuts,
            read_upper: true,
            sees_storage: seen,
            scratch: std::env::temp_dir(),
            scratch_visible: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            pending: Default::default(),
            queue: Default::default(),
            parked: None,
            unparking: Default::default(),
            sys_admin: has_sys_admin(),
        })
    }

    /// Whether the local shortcuts are on and this process can read the daemon's storage
    /// directory (`<DockerRootDir>/<driver>`): a worker beside its daemon with its
    /// permissions. Asked of the daemon once.
    pub async fn beside_daemon(&self) -> bool {
        if !self.local_shortcuts {
            return false;
        }
        *self
            .sees_storage
            .get_or_init(|| sees_storage(&self.docker))
            .await
    }

    /// Whether RUN layers may be read from upper directories: beside the daemon, and
    /// with `CAP_SYS_ADMIN`, without which the kernel hides the `trusted.overlay.*`
    /// attributes that mark an opaque directory (reading on would let a replaced
    /// directory's old contents show through).
    pub async fn reads_upper_dirs(&self) -> bool {
        self.read_upper && self.sys_admin && self.beside_daemon().await
    }

    /// A name no other object of this process uses: `<prefix>-<pid>-<n>`.
    pub fn unique(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0);
        format!("{}-{what}-{}-{n}-{t}", self.prefix, std::process::id())
    }

    /// `(id, state)` of an image, or `None` if the daemon has no such image.
    pub async fn inspect(
        &self,
        reference: &str,
    ) -> Result<Option<(String, ImageState)>, StageError> {
        Ok(self
            .inspect_sized(reference)
            .await?
            .map(|(id, s, _)| (id, s)))
    }

    /// [`Self::inspect`] with the image's `Size` (bytes, all layers).
    pub async fn inspect_sized(
        &self,
        reference: &str,
    ) -> Result<Option<(String, ImageState, u64)>, StageError> {
        self.settle(reference).await?;
        match timed("inspect_image", self.docker.inspect_image(reference)).await {
            Ok(i) => {
                let size = i.size.unwrap_or(0).max(0) as u64;
                let state = ImageState {
                    layers: i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                    config: ImageConfig::from_inspect(i.config),
                    os: i.os.unwrap_or_else(|| "linux".into()),
                    architecture: i.architecture.unwrap_or_else(|| "amd64".into()),
                    variant: i.variant.filter(|v| !v.is_empty()),
                    author: i.author.filter(|a| !a.is_empty()),
                };
                Ok(Some((i.id.unwrap_or_default(), state, size)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(derr(format!("inspect image {reference}"), e)),
        }
    }

    /// Writes images with `docker load`: each `(state, tags)` becomes one image tagged
    /// with every tag. Each layer must exist on the daemon or be in `new_layers` (diff id →
    /// layer tar): those are sent with the images, and removed from `new_layers` once the
    /// daemon has them.
    fn archive(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        new_layers: &NewLayers,
    ) -> Result<LoadArchive, StageError> {
        let fail = |e: std::io::Error| StageError::new(format!("build image archive: {e}"));
        let mut tar = tar::Builder::new(Vec::new());
        let mut manifest = Vec::new();
        // Chains already sent in this archive (the daemon then finds them by chain id).
        let mut sent: HashSet<&[String]> = HashSet::new();
        let mut used = Vec::new();
        let mut files = HashMap::new();
        for (i, (state, tags, comment)) in images.iter().enumerate() {
            let name = format!("config-{i}.json");
            let config = state.to_json(*comment);
            append_bytes(&mut tar, &name, &config).map_err(fail)?;
            let mut layers = Vec::new();
            for (l, diff) in state.layers.iter().enumerate() {
                let file = format!("layer-{i}-{l}/layer.tar");
                if let Some(data) = new_layers.get(diff) {
                    if sent.insert(&state.layers[..=l]) {
                        append_bytes(&mut tar, &file, data).map_err(fail)?;
                        files.entry(diff.clone()).or_insert_with(|| file.clone());
                        used.push(diff.clone());
                    }
                }
                layers.push(file);
            }
            manifest.push(json!({ "Config": name, "RepoTags": tags, "Layers": layers }));
        }
        let manifest = serde_json::to_vec(&manifest).expect("manifest serializes");
        append_bytes(&mut tar, "manifest.json", &manifest)
            .map_err(|e| StageError::new(format!("build image archive: {e}")))?;
        let bytes = tar
            .into_inner()
            .map_err(|e| StageError::new(format!("build image archive: {e}")))?;
        Ok(LoadArchive { bytes, used, files })
    }

    /// Writes images with `docker load`: each `(state, tags)` becomes one image tagged
    /// with every tag. Each layer must exist on the daemon or be in `new_layers` (diff id →
    /// layer tar): those are sent with the images, and removed from `new_layers` once the
    /// daemon has them.
    pub async fn load(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        new_layers: &mut NewLayers,
    ) -> Result<(), StageError> {
        let a = self.archive(images, new_layers)?;
        send_load(&self.docker, a.bytes).await?;
        for d in a.used {
            new_layers.remove(&d);
        }
        let tags: Vec<String> = images.iter().flat_map(|(_, t, _)| t.clone()).collect();
        self.unpark_names(&tags);
        Ok(())
    }

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
                .unwrap_or_else(|_| Err("the image writer stopped".to_string()))
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
                    let _ = one.done.send(r.map_err(|e| e.message));
                }
                continue;
            }
            let result = result.map_err(|e| e.message);
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
                let _ = docker.remove_image(i, Some(opts), None).await;
            }
            Ok(())
        }
        .boxed()
        .shared();
        self.track(vec![name], done);
    }

    fn pending_load(&self, reference: &str) -> Option<LoadDone> {
        self.pending.lock().get(reference).cloned()
    }

    /// Registers `done` under `names` until it finishes, and drives it.
    fn track(&self, names: Vec<String>, done: LoadDone) {
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

    /// Loads `reference` if it is parked (see `park.rs`).
    async fn unpark(&self, reference: &str) -> Result<(), StageError> {
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
    async fn present(&self, reference: &str) -> Result<bool, StageError> {
        Ok(self.daemon_id(reference).await?.is_some())
    }

    /// The id of the image the daemon holds under `reference`, if any (nothing waited
    /// for, nothing loaded).
    async fn daemon_id(&self, reference: &str) -> Result<Option<String>, StageError> {
        match timed("inspect_image", self.docker.inspect_image(reference)).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(derr(format!("inspect image {reference}"), e)),
        }
    }

    /// Drops the parked names of images written to the daemon now (see [`Self::unpark`]).
    fn unpark_names(&self, names: &[String]) {
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

    /// Puts one more layer (an uncompressed layer tar: files, directories, `.wh.`
    /// whiteouts) on top of `state`: loads a bare image whose last layer is `layer` under a
    /// fresh tag (noted in `res`, so the layer lives until the stage's images use it) and
    /// returns `state` with that layer's diff id appended.
    pub async fn add_layer(
        &self,
        state: &ImageState,
        layer: Vec<u8>,
        res: &Resources,
    ) -> Result<ImageState, StageError> {
        let mut next = ImageState {
            config: ImageConfig::default(),
            author: None,
            ..state.clone()
        };
        next.layers
            .push(format!("sha256:{}", super::sha256::hex(&layer)));
        let tag = format!("dbuild-bare:{}", self.unique("l").replace('/', "-"));
        res.image(&tag);
        let mut tar = tar::Builder::new(Vec::new());
        let fail = |e: std::io::Error| StageError::new(format!("build layer archive: {e}"));
        append_bytes(&mut tar, "config.json", &next.to_json(Some(&tag))).map_err(fail)?;
        // Layers the daemon already has are found by chain id; only the new one is sent.
        let layers: Vec<String> = (0..next.layers.len())
            .map(|l| format!("layer-{l}/layer.tar"))
            .collect();
        append_bytes(&mut tar, layers.last().expect("one layer at least"), &layer).map_err(fail)?;
        let manifest = json!([{ "Config": "config.json", "RepoTags": [tag], "Layers": layers }]);
        append_bytes(&mut tar, "manifest.json", manifest.to_string().as_bytes()).map_err(fail)?;
        send_load(&self.docker, tar.into_inner().map_err(fail)?).await?;
        Ok(ImageState {
            layers: next.layers,
            ..state.clone()
        })
    }

    /// Mode bits, uid and gid of `path` in a container (what `stat` cannot tell), from the
    /// first header of its archive; the rest of the archive is never read.
    pub async fn owner_and_mode(
        &self,
        container: &str,
        path: &str,
    ) -> Result<(u32, u32, u32), StageError> {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(container, Some(opts));
        let mut buf = Vec::new();
        // A header, plus room for a PAX header before it.
        while buf.len() < 4096 {
            match stream.next().await {
                Some(chunk) => buf.extend_from_slice(
                    &chunk.map_err(|e| derr(format!("read {path} from container"), e))?,
                ),
                None => break,
            }
        }
        drop(stream);
        let mut ar = tar::Archive::new(buf.as_slice());
        let first = ar
            .entries()
            .ok()
            .and_then(|mut e| e.next())
            .and_then(Result::ok)
            .ok_or_else(|| StageError::new(format!("read {path} from container: no entry")))?;
        let h = first.header();
        let num = |v: std::io::Result<u64>| v.map(|n| n as u32).unwrap_or(0);
        Ok((
            h.mode().unwrap_or(0o755) & 0o7777,
            num(h.uid()),
            num(h.gid()),
        ))
    }

    /// Loads an image with `state`'s layers and an empty config under a fresh tag (noted
    /// in `res`), so containers made from it see exactly the config they are given.
    pub async fn bare_image(
        &self,
        state: &ImageState,
        res: &Resources,
        new_layers: &mut NewLayers,
    ) -> Result<String, StageError> {
        let bare = ImageState {
            config: ImageConfig::default(),
            author: None,
            ..state.clone()
        };
        let tag = format!("dbuild-bare:{}", self.unique("b").replace('/', "-"));
        let comment = tag.clone();
        res.image(&tag);
        self.load(
            &[(&bare, vec![tag.clone()], Some(comment.as_str()))],
            new_layers,
        )
        .await?;
        Ok(tag)
    }

    /// Creates (never starts) a container named by this executor, noted in `res`.
    pub async fn create(
        &self,
        mut body: ContainerCreateBody,
        res: &Resources,
    ) -> Result<String, StageError> {
        if let Some(image) = &body.image {
            self.settle(image).await?;
        }
        if body.cmd.is_none() && body.entrypoint.is_none() {
            // The daemon refuses a container without a command, even one never started.
            body.cmd = Some(vec!["/dbuild-never-started".into()]);
        }
        let name = self.unique("c");
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let r = timed(
            "create_container",
            self.docker.create_container(Some(opts), body),
        )
        .await
        .map_err(|e| derr("create container", e))?;
        res.container(&r.id);
        Ok(r.id)
    }

    /// Stats `path` in a container without following a final symlink.
    pub async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>, StageError> {
        let opts = ContainerArchiveInfoOptionsBuilder::default()
            .path(path)
            .build();
        match timed(
            "stat",
            self.docker
                .get_container_archive_info(container, Some(opts)),
        )
        .await
        {
            Ok(s) => Ok(Some(PathStat {
                is_dir: s.file_mode & GO_MODE_DIR != 0,
                is_symlink: s.file_mode & GO_MODE_SYMLINK != 0,
                link_target: s.link_target,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            // HEAD answers carry no body: a missing path can come back as another error
            // whose message the daemon could not send.
            Err(bollard::errors::Error::HttpHeaderNotFoundError(_)) => Ok(None),
            Err(e) => Err(derr(format!("stat {path}"), e)),
        }
    }

    /// Stats `path`, following symlinks (`os.Stat` semantics), up to 16 links deep.
    pub async fn stat_follow(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<PathStat>, StageError> {
        let mut p = path.to_string();
        for _ in 0..16 {
            match self.stat(container, &p).await? {
                Some(s) if s.is_symlink => p = s.link_target.clone(),
                other => return Ok(other),
            }
        }
        Err(StageError::new(format!(
            "too many levels of symbolic links: {path}"
        )))
    }

    /// The tar archive of `path` in a container (Docker names the root entry by its base
    /// name).
    pub async fn download(&self, container: &str, path: &str) -> Result<Vec<u8>, StageError> {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(container, Some(opts));
        timed("download", async {
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| derr(format!("read {path} from container"), e))?;
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        })
        .await
    }

    /// Extracts a tar archive (plain or compressed) at `path` in a container.
    pub async fn upload(
        &self,
        container: &str,
        path: &str,
        tar: Vec<u8>,
    ) -> Result<(), StageError> {
        let opts = UploadToContainerOptionsBuilder::default()
            .path(path)
            .build();
        timed(
            "upload",
            self.docker
                .upload_to_container(container, Some(opts), bollard::body_full(tar.into())),
        )
        .await
        .map_err(|e| derr(format!("write files into container at {path}"), e))
    }

    /// Commits a container's changes as a new (temporary, noted in `res`) image and
    /// returns its layer chain and size.
    pub async fn commit_layers(
        &self,
        container: &str,
        res: &Resources,
    ) -> Result<(Vec<String>, u64), StageError> {
        let opts = CommitContainerOptionsBuilder::default()
            .container(container)
            .pause(false)
            .build();
        let r = timed(
            "commit",
            self.docker
                .commit_container(opts, bollard::models::ContainerConfig::default()),
        )
        .await
        .map_err(|e| derr("commit container", e))?;
        let id = r.id;
        res.image(&id);
        match self.inspect_sized(&id).await? {
            Some((_, s, size)) => Ok((s.layers, size)),
            None => Err(StageError::new(format!("committed image {id} vanished"))),
        }
    }

    /// Tags an existing image.
    pub async fn tag(&self, image: &str, tag: &str) -> Result<(), StageError> {
        self.settle(image).await?;
        let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(t)
            .build();
        timed("tag", self.docker.tag_image(image, Some(opts)))
            .await
            .map_err(|e| derr(format!("tag {image} as {tag}"), e))?;
        self.unpark_names(&[tag.to_string()]);
        Ok(())
    }
}

/// The id a loaded image gets: the digest of its config.
fn config_id(config: &[u8]) -> String {
    format!("sha256:{}", super::sha256::hex(config))
}

/// Background loads waiting for the one being sent (see [`Daemon::load_later`]).
#[derive(Default)]
struct LoadQueue {
    waiting: Vec<QueuedLoad>,
    /// Whether a task is sending (it takes whatever waits when its load is done).
    sending: bool,
}

struct QueuedLoad {
    images: Vec<(ImageState, Vec<String>, Option<String>)>,
    /// The layers the daemon does not have yet that these images name.
    layers: NewLayers,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// A `docker load` archive and the new layers it sends.
struct LoadArchive {
    bytes: Vec<u8>,
    used: Vec<String>,
    /// The file each sent layer is in, by diff id.
    files: HashMap<String, String>,
}

/// Sends a `docker load` archive and waits for the daemon to take it.
async fn send_load(docker: &Docker, bytes: Vec<u8>) -> Result<(), StageError> {
    let opts = ImportImageOptionsBuilder::default().quiet(true).build();
    let mut stream = docker.import_image(opts, bollard::body_full(bytes.into()), None);
    timed("load", async {
        while let Some(item) = stream.next().await {
            item.map_err(|e| derr("docker load", e))?;
        }
        Ok::<(), StageError>(())
    })
    .await
}

/// Appends a regular file (0644, root) to a tar archive.
pub fn append_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    tar.append_data(&mut h, name, data)
}
