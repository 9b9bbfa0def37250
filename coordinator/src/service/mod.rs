//! gRPC services of the coordinator (package `dbuild.v1`): the transport only. The build
//! logic lives in the scheduler and the worker pool; these files translate messages.
pub mod auth;
pub mod content;

pub use auth::Auth;
pub use content::ContentServer;

/// Largest chunk of a streamed blob (the default gRPC message limit is 4 MiB).
pub const CHUNK: usize = 1 << 20;
