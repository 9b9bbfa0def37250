//! dbuild worker: executes stage tasks on a Docker daemon (issue #3).
//!
//! [`DockerExecutor`] implements `model::task::Executor` with bollard, executing
//! every instruction itself through the container and image API.
pub mod daemon;
pub mod executor;

pub use executor::DockerExecutor;
pub mod farm;
pub mod image_cap;
