//! dbuild coordinator: Dockerfile frontend, build context, cache keys.
pub mod analysis;
pub mod cache;
pub mod context;
pub mod digest;
pub mod explain;
pub mod frontend;
pub mod image_parts;
pub mod keys;
pub mod pool;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod task;
