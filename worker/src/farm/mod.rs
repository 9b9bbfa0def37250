//! A worker of the farm: registers with the coordinator, renews its lease, runs the stage
//! tasks it is given with the local [`DockerExecutor`], and moves artifacts: it imports
//! what it lacks before a stage (images by `docker load`, copied paths as an image of just
//! those paths) and exports what consumers need after it. It never opens the cache index,
//! and it never calls the Docker daemon itself: every call goes through the executor's
//! daemon handle ([`crate::daemon::Daemon`]).
//!
//! - `session.rs`: register, heartbeats, the task stream.
//! - `task.rs`: one assignment: logs, inputs, the stage run, the report.
//! - `resolve.rs`: resolve jobs (pin references, save images the store lacks).
//! - `import.rs` / `export.rs`: artifacts in before a stage, out after it.
//! - `tar.rs`: moving an exported path's archive to its place.
mod export;
mod import;
mod resolve;
mod session;
mod tar;
mod task;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::blobs::{BlobError, BlobStore};
use model::keys::StageKey;
use model::task::{stage_image_tag, Artifact, StageError, StageTask, TaskBase};
use parking_lot::Mutex;
use proto::v1::TaskAssignment;
use tokio_util::sync::CancellationToken;
use wire::blob::artifact;
use wire::from_document;

use crate::daemon::DaemonError;
use crate::DockerExecutor;

/// How a worker is started (`dbuild worker ...`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub name: String,
    /// Stages run at once; `None`: as many as the daemon's host has CPUs.
    pub slots: Option<usize>,
    pub data_dir: PathBuf,
    pub docker_host: Option<String>,
    pub token: Option<String>,
    /// How the worker describes itself in `dbuild workers` (host name by default).
    pub address: String,
    /// Most bytes of dbuild images kept on the daemon (`None`: no cap).
    pub image_cap: Option<u64>,
}

/// Why a worker stopped, or a task's artifacts could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] wire::ConnectError),
    #[error(transparent)]
    Transfer(#[from] wire::blob::TransferError),
    #[error("coordinator refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("docker: {0}")]
    Docker(#[from] DaemonError),
    /// The executor failed (connecting, writing a stage image).
    #[error("docker: {0}")]
    Executor(#[source] StageError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("splitting the saved image {image}: {source}")]
    SplitImage {
        image: String,
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("{0}")]
    Blocking(#[from] tokio::task::JoinError),
}

impl WorkerError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| WorkerError::Io { path, source }
    }
}

pub use wire::blob::{download_to, upload_file};
pub use wire::client::{Builds, Cache, Clients, Content, Workers};

/// Runs a worker until `shutdown` is cancelled or the coordinator goes away for good.
pub async fn run_worker(
    mut cfg: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let executor = Arc::new(
        DockerExecutor::connect(cfg.docker_host.as_deref(), &cfg.name)
            .await
            .map_err(WorkerError::Executor)?
            .with_scratch_dir(&cfg.data_dir.join("tmp"))
            .with_park_dir(&cfg.data_dir.join(crate::executor::park::DIR)),
    );
    if cfg.slots.is_none() {
        let cpus = executor.daemon().cpus().await?;
        tracing::info!(slots = cpus, "slots: one per CPU of the daemon's host");
        cfg.slots = Some(cpus);
    }
    let blobs = BlobStore::open(&cfg.data_dir.join("blobs"))?;
    let running: Arc<Mutex<BTreeMap<String, CancellationToken>>> = Arc::default();
    let cap = cfg.image_cap.map(|c| {
        Arc::new(
            crate::image_cap::ImageCap::new(executor.daemon().clone(), c)
                .with_parked(executor.parked().cloned()),
        )
    });
    if let Some(cap) = &cap {
        enforce_cap(Arc::clone(cap));
    }
    let shared = Shared {
        executor,
        blobs,
        running,
        cap,
    };
    // A coordinator that goes away (a restart, a deploy) is waited for: the worker
    // registers again when it is back. Only a first connection that fails is an error.
    let mut registered_once = false;
    let mut backoff = Duration::from_millis(500);
    let ended = loop {
        let began = Instant::now();
        let outcome = session::session(&cfg, &shutdown, &shared, &mut registered_once).await;
        if began.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) if !registered_once => break Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "lost the coordinator; reconnecting");
                // Cancel safe: either branch's future is a timer or a token's wait;
                // dropping the other loses nothing.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    // Stage images still being written are finished before the worker ends.
    if let Err(e) = shared.executor.settle_all().await {
        tracing::warn!(error = %e.message, "a stage image was not written");
    }
    ended
}

/// What a worker keeps across its sessions with the coordinator.
pub(super) struct Shared {
    pub(super) executor: Arc<DockerExecutor>,
    pub(super) blobs: BlobStore,
    pub(super) running: Arc<Mutex<BTreeMap<String, CancellationToken>>>,
    pub(super) cap: Option<Arc<crate::image_cap::ImageCap>>,
}

/// The tags of the images a task reads and writes (its stage, its instructions, the
/// stages it reads), for the image cap's least-recently-used order.
pub(super) fn used_tags(a: &TaskAssignment) -> Vec<String> {
    let Ok(task) = from_document::<StageTask>(a.task.as_ref()) else {
        return Vec::new();
    };
    let mut tags = vec![stage_image_tag(&task.key)];
    tags.extend(
        task.instructions
            .iter()
            .map(|t| model::task::instruction_image_tag(&t.key)),
    );
    let mut by_key: BTreeMap<StageKey, Vec<Artifact>> = BTreeMap::new();
    for art in a.imports.iter().filter_map(|i| artifact(i).ok()) {
        by_key.entry(art.stage_key).or_default().push(art);
    }
    for (key, arts) in &by_key {
        tags.push(stage_image_tag(key));
        tags.push(paths_image_tag(key, arts));
    }
    if let TaskBase::Stage { key, .. } = &task.base {
        tags.push(stage_image_tag(key));
    }
    tags
}

/// Path artifacts of one stage up to this many bytes in all are imported from memory.
const PATHS_IN_MEMORY: u64 = 64 << 20;

/// The tag of the image a worker makes of a stage's exported paths: named by the stage key
/// and the artifacts' digests, so other artifacts of the same key never reuse it.
fn paths_image_tag(key: &StageKey, arts: &[Artifact]) -> String {
    let mut h = blake3::Hasher::new();
    let mut digests: Vec<&str> = arts.iter().map(|a| a.digest.as_str()).collect();
    digests.sort();
    for d in digests {
        h.update(d.as_bytes());
    }
    format!(
        "dbuild-paths:{}-{}",
        key.to_hex(),
        &h.finalize().to_hex()[..12]
    )
}

/// Evicts least recently used images over the cap, in the background.
pub(super) fn enforce_cap(cap: Arc<crate::image_cap::ImageCap>) {
    tokio::spawn(async move {
        match cap.enforce().await {
            Ok(r) if r.images_removed > 0 => tracing::info!(
                removed = r.images_removed,
                freed = r.bytes_freed,
                "image cap: evicted the least recently used stage images"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "image cap not enforced"),
        }
    });
}
