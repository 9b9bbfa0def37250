//! gRPC services of the coordinator (package `dbuild.v1`): the transport only. The build
//! logic lives in the scheduler and the worker pool; these files translate messages.
pub mod builds;
pub mod cache;
pub mod content;
pub mod workers;

pub use builds::BuildServer;
pub use cache::CacheServer;
pub use content::ContentServer;
pub use wire::auth::Auth;
pub use workers::WorkerServer;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use proto::v1::build_service_server::BuildServiceServer;
use proto::v1::cache_service_server::CacheServiceServer;
use proto::v1::content_service_server::ContentServiceServer;
use proto::v1::worker_service_server::WorkerServiceServer;

use crate::cache::StageCache;
use crate::pool::WorkerPool;
use crate::store::StoreError;

/// How the coordinator keeps its cache.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Require this bearer token on every RPC.
    pub token: Option<String>,
    /// Evict least recently used stages past this many bytes (`None`: no cap).
    pub cache_max_bytes: Option<u64>,
}

/// Runs the coordinator's gRPC services on `listener` until `shutdown` completes. The
/// index lives in `<data_dir>/index`, blobs under `<data_dir>/blobs`, single-flight
/// locks under `<data_dir>/locks`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    data_dir: &Path,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cache = Arc::new(StageCache::open(data_dir, true)?.with_max_bytes(opts.cache_max_bytes));
    let blobs = cache.blobs().expect("opened with blobs").clone();
    let pool = WorkerPool::new(Arc::clone(&cache));
    let auth = Auth::new(opts.token);
    let lease_pool = Arc::clone(&pool);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::pool::HEARTBEAT_INTERVAL).await;
            lease_pool.expire_leases();
        }
    });
    let (a1, a2, a3, a4) = (auth.clone(), auth.clone(), auth.clone(), auth);
    // Graceful shutdown waits for open streams: end the workers' task streams (they
    // reconnect to the next coordinator) so it does not wait for their leases.
    let closing = Arc::clone(&pool);
    let shutdown = async move {
        shutdown.await;
        closing.detach_all();
    };
    tonic::transport::Server::builder()
        .add_service(BuildServiceServer::with_interceptor(
            BuildServer::new(Arc::clone(&pool), blobs.clone(), data_dir.join("locks")),
            move |r| a1.check(r),
        ))
        .add_service(ContentServiceServer::with_interceptor(
            ContentServer::new(blobs),
            move |r| a2.check(r),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerServer::new(Arc::clone(&pool)),
            move |r| a3.check(r),
        ))
        .add_service(CacheServiceServer::with_interceptor(
            CacheServer::new(cache),
            move |r| a4.check(r),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Transport(String),
}

/// Binds `addr` (e.g. `127.0.0.1:7700`, port 0 for any).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
