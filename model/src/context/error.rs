//! Errors of the build-context module.
use std::io;
use std::path::PathBuf;

/// Every failure of reading, matching or hashing a build context. Variants that concern a
/// file always carry its path.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// An I/O operation on `path` failed (unreadable file, unlistable directory, ...).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `.dockerignore` (or COPY source) pattern is malformed.
    #[error("bad pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    /// The build context path exists but is not a directory.
    #[error("build context {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file name (or symlink target) in the context is not valid UTF-8; manifest paths are
    /// strings, so such a context cannot be described.
    #[error("{0}: path is not valid UTF-8")]
    NonUtf8Path(PathBuf),
}

impl ContextError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ContextError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_pattern(pattern: &str, reason: impl Into<String>) -> Self {
        ContextError::BadPattern {
            pattern: pattern.to_string(),
            reason: reason.into(),
        }
    }
}
