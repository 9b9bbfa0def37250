//! Exports after a stage: what its consumers on other workers need, the image as parts
//! (one blob per layer, stored once) and the copied paths as archives.
use std::io::Write;

use futures::StreamExt;
use model::task::{stage_image_tag, Artifact, StageTask};
use proto::v1::TaskAssignment;
use wire::blob::upload_file;

use super::task::TaskCtx;
use super::WorkerError;
use crate::daemon::DaemonError;

impl TaskCtx {
    /// Exports what the consumers need: the image (docker save) and/or the copied paths.
    pub(super) async fn export(
        &mut self,
        task: &StageTask,
        a: &TaskAssignment,
        image_id: &str,
    ) -> Result<Vec<Artifact>, WorkerError> {
        let tag = stage_image_tag(&task.key);
        let mut out = Vec::new();
        std::fs::create_dir_all(&self.scratch).map_err(WorkerError::io(&self.scratch))?;
        let written = WorkerError::Executor;
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
                    let chunk =
                        futures::stream::iter([Ok::<_, DaemonError>(bytes::Bytes::from(tar))]);
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
            let executor = std::sync::Arc::clone(&self.executor);
            executor.daemon().create_named(&name, &tag).await?;
            let mut result = Ok(());
            for p in &from_container {
                // What COPY --from reads: a symlink's target (the archive keeps the
                // target's name; the importer names it back after `p`).
                let real = self
                    .executor
                    .resolve_path(&name, p)
                    .await
                    .unwrap_or_else(|_| p.clone());
                let tar = executor.daemon().download_stream(&name, &real);
                match self.upload_stream(task, p.clone(), tar).await {
                    Ok(Some(art)) => out.push(art),
                    Ok(None) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let _ = executor.daemon().remove_container(&name).await;
            result?;
        }
        Ok(out)
    }

    /// Exports the stage image as parts (model::image_parts): each layer a blob,
    /// uploaded only when the store lacks it (a base layer is stored once for every stage
    /// built on it), and an index naming them, which is the artifact.
    pub(super) async fn export_image_parts(
        &mut self,
        task: &StageTask,
        tag: &str,
    ) -> Result<Artifact, WorkerError> {
        let archive = self.save_image(tag).await?;
        let (path, scratch) = (archive.path().to_path_buf(), self.scratch.clone());
        let saved =
            tokio::task::spawn_blocking(move || model::image_parts::split_saved(&path, &scratch))
                .await
                .map_err(WorkerError::Blocking)?
                .map_err(|source| WorkerError::SplitImage {
                    image: tag.to_string(),
                    source,
                })?;
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
        let file = tempfile::NamedTempFile::new_in(&self.scratch)
            .map_err(WorkerError::io(&self.scratch))?;
        std::fs::write(file.path(), index.to_json()).map_err(WorkerError::io(file.path()))?;
        let (d, size) = upload_file(&mut self.clients.content, file.path()).await?;
        Ok(Artifact {
            stage_key: task.key,
            path: String::new(),
            digest: d.to_hex(),
            size,
        })
    }

    /// Spools a Docker byte stream to a scratch file and uploads it as the artifact `path`
    /// of the task's stage. `None` when Docker has no such path: the consumer's COPY then
    /// fails with Docker's own message.
    pub(super) async fn upload_stream(
        &mut self,
        task: &StageTask,
        path: String,
        mut stream: impl futures::Stream<Item = Result<bytes::Bytes, DaemonError>> + Unpin,
    ) -> Result<Option<Artifact>, WorkerError> {
        let file = tempfile::NamedTempFile::new_in(&self.scratch)
            .map_err(WorkerError::io(&self.scratch))?;
        let io = WorkerError::io(file.path());
        let mut f = file.reopen().map_err(WorkerError::io(file.path()))?;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => f.write_all(&c).map_err(WorkerError::io(file.path()))?,
                // The daemon has no such path: not this worker's error (see above).
                Err(_) if !path.is_empty() => return Ok(None),
                Err(e) => return Err(e.into()),
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
