//! dbuild coordinator: the build session (`build`), the scheduler, the worker pool, the
//! stage cache over the index (`store`), build history and explain, and the gRPC
//! services. The build model (frontend, context, keys, tasks) is the `model` crate; what
//! crosses the wire is the `wire` crate. It never talks to Docker.
pub mod cache;
pub mod explain;
pub mod pool;
pub mod scheduler;
pub mod service;
pub mod store;
mod sync;
