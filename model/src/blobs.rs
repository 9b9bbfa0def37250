//! Blobs as files named by their blake3 digest: written to a temporary file, fsynced and
//! renamed into place, and verified whenever they are read.
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::BlobDigest;

/// What can go wrong with a blob file.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {digest}: {source}")]
    BlobIo {
        digest: String,
        source: std::io::Error,
    },
    #[error("blob store {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The bytes did not hash to the name they were stored or sent under.
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    Corrupt { expected: String, actual: String },
    #[error("blob {0} is not in the store")]
    Missing(String),
}

/// Content-addressed files under one directory: `<dir>/<first 2 hex>/<64 hex>`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        for d in [dir.to_path_buf(), dir.join("tmp")] {
            fs::create_dir_all(&d).map_err(|source| BlobError::Io { path: d, source })?;
        }
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, d: &BlobDigest) -> PathBuf {
        let hex = d.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, d: &BlobDigest) -> bool {
        self.path(d).is_file()
    }

    /// The file metadata of a stored blob (size, modification time).
    pub fn metadata(&self, d: &BlobDigest) -> Option<fs::Metadata> {
        fs::metadata(self.path(d)).ok()
    }

    /// The size of a stored blob.
    pub fn size(&self, d: &BlobDigest) -> Option<u64> {
        fs::metadata(self.path(d)).ok().map(|m| m.len())
    }

    /// Starts writing a blob; `expected` (when known) is checked before the blob is kept.
    pub fn writer(&self, expected: Option<BlobDigest>) -> Result<BlobWriter, BlobError> {
        let tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.dir.join("tmp"))
            .map_err(|source| BlobError::Io {
                path: self.dir.join("tmp"),
                source,
            })?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            hasher: blake3::Hasher::new(),
            size: 0,
            expected,
        })
    }

    /// Stores `bytes`, returning their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobDigest, BlobError> {
        let mut w = self.writer(None)?;
        w.write_all(bytes).map_err(|source| BlobError::Io {
            path: self.dir.clone(),
            source,
        })?;
        Ok(w.commit()?.0)
    }

    /// Copies a stored blob to `out`, verifying it. On a mismatch the blob is deleted (it
    /// can never be served again) and `Corrupt` is returned: whatever `out` received must
    /// then be discarded.
    pub fn copy_to(&self, d: &BlobDigest, out: &mut dyn Write) -> Result<u64, BlobError> {
        let io_err = |source| BlobError::BlobIo {
            digest: d.to_hex(),
            source,
        };
        let mut f = match File::open(self.path(d)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::Missing(d.to_hex()))
            }
            Err(e) => return Err(io_err(e)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err)?;
            total += n as u64;
        }
        let actual = BlobDigest::from(hasher.finalize());
        if actual != *d {
            let _ = fs::remove_file(self.path(d));
            tracing::error!(blob = %d, actual = %actual, "corrupt blob removed");
            return Err(BlobError::Corrupt {
                expected: d.to_hex(),
                actual: actual.to_hex(),
            });
        }
        Ok(total)
    }

    /// Reads a whole blob, verified.
    pub fn read(&self, d: &BlobDigest) -> Result<Vec<u8>, BlobError> {
        let mut v = Vec::new();
        self.copy_to(d, &mut v)?;
        Ok(v)
    }

    /// A stored blob to read from, checked first (a corrupt one is deleted): for blobs too
    /// large to hold in memory. Blobs are immutable once stored.
    pub fn open_verified(&self, d: &BlobDigest) -> Result<fs::File, BlobError> {
        self.verify(d)?;
        fs::File::open(self.path(d)).map_err(|source| BlobError::BlobIo {
            digest: d.to_hex(),
            source,
        })
    }

    /// Checks a blob without keeping its bytes; a corrupt one is deleted.
    pub fn verify(&self, d: &BlobDigest) -> Result<(), BlobError> {
        self.copy_to(d, &mut io::sink()).map(|_| ())
    }

    pub fn remove(&self, d: &BlobDigest) -> Result<bool, BlobError> {
        match fs::remove_file(self.path(d)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(BlobError::BlobIo {
                digest: d.to_hex(),
                source,
            }),
        }
    }

    /// Marks a blob as just used (its mtime), so a sweep of unreferenced blobs keeps it.
    pub fn touch(&self, d: &BlobDigest) {
        let _ = fs::File::options()
            .write(true)
            .open(self.path(d))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }

    /// Every stored blob's digest and size.
    pub fn list(&self) -> Result<Vec<(BlobDigest, u64)>, BlobError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|source| BlobError::Io {
            path: self.dir.clone(),
            source,
        })?;
        for shard in rd.flatten() {
            if shard.file_name().len() != 2 {
                continue;
            }
            for f in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                if let Some(d) = f.file_name().to_str().and_then(BlobDigest::from_hex) {
                    out.push((d, f.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        Ok(out)
    }
}

/// A blob being written. Dropped without [`commit`](Self::commit), nothing is kept.
pub struct BlobWriter {
    store: BlobStore,
    tmp: tempfile::NamedTempFile,
    hasher: blake3::Hasher,
    size: u64,
    expected: Option<BlobDigest>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

impl BlobWriter {
    /// Verifies the digest, fsyncs and renames into place. Returns the digest, the size and
    /// whether the blob was new.
    pub fn commit(mut self) -> Result<(BlobDigest, u64, bool), BlobError> {
        let actual = BlobDigest::from(self.hasher.finalize());
        if let Some(e) = self.expected {
            if e != actual {
                return Err(BlobError::Corrupt {
                    expected: e.to_hex(),
                    actual: actual.to_hex(),
                });
            }
        }
        let dest = self.store.path(&actual);
        if dest.is_file() {
            return Ok((actual, self.size, false));
        }
        let io_err = |source| BlobError::BlobIo {
            digest: actual.to_hex(),
            source,
        };
        self.tmp.flush().map_err(io_err)?;
        self.tmp.as_file().sync_all().map_err(io_err)?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err)?;
        }
        self.tmp.persist(&dest).map_err(|e| io_err(e.error))?;
        Ok((actual, self.size, true))
    }
}
