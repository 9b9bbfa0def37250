//! The daemon handle: the one connection to a Docker daemon and every call dbuild makes
//! on it. The executor, the farm agent (`farm/`) and the CLI's output delivery all go
//! through a [`Daemon`]; nothing else opens a connection.
//!
//! - `image.rs`: images as (layers, config), inspect, `docker load` of exact configs,
//!   tags, saves, streamed loads and imports, pulls, removal.
//! - `background.rs`: loads in the background, batched, and `settle` (waiting for them).
//! - `park.rs` + `parking.rs`: stage images parked beside the daemon instead of loaded.
//! - `container.rs`: the containers, volumes and images a stage makes (`Resources`), and
//!   file operations inside containers (stat, archive read and write, commit), and a RUN
//!   container's life (start, logs, wait, kill, its change list).
//! - `volume.rs`: the temporary volumes a RUN's mounts fill, and cache-mount volumes.
//!
//! Why `docker load` for configs: `POST /commit` merges the container's config into the
//! one given (a RUN's command leaks into `Cmd`, nothing can be unset), and creating a
//! container merges the image's config (VOLUMEs become anonymous volumes). So containers
//! are created from a *bare* image (same layers, empty config) and every result image is
//! written with `docker load` from its exact config; the daemon reuses layers it already
//! has by chain id, so the archive holds only JSON.
mod background;
mod container;
mod image;
pub mod park;
mod parking;
mod volume;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use model::task::StageError;
use parking_lot::Mutex;

pub use background::LoadDone;
pub use container::{PathStat, Resources};
pub use image::{append_bytes, ImageState, NewLayers};

use background::LoadQueue;

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No connection, or no API version both sides speak.
    #[error("{what}: {source}")]
    Connect {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    /// A call the daemon failed: `op` on `target` (an image, a container path).
    #[error("{op}{}: {source}", image::at(target))]
    Docker {
        op: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// A local file a transfer reads or writes.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    pub(crate) fn docker(
        op: &'static str,
        target: impl Into<String>,
    ) -> impl FnOnce(bollard::errors::Error) -> Self {
        let target = target.into();
        move |source| DaemonError::Docker { op, target, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DaemonError::Io { path, source }
    }

    /// Whether the daemon answered that the object does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            DaemonError::Connect { source, .. } | DaemonError::Docker { source, .. } => {
                is_not_found(source)
            }
            DaemonError::Io { .. } => false,
        }
    }
}

impl From<DaemonError> for StageError {
    fn from(e: DaemonError) -> Self {
        StageError::new(e.to_string())
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
    let Ok(info) = timed("info", docker.info()).await else {
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

/// The daemon connection plus the names this executor gives to what it makes.
#[derive(Clone)]
pub struct Daemon {
    docker: Docker,
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
    pub parked: Option<park::Parked>,
    /// Held while a parked archive is being loaded (one at a time).
    unparking: Arc<tokio::sync::Mutex<()>>,
    /// Whether this process holds `CAP_SYS_ADMIN` (read once, at connect).
    sys_admin: bool,
}

impl Daemon {
    /// Connects (`unix://`, `tcp://`/`http://` or the local defaults), negotiates the API
    /// version and raises the request timeout to 600 s (loads and uploads can be big).
    /// The one place a Docker connection is opened: the executor, the farm agent and the
    /// CLI all hold a `Daemon`.
    pub async fn connect(docker_host: Option<&str>) -> Result<Self, DaemonError> {
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
        .map_err(|source| DaemonError::Connect {
            what: "cannot connect to the Docker daemon",
            source,
        })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| DaemonError::Connect {
                what: "cannot reach the Docker daemon",
                source,
            })?
            .with_timeout(Duration::from_secs(timeout));
        Ok(Daemon {
            docker,
            prefix: "dbuild-w-".into(),
            counter: Arc::new(AtomicU64::new(0)),
            local_shortcuts: std::env::var("DBUILD_LOCAL_SHORTCUTS").map_or(true, |v| v != "0"),
            read_upper: true,
            sees_storage: Default::default(),
            scratch: std::env::temp_dir(),
            scratch_visible: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            pending: Default::default(),
            queue: Default::default(),
            parked: None,
            unparking: Default::default(),
            sys_admin: has_sys_admin(),
        })
    }

    /// Names every container and temporary volume after worker `name`
    /// (`dbuild-w-<name>-...`), and asks whether the daemon's storage is readable here
    /// now, so the first RUN does not wait for it.
    pub fn for_worker(mut self, name: &str) -> Self {
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
        self.prefix = format!("dbuild-w-{clean}");
        if self.local_shortcuts {
            let (seen, docker) = (self.sees_storage.clone(), self.docker.clone());
            tokio::spawn(async move {
                seen.get_or_init(|| sees_storage(&docker)).await;
            });
        }
        self
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

    /// The bollard connection itself (for tests and tools that ask the daemon what
    /// dbuild made).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// A name no other object of this process uses: `<prefix>-<pid>-<n>`.
    /// The CPUs the daemon's host reports (`docker info`'s NCPU): what a worker's
    /// default `--slots` follows, since its stages run there, not here.
    pub async fn cpus(&self) -> Result<usize, DaemonError> {
        let info = timed("info", self.docker.info())
            .await
            .map_err(DaemonError::docker("info", "the daemon"))?;
        Ok(info.ncpu.unwrap_or(1).max(1) as usize)
    }

    pub fn unique(&self, what: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0);
        format!("{}-{what}-{}-{n}-{t}", self.prefix, std::process::id())
    }
}
