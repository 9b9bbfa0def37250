//! The coordinator's gRPC clients, sharing one channel and one [`Bearer`].
use std::time::Duration;

use proto::v1::build_service_client::BuildServiceClient;
use proto::v1::cache_service_client::CacheServiceClient;
use proto::v1::content_service_client::ContentServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::Bearer;

pub type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;
pub type Content = ContentServiceClient<InterceptedService<Channel, Bearer>>;
pub type Builds = BuildServiceClient<InterceptedService<Channel, Bearer>>;
pub type Cache = CacheServiceClient<InterceptedService<Channel, Bearer>>;

/// The coordinator did not answer a connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the coordinator at {url}: {message}")]
pub struct ConnectError {
    pub url: String,
    pub message: String,
}

/// The clients a worker or a farm client needs, sharing one channel.
#[derive(Clone)]
pub struct Clients {
    pub workers: Workers,
    pub content: Content,
    pub builds: Builds,
    pub cache: Cache,
}

impl Clients {
    pub async fn connect(url: &str, token: Option<String>) -> Result<Self, ConnectError> {
        let err = |e: &dyn std::fmt::Display| ConnectError {
            url: url.into(),
            message: e.to_string(),
        };
        let channel = Channel::from_shared(url.to_string())
            .map_err(|e| err(&e))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| err(&e))?;
        let bearer = Bearer::new(token);
        Ok(Clients {
            workers: WorkerServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            content: ContentServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            builds: BuildServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            cache: CacheServiceClient::with_interceptor(channel, bearer),
        })
    }
}
