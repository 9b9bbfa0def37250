//! What the index holds per stage key ([`StageRecord`]) and the totals over it.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Artifact, Export};
use model::keys::StageKey;

/// A blob a record names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// The records `CacheService.List` sends, most recently used first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRecords(pub Vec<StageRecord>);

impl wire::Doc for StageRecords {
    const KIND: &'static str = "StageRecords/1";
}

/// Everything the cache knows of one stage key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    /// The stage's name when it was last built or used (`stage-N` when unnamed).
    pub name: String,
    /// The image id (the same on every daemon: it is the digest of its config).
    pub image_id: String,
    /// The exported image, when a consumer needed it: an `ImageParts/1` index (or, from
    /// an older worker, a whole `docker save` archive).
    pub image: Option<BlobRef>,
    /// The layer blobs the image index names (shared with other records that have the
    /// same layers).
    #[serde(default)]
    pub image_parts: Vec<BlobRef>,
    /// Exported paths of the stage's filesystem.
    pub paths: BTreeMap<String, BlobRef>,
    /// Bytes this record accounts for: its blobs, or the image on the daemon when it has
    /// none (the embedded build keeps stages as images only).
    pub size: u64,
    pub duration_ms: u64,
    pub created_ms: u64,
    pub last_used_ms: u64,
    pub hits: u64,
    /// Workers whose daemon holds the stage image.
    pub holders: BTreeSet<String>,
    /// Tags naming the stage's images on those daemons (the stage and each instruction),
    /// removed with the record by an embedded prune.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Content digests of paths consumers read with `COPY --from` (see
    /// [`model::keys::Contents`]): a hit hands them on, so its consumers keep their keys.
    #[serde(default)]
    pub contents: BTreeMap<String, String>,
}

impl StageRecord {
    pub(super) fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.image
            .iter()
            .chain(&self.image_parts)
            .chain(self.paths.values())
    }

    /// Whether the record holds every artifact `need` names.
    pub fn covers(&self, need: &Export) -> bool {
        (!need.image || self.image.is_some())
            && need.paths.iter().all(|p| self.paths.contains_key(p))
    }

    pub(super) fn blob_bytes(&self) -> u64 {
        self.blobs().map(|b| b.size).sum()
    }

    /// The artifacts of the record, as the pool hands them to workers.
    pub fn artifacts(&self) -> Vec<Artifact> {
        let Some(key) = StageKey::from_hex(&self.key) else {
            return Vec::new();
        };
        let mut out: Vec<Artifact> = self
            .paths
            .iter()
            .map(|(p, b)| Artifact {
                stage_key: key,
                path: p.clone(),
                digest: b.digest.clone(),
                size: b.size,
            })
            .collect();
        if let Some(b) = &self.image {
            out.push(Artifact {
                stage_key: key,
                path: String::new(),
                digest: b.digest.clone(),
                size: b.size,
            });
        }
        out
    }
}

/// Totals over the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    /// Stages built (a lookup that found nothing usable).
    pub misses: u64,
    /// Sum of the sizes of the stages reused instead of built.
    pub bytes_saved: u64,
    /// Sum of the build durations of the stages reused instead of built.
    pub time_saved_ms: u64,
}

impl CacheStats {
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

impl wire::Doc for CacheStats {
    const KIND: &'static str = "CacheStats/1";
}
