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

use crate::build::{BuildOptions, Network, PrepareError, Session};
use crate::explain::{self, CacheLookup};
use crate::pool::{exports, WorkerPool};
use crate::scheduler::PinnedImages;
use crate::store::BlobStore;
use crate::sync::lock;
use model::analysis::{plan_source, AnalysisError};
use model::context::{ContextManifest, EntryKind};
use model::frontend::plan::{Plan, PlanOptions, Platform};
use model::ids::BuildId;
use model::keys::StageKeys;
use model::task::{BlobContext, BuildInputs};
use wire::{document, from_document};

pub struct BuildServer {
    pool: Arc<WorkerPool>,
    blobs: BlobStore,
    builds: Arc<Mutex<BTreeMap<BuildId, CancellationToken>>>,
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

fn event(build_id: &BuildId, json: serde_json::Value) -> PbEvent {
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
    /// A build session on the pool: its cache, its single-flight locks, its history.
    fn session(&self) -> Session {
        // The pool waits for free slots itself; the scheduler only orders the work.
        Session::new(Arc::clone(&self.pool) as _, 1024)
            .with_cache(Arc::clone(self.pool.cache()))
            .with_single_flight(self.locks.clone())
            .with_history(Arc::clone(self.pool.cache().index()))
    }

    /// Plans the request's Dockerfile (never trusting a key from the client).
    fn plan_request(r: &SubmitRequest) -> Result<(Plan, ContextManifest), Status> {
        let file = if r.dockerfile_path.is_empty() {
            "Dockerfile".to_string()
        } else {
            r.dockerfile_path.clone()
        };
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
        let options = PlanOptions {
            target: r.target.clone(),
            build_args: r.build_args.clone().into_iter().collect(),
            platform,
        };
        let plan = plan_source(&r.dockerfile, std::path::Path::new(&file), &options).map_err(
            |e| match e {
                AnalysisError::Dockerfile {
                    line: Some(l),
                    message,
                    ..
                } => Status::invalid_argument(format!("{file}:{l}: {message}")),
                AnalysisError::Dockerfile { message, .. } => {
                    Status::invalid_argument(format!("{file}: {message}"))
                }
                other => Status::invalid_argument(other.to_string()),
            },
        )?;
        let manifest: ContextManifest = from_document(r.manifest.as_ref())?;
        Ok((plan, manifest))
    }

    /// Plans the request, has a worker pin its base images and keys it; no blob is needed.
    async fn key_request(&self, r: &SubmitRequest) -> Result<Keyed, Status> {
        let (plan, manifest) = Self::plan_request(r)?;
        let (pinned, keys) = self
            .session()
            .pin_and_key(&plan, &manifest, r.pull)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
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
        let options = BuildOptions {
            no_cache: r.no_cache,
            no_cache_filter: r.no_cache_filter.clone(),
            pull: r.pull,
            network: r
                .network
                .parse::<Network>()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            export_target_image: r.export_image,
        };
        let (plan, manifest) = Self::plan_request(&r)?;
        let session = self.session();
        // The id names the target's key too, for whoever reads the coordinator's logs.
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let prepared = session
            .prepare(
                |target| BuildId(format!("b{millis}-{}", &target.to_hex()[..12])),
                plan,
                manifest,
                &options,
            )
            .await
            .map_err(|e| match e {
                PrepareError::Pin(_) => Status::failed_precondition(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        let (plan, keys, manifest) = (&prepared.request.plan, &prepared.keys, &prepared.manifest);
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
        let build_id = prepared.request.build_id.clone();
        let inputs = BuildInputs {
            manifest: Arc::clone(&prepared.manifest),
            context: Arc::new(BlobContext {
                blobs: self.blobs.clone(),
                manifest: Arc::clone(&prepared.manifest),
            }),
            secrets: Arc::new(r.secrets.clone().into_iter().collect()),
        };
        let cancel = CancellationToken::new();
        lock(&self.builds).insert(build_id.clone(), cancel.clone());
        let (out_tx, out_rx) = mpsc::channel(256);
        // First, why each stage may be rebuilt (its key against the last recorded build
        // of the same Dockerfile), which `--progress plain` prints next to a rebuilt stage.
        if !r.history_id.is_empty() {
            let why = prepared.why_rebuilt(&**self.pool.cache().index(), &r.history_id);
            let _ = out_tx.try_send(Ok(event(
                &build_id,
                serde_json::json!({ "event": "build_reasons", "reasons": why }),
            )));
        }
        let pool = Arc::clone(&self.pool);
        let builds = Arc::clone(&self.builds);
        let history_id = (!r.history_id.is_empty()).then(|| r.history_id.clone());
        // The context's blobs belong to no record, nor do the pinned base images' blobs
        // (looking them up marks them used): pinned against the sweep while the build runs.
        let base_blobs: Vec<String> = prepared
            .request
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
            let result = session
                .run(&prepared, inputs, history_id.as_deref(), tx, cancel)
                .await;
            let _ = forward.await;
            if let Ok(ran) = result {
                let outcome = ran.outcome;
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
            lock(&builds).remove(&build_id);
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
        let token = lock(&self.builds)
            .get(req.get_ref().build_id.as_str())
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
