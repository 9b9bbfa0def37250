//! The embedded coordinator's memory of earlier builds (in `<data-dir>/index`): what each
//! stage's key covered last time, so `explain` and `submit --progress plain` can say why a
//! stage is rebuilt.
use std::collections::BTreeMap;
use std::path::Path;

use coordinator::explain::{latest, reasons, record, StageHistory};
use coordinator::frontend::plan::Plan;
use coordinator::keys::StageKeys;
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

/// Why each stage the target needs differs from its last recorded build (an empty list:
/// same key as last time).
pub fn why_rebuilt(
    index: &SledStore,
    id: &str,
    plan: &Plan,
    keys: &[StageKeys],
) -> BTreeMap<usize, Vec<String>> {
    plan.stages
        .iter()
        .filter(|s| plan.built[s.index])
        .map(|s| {
            let why = match latest(index, id, &s.display_name()) {
                Ok(Some(h)) => reasons(&h, &keys[s.index]),
                Ok(None) => vec!["no earlier build of this stage is recorded".into()],
                Err(e) => vec![format!("history unreadable: {e}")],
            };
            (s.index, why)
        })
        .collect()
}

/// Records the keys of the stages that now exist as the most recent build of each.
pub fn remember(
    index: &SledStore,
    id: &str,
    plan: &Plan,
    keys: &[StageKeys],
    stages: impl Iterator<Item = usize>,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for i in stages {
        let h = StageHistory::of(&keys[i], now);
        if let Err(e) = record(index, id, &plan.stages[i].display_name(), &h) {
            tracing::warn!(error = %e, "could not record build history");
        }
    }
    let _ = coordinator::store::Store::flush(index);
}
