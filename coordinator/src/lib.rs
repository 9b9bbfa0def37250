//! dbuild coordinator: Dockerfile frontend, build context, cache keys.
pub mod context;
pub mod digest;
pub mod frontend;
