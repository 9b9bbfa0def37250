//! The manifest of a build context: every path that is sent, with its mode and content digest.
use crate::digest::BlobDigest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// What a manifest path is. Serialized internally tagged: `{"type":"file","size":..,
/// "digest":"<64 hex>"}`, `{"type":"dir"}`, `{"type":"symlink","target":".."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file; `digest` is plain `blake3(content)`, i.e. the name of its blob, and
    /// `size` the number of bytes that were hashed.
    File {
        size: u64,
        #[serde(with = "digest_hex")]
        digest: BlobDigest,
    },
    /// A directory.
    Dir,
    /// A symbolic link, never followed; `target` is the link text exactly as stored.
    Symlink { target: String },
}

/// One path of the context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the context root, `/`-separated, no leading `./` or `/`, never empty.
    pub path: String,
    /// Permission bits: `st_mode & 0o7777`.
    pub mode: u32,
    pub kind: EntryKind,
}

impl ManifestEntry {
    /// The file digest, if this is a regular file.
    pub fn digest(&self) -> Option<BlobDigest> {
        match self.kind {
            EntryKind::File { digest, .. } => Some(digest),
            _ => None,
        }
    }
}

/// All entries of a context, unique by path and iterated in byte order of the path. The root
/// directory itself is not an entry. Serializes as a JSON array of [`ManifestEntry`] sorted by
/// path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextManifest {
    entries: BTreeMap<String, ManifestEntry>,
}

impl ContextManifest {
    /// Builds a manifest; when two entries share a path the later one wins.
    pub fn from_entries(entries: impl IntoIterator<Item = ManifestEntry>) -> Self {
        ContextManifest {
            entries: entries.into_iter().map(|e| (e.path.clone(), e)).collect(),
        }
    }

    /// The entry at `path` (relative, `/`-separated).
    pub fn get(&self, path: &str) -> Option<&ManifestEntry> {
        self.entries.get(path)
    }

    /// Entries sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.entries.values()
    }

    /// Number of entries (files, directories and symlinks).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the sizes of all regular files.
    pub fn total_file_bytes(&self) -> u64 {
        self.iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }
}

impl<'a> IntoIterator for &'a ContextManifest {
    type Item = &'a ManifestEntry;
    type IntoIter = std::collections::btree_map::Values<'a, String, ManifestEntry>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.values()
    }
}

impl Serialize for ContextManifest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.entries.values())
    }
}

impl<'de> Deserialize<'de> for ContextManifest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ContextManifest::from_entries(
            Vec::<ManifestEntry>::deserialize(d)?,
        ))
    }
}

/// Serde adapter: a [`BlobDigest`] as 64 lowercase hex digits.
pub mod digest_hex {
    use crate::digest::BlobDigest;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &BlobDigest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BlobDigest, D::Error> {
        let s = String::deserialize(d)?;
        BlobDigest::from_hex(&s).ok_or_else(|| D::Error::custom("expected 64 hex digits"))
    }
}
