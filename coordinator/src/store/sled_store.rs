//! [`Store`] on sled 0.34 (beta by its own account: the index is kept rebuildable).
use std::path::{Path, PathBuf};

use super::{Entries, Store, StoreError, Tree};

/// Bumped when the meaning of what the trees hold changes.
const SCHEMA_VERSION: &[u8] = b"1";

pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

impl SledStore {
    /// Opens (or creates) the index at `path`. An index that is corrupt, or was written by
    /// another schema, is moved aside to `<path>.broken-<unix time>` and started afresh: the
    /// index is metadata only, and a missing record is just a cache miss. An index another
    /// process holds ([`StoreError::Busy`]) or that cannot be read for another I/O reason is
    /// an error and is left exactly as it is.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        match Self::try_open(path) {
            Ok(s) => Ok(s),
            Err(Opening::Failed(e)) => Err(e),
            Err(Opening::Broken(e)) => {
                let aside = path.with_extension(format!(
                    "broken-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                tracing::warn!(index = %path.display(), error = %e, aside = %aside.display(), "index unusable; starting a new one");
                std::fs::rename(path, &aside).map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::try_open(path).map_err(|e| match e {
                    Opening::Failed(e) | Opening::Broken(e) => e,
                })
            }
        }
    }

    fn try_open(path: &Path) -> Result<Self, Opening> {
        let db = sled::Config::new().path(path).open().map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                Opening::Failed(StoreError::Busy {
                    path: path.to_path_buf(),
                })
            }
            // Something that is not an index sits at the path: moved aside.
            sled::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::NotADirectory
                        | std::io::ErrorKind::AlreadyExists
                        | std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Opening::Broken(index_err(path, io))
            }
            // A full disk, a descriptor limit, a read-only or failing disk, no permission:
            // the index itself is fine and is left alone.
            sled::Error::Io(io) => Opening::Failed(StoreError::Io {
                path: path.to_path_buf(),
                source: io,
            }),
            other => Opening::Broken(index_err(path, other)),
        })?;
        let store = SledStore {
            db,
            path: path.to_path_buf(),
        };
        let schema = store.get(Tree::Meta, b"schema").map_err(Opening::Broken)?;
        match schema {
            None => {
                store
                    .put(Tree::Meta, b"schema", SCHEMA_VERSION)
                    .and_then(|()| store.flush())
                    .map_err(Opening::Failed)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(Opening::Broken(StoreError::Index {
                    path: path.to_path_buf(),
                    message: format!(
                        "schema version {} (this dbuild writes {})",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(SCHEMA_VERSION)
                    ),
                }))
            }
        }
        Ok(store)
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(tree.name())
            .map_err(|e| index_err(&self.path, e))
    }
}

/// Why an index did not open: moved aside and rebuilt, or reported as it is.
enum Opening {
    Broken(StoreError),
    Failed(StoreError),
}

fn index_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Index {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)?
            .get(key)
            .map_err(|e| index_err(&self.path, e))?
            .map(|v| v.to_vec()))
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?
            .insert(key, value)
            .map_err(|e| index_err(&self.path, e))?;
        Ok(())
    }

    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, StoreError> {
        let r = self
            .tree(tree)?
            .compare_and_swap(key, old, new)
            .map_err(|e| index_err(&self.path, e))?;
        Ok(r.map_err(|e| e.current.map(|v| v.to_vec())))
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| index_err(&self.path, e))
            })
            .collect()
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)?
            .remove(key)
            .map_err(|e| index_err(&self.path, e))?
            .map(|v| v.to_vec()))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| index_err(&self.path, e))?;
        Ok(())
    }
}
