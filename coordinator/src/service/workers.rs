//! `WorkerService`: workers register, renew their leases, receive stage tasks, stream
//! logs and report results. Only a worker that was given a task may report on it.
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use proto::v1::worker_service_server::WorkerService;
use proto::v1::{
    task_report, BaseImage, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse,
    ResolveImages, ResolvedReport, ResolvedReportResponse, StreamLogsResponse, TaskAssignment,
    TaskLog, TaskReport, TaskReportResponse, TasksRequest,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::BlobRef;
use crate::pool::{Job, Report, Resolved, WorkerPool, HEARTBEAT_INTERVAL, LEASE_TIMEOUT};
use model::keys::StageKey;
use model::task::{StageError, StageResult};
use wire::blob::{artifact, parse_digest, pb_artifact, pb_digest};
use wire::{document, from_document};

pub struct WorkerServer {
    pool: Arc<WorkerPool>,
}

impl WorkerServer {
    pub fn new(pool: Arc<WorkerPool>) -> Self {
        WorkerServer { pool }
    }
}

pub fn pb_base_image(id: &str, b: &BlobRef) -> BaseImage {
    BaseImage {
        id: id.to_string(),
        digest: model::digest::BlobDigest::from_hex(&b.digest).map(|d| pb_digest(&d)),
        size: b.size,
    }
}

fn assignment_message(job: Job) -> TaskAssignment {
    let a = match job {
        Job::Stage(a) => *a,
        Job::Resolve(r) => {
            return TaskAssignment {
                task_id: r.task_id.0,
                resolve: Some(ResolveImages {
                    references: r.references,
                    pull: r.pull,
                    stored_ids: r.stored_ids,
                }),
                ..Default::default()
            }
        }
    };
    TaskAssignment {
        resolve: None,
        base_images: a
            .base_images
            .iter()
            .map(|(id, b)| pb_base_image(id, b))
            .collect(),
        task_id: a.task_id.0,
        task: Some(document(&a.task)),
        export_image: a.export.image,
        export_paths: a.export.paths.into_iter().collect(),
        imports: a.imports.iter().map(pb_artifact).collect(),
        secrets: a
            .inputs
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        manifest: Some(document(&*a.inputs.manifest)),
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<TaskAssignment, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerServer {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("a worker needs a name (--name)"));
        }
        let holds = r
            .held_stage_keys
            .iter()
            .filter_map(|k| StageKey::from_hex(k))
            .collect();
        let id = self
            .pool
            .register(&r.name, &r.address, r.slots.max(1) as usize, holds);
        tracing::info!(worker = %r.name, slots = r.slots, "worker registered");
        Ok(Response::new(RegisterResponse {
            worker_id: id.0,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
            lease_timeout_ms: LEASE_TIMEOUT.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let cancel = self
            .pool
            .heartbeat(&req.get_ref().worker_id)
            .ok_or_else(|| Status::not_found("unknown worker: register first"))?;
        Ok(Response::new(HeartbeatResponse {
            cancel_task_ids: cancel,
        }))
    }

    type TasksStream = TaskStream;

    async fn tasks(
        &self,
        req: Request<TasksRequest>,
    ) -> Result<Response<Self::TasksStream>, Status> {
        let rx = self
            .pool
            .attach(&req.get_ref().worker_id)
            .ok_or_else(|| Status::not_found("unknown worker: register first"))?;
        let stream = UnboundedReceiverStream::new(rx).map(|a| Ok(assignment_message(a)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stream_logs(
        &self,
        req: Request<Streaming<TaskLog>>,
    ) -> Result<Response<StreamLogsResponse>, Status> {
        let mut s = req.into_inner();
        while let Some(l) = s.message().await? {
            self.pool.log(&l.worker_id, &l.task_id, l.line);
        }
        Ok(Response::new(StreamLogsResponse {}))
    }

    async fn report_result(
        &self,
        req: Request<TaskReport>,
    ) -> Result<Response<TaskReportResponse>, Status> {
        let r = req.into_inner();
        let outcome = match &r.outcome {
            Some(task_report::Outcome::Result(d)) => Ok(from_document::<StageResult>(Some(d))?),
            Some(task_report::Outcome::Error(d)) => Err(from_document::<StageError>(Some(d))?),
            None => {
                return Err(Status::invalid_argument(
                    "a report needs a result or an error",
                ))
            }
        };
        let artifacts = r
            .artifacts
            .iter()
            .map(artifact)
            .collect::<Result<Vec<_>, _>>()?;
        let accepted = self
            .pool
            .report(&r.worker_id, &r.task_id, Report { outcome, artifacts });
        Ok(Response::new(TaskReportResponse { accepted }))
    }

    async fn report_resolved(
        &self,
        req: Request<ResolvedReport>,
    ) -> Result<Response<ResolvedReportResponse>, Status> {
        let r = req.into_inner();
        let mut answers = Vec::with_capacity(r.images.len());
        for i in r.images {
            let image = match &i.image {
                Some(b) => Some(BlobRef {
                    digest: parse_digest(b.digest.as_ref())?.to_hex(),
                    size: b.size,
                }),
                None => None,
            };
            answers.push(Resolved {
                reference: i.reference,
                id: if i.id.is_empty() {
                    Err(i.error)
                } else {
                    Ok(i.id)
                },
                image,
            });
        }
        let accepted = self.pool.report_resolved(&r.worker_id, &r.task_id, answers);
        Ok(Response::new(ResolvedReportResponse { accepted }))
    }
}
