//! dbuild worker: executes stage tasks on a Docker daemon.
//!
//! Two parts: [`daemon::Daemon`], the handle that owns the one Docker connection and
//! every call made on it, and on top of it [`DockerExecutor`] (the `model::task::Executor`
//! that runs every instruction itself through the container and image API) and the farm
//! agent ([`farm`]: session, tasks, imports, exports, resolve jobs). It never opens the
//! cache index: it does not depend on the coordinator.
pub mod daemon;
pub mod executor;

pub use executor::DockerExecutor;
pub mod farm;
pub mod image_cap;
