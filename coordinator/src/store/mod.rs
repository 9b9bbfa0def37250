//! The cache store: a small metadata index ([`Store`], sled behind a trait) and blobs as
//! files named by their blake3 digest ([`BlobStore`]). Only the coordinator opens it.
mod sled_store;

pub use model::blobs::{BlobError, BlobStore, BlobWriter};
pub use sled_store::SledStore;

/// A metadata tree of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Stage key → stage record.
    Stages,
    /// Blob digest → blob record (size, last use).
    Blobs,
    /// Schema version and counters.
    Meta,
    /// `<Dockerfile id>/<stage name>` → the most recent build's key inputs (for explain).
    History,
}

impl Tree {
    pub fn name(self) -> &'static str {
        match self {
            Tree::Stages => "stages",
            Tree::Blobs => "blobs",
            Tree::Meta => "meta",
            Tree::History => "history",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("index {path}: {message}")]
    Index {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("blob store {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Another process holds the index (sled allows one process per index).
    #[error("index {path} is in use by another process (one process per data dir): stop it, or give this command its own --data-dir")]
    Busy { path: std::path::PathBuf },
}

/// Key/value pairs returned by a prefix scan, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The index: small metadata only, never blob bytes. One file per backend implements it,
/// so swapping sled is one file.
pub trait Store: Send + Sync {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Sets `key` to `new` only if it currently holds `old` (`None` = absent); on a
    /// mismatch returns the current value as `Err`.
    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, StoreError>;
    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Entries, StoreError>;
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), StoreError>;
}
