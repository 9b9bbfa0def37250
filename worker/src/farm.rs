//! A worker of the farm: registers with the coordinator, renews its lease, runs the stage
//! tasks it is given with the local [`DockerExecutor`], and moves artifacts: it imports
//! what it lacks before a stage (images by `docker load`, copied paths as an image of just
//! those paths) and exports what consumers need after it. It never opens the cache index.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ImportImageOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use model::blobs::BlobStore;
use model::context::ContextManifest;
use model::digest::BlobDigest;
use model::frontend::instructions::{Instruction, MountType};
use model::keys::{match_sources, StageKey};
use model::task::Artifact;
use model::task::{
    stage_image_tag, BlobContext, BuildInputs, Executor, StageError, StageLog, StageTask, TaskBase,
    TaskSource,
};
use proto::v1::{
    task_report, BaseImage, HeartbeatRequest, RegisterRequest, ResolveImages, ResolvedImage,
    ResolvedReport, TaskAssignment, TaskLog, TaskReport, TasksRequest,
};
use tokio_util::sync::CancellationToken;
use wire::blob::{artifact, pb_artifact, pb_digest};
use wire::{document, from_document};

use crate::DockerExecutor;

/// How a worker is started (`dbuild worker ...`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub name: String,
    pub slots: usize,
    pub data_dir: PathBuf,
    pub docker_host: Option<String>,
    pub token: Option<String>,
    /// How the worker describes itself in `dbuild workers` (host name by default).
    pub address: String,
    /// Most bytes of dbuild images kept on the daemon (`None`: no cap).
    pub image_cap: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connect(#[from] wire::ConnectError),
    #[error(transparent)]
    Transfer(#[from] wire::blob::TransferError),
    #[error("coordinator refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("docker: {0}")]
    Docker(String),
    #[error("{0}")]
    Io(String),
}

pub use wire::blob::{download_to, upload_file};
pub use wire::client::{Builds, Cache, Clients, Content, Workers};

/// The context files a task reads (COPY/ADD and bind mounts from the context).
fn needed_context_blobs(task: &StageTask, manifest: &ContextManifest) -> Vec<BlobDigest> {
    let mut out = Vec::new();
    for ti in &task.instructions {
        match &ti.instruction {
            Instruction::Copy(c) | Instruction::Add(c) if ti.copy_from.is_none() => {
                let srcs: Vec<&str> = c.sources.iter().map(String::as_str).collect();
                out.extend(
                    match_sources(manifest, &srcs, &c.excludes)
                        .0
                        .iter()
                        .filter_map(|e| e.digest()),
                );
            }
            Instruction::Run(r) => {
                for (m, from) in r.mounts.iter().zip(&ti.mount_from) {
                    if m.kind == MountType::Bind && from.is_none() {
                        let src = m.source.as_deref().unwrap_or(".");
                        out.extend(
                            match_sources(manifest, &[src], &[])
                                .0
                                .iter()
                                .filter_map(|e| e.digest()),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Runs a worker until `shutdown` is cancelled or the coordinator goes away for good.
pub async fn run_worker(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let executor = Arc::new(
        DockerExecutor::connect(cfg.docker_host.as_deref(), &cfg.name)
            .await
            .map_err(|e| WorkerError::Docker(e.message))?
            .with_scratch_dir(&cfg.data_dir.join("tmp"))
            .with_park_dir(&cfg.data_dir.join(crate::executor::park::DIR)),
    );
    let docker = connect_docker(cfg.docker_host.as_deref()).await?;
    let blobs =
        BlobStore::open(&cfg.data_dir.join("blobs")).map_err(|e| WorkerError::Io(e.to_string()))?;
    let running: Arc<Mutex<BTreeMap<String, CancellationToken>>> = Arc::default();
    let cap = cfg.image_cap.map(|c| {
        Arc::new(
            crate::image_cap::ImageCap::new(docker.clone(), c)
                .with_parked(executor.parked().cloned()),
        )
    });
    if let Some(cap) = &cap {
        enforce_cap(Arc::clone(cap));
    }
    let shared = Shared {
        executor,
        docker,
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
        let outcome = session(&cfg, &shutdown, &shared, &mut registered_once).await;
        if began.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) if !registered_once => break Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "lost the coordinator; reconnecting");
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
struct Shared {
    executor: Arc<DockerExecutor>,
    docker: Docker,
    blobs: BlobStore,
    running: Arc<Mutex<BTreeMap<String, CancellationToken>>>,
    cap: Option<Arc<crate::image_cap::ImageCap>>,
}

/// One registration with the coordinator: heartbeats and the task stream, until shutdown
/// (`Ok`) or until the coordinator is lost (`Err`).
async fn session(
    cfg: &WorkerConfig,
    shutdown: &CancellationToken,
    sh: &Shared,
    registered_once: &mut bool,
) -> Result<(), WorkerError> {
    let mut clients = Clients::connect(&cfg.coordinator, cfg.token.clone()).await?;
    let reg = clients
        .workers
        .register(RegisterRequest {
            name: cfg.name.clone(),
            address: cfg.address.clone(),
            slots: cfg.slots as u32,
            held_stage_keys: held_stage_keys(&sh.docker, sh.executor.parked()).await,
        })
        .await?
        .into_inner();
    *registered_once = true;
    tracing::info!(worker = %cfg.name, coordinator = %cfg.coordinator, "registered");
    // Heartbeats renew the lease and carry cancels back, for this session only.
    let ended = shutdown.child_token();
    let _end_heartbeats = ended.clone().drop_guard();
    let hb_running = Arc::clone(&sh.running);
    let mut hb_client = clients.workers.clone();
    let worker_id = reg.worker_id.clone();
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(100) as u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = ended.cancelled() => return,
            }
            let ids: Vec<String> = hb_running.lock().keys().cloned().collect();
            match hb_client
                .heartbeat(HeartbeatRequest {
                    worker_id: worker_id.clone(),
                    running_task_ids: ids,
                })
                .await
            {
                Ok(r) => {
                    for id in r.into_inner().cancel_task_ids {
                        if let Some(t) = hb_running.lock().get(&id) {
                            t.cancel();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    });

    let mut tasks = clients
        .workers
        .tasks(TasksRequest {
            worker_id: reg.worker_id.clone(),
        })
        .await?
        .into_inner();
    loop {
        let next = tokio::select! {
            m = tasks.message() => m?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(assignment) = next else {
            return Err(WorkerError::Connect(wire::ConnectError {
                url: cfg.coordinator.clone(),
                message: "the coordinator closed the task stream".into(),
            }));
        };
        let token = shutdown.child_token();
        sh.running
            .lock()
            .insert(assignment.task_id.clone(), token.clone());
        let ctx = TaskCtx {
            executor: Arc::clone(&sh.executor),
            docker: sh.docker.clone(),
            blobs: sh.blobs.clone(),
            clients: clients.clone(),
            worker_id: reg.worker_id.clone(),
            scratch: cfg.data_dir.join("tmp"),
        };
        let running = Arc::clone(&sh.running);
        let cap = sh.cap.clone();
        tokio::spawn(async move {
            let id = assignment.task_id.clone();
            let tags = used_tags(&assignment);
            if let Some(c) = &cap {
                c.begin(&id, tags.clone());
            }
            ctx.handle(assignment, token).await;
            running.lock().remove(&id);
            if let Some(c) = cap {
                c.touch(tags);
                c.end(&id);
                enforce_cap(c);
            }
        });
    }
}

/// The tags of the images a task reads and writes (its stage, its instructions, the
/// stages it reads), for the image cap's least-recently-used order.
fn used_tags(a: &TaskAssignment) -> Vec<String> {
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
fn enforce_cap(cap: Arc<crate::image_cap::ImageCap>) {
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

/// `docker load` of an archive file, streamed in 1 MiB chunks (never held in memory).
pub async fn docker_load_file(
    docker: &Docker,
    archive: std::fs::File,
) -> Result<(), bollard::errors::Error> {
    let opts = ImportImageOptionsBuilder::default().quiet(true).build();
    let mut s = docker.import_image(opts, bollard::body_try_stream(file_chunks(archive)), None);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(())
}

/// A file as a stream of 1 MiB chunks, for a request body that is never held in memory.
fn file_chunks(
    file: std::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let file = tokio::fs::File::from_std(file);
    futures::stream::unfold(Some(file), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Connects to the worker's daemon at a version it speaks.
pub async fn connect_docker(host: Option<&str>) -> Result<Docker, WorkerError> {
    let d = match host {
        Some(h) => Docker::connect_with_host(h),
        None => Docker::connect_with_local_defaults(),
    }
    .map_err(|e| WorkerError::Docker(e.to_string()))?;
    d.with_timeout(Duration::from_secs(600))
        .negotiate_version()
        .await
        .map_err(|e| WorkerError::Docker(e.to_string()))
}

/// Stage keys whose images this daemon holds (tagged `dbuild-stage:<key>`) or this
/// worker parked beside it.
async fn held_stage_keys(
    docker: &Docker,
    parked: Option<&crate::executor::park::Parked>,
) -> Vec<String> {
    let opts = ListImagesOptionsBuilder::default()
        .filters(&std::collections::HashMap::from([(
            "reference",
            vec!["dbuild-stage"],
        )]))
        .build();
    let parked_names = parked
        .and_then(|p| p.archives().ok())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|a| a.names);
    docker
        .list_images(Some(opts))
        .await
        .unwrap_or_default()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .chain(parked_names)
        .filter_map(|t| t.strip_prefix("dbuild-stage:").map(str::to_string))
        .collect()
}

struct TaskCtx {
    executor: Arc<DockerExecutor>,
    docker: Docker,
    blobs: BlobStore,
    clients: Clients,
    worker_id: String,
    scratch: PathBuf,
}

impl TaskCtx {
    /// Pins each reference on this worker's daemon; uploads the images the store lacks.
    async fn resolve(mut self, task_id: String, job: ResolveImages) {
        let mut images = Vec::with_capacity(job.references.len());
        for reference in &job.references {
            let answer = match self.executor.resolve_image(reference, job.pull).await {
                Err(e) => ResolvedImage {
                    reference: reference.clone(),
                    error: e.message,
                    ..Default::default()
                },
                Ok(id) if job.stored_ids.contains(&id) => ResolvedImage {
                    reference: reference.clone(),
                    id,
                    ..Default::default()
                },
                Ok(id) => match self.upload_image(&id).await {
                    Ok(image) => ResolvedImage {
                        reference: reference.clone(),
                        id,
                        image: Some(image),
                        ..Default::default()
                    },
                    Err(e) => ResolvedImage {
                        reference: reference.clone(),
                        error: format!("saving image {id} to the store: {e}"),
                        ..Default::default()
                    },
                },
            };
            images.push(answer);
        }
        let report = ResolvedReport {
            worker_id: self.worker_id.clone(),
            task_id,
            images,
        };
        // The coordinator waits for this answer: try a few times before giving up.
        for attempt in 1..=5 {
            match self.clients.workers.report_resolved(report.clone()).await {
                Ok(_) => return,
                Err(e) if attempt == 5 => {
                    tracing::error!(error = %e, "could not report resolved images")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
            }
        }
    }

    /// `docker save` of an image into a scratch file.
    async fn save_image(&self, image: &str) -> Result<tempfile::NamedTempFile, WorkerError> {
        let io = |e: std::io::Error| WorkerError::Io(e.to_string());
        std::fs::create_dir_all(&self.scratch).map_err(io)?;
        let file = tempfile::NamedTempFile::new_in(&self.scratch).map_err(io)?;
        let mut f = file.reopen().map_err(io)?;
        let mut stream = self.docker.export_image(image);
        while let Some(chunk) = stream.next().await {
            let c = chunk.map_err(|e| WorkerError::Docker(e.to_string()))?;
            f.write_all(&c).map_err(io)?;
        }
        f.flush().map_err(io)?;
        Ok(file)
    }

    /// `docker save` of an image into the store.
    async fn upload_image(&mut self, id: &str) -> Result<BaseImage, WorkerError> {
        let file = self.save_image(id).await?;
        let (d, size) = upload_file(&mut self.clients.content, file.path()).await?;
        Ok(BaseImage {
            id: id.to_string(),
            digest: Some(pb_digest(&d)),
            size,
        })
    }

    /// Loads the pinned external images this daemon lacks from the store.
    async fn load_base_images(&mut self, images: &[BaseImage]) -> Result<(), StageError> {
        for img in images {
            if self.has_image(&img.id).await {
                continue;
            }
            let digest = img
                .digest
                .as_ref()
                .map(|d| d.hex.clone())
                .unwrap_or_default();
            let file = self.fetch_blob_file(&digest).await?;
            self.docker_load(file)
                .await
                .map_err(|e| StageError::new(format!("image {}: {}", img.id, e.message)))?;
            if !self.has_image(&img.id).await {
                return Err(StageError::new(format!(
                    "the store's copy of image {} loaded as another image",
                    img.id
                )));
            }
        }
        Ok(())
    }

    async fn handle(mut self, a: TaskAssignment, cancel: CancellationToken) {
        let task_id = a.task_id.clone();
        if let Some(job) = a.resolve {
            return self.resolve(task_id, job).await;
        }
        let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel::<StageLog>();
        let (line_tx, line_rx) = tokio::sync::mpsc::channel::<TaskLog>(256);
        let mut log_client = self.clients.workers.clone();
        let streamer = tokio::spawn(async move {
            let _ = log_client
                .stream_logs(tokio_stream::wrappers::ReceiverStream::new(line_rx))
                .await;
        });
        let (wid, tid) = (self.worker_id.clone(), task_id.clone());
        let forwarder = tokio::spawn(async move {
            while let Some(l) = log_rx.recv().await {
                let _ = line_tx
                    .send(TaskLog {
                        worker_id: wid.clone(),
                        task_id: tid.clone(),
                        line: l.line,
                    })
                    .await;
            }
        });
        let outcome = self.run(&a, log_tx, cancel).await;
        let _ = forwarder.await;
        let _ = streamer.await;
        let report = match outcome {
            Ok((result, artifacts)) => TaskReport {
                worker_id: self.worker_id.clone(),
                task_id,
                outcome: Some(task_report::Outcome::Result(document(&result))),
                artifacts: artifacts.iter().map(pb_artifact).collect(),
            },
            Err(e) => TaskReport {
                worker_id: self.worker_id.clone(),
                task_id,
                outcome: Some(task_report::Outcome::Error(document(&e))),
                artifacts: Vec::new(),
            },
        };
        if let Err(e) = self.clients.workers.report_result(report).await {
            tracing::error!(error = %e, "could not report a result");
        }
    }

    async fn run(
        &mut self,
        a: &TaskAssignment,
        logs: tokio::sync::mpsc::UnboundedSender<StageLog>,
        cancel: CancellationToken,
    ) -> Result<(model::task::StageResult, Vec<Artifact>), StageError> {
        let rpc = |e: tonic::Status| StageError::new(e.message().to_string());
        let wrk = |e: WorkerError| StageError::new(e.to_string());
        let mut task: StageTask = from_document(a.task.as_ref()).map_err(rpc)?;
        let manifest: ContextManifest = from_document(a.manifest.as_ref()).map_err(rpc)?;
        let moved_in = Instant::now();
        self.load_base_images(&a.base_images).await?;
        self.import(&mut task, a).await?;
        // Many small files: one round trip each, so several at once.
        let (content, blobs) = (self.clients.content.clone(), self.blobs.clone());
        let fetches = needed_context_blobs(&task, &manifest).into_iter().map(|d| {
            let (mut content, blobs) = (content.clone(), blobs.clone());
            async move { download_to(&mut content, &blobs, &d).await }
        });
        let mut fetches = futures::stream::iter(fetches).buffer_unordered(16);
        while let Some(r) = fetches.next().await {
            r.map_err(|e| wrk(e.into()))?;
        }
        drop(fetches);
        let _ = logs.send(StageLog {
            stage: task.stage,
            line: format!("inputs ready in {:.1}s", moved_in.elapsed().as_secs_f64()),
            placed_on: None,
        });
        let manifest = Arc::new(manifest);
        let inputs = BuildInputs {
            manifest: Arc::clone(&manifest),
            context: Arc::new(BlobContext {
                blobs: self.blobs.clone(),
                manifest,
            }),
            secrets: Arc::new(a.secrets.clone().into_iter().collect()),
        };
        let result = self
            .executor
            .run_stage(task.clone(), inputs, logs, cancel)
            .await?;
        let artifacts = self.export(&task, a, &result.image_id).await.map_err(wrk)?;
        Ok((result, artifacts))
    }

    /// Loads the stage images the task needs and lacks; turns copied-path artifacts into a
    /// small image the COPY --from reads instead of the stage's image.
    async fn import(&mut self, task: &mut StageTask, a: &TaskAssignment) -> Result<(), StageError> {
        let mut by_key: BTreeMap<StageKey, Vec<Artifact>> = BTreeMap::new();
        for pb in &a.imports {
            let art = artifact(pb).map_err(|e| StageError::new(e.message().to_string()))?;
            by_key.entry(art.stage_key).or_default().push(art);
        }
        // Images whose layers an imported stage image may start with: the task's pinned
        // external images (loaded before) and the stage images it reads that are here.
        let mut have: Vec<String> = a.base_images.iter().map(|b| b.id.clone()).collect();
        if let TaskBase::Image { id, .. } = &task.base {
            have.push(id.clone());
        }
        for k in by_key.keys() {
            have.push(stage_image_tag(k));
        }
        // Each stage's artifacts are imported at the same time (a docker load or import
        // each); then the task reads the path-only ones from the images made of them.
        let imports = by_key.into_iter().map(|(key, arts)| {
            // The image this build read the stage as, when the task names it: a daemon
            // holding another image under the stage's tag must import this one.
            let expected = task
                .instructions
                .iter()
                .flat_map(|ti| ti.copy_from.iter().chain(ti.mount_from.iter().flatten()))
                .find_map(|s| match s {
                    TaskSource::Stage {
                        key: k,
                        image_id: Some(id),
                        ..
                    } if *k == key => Some(id.clone()),
                    _ => None,
                });
            let this = self.clone_for_import();
            let have = have.clone();
            let platform = task.platform.clone();
            async move {
                let made = this
                    .import_stage(key, &arts, expected, have, &platform)
                    .await?;
                Ok::<_, StageError>((key, made))
            }
        });
        for r in futures::future::join_all(imports).await {
            let (key, made) = r?;
            let Some((reference, id)) = made else {
                continue;
            };
            for ti in &mut task.instructions {
                for s in ti
                    .copy_from
                    .iter_mut()
                    .chain(ti.mount_from.iter_mut().flatten())
                {
                    if matches!(s, TaskSource::Stage { key: k, .. } if *k == key) {
                        *s = TaskSource::Image {
                            reference: reference.clone(),
                            id: id.clone(),
                        };
                    }
                }
            }
        }
        if let TaskBase::Stage { key, .. } = &task.base {
            if !self.has_image(&stage_image_tag(key)).await {
                return Err(StageError::new(format!(
                    "the image of stage {key} is neither on this worker nor in the store"
                )));
            }
        }
        Ok(())
    }

    /// A copy of what importing needs, for one of several imports at once.
    fn clone_for_import(&self) -> TaskCtx {
        TaskCtx {
            executor: Arc::clone(&self.executor),
            docker: self.docker.clone(),
            blobs: self.blobs.clone(),
            clients: self.clients.clone(),
            worker_id: self.worker_id.clone(),
            scratch: self.scratch.clone(),
        }
    }

    /// Imports one stage's artifacts unless the daemon holds its image (`expected`, else
    /// its tag): the image by `docker load`, or an image of just its exported paths,
    /// whose reference and id are returned (the task then reads those paths there).
    async fn import_stage(
        mut self,
        key: StageKey,
        arts: &[Artifact],
        expected: Option<String>,
        have: Vec<String>,
        platform: &str,
    ) -> Result<Option<(String, String)>, StageError> {
        let held = match &expected {
            Some(id) => self.has_image(id).await,
            None => self.has_image(&stage_image_tag(&key)).await,
        };
        if held {
            return Ok(None);
        }
        if let Some(img) = arts.iter().find(|a| a.path.is_empty()) {
            self.load_image_artifact(&img.digest, &have)
                .await
                .map_err(|e| StageError::new(format!("stage {key}: {}", e.message)))?;
            return Ok(None);
        }
        // Only paths: build an image holding just them, and read COPY --from there.
        let reference = paths_image_tag(&key, arts);
        let small = arts.iter().map(|a| a.size).sum::<u64>() <= PATHS_IN_MEMORY;
        if small && !self.has_image(&reference).await {
            // Written in the background under an id known at once, its paths read ahead
            // into the tree cache: the consumer starts without waiting for the daemon.
            let mut paths = Vec::with_capacity(arts.len());
            for art in arts {
                paths.push((art.path.clone(), self.fetch_blob(&art.digest).await?));
            }
            let (layer, paths) = tokio::task::spawn_blocking(move || {
                let mut out = tar::Builder::new(Vec::new());
                for (path, data) in &paths {
                    reprefix(&mut out, &data[..], parent_of(path), base_of(path))
                        .map_err(|e| std::io::Error::other(format!("artifact {path}: {e}")))?;
                }
                Ok::<_, std::io::Error>((out.into_inner()?, paths))
            })
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(e.to_string()))?;
            let id = self
                .executor
                .load_paths_image(&reference, platform, layer, &paths)?;
            return Ok(Some((reference, id)));
        }
        if !self.has_image(&reference).await {
            // Streamed through files: an artifact may be larger than memory.
            let mut parts = Vec::with_capacity(arts.len());
            for art in arts {
                parts.push((self.fetch_blob_file(&art.digest).await?, art.path.clone()));
            }
            let scratch = self.scratch.clone();
            let rootfs = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&scratch)?;
                let tmp = tempfile::NamedTempFile::new_in(&scratch)?;
                let mut out = tar::Builder::new(std::io::BufWriter::new(tmp.reopen()?));
                for (file, path) in parts {
                    reprefix(
                        &mut out,
                        std::io::BufReader::new(file),
                        parent_of(&path),
                        base_of(&path),
                    )
                    .map_err(|e| std::io::Error::other(format!("artifact {path}: {e}")))?;
                }
                out.into_inner()?.flush()?;
                Ok::<_, std::io::Error>(tmp)
            })
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(e.to_string()))?;
            let file = rootfs
                .reopen()
                .map_err(|e| StageError::new(e.to_string()))?;
            let (repo, tag) = reference.split_once(':').expect("has a tag");
            let opts = CreateImageOptionsBuilder::default()
                .from_src("-")
                .repo(repo)
                .tag(tag)
                .build();
            let mut s = self.docker.create_image(
                Some(opts),
                Some(bollard::body_try_stream(file_chunks(file))),
                None,
            );
            while let Some(r) = s.next().await {
                r.map_err(|e| StageError::new(format!("importing artifacts of {key}: {e}")))?;
            }
        }
        let id = self
            .docker
            .inspect_image(&reference)
            .await
            .ok()
            .and_then(|i| i.id)
            .unwrap_or_else(|| reference.clone());
        Ok(Some((reference, id)))
    }

    /// A blob as a file of the local blob cache (downloaded if missing, checked), for
    /// blobs too large to hold in memory (images, layers).
    async fn fetch_blob_file(&mut self, digest_hex: &str) -> Result<std::fs::File, StageError> {
        let d = BlobDigest::from_hex(digest_hex)
            .ok_or_else(|| StageError::new(format!("bad blob digest {digest_hex:?}")))?;
        download_to(&mut self.clients.content, &self.blobs, &d)
            .await
            .map_err(|e| StageError::new(e.to_string()))?;
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || blobs.open_verified(&d))
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(e.to_string()))
    }

    /// An artifact's bytes: downloaded into the local blob cache if missing, read verified.
    async fn fetch_blob(&mut self, digest_hex: &str) -> Result<Vec<u8>, StageError> {
        let d = BlobDigest::from_hex(digest_hex)
            .ok_or_else(|| StageError::new(format!("bad artifact digest {digest_hex:?}")))?;
        download_to(&mut self.clients.content, &self.blobs, &d)
            .await
            .map_err(|e| StageError::new(e.to_string()))?;
        self.blobs
            .read(&d)
            .map_err(|e| StageError::new(e.to_string()))
    }

    async fn has_image(&self, reference: &str) -> bool {
        // A stage image this worker is still writing counts once it is written; a parked
        // one counts as it is (whatever needs it on the daemon loads it).
        self.executor.holds_image(reference).await
    }

    /// Exports what the consumers need: the image (docker save) and/or the copied paths.
    async fn export(
        &mut self,
        task: &StageTask,
        a: &TaskAssignment,
        image_id: &str,
    ) -> Result<Vec<Artifact>, WorkerError> {
        let tag = stage_image_tag(&task.key);
        let mut out = Vec::new();
        std::fs::create_dir_all(&self.scratch).map_err(|e| WorkerError::Io(e.to_string()))?;
        let written = |e: StageError| WorkerError::Docker(e.message);
        if a.export_image {
            // Saved from the daemon: the image must be written first.
            self.executor.settle(&tag).await.map_err(written)?;
            out.push(self.export_image_parts(task, &tag).await?);
        }
        // Paths the stage's contents already read (its tree cache) need no container.
        let mut from_container = Vec::new();
        for p in &a.export_paths {
            match self.executor.cached_path_archive(image_id, p) {
                Some(tar) => {
                    tracing::debug!(path = %p, "exported from the stage's trees");
                    let chunk = futures::stream::iter([Ok(bytes::Bytes::from(tar))]);
                    if let Some(art) = self.upload_stream(task, p.clone(), chunk).await? {
                        out.push(art);
                    }
                }
                None => from_container.push(p.clone()),
            }
        }
        if !from_container.is_empty() {
            self.executor.settle(&tag).await.map_err(written)?;
            let name = format!(
                "dbuild-export-{}-{}",
                &task.key.to_hex()[..12],
                std::process::id()
            );
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            let body = bollard::models::ContainerCreateBody {
                image: Some(tag.clone()),
                cmd: Some(vec!["/".into()]),
                ..Default::default()
            };
            self.docker
                .create_container(Some(opts), body)
                .await
                .map_err(|e| WorkerError::Docker(e.to_string()))?;
            let mut result = Ok(());
            for p in &from_container {
                // What COPY --from reads: a symlink's target (the archive keeps the
                // target's name; the importer names it back after `p`).
                let real = self
                    .executor
                    .resolve_path(&name, p)
                    .await
                    .unwrap_or_else(|_| p.clone());
                let opts = DownloadFromContainerOptionsBuilder::default()
                    .path(&real)
                    .build();
                let tar = self.docker.download_from_container(&name, Some(opts));
                match self.upload_stream(task, p.clone(), tar).await {
                    Ok(Some(art)) => out.push(art),
                    Ok(None) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = self
                .docker
                .remove_container(
                    &name,
                    Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                )
                .await;
            result?;
        }
        Ok(out)
    }

    /// Exports the stage image as parts (model::image_parts): each layer a blob,
    /// uploaded only when the store lacks it (a base layer is stored once for every stage
    /// built on it), and an index naming them, which is the artifact.
    async fn export_image_parts(
        &mut self,
        task: &StageTask,
        tag: &str,
    ) -> Result<Artifact, WorkerError> {
        let io = |e: std::io::Error| WorkerError::Io(e.to_string());
        let archive = self.save_image(tag).await?;
        let (path, scratch) = (archive.path().to_path_buf(), self.scratch.clone());
        let saved =
            tokio::task::spawn_blocking(move || model::image_parts::split_saved(&path, &scratch))
                .await
                .map_err(|e| WorkerError::Io(e.to_string()))?
                .map_err(|e| WorkerError::Io(format!("splitting the saved image {tag}: {e}")))?;
        drop(archive);
        let mut layers = Vec::with_capacity(saved.layers.len());
        for (diff_id, file) in &saved.layers {
            let (d, size) = upload_file(&mut self.clients.content, file.path()).await?;
            layers.push(model::image_parts::LayerPart {
                diff_id: diff_id.clone(),
                digest: d.to_hex(),
                size,
            });
        }
        let index = model::image_parts::ImageParts {
            kind: model::image_parts::KIND.into(),
            config: saved.config,
            repo_tags: saved.repo_tags,
            layers,
        };
        let file = tempfile::NamedTempFile::new_in(&self.scratch).map_err(io)?;
        std::fs::write(file.path(), index.to_json()).map_err(io)?;
        let (d, size) = upload_file(&mut self.clients.content, file.path()).await?;
        Ok(Artifact {
            stage_key: task.key,
            path: String::new(),
            digest: d.to_hex(),
            size,
        })
    }

    /// Loads an image artifact: a whole `docker save` archive, or an index of parts, of
    /// which only the layers this daemon lacks are fetched (`have`: images whose layers
    /// it holds, to find the longest layer chain it has).
    async fn load_image_artifact(
        &mut self,
        digest: &str,
        have: &[String],
    ) -> Result<(), StageError> {
        let index_size = BlobDigest::from_hex(digest)
            .and_then(|d| self.blobs.size(&d))
            .unwrap_or(0);
        // An index is small; anything larger is a whole archive, streamed to the daemon.
        let parts = if index_size > 4 << 20 {
            None
        } else {
            let bytes = self.fetch_blob(digest).await?;
            model::image_parts::ImageParts::parse(&bytes)
        };
        let Some(parts) = parts else {
            let file = self.fetch_blob_file(digest).await?;
            return self.docker_load(file).await;
        };
        let wanted = parts.diff_ids();
        let mut present = 0;
        for image in have {
            let layers = crate::image_cap::image_layers(&self.docker, image).await;
            let common = layers
                .iter()
                .zip(&wanted)
                .take_while(|(a, b)| a == b)
                .count();
            present = present.max(common);
        }
        // First without the layers the daemon should have; if it lacks one after all,
        // once more with every layer.
        for skip in [present, 0] {
            // Layers are read from the local blob cache as files, never held in memory.
            let mut files = Vec::new();
            for l in &parts.layers[skip..] {
                files.push(self.fetch_blob_file(&l.digest).await?);
            }
            let mut files = files.into_iter();
            let archive = tempfile::tempfile_in(&self.scratch)
                .or_else(|_| tempfile::tempfile())
                .map_err(|e| StageError::new(e.to_string()))?;
            let mut layer = |i: usize| -> std::io::Result<Option<Box<dyn Read>>> {
                Ok(if i >= skip {
                    files.next().map(|f| Box::new(f) as Box<dyn Read>)
                } else {
                    None
                })
            };
            let mut w = std::io::BufWriter::new(&archive);
            model::image_parts::assemble(&parts, &mut layer, &mut w)
                .map_err(|e| StageError::new(format!("assembling image {digest}: {e}")))?;
            drop(w);
            use std::io::Seek;
            let mut archive = archive;
            archive
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| StageError::new(e.to_string()))?;
            match self.docker_load(archive).await {
                Ok(()) => return Ok(()),
                Err(e) if skip == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e.message, "load without the layers the daemon should have failed; sending all")
                }
            }
        }
        Ok(())
    }

    /// `docker load` of an archive file, streamed.
    async fn docker_load(&self, archive: std::fs::File) -> Result<(), StageError> {
        docker_load_file(&self.docker, archive)
            .await
            .map_err(|e| StageError::new(format!("docker load: {e}")))
    }

    /// Spools a Docker byte stream to a scratch file and uploads it as the artifact `path`
    /// of the task's stage. `None` when Docker has no such path: the consumer's COPY then
    /// fails with Docker's own message.
    async fn upload_stream(
        &mut self,
        task: &StageTask,
        path: String,
        mut stream: impl futures::Stream<Item = Result<bytes::Bytes, bollard::errors::Error>> + Unpin,
    ) -> Result<Option<Artifact>, WorkerError> {
        let io = |e: std::io::Error| WorkerError::Io(e.to_string());
        let file = tempfile::NamedTempFile::new_in(&self.scratch).map_err(io)?;
        let mut f = file.reopen().map_err(io)?;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => f.write_all(&c).map_err(io)?,
                Err(_) if !path.is_empty() => return Ok(None),
                Err(e) => return Err(WorkerError::Docker(e.to_string())),
            }
        }
        f.flush().map_err(io)?;
        let (d, size) = upload_file(&mut self.clients.content, file.path()).await?;
        Ok(Some(Artifact {
            stage_key: task.key,
            path,
            digest: d.to_hex(),
            size,
        }))
    }
}

fn parent_of(path: &str) -> String {
    let p = path.trim_end_matches('/');
    match p.rsplit_once('/') {
        Some((parent, _)) => parent.trim_start_matches('/').to_string(),
        None => String::new(),
    }
}

/// Copies the entries of a `download_from_container` tar (named from the path's basename)
/// into `out` under `prefix`, keeping modes, owners and link targets, adding the parents.
/// The last component of a path (`/a/b` → `b`).
fn base_of(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// Copies an archive of one path (its root entry first) into `out` below `prefix`, with
/// the root named `root` (an exported symlink's target arrives under its own name).
fn reprefix<W: std::io::Write>(
    out: &mut tar::Builder<W>,
    archive: impl std::io::Read,
    prefix: String,
    root: &str,
) -> std::io::Result<()> {
    let mut first: Option<String> = None;
    let rename = |name: &str, first: &str| -> String {
        if root.is_empty() || first.is_empty() {
            return name.to_string();
        }
        match name.strip_prefix(first) {
            Some("") => root.to_string(),
            Some(rest) if rest.starts_with('/') => format!("{root}{rest}"),
            _ => name.to_string(),
        }
    };
    let mut made = String::new();
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        made = if made.is_empty() {
            part.to_string()
        } else {
            format!("{made}/{part}")
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        out.append_data(&mut h, format!("{made}/"), std::io::empty())?;
    }
    let mut a = tar::Archive::new(archive);
    for entry in a.entries()? {
        let mut e = entry?;
        let name = e.path()?.to_string_lossy().into_owned();
        let first = first
            .get_or_insert_with(|| name.trim_end_matches('/').to_string())
            .clone();
        let name = rename(&name, &first);
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let mut h = e.header().clone();
        let link = e.link_name()?.map(|l| l.into_owned());
        match (h.entry_type(), link) {
            // Hard links name another entry of the same archive: move them along.
            (tar::EntryType::Link, Some(target)) => {
                let t = rename(&target.to_string_lossy(), &first);
                let t = if prefix.is_empty() {
                    t
                } else {
                    format!("{prefix}/{t}")
                };
                out.append_link(&mut h, &full, t)?;
            }
            (_, Some(target)) => {
                let target = target.to_path_buf();
                out.append_link(&mut h, &full, target)?;
            }
            (_, None) => out.append_data(&mut h, &full, &mut e)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        assert_eq!(parent_of("/go/src/app"), "go/src");
        assert_eq!(parent_of("/app"), "");
        assert_eq!(parent_of("/out/"), "");
    }

    /// An exported symlink's target arrives under its own name and is named back.
    #[test]
    fn reprefix_names_the_root_after_the_exported_path() {
        let mut src = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        src.append_data(&mut h, "real/", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(2);
        src.append_data(&mut h, "real/f", &b"hi"[..]).unwrap();
        let archive = src.into_inner().unwrap();
        let mut out = tar::Builder::new(Vec::new());
        reprefix(
            &mut out,
            archive.as_slice(),
            "opt".into(),
            base_of("/opt/dir"),
        )
        .unwrap();
        let bytes = out.into_inner().unwrap();
        let names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["opt/", "opt/dir/", "opt/dir/f"]);
    }
}
