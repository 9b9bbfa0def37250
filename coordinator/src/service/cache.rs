//! `CacheService`: stats, listing and pruning of the coordinator's stage cache.
use std::sync::Arc;

use proto::v1::cache_service_server::CacheService;
use proto::v1::{CacheListRequest, CacheStatsRequest, Document};
use tonic::{Request, Response, Status};

use crate::cache::{PruneOptions, StageCache, StageRecords};
use wire::{document, from_document};

pub struct CacheServer {
    cache: Arc<StageCache>,
}

impl CacheServer {
    pub fn new(cache: Arc<StageCache>) -> Self {
        CacheServer { cache }
    }
}

fn internal(e: crate::store::StoreError) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl CacheService for CacheServer {
    async fn stats(&self, _: Request<CacheStatsRequest>) -> Result<Response<Document>, Status> {
        let s = self.cache.stats().map_err(internal)?;
        Ok(Response::new(document(&s)))
    }

    async fn list(&self, _: Request<CacheListRequest>) -> Result<Response<Document>, Status> {
        let l = self.cache.list().map_err(internal)?;
        Ok(Response::new(document(&StageRecords(l))))
    }

    async fn prune(&self, req: Request<Document>) -> Result<Response<Document>, Status> {
        let opts: PruneOptions = from_document(Some(req.get_ref()))?;
        let cache = Arc::clone(&self.cache);
        let r = tokio::task::spawn_blocking(move || cache.prune(&opts))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(internal)?;
        Ok(Response::new(document(&r)))
    }
}
