//! A session with the coordinator: register (with the stage images held here), renew
//! the lease by heartbeats (which carry cancels back), and take tasks from the stream,
//! each run on its own task.
use std::sync::Arc;
use std::time::Duration;

use proto::v1::{HeartbeatRequest, RegisterRequest, TasksRequest};
use tokio_util::sync::CancellationToken;
use wire::Clients;

use super::task::TaskCtx;
use super::{enforce_cap, used_tags, Shared, WorkerConfig, WorkerError};
use crate::DockerExecutor;

/// One registration with the coordinator: heartbeats and the task stream, until shutdown
/// (`Ok`) or until the coordinator is lost (`Err`).
pub(super) async fn session(
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
            slots: cfg.slots.unwrap_or(1).max(1) as u32,
            held_stage_keys: held_stage_keys(&sh.executor).await,
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
            // Cancel safe: a dropped sleep loses nothing; a dropped `cancelled` is a
            // future of a token, which stays cancelled.
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
        // Cancel safe: `Streaming::message` loses no message when its future is dropped
        // (what was read stays buffered in the stream), and the stream is dropped with
        // the session anyway on shutdown.
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

/// Stage keys whose images this daemon holds (tagged `dbuild-stage:<key>`) or this
/// worker parked beside it.
async fn held_stage_keys(executor: &DockerExecutor) -> Vec<String> {
    let parked_names = executor
        .parked()
        .and_then(|p| p.archives().ok())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|a| a.names);
    executor
        .daemon()
        .list_tags("dbuild-stage")
        .await
        .unwrap_or_default()
        .into_iter()
        .chain(parked_names)
        .filter_map(|t| t.strip_prefix("dbuild-stage:").map(str::to_string))
        .collect()
}
