//! Looking a stage up before building it: the stage cache (with the executor's
//! agreement that it holds the image), or the executor alone.
use std::collections::BTreeMap;

use model::task::{instruction_image_tag, stage_image_tag, Executor, StageResult, StageTask};

use crate::cache::StageCache;

/// How a stage task ended well: built, or found in the cache after waiting for another
/// build of the same key.
pub(super) enum Done {
    Built(StageResult),
    Cached(Hit),
}

/// A stage found in the cache: its image id and the contents of the paths its consumers
/// read.
pub(super) struct Hit {
    pub image_id: String,
    pub contents: BTreeMap<String, String>,
}

/// The stage's image id (and the contents of its `digest_paths`) if the cache (or,
/// without one, the executor) can stand in for building it. A hit is counted in the cache.
pub(super) async fn lookup(
    executor: &dyn Executor,
    cache: Option<&StageCache>,
    task: &StageTask,
) -> Option<Hit> {
    let (image_id, mut contents) = find(executor, cache, task).await?;
    let more = fill_contents(executor, &image_id, &mut contents, &task.digest_paths).await;
    if let (Some(c), false) = (cache, more.is_empty()) {
        if let Err(e) = c.add_contents(&task.key, &image_id, &more) {
            tracing::warn!(error = %e, "could not record a stage's contents");
        }
    }
    Some(Hit { image_id, contents })
}

/// Completes `contents` with the digests of those `paths` it lacks, read by the executor
/// from `image_id`; returns what it added (for the cache record).
pub async fn fill_contents(
    executor: &dyn Executor,
    image_id: &str,
    contents: &mut BTreeMap<String, String>,
    paths: &[String],
) -> BTreeMap<String, String> {
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !contents.contains_key(*p))
        .cloned()
        .collect();
    if missing.is_empty() {
        return BTreeMap::new();
    }
    let more = executor.contents(image_id, &missing).await;
    contents.extend(more.clone());
    more
}

async fn find(
    executor: &dyn Executor,
    cache: Option<&StageCache>,
    task: &StageTask,
) -> Option<(String, BTreeMap<String, String>)> {
    let Some(cache) = cache else {
        let id = executor.stage_image(&task.key).await?;
        return Some((id, BTreeMap::new()));
    };
    let need = &task.export;
    match cache.find(&task.key, need) {
        Ok(Some(record)) => {
            let id = executor.held_image(task, &record.image_id).await?;
            if let Err(e) = cache.count_hit(&task.key, &task.display_name()) {
                tracing::warn!(error = %e, "could not count a cache hit");
            }
            // The record's contents describe its image; another image held under the key
            // (rebuilt by another process) is read as it is.
            let contents = if id == record.image_id {
                record.contents
            } else {
                BTreeMap::new()
            };
            return Some((id, contents));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cache index unreadable: asking the executor"),
    }
    // No usable record, but nothing beyond the image is needed and the executor still
    // holds it (built by a process that could not write the index): reuse it.
    if *need == model::task::Export::default() {
        let id = executor.stage_image(&task.key).await?;
        let name = task.display_name();
        let adopted = cache
            .adopt(&task.key, &name, &id, executor.name(), &stage_tags(task))
            .and_then(|()| cache.count_hit(&task.key, &name));
        if let Err(e) = adopted {
            tracing::warn!(error = %e, "could not record a stage found on the executor");
        }
        return Some((id, BTreeMap::new()));
    }
    None
}

/// The tags naming a stage's images on an executor's daemon.
pub(super) fn stage_tags(task: &StageTask) -> Vec<String> {
    std::iter::once(stage_image_tag(&task.key))
        .chain(
            task.instructions
                .iter()
                .map(|t| instruction_image_tag(&t.key)),
        )
        .collect()
}
