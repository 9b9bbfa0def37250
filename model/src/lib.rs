//! dbuild's build model, shared by every part of the system: the Dockerfile frontend
//! (parse, expand, plan), the build context (walk, `.dockerignore`, hashing), cache keys,
//! the stage tasks an [`task::Executor`] runs, the image-parts format and the blob files.
//!
//! It holds no index, no transport and no Docker client: the coordinator adds the index
//! and the services, the worker the daemon, and `wire` the gRPC contract's types.
pub mod analysis;
pub mod blobs;
pub mod context;
pub mod digest;
pub mod frontend;
pub mod ids;
pub mod image_parts;
pub mod keys;
pub mod task;
