//! Single flight: one builder per stage key, across builds and processes.
use std::time::Duration;

use model::keys::StageKey;
use tokio_util::sync::CancellationToken;

/// A claim on building one stage key (single-flight): an exclusive lock on
/// `<dir>/<key>.lock`, which works across builds in one process and across processes.
/// The holder deletes the file before it lets go, so locks do not pile up; a waiter that
/// then gets the lock on the deleted file sees it no longer at the path and tries again.
pub(super) enum Claim {
    Held(HeldLock),
    /// No lock could be taken (the directory is unusable): build without one.
    Unavailable,
    Cancelled,
}

/// A held single-flight lock; dropping it deletes the lock file, then unlocks.
pub(super) struct HeldLock {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `file` (locked) is still the file at `path`.
fn still_at(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

pub(super) async fn claim(
    dir: &std::path::Path,
    key: &StageKey,
    cancel: &CancellationToken,
) -> Claim {
    let path = dir.join(format!("{}.lock", key.to_hex()));
    'open: loop {
        let file = std::fs::create_dir_all(dir).and_then(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        });
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no single-flight lock");
                return Claim::Unavailable;
            }
        };
        loop {
            match file.try_lock() {
                // The previous holder deleted it on release: lock the new one.
                Ok(()) if !still_at(&file, &path) => continue 'open,
                Ok(()) => return Claim::Held(HeldLock { _file: file, path }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    // Cancel safety: both branches hold nothing; the lock is only ever
                    // taken by `try_lock` above, never inside the select.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = cancel.cancelled() => return Claim::Cancelled,
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "no single-flight lock");
                    return Claim::Unavailable;
                }
            }
        }
    }
}
