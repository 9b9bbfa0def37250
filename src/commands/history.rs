//! The embedded coordinator's memory of earlier builds (in `<data-dir>/index`): what each
//! stage's key covered last time, so `explain` and `submit --progress plain` can say why a
//! stage is rebuilt. Recording and comparing live in `coordinator::explain` (a farm's
//! coordinator keeps the same history); this is where the CLI finds the index and names
//! the Dockerfile.
use std::path::Path;

use coordinator::store::SledStore;

/// Opens the index; `None` (with a warning) when it is busy or unusable, since history
/// only ever adds explanations.
pub fn open_index(data_dir: &Path) -> Option<std::sync::Arc<SledStore>> {
    if let Err(e) = std::fs::create_dir_all(data_dir) {
        tracing::warn!(dir = %data_dir.display(), error = %e, "no data dir: build history off");
        return None;
    }
    match SledStore::open(&data_dir.join("index")) {
        Ok(s) => Some(std::sync::Arc::new(s)),
        Err(e) => {
            tracing::warn!(error = %e, "index unavailable: build history off for this run");
            None
        }
    }
}

/// A Dockerfile's identity in the history: its canonical path.
pub fn dockerfile_id(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}
