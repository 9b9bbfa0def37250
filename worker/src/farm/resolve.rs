//! Resolve jobs: pinning image references to ids on this worker's daemon, and saving
//! the images the store lacks into it.
use std::time::Duration;

use model::task::Executor;
use proto::v1::{BaseImage, ResolveImages, ResolvedImage, ResolvedReport};
use wire::blob::{pb_digest, upload_file};

use super::task::TaskCtx;
use super::WorkerError;

impl TaskCtx {
    /// Pins each reference on this worker's daemon; uploads the images the store lacks.
    pub(super) async fn resolve(mut self, task_id: String, job: ResolveImages) {
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
    pub(super) async fn save_image(
        &self,
        image: &str,
    ) -> Result<tempfile::NamedTempFile, WorkerError> {
        let io = WorkerError::io(&self.scratch);
        std::fs::create_dir_all(&self.scratch).map_err(io)?;
        let file = tempfile::NamedTempFile::new_in(&self.scratch)
            .map_err(WorkerError::io(&self.scratch))?;
        self.executor
            .daemon()
            .save_to_file(image, file.path())
            .await?;
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
}
