//! External (base) images pinned by id, each kept as one `docker save` blob whose
//! [`BlobRef`] the index holds under `image:<id>` in [`Tree::Blobs`].
use super::{BlobRef, StageCache};
use crate::store::{StoreError, Tree};
use model::digest::BlobDigest;

impl StageCache {
    /// Records the blob (docker save) of an external image pinned to `id`.
    pub fn set_base_image(&self, id: &str, blob: &BlobRef) -> Result<(), StoreError> {
        let json = serde_json::to_vec(blob).expect("blob refs serialize");
        self.index
            .put(Tree::Blobs, format!("image:{id}").as_bytes(), &json)
    }

    /// The blob of the external image `id`, if the store holds it (and marks it used, so
    /// the sweep of unreferenced blobs keeps it for another grace period).
    pub fn base_image(&self, id: &str) -> Option<BlobRef> {
        let blobs = self.blobs.as_ref()?;
        let key = format!("image:{id}");
        let b: BlobRef = self
            .index
            .get(Tree::Blobs, key.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())?;
        let d = BlobDigest::from_hex(&b.digest)?;
        if !blobs.contains(&d) {
            let _ = self.index.remove(Tree::Blobs, key.as_bytes());
            return None;
        }
        blobs.touch(&d);
        Some(b)
    }

    /// Ids of the external images whose blobs the store holds.
    pub fn base_image_ids(&self) -> Vec<String> {
        let Ok(entries) = self.index.scan_prefix(Tree::Blobs, b"image:") else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|(k, v)| {
                let id = String::from_utf8(k)
                    .ok()?
                    .strip_prefix("image:")?
                    .to_string();
                let b: BlobRef = serde_json::from_slice(&v).ok()?;
                let d = BlobDigest::from_hex(&b.digest)?;
                self.blobs.as_ref()?.contains(&d).then_some(id)
            })
            .collect()
    }
}
