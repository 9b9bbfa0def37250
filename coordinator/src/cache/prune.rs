//! Eviction: least recently used records first (a size cap, an age, or all), the blobs
//! only they name, then the blobs no record names once past a grace period and unpinned.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{now_ms, BlobRef, StageCache, StageRecord};
use crate::store::{BlobStore, StoreError, Tree};
use crate::sync::lock;
use model::digest::BlobDigest;

/// What to prune: `all`, or down to `keep_bytes`, and/or everything unused for
/// `older_than`. Least recently used first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneOptions {
    pub keep_bytes: Option<u64>,
    pub older_than: Option<Duration>,
    pub all: bool,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub removed: Vec<StageRecord>,
    /// Bytes of the removed records and of the unreferenced blobs swept.
    pub bytes_freed: u64,
    pub blobs_removed: u64,
    /// Blobs no record named (build contexts), older than the grace period and used by
    /// no running build, removed.
    #[serde(default)]
    pub unreferenced_removed: u64,
}

impl wire::Doc for PruneOptions {
    const KIND: &'static str = "PruneOptions/1";
}
impl wire::Doc for PruneReport {
    const KIND: &'static str = "PruneReport/1";
}

/// What records occupy: with a blob store, the distinct blobs they name (counted by the
/// records naming each); without one (the embedded cache), each record's image size.
pub(super) struct BlobRefs {
    with_blobs: bool,
    count: BTreeMap<String, (usize, u64)>,
    pub(super) total: u64,
}

impl BlobRefs {
    pub(super) fn of(with_blobs: bool, records: &[StageRecord]) -> Self {
        let mut refs = BlobRefs {
            with_blobs,
            count: BTreeMap::new(),
            total: 0,
        };
        for r in records {
            if !with_blobs {
                refs.total += r.size;
                continue;
            }
            for b in Self::distinct(r) {
                let e = refs.count.entry(b.digest.clone()).or_insert((0, b.size));
                if e.0 == 0 {
                    refs.total += b.size;
                }
                e.0 += 1;
            }
        }
        refs
    }

    fn distinct(r: &StageRecord) -> Vec<&BlobRef> {
        let mut seen = BTreeSet::new();
        r.blobs().filter(|b| seen.insert(&b.digest)).collect()
    }

    /// Drops a record's references; returns the bytes no other record still names.
    fn release(&mut self, r: &StageRecord) -> u64 {
        if !self.with_blobs {
            return r.size;
        }
        let mut freed = 0;
        for b in Self::distinct(r) {
            if let Some(e) = self.count.get_mut(&b.digest) {
                e.0 -= 1;
                if e.0 == 0 {
                    freed += e.1;
                }
            }
        }
        freed
    }
}

/// How long a blob no record names is kept: a client uploads a context before it submits,
/// and the build names its blobs only once submitted.
pub const UNREFERENCED_GRACE: Duration = Duration::from_secs(3600);

/// Blobs a running build reads (its context): never swept while this lives.
pub struct BlobPins {
    cache: Arc<StageCache>,
    id: u64,
}

impl Drop for BlobPins {
    fn drop(&mut self) {
        lock(&self.cache.pins).remove(&self.id);
    }
}

impl StageCache {
    pub(super) fn enforce_cap(&self) -> Result<(), StoreError> {
        if let Some(max) = self.max_bytes {
            if lock(&self.approx_bytes).is_some_and(|b| b <= max) {
                return Ok(());
            }
            let r = self.prune_inner(
                &PruneOptions {
                    keep_bytes: Some(max),
                    ..Default::default()
                },
                false,
            )?;
            if !r.removed.is_empty() {
                tracing::info!(
                    records = r.removed.len(),
                    bytes = r.bytes_freed,
                    "cache over its size cap: evicted the least recently used stages"
                );
            }
        }
        Ok(())
    }

    /// Removes records (least recently used first) and the blobs only they name, then the
    /// blobs no record names (contexts) that are past [`UNREFERENCED_GRACE`] (all of
    /// them with `all`) and no running build pinned.
    pub fn prune(&self, opts: &PruneOptions) -> Result<PruneReport, StoreError> {
        self.prune_inner(opts, true)
    }

    fn prune_inner(&self, opts: &PruneOptions, explicit: bool) -> Result<PruneReport, StoreError> {
        let _g = lock(&self.lock);
        let mut list = self.list()?;
        // Oldest last use first.
        list.reverse();
        // With a blob store, bytes are those of the distinct blobs the records name (a
        // layer several stage images share counts once, and is freed with the last).
        let mut refs = BlobRefs::of(self.blobs.is_some(), &list);
        let mut total = refs.total;
        let now = now_ms();
        let mut report = PruneReport::default();
        let mut keep = Vec::new();
        for r in list {
            let old = opts
                .older_than
                .is_some_and(|d| now.saturating_sub(r.last_used_ms) >= d.as_millis() as u64);
            let over = opts.keep_bytes.is_some_and(|k| total > k);
            if opts.all || old || over {
                let freed = refs.release(&r);
                total -= freed;
                self.index.remove(Tree::Stages, r.key.as_bytes())?;
                report.bytes_freed += freed;
                report.removed.push(r);
            } else {
                keep.push(r);
            }
        }
        *lock(&self.approx_bytes) = Some(total);
        if let Some(blobs) = &self.blobs {
            let kept: BTreeSet<&str> = keep
                .iter()
                .flat_map(|r| r.blobs().map(|b| b.digest.as_str()))
                .collect();
            let gone: BTreeSet<&str> = report
                .removed
                .iter()
                .flat_map(|r| r.blobs().map(|b| b.digest.as_str()))
                .filter(|d| !kept.contains(d))
                .collect();
            for d in gone {
                if let Some(d) = BlobDigest::from_hex(d) {
                    if blobs.remove(&d)? {
                        report.blobs_removed += 1;
                    }
                }
            }
            // Context blobs belong to no record: swept once past the grace period (at
            // once for --all), at most every ten minutes when the cap is enforced.
            let due =
                lock(&self.last_sweep).is_none_or(|t| t.elapsed() >= Duration::from_secs(600));
            if explicit || due {
                let grace = if opts.all {
                    Duration::ZERO
                } else {
                    UNREFERENCED_GRACE
                };
                self.sweep(blobs, &kept, grace, &mut report)?;
            }
        }
        self.index.flush()?;
        Ok(report)
    }

    /// Keeps `digests` (a running build's context) from being swept until the guard drops.
    pub fn pin_blobs(self: &Arc<Self>, digests: impl IntoIterator<Item = String>) -> BlobPins {
        let mut pins = lock(&self.pins);
        let id = pins.keys().next_back().map_or(0, |k| k + 1);
        pins.insert(id, digests.into_iter().collect());
        BlobPins {
            cache: Arc::clone(self),
            id,
        }
    }

    /// Removes blobs no record in `kept` names, older than `grace` and pinned by no build.
    fn sweep(
        &self,
        blobs: &BlobStore,
        kept: &BTreeSet<&str>,
        grace: Duration,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        // Held to the end: a build pinning its blobs meanwhile waits for the sweep.
        let pins = lock(&self.pins);
        let pinned: BTreeSet<&String> = pins.values().flatten().collect();
        let now = std::time::SystemTime::now();
        for (d, size) in blobs.list()? {
            let hex = d.to_hex();
            if kept.contains(hex.as_str()) || pinned.contains(&hex) {
                continue;
            }
            let age = blobs
                .metadata(&d)
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            if age >= grace && blobs.remove(&d)? {
                report.unreferenced_removed += 1;
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        *lock(&self.last_sweep) = Some(std::time::Instant::now());
        Ok(())
    }
}
