//! One task on this worker: its log stream, its inputs (base images, imports, context
//! blobs), the stage run on the executor, its exports and its report.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use model::blobs::BlobStore;
use model::context::ContextManifest;
use model::digest::BlobDigest;
use model::frontend::instructions::{Instruction, MountType};
use model::keys::match_sources;
use model::task::{Artifact, BlobContext, BuildInputs, Executor, StageError, StageLog, StageTask};
use proto::v1::{task_report, TaskAssignment, TaskLog, TaskReport};
use tokio_util::sync::CancellationToken;
use wire::blob::{download_to, pb_artifact};
use wire::{document, from_document, Clients};

use super::WorkerError;
use crate::DockerExecutor;

/// The context files a task reads (COPY/ADD and bind mounts from the context).
pub(super) fn needed_context_blobs(
    task: &StageTask,
    manifest: &ContextManifest,
) -> Vec<BlobDigest> {
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

/// What one task (a stage or a resolve job) works with.
pub(super) struct TaskCtx {
    pub(super) executor: Arc<DockerExecutor>,
    pub(super) blobs: BlobStore,
    pub(super) clients: Clients,
    pub(super) worker_id: String,
    /// Where archives are spooled (the data directory's `tmp`).
    pub(super) scratch: PathBuf,
}

impl TaskCtx {
    /// Runs one assignment to its end and reports it.
    pub(super) async fn handle(mut self, a: TaskAssignment, cancel: CancellationToken) {
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

    /// A copy of what importing needs, for one of several imports at once.
    pub(super) fn clone_for_import(&self) -> TaskCtx {
        TaskCtx {
            executor: Arc::clone(&self.executor),
            blobs: self.blobs.clone(),
            clients: self.clients.clone(),
            worker_id: self.worker_id.clone(),
            scratch: self.scratch.clone(),
        }
    }

    /// A blob as a file of the local blob cache (downloaded if missing, checked), for
    /// blobs too large to hold in memory (images, layers).
    pub(super) async fn fetch_blob_file(
        &mut self,
        digest_hex: &str,
    ) -> Result<std::fs::File, StageError> {
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
    pub(super) async fn fetch_blob(&mut self, digest_hex: &str) -> Result<Vec<u8>, StageError> {
        let d = BlobDigest::from_hex(digest_hex)
            .ok_or_else(|| StageError::new(format!("bad artifact digest {digest_hex:?}")))?;
        download_to(&mut self.clients.content, &self.blobs, &d)
            .await
            .map_err(|e| StageError::new(e.to_string()))?;
        self.blobs
            .read(&d)
            .map_err(|e| StageError::new(e.to_string()))
    }

    pub(super) async fn has_image(&self, reference: &str) -> bool {
        // A stage image this worker is still writing counts once it is written; a parked
        // one counts as it is (whatever needs it on the daemon loads it).
        self.executor.holds_image(reference).await
    }
}
