//! gRPC services of the coordinator (package `dbuild.v1`): the transport only. The build
//! logic lives in the scheduler and the worker pool; these files translate messages.
pub mod auth;
pub mod builds;
pub mod content;
pub mod workers;

pub use auth::Auth;
pub use builds::BuildServer;
pub use content::ContentServer;
pub use workers::WorkerServer;

/// Largest chunk of a streamed blob (the default gRPC message limit is 4 MiB).
pub const CHUNK: usize = 1 << 20;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use proto::v1::build_service_server::BuildServiceServer;
use proto::v1::content_service_server::ContentServiceServer;
use proto::v1::worker_service_server::WorkerServiceServer;

use crate::pool::WorkerPool;
use crate::store::{BlobStore, StoreError};

/// Runs the coordinator's gRPC services on `listener` until `shutdown` completes. Blobs
/// live under `<data_dir>/blobs`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    data_dir: &Path,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let blobs = BlobStore::open(&data_dir.join("blobs"))?;
    let pool = WorkerPool::new();
    let auth = Auth::new(token);
    let lease_pool = Arc::clone(&pool);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::pool::HEARTBEAT_INTERVAL).await;
            lease_pool.expire_leases();
        }
    });
    let (a1, a2, a3) = (auth.clone(), auth.clone(), auth);
    tonic::transport::Server::builder()
        .add_service(BuildServiceServer::with_interceptor(
            BuildServer::new(Arc::clone(&pool), blobs.clone()),
            move |r| a1.check(r),
        ))
        .add_service(ContentServiceServer::with_interceptor(
            ContentServer::new(blobs),
            move |r| a2.check(r),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerServer::new(pool),
            move |r| a3.check(r),
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
