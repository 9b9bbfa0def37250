//! The stage cache: one record per stage key in the index ([`Tree::Stages`]), pointing at
//! the blobs consumers need (the exported image, the tar of each copied path), with size,
//! build duration, last use and the workers holding the stage locally.
//!
//! Invariants: a record is only a hit when every blob it names is in the blob store (a
//! record whose blob went missing or was found corrupt loses that blob and is a miss for
//! whoever needs it); records are written only from what a worker reported (artifacts it
//! uploaded and the store verified, a stage it finished), never from a client; evicting a
//! record removes the blobs no other record names.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{BlobStore, SledStore, Store, StoreError, Tree};
use crate::sync::lock;
use model::digest::BlobDigest;
use model::keys::StageKey;

mod base_images;
mod prune;
mod record;
mod size;

use prune::BlobRefs;

pub use model::task::{Artifact, Export};
pub use prune::{BlobPins, PruneOptions, PruneReport, UNREFERENCED_GRACE};
pub use record::{BlobRef, CacheStats, StageRecord, StageRecords};
pub use size::{parse_duration, parse_size, DurationError, SizeError};

/// The schema of the records below, kept in [`Tree::Meta`] under `stage_records_schema`.
pub const SCHEMA: &str = "stage-records/1";

/// A stage a worker finished, as [`StageCache::stage_built`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Built<'a> {
    pub key: &'a StageKey,
    pub name: &'a str,
    pub image_id: &'a str,
    pub image_size: u64,
    pub duration: Duration,
    pub worker: &'a str,
    pub tags: &'a [String],
    pub contents: &'a BTreeMap<String, String>,
}

/// The stage cache over an index and (on a coordinator) a blob store.
pub struct StageCache {
    index: Arc<dyn Store>,
    blobs: Option<BlobStore>,
    /// Serialises read-modify-write of records within this process.
    lock: Mutex<()>,
    /// Size cap enforced after every write (`None`: no cap).
    max_bytes: Option<u64>,
    /// Blobs hashed since this process started, with the (size, mtime) they had then: a
    /// blob is hashed again only when its file changed.
    verified: Mutex<std::collections::HashMap<String, (u64, std::time::SystemTime)>>,
    /// Blobs running builds read, by pin id ([`BlobPins`]).
    pins: Mutex<BTreeMap<u64, BTreeSet<String>>>,
    /// When unreferenced blobs were last swept.
    last_sweep: Mutex<Option<std::time::Instant>>,
    /// An upper bound of the cache's bytes (a record's shared blobs count in full), kept
    /// from the last full pass plus what records grew by since; `None` until a first pass.
    /// The cap lists every record only once this passes it, not after every write.
    approx_bytes: Mutex<Option<u64>>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const HITS: &[u8] = b"hits";
const MISSES: &[u8] = b"misses";
const BYTES_SAVED: &[u8] = b"bytes_saved";
const TIME_SAVED: &[u8] = b"time_saved_ms";

impl StageCache {
    /// The cache over `<data_dir>/index` and, with `with_blobs`, `<data_dir>/blobs`.
    pub fn open(data_dir: &Path, with_blobs: bool) -> Result<Self, StoreError> {
        let index = SledStore::open(&data_dir.join("index"))?;
        let blobs = if with_blobs {
            Some(BlobStore::open(&data_dir.join("blobs"))?)
        } else {
            None
        };
        Self::new(Arc::new(index), blobs)
    }

    pub fn new(index: Arc<dyn Store>, blobs: Option<BlobStore>) -> Result<Self, StoreError> {
        match index.get(Tree::Meta, b"stage_records_schema")? {
            Some(v) if v == SCHEMA.as_bytes() => {}
            Some(other) => {
                // Records of another schema cannot be read: start over rather than fail
                // every build (the blobs stay and are found again by their digests).
                tracing::warn!(
                    found = %String::from_utf8_lossy(&other),
                    "stage records of another schema: dropping them"
                );
                for (k, _) in index.scan_prefix(Tree::Stages, b"")? {
                    index.remove(Tree::Stages, &k)?;
                }
                index.put(Tree::Meta, b"stage_records_schema", SCHEMA.as_bytes())?;
            }
            None => index.put(Tree::Meta, b"stage_records_schema", SCHEMA.as_bytes())?,
        }
        Ok(StageCache {
            index,
            blobs,
            lock: Mutex::new(()),
            max_bytes: None,
            verified: Mutex::default(),
            pins: Mutex::default(),
            last_sweep: Mutex::new(None),
            approx_bytes: Mutex::new(None),
        })
    }

    /// Evict least recently used records whenever the cache grows past `max`.
    pub fn with_max_bytes(mut self, max: Option<u64>) -> Self {
        self.max_bytes = max;
        self
    }

    pub fn index(&self) -> &Arc<dyn Store> {
        &self.index
    }

    pub fn blobs(&self) -> Option<&BlobStore> {
        self.blobs.as_ref()
    }

    pub fn get(&self, key: &StageKey) -> Result<Option<StageRecord>, StoreError> {
        Ok(self
            .index
            .get(Tree::Stages, key.to_hex().as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn put(&self, r: &StageRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(r).expect("records serialize");
        self.index.put(Tree::Stages, r.key.as_bytes(), &v)
    }

    /// Counts a record's growth into the size bound. Only the writers that add to a record
    /// (`add_artifacts`, `stage_built`) call it: every other write keeps or shrinks one.
    fn grew(&self, from: u64, to: u64) {
        if let Some(b) = lock(&self.approx_bytes).as_mut() {
            *b = b.saturating_add(to.saturating_sub(from));
        }
    }

    fn add(&self, counter: &[u8], n: u64) -> Result<(), StoreError> {
        let old = self.counter(counter)?;
        self.index
            .put(Tree::Meta, counter, &old.saturating_add(n).to_be_bytes())
    }

    fn counter(&self, counter: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .index
            .get(Tree::Meta, counter)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Whether the blob is in the store, intact (always true without a blob store:
    /// nothing to check). A blob is hashed on its first lookup in this process and again
    /// whenever its file changed; a corrupt one is deleted, so it is never served.
    fn blob_ok(&self, b: &BlobRef) -> bool {
        let (Some(store), Some(d)) = (&self.blobs, BlobDigest::from_hex(&b.digest)) else {
            return self.blobs.is_none();
        };
        let Some(meta) = store.metadata(&d) else {
            return false;
        };
        let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        if lock(&self.verified).get(&b.digest) == Some(&stamp) {
            return true;
        }
        match store.verify(&d) {
            Ok(()) => {
                lock(&self.verified).insert(b.digest.clone(), stamp);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cached blob unusable: the stage will be built again");
                lock(&self.verified).remove(&b.digest);
                false
            }
        }
    }

    /// The record of a stage if it can serve a consumer needing `need`: every needed
    /// artifact present and every blob it names on disk. Blobs found missing are dropped
    /// from the record for good.
    pub fn find(&self, key: &StageKey, need: &Export) -> Result<Option<StageRecord>, StoreError> {
        let _g = lock(&self.lock);
        let Some(mut r) = self.get(key)? else {
            return Ok(None);
        };
        let before = r.clone();
        // The image is usable only with its index and every layer it names.
        if r.image.as_ref().is_some_and(|b| !self.blob_ok(b))
            || r.image_parts.iter().any(|b| !self.blob_ok(b))
        {
            r.image = None;
            r.image_parts.clear();
        }
        r.paths.retain(|_, b| self.blob_ok(b));
        if r != before {
            tracing::warn!(key = %r.key, "stage record named blobs that are gone; dropped them");
            if self.blobs.is_some() {
                r.size = r.blob_bytes();
            }
            self.put(&r)?;
        }
        Ok((!r.image_id.is_empty() && r.covers(need)).then_some(r))
    }

    /// Records a stage the executor holds but the index does not know (built by a
    /// process that could not open the index), so later hits count and prune sees it.
    pub fn adopt(
        &self,
        key: &StageKey,
        name: &str,
        image_id: &str,
        worker: &str,
        tags: &[String],
    ) -> Result<(), StoreError> {
        let _g = lock(&self.lock);
        if self.get(key)?.is_some() {
            return Ok(());
        }
        let now = now_ms();
        self.put(&StageRecord {
            key: key.to_hex(),
            name: name.to_string(),
            image_id: image_id.to_string(),
            created_ms: now,
            last_used_ms: now,
            holders: [worker.to_string()].into(),
            tags: tags.iter().cloned().collect(),
            ..Default::default()
        })
    }

    /// Counts a stage reused instead of built, and touches its record.
    pub fn count_hit(&self, key: &StageKey, name: &str) -> Result<(), StoreError> {
        let _g = lock(&self.lock);
        let Some(mut r) = self.get(key)? else {
            return Ok(());
        };
        r.hits += 1;
        r.last_used_ms = now_ms();
        r.name = name.to_string();
        self.put(&r)?;
        self.add(HITS, 1)?;
        self.add(BYTES_SAVED, r.size)?;
        self.add(TIME_SAVED, r.duration_ms)
    }

    /// Records artifacts a worker uploaded for a stage (a later export of the same path
    /// replaces the earlier one).
    pub fn add_artifacts(&self, artifacts: &[Artifact], worker: &str) -> Result<(), StoreError> {
        let _g = lock(&self.lock);
        let now = now_ms();
        let mut by_key: BTreeMap<StageKey, Vec<&Artifact>> = BTreeMap::new();
        for a in artifacts {
            by_key.entry(a.stage_key).or_default().push(a);
        }
        for (key, list) in by_key {
            let mut r = self.get(&key)?.unwrap_or_else(|| StageRecord {
                key: key.to_hex(),
                created_ms: now,
                ..Default::default()
            });
            for a in list {
                let b = BlobRef {
                    digest: a.digest.clone(),
                    size: a.size,
                };
                if a.path.is_empty() {
                    r.image_parts = self.parts_of(&b);
                    r.image = Some(b);
                } else {
                    r.paths.insert(a.path.clone(), b);
                }
            }
            r.holders.insert(worker.to_string());
            r.last_used_ms = now;
            let before = r.size;
            r.size = r.blob_bytes();
            self.put(&r)?;
            self.grew(before, r.size);
        }
        drop(_g);
        self.enforce_cap()
    }

    /// The layer blobs an image index names (none for a whole-image archive).
    fn parts_of(&self, image: &BlobRef) -> Vec<BlobRef> {
        let Some(blobs) = &self.blobs else {
            return Vec::new();
        };
        // An index is small; a whole archive is not read.
        if image.size > 4 << 20 {
            return Vec::new();
        }
        let Some(bytes) = BlobDigest::from_hex(&image.digest).and_then(|d| blobs.read(&d).ok())
        else {
            return Vec::new();
        };
        model::image_parts::ImageParts::parse(&bytes)
            .map(|p| {
                p.layers
                    .into_iter()
                    .map(|l| BlobRef {
                        digest: l.digest,
                        size: l.size,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a stage a worker finished. `image_size` counts when the record has no
    /// blobs (an embedded build's stage lives as an image on the daemon).
    pub fn stage_built(&self, b: &Built<'_>) -> Result<(), StoreError> {
        let Built {
            key,
            name,
            image_id,
            image_size,
            duration,
            worker,
            tags,
            contents,
        } = *b;
        let _g = lock(&self.lock);
        let now = now_ms();
        let mut r = self.get(key)?.unwrap_or_else(|| StageRecord {
            key: key.to_hex(),
            created_ms: now,
            ..Default::default()
        });
        // A rebuild of the same key (--no-cache) may give another image id when its
        // commands are not reproducible; either result is valid for the key, and the
        // artifacts the worker just reported are already in the record. Contents describe
        // one image: another image drops the old ones.
        if r.image_id != image_id {
            r.contents.clear();
        }
        r.image_id = image_id.to_string();
        r.name = name.to_string();
        r.duration_ms = duration.as_millis() as u64;
        r.last_used_ms = now;
        r.holders.insert(worker.to_string());
        r.tags.extend(tags.iter().cloned());
        r.contents
            .extend(contents.iter().map(|(k, v)| (k.clone(), v.clone())));
        let before = r.size;
        r.size = if self.blobs.is_some() {
            r.blob_bytes()
        } else {
            image_size
        };
        self.put(&r)?;
        self.grew(before, r.size);
        self.add(MISSES, 1)?;
        drop(_g);
        self.enforce_cap()
    }

    /// Adds content digests an executor computed from image `image_id` for a record found
    /// without them (ignored if the record now names another image).
    pub fn add_contents(
        &self,
        key: &StageKey,
        image_id: &str,
        contents: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let _g = lock(&self.lock);
        let Some(mut r) = self.get(key)?.filter(|r| r.image_id == image_id) else {
            return Ok(());
        };
        r.contents
            .extend(contents.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.put(&r)
    }

    /// Every record, most recently used first.
    pub fn list(&self) -> Result<Vec<StageRecord>, StoreError> {
        let mut out: Vec<StageRecord> = self
            .index
            .scan_prefix(Tree::Stages, b"")?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        out.sort_by(|a, b| b.last_used_ms.cmp(&a.last_used_ms).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    pub fn stats(&self) -> Result<CacheStats, StoreError> {
        let list = self.list()?;
        Ok(CacheStats {
            entries: list.len() as u64,
            bytes: BlobRefs::of(self.blobs.is_some(), &list).total,
            hits: self.counter(HITS)?,
            misses: self.counter(MISSES)?,
            bytes_saved: self.counter(BYTES_SAVED)?,
            time_saved_ms: self.counter(TIME_SAVED)?,
        })
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.index.flush()
    }
}
