//! A stage image in the blob store as parts: an index (`ImageParts/1`: the image config and
//! its layers in order) and each layer tar a blob of its own. A layer any stored image has
//! is stored once, a worker uploads only the layers the store lacks, and a worker loading
//! the image fetches only the layers its daemon lacks (Docker's `load` skips a layer whose
//! chain it has without opening its file, so those are left out of the archive).
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const KIND: &str = "ImageParts/1";

/// The index blob of an image stored as parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageParts {
    /// Always [`KIND`]: tells an index from a whole `docker save` archive.
    pub kind: String,
    /// The image config, byte for byte as saved (its sha256 is the image id).
    pub config: String,
    pub repo_tags: Vec<String>,
    pub layers: Vec<LayerPart>,
}

/// One layer: its diff id (sha256 of the layer tar) and the blob holding the tar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPart {
    pub diff_id: String,
    pub digest: String,
    pub size: u64,
}

impl ImageParts {
    /// The index in `bytes`, or `None` for anything else (a whole-image archive).
    pub fn parse(bytes: &[u8]) -> Option<ImageParts> {
        if bytes.first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice::<ImageParts>(bytes)
            .ok()
            .filter(|p| p.kind == KIND)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("image parts serialize")
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }
}

/// A `docker save` archive of one image, split: its config, tags, and each layer tar
/// (with its diff id, in order) written to a file of its own in `scratch`.
pub struct SavedImage {
    pub config: String,
    pub repo_tags: Vec<String>,
    pub layers: Vec<(String, tempfile::NamedTempFile)>,
}

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigRootFs {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Splits the `docker save` archive at `archive` (one image).
pub fn split_saved(archive: &Path, scratch: &Path) -> io::Result<SavedImage> {
    let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut files: BTreeMap<String, tempfile::NamedTempFile> = BTreeMap::new();
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().to_string();
        match entry.header().entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                // A layer saved twice is a link to the first copy.
                if let Some(target) = entry.link_name()? {
                    let target = target.to_string_lossy().to_string();
                    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let resolved = if entry.header().entry_type() == tar::EntryType::Link {
                        target
                    } else {
                        crate::keys::clean_source(&format!("{dir}/{target}"))
                    };
                    links.insert(path, resolved);
                }
            }
            tar::EntryType::Regular if path.ends_with("layer.tar") => {
                let mut f = tempfile::NamedTempFile::new_in(scratch)?;
                io::copy(&mut entry, &mut f)?;
                files.insert(path, f);
            }
            tar::EntryType::Regular if path.ends_with(".json") => {
                let mut b = Vec::new();
                entry.read_to_end(&mut b)?;
                small.insert(path, b);
            }
            _ => {}
        }
    }
    let manifest: Vec<ManifestEntry> = serde_json::from_slice(
        small
            .get("manifest.json")
            .ok_or_else(|| bad("docker save archive without manifest.json"))?,
    )
    .map_err(|e| bad(format!("manifest.json: {e}")))?;
    let [m] = <[ManifestEntry; 1]>::try_from(manifest)
        .map_err(|m| bad(format!("{} images in the archive, expected one", m.len())))?;
    let config = small
        .remove(&m.config)
        .ok_or_else(|| bad(format!("the archive lacks the config {}", m.config)))?;
    let diff_ids = serde_json::from_slice::<ConfigRootFs>(&config)
        .map_err(|e| bad(format!("image config: {e}")))?
        .rootfs
        .diff_ids;
    if diff_ids.len() != m.layers.len() {
        return Err(bad("the manifest and the config list different layers"));
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (diff_id, path) in diff_ids.into_iter().zip(&m.layers) {
        let mut p = path.clone();
        for _ in 0..8 {
            match links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        let file = match files.get(&p) {
            Some(f) => {
                // The same layer may be listed again later: hand out a copy of the path.
                let mut copy = tempfile::NamedTempFile::new_in(scratch)?;
                io::copy(&mut std::fs::File::open(f.path())?, &mut copy)?;
                copy
            }
            None => return Err(bad(format!("the archive lacks layer {path}"))),
        };
        layers.push((diff_id, file));
    }
    Ok(SavedImage {
        config: String::from_utf8(config).map_err(|_| bad("the image config is not UTF-8"))?,
        repo_tags: m.repo_tags.unwrap_or_default(),
        layers,
    })
}

/// Writes a `docker load` archive of the image: config, manifest, and the layer tars
/// `layer(i)` gives. A layer it gives `None` for is listed but left out, which `docker
/// load` accepts only when the daemon already has that layer's chain.
pub fn assemble(
    parts: &ImageParts,
    layer: &mut dyn FnMut(usize) -> io::Result<Option<Box<dyn Read>>>,
    out: impl Write,
) -> io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let mut layer_paths = Vec::with_capacity(parts.layers.len());
    for i in 0..parts.layers.len() {
        let path = format!("{i}/layer.tar");
        if let Some(mut r) = layer(i)? {
            // Spooled to learn the size the tar header needs.
            let mut f = tempfile::tempfile()?;
            let size = io::copy(&mut r, &mut f)?;
            use std::io::Seek;
            f.seek(io::SeekFrom::Start(0))?;
            tar.append_data(&mut file_header(size), &path, f)?;
        }
        layer_paths.push(path);
    }
    let config = parts.config.as_bytes();
    tar.append_data(&mut file_header(config.len() as u64), "config.json", config)?;
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": parts.repo_tags,
        "Layers": layer_paths,
    }])
    .to_string();
    let manifest = manifest.as_bytes();
    tar.append_data(
        &mut file_header(manifest.len() as u64),
        "manifest.json",
        manifest,
    )?;
    tar.into_inner()?.flush()
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_archive(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("saved.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let add = |tar: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, name, data).unwrap();
        };
        add(&mut tar, "aaa/layer.tar", b"layer one");
        add(&mut tar, "bbb/layer.tar", b"layer two");
        add(
            &mut tar,
            "cfg.json",
            br#"{"rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2","sha256:1"]}}"#,
        );
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar")
            .unwrap();
        add(
            &mut tar,
            "manifest.json",
            br#"[{"Config":"cfg.json","RepoTags":["dbuild-stage:k"],"Layers":["aaa/layer.tar","bbb/layer.tar","ccc/layer.tar"]}]"#,
        );
        tar.finish().unwrap();
        path
    }

    #[test]
    fn a_saved_image_splits_and_reassembles_leaving_out_what_the_daemon_has() {
        let dir = tempfile::tempdir().unwrap();
        let saved = split_saved(&saved_archive(dir.path()), dir.path()).unwrap();
        assert_eq!(saved.repo_tags, ["dbuild-stage:k"]);
        let contents: Vec<String> = saved
            .layers
            .iter()
            .map(|(_, f)| std::fs::read_to_string(f.path()).unwrap())
            .collect();
        assert_eq!(contents, ["layer one", "layer two", "layer one"]);
        let parts = ImageParts {
            kind: KIND.into(),
            config: saved.config.clone(),
            repo_tags: saved.repo_tags.clone(),
            layers: saved
                .layers
                .iter()
                .map(|(d, _)| LayerPart {
                    diff_id: d.clone(),
                    digest: String::new(),
                    size: 0,
                })
                .collect(),
        };
        assert_eq!(ImageParts::parse(&parts.to_json()), Some(parts.clone()));
        assert_eq!(ImageParts::parse(b"not an index"), None);
        // The daemon has the first layer: it is listed, not sent.
        let mut out = Vec::new();
        let mut layer = |i: usize| -> io::Result<Option<Box<dyn Read>>> {
            Ok((i > 0).then(|| {
                Box::new(std::fs::File::open(saved.layers[i].1.path()).unwrap()) as Box<dyn Read>
            }))
        };
        assemble(&parts, &mut layer, &mut out).unwrap();
        let mut names = Vec::new();
        let mut manifest = String::new();
        let mut ar = tar::Archive::new(&out[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().to_string();
            if name == "manifest.json" {
                e.read_to_string(&mut manifest).unwrap();
            }
            names.push(name);
        }
        assert_eq!(
            names,
            ["1/layer.tar", "2/layer.tar", "config.json", "manifest.json"]
        );
        assert!(manifest.contains(r#""Layers":["0/layer.tar","1/layer.tar","2/layer.tar"]"#));
    }
}
