//! The build context: walking it under `.dockerignore`, hashing its files, the stat cache.
//!
//! Entry point: [`scan`], which returns a [`ContextManifest`] (sorted path -> mode, kind,
//! blake3 digest) and [`ScanStats`]. Unix-only (modes, inodes and ctime come from `lstat`).
pub mod error;
mod gomatch;
pub mod ignore;
pub mod manifest;
pub mod statcache;
pub mod walk;

pub use error::ContextError;
pub use ignore::{path_match, read_ignore_patterns, IgnoreMatcher};
pub use manifest::{ContextManifest, EntryKind, ManifestEntry};
pub use statcache::stat_cache_path;
pub use walk::{scan, ScanOptions, ScanStats};
