//! `BuildService`: a client submits a build (Dockerfile, context manifest, options) after
//! uploading the context blobs the store lacked; the coordinator plans it itself, keys it,
//! and runs it on the worker pool with the same scheduler as the one-machine build, then
//! records the stages' keys in the build history. `Explain` plans and keys the same
//! request, and says per stage whether the cache serves it and, if not, why.
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use proto::v1::build_service_server::BuildService;
use proto::v1::{
    BuildEvent as PbEvent, CancelRequest, CancelResponse, Document, ListWorkersRequest,
    ListWorkersResponse, SubmitRequest, WorkerInfo,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::explain::{self, CacheLookup};
use crate::pool::{exports, WorkerPool};
use crate::scheduler::{external_images, BuildRequest, PinnedImages, Scheduler};
use crate::store::BlobStore;
use model::context::{ContextManifest, EntryKind};
use model::frontend::parser;
use model::frontend::plan::{plan, Plan, PlanOptions, Platform};
use model::keys::{compute_keys, StageKeys};
use model::task::{BlobContext, BuildInputs};
use wire::{document, from_document};

pub struct BuildServer {
    pool: Arc<WorkerPool>,
    blobs: BlobStore,
    builds: Arc<Mutex<BTreeMap<String, CancellationToken>>>,
    /// Single-flight locks, one per stage key being built.
    locks: std::path::PathBuf,
}

impl BuildServer {
    pub fn new(pool: Arc<WorkerPool>, blobs: BlobStore, locks: std::path::PathBuf) -> Self {
        BuildServer {
            pool,
            blobs,
            builds: Arc::default(),
            locks,
        }
    }
}

fn event(build_id: &str, json: serde_json::Value) -> PbEvent {
    PbEvent {
        build_id: build_id.to_string(),
        json: serde_json::to_vec(&json).expect("json"),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PbEvent, Status>> + Send>>;

/// A request planned, its base images pinned and its stages keyed, as the coordinator
/// builds it.
struct Keyed {
    plan: Plan,
    manifest: ContextManifest,
    pinned: PinnedImages,
    /// The static keys (before any stage is re-keyed on the contents it copies).
    keys: Vec<StageKeys>,
}

impl BuildServer {
    /// Plans the request's Dockerfile, has a worker pin its base images and keys it. Keys
    /// are derived here from the manifest, never taken from the client; no blob is needed.
    async fn key_request(&self, r: &SubmitRequest) -> Result<Keyed, Status> {
        let file = if r.dockerfile_path.is_empty() {
            "Dockerfile".to_string()
        } else {
            r.dockerfile_path.clone()
        };
        let df = parser::parse(&r.dockerfile)
            .map_err(|e| Status::invalid_argument(format!("{file}:{}: {}", e.line, e.message)))?;
        let platform = match r.platform.split('/').collect::<Vec<_>>().as_slice() {
            [os, arch] => Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            },
            [os, arch, v] => Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            },
            _ => Platform::host(),
        };
        let plan = plan(
            &df,
            &PlanOptions {
                target: r.target.clone(),
                build_args: r.build_args.clone().into_iter().collect(),
                platform,
            },
        )
        .map_err(|e| {
            Status::invalid_argument(match e.line {
                Some(l) => format!("{file}:{l}: {}", e.message),
                None => format!("{file}: {}", e.message),
            })
        })?;
        let manifest: ContextManifest = from_document(r.manifest.as_ref())?;
        // Base images are pinned once per build, by a worker's daemon: the ids enter the
        // keys (a tag that moved is a miss) and every worker builds from them.
        let references: Vec<String> = external_images(&plan)
            .into_iter()
            .filter(|r| !r.eq_ignore_ascii_case("scratch"))
            .collect();
        let pinned = PinnedImages(
            self.pool
                .pin_images(&references, r.pull)
                .await
                .map_err(Status::failed_precondition)?,
        );
        // Keys are derived here from content the store can verify; never from the client.
        let keys = compute_keys(&plan, &manifest, &pinned);
        Ok(Keyed {
            plan,
            manifest,
            pinned,
            keys,
        })
    }
}

#[tonic::async_trait]
impl BuildService for BuildServer {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let r = req.into_inner();
        let Keyed {
            plan,
            manifest,
            pinned,
            keys,
        } = self.key_request(&r).await?;
        let missing: Vec<&str> = keys
            .iter()
            .filter(|k| plan.built[k.index])
            .flat_map(|k| k.context_files.iter())
            .filter(|p| match manifest.get(p).map(|e| &e.kind) {
                Some(EntryKind::File { digest, .. }) => !self.blobs.contains(digest),
                _ => false,
            })
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{} context files were not uploaded (first: {}): upload the blobs MissingBlobs reports, then submit",
                missing.len(),
                missing[0]
            )));
        }
        let target_key = keys[plan.target].key;
        let build_id = format!(
            "b{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            &target_key.to_hex()[..12]
        );
        let plan = Arc::new(plan);
        let manifest = Arc::new(manifest);
        let inputs = BuildInputs {
            manifest: Arc::clone(&manifest),
            context: Arc::new(BlobContext {
                blobs: self.blobs.clone(),
                manifest,
            }),
            secrets: Arc::new(r.secrets.clone().into_iter().collect()),
        };
        let no_cache_stages = plan
            .stage_indices(&r.no_cache_filter)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let request = BuildRequest {
            exports: exports(&plan, r.export_image),
            build_id: build_id.clone(),
            plan,
            keys: Arc::new(keys),
            pinned,
            no_cache: r.no_cache,
            no_cache_stages,
            network: match r.network.as_str() {
                "" | "default" => None,
                "none" | "host" => Some(r.network.clone()),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "--network {other}: a build's RUN network is default, none or host"
                    )))
                }
            },
        };
        let cancel = CancellationToken::new();
        self.builds
            .lock()
            .unwrap()
            .insert(build_id.clone(), cancel.clone());
        let (out_tx, out_rx) = mpsc::channel(256);
        // First, why each stage may be rebuilt (its key against the last recorded build
        // of the same Dockerfile), which `--progress plain` prints next to a rebuilt stage.
        if !r.history_id.is_empty() {
            let why = explain::why_rebuilt(
                &**self.pool.cache().index(),
                &r.history_id,
                &request.plan,
                &request.keys,
            );
            let _ = out_tx.try_send(Ok(event(
                &build_id,
                serde_json::json!({ "event": "build_reasons", "reasons": why }),
            )));
        }
        let pool = Arc::clone(&self.pool);
        let builds = Arc::clone(&self.builds);
        let locks = self.locks.clone();
        let history_id = r.history_id.clone();
        // The context's blobs belong to no record: pinned against the sweep while the
        // build runs.
        // So are the pinned base images' blobs (looking them up marks them used).
        let base_blobs: Vec<String> = request
            .pinned
            .0
            .values()
            .filter_map(|id| pool.cache().base_image(id))
            .map(|b| b.digest)
            .collect();
        let pins = pool.cache().pin_blobs(
            inputs
                .manifest
                .iter()
                .filter_map(|e| e.digest())
                .map(|d| d.to_hex())
                .chain(base_blobs),
        );
        tokio::spawn(async move {
            let _pins = pins;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let forward_tx = out_tx.clone();
            let id = build_id.clone();
            let forward = tokio::spawn(async move {
                while let Some(e) = rx.recv().await {
                    let json = serde_json::to_value(&e).expect("events serialize");
                    if forward_tx.send(Ok(event(&id, json))).await.is_err() {
                        break;
                    }
                }
            });
            // The pool waits for free slots itself; the scheduler only orders the work.
            let scheduler = Scheduler::new(Arc::clone(&pool) as _, 1024)
                .with_cache(Arc::clone(pool.cache()))
                .with_single_flight(locks);
            let result = scheduler.run(&request, inputs, tx, cancel).await;
            let _ = forward.await;
            if let Ok(outcome) = result {
                // The static keys, as `Explain` compares them (and as the embedded build
                // records its history).
                if !history_id.is_empty() {
                    let built = outcome.results.keys().chain(&outcome.cached).copied();
                    explain::remember(
                        &**pool.cache().index(),
                        &history_id,
                        &request.plan,
                        &request.keys,
                        built,
                    );
                }
                if let Some(img) = pool
                    .artifacts_of(&outcome.target_key)
                    .into_iter()
                    .find(|a| a.path.is_empty())
                {
                    let _ = out_tx
                        .send(Ok(event(
                            &build_id,
                            serde_json::json!({
                                "event": "target_image",
                                "stage": outcome.target,
                                "key": outcome.target_key.to_hex(),
                                "digest": img.digest,
                                "size": img.size,
                            }),
                        )))
                        .await;
                }
            }
            builds.lock().unwrap().remove(&build_id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn explain(&self, req: Request<SubmitRequest>) -> Result<Response<Document>, Status> {
        let r = req.into_inner();
        // Never builds, never schedules, needs no blob: only the pinned keys.
        let k = self.key_request(&r).await?;
        let cache = self.pool.cache();
        let lookup = CacheLookup {
            cache,
            exports: exports(&k.plan, r.export_image),
        };
        let explanation = explain::explain(
            &k.plan,
            &k.manifest,
            &k.pinned,
            &k.keys,
            &**cache.index(),
            &r.history_id,
            &lookup,
        )
        .await;
        Ok(Response::new(document(&explanation)))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let token = self
            .builds
            .lock()
            .unwrap()
            .get(&req.get_ref().build_id)
            .cloned();
        if let Some(t) = &token {
            t.cancel();
        }
        Ok(Response::new(CancelResponse {
            found: token.is_some(),
        }))
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self
            .pool
            .workers()
            .into_iter()
            .map(|w| WorkerInfo {
                name: w.name,
                address: w.address,
                slots: w.slots as u32,
                running: w.running as u32,
                state: w.state.to_string(),
                last_heartbeat_unix_ms: 0,
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}
