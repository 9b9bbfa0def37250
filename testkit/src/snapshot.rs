//! What an image *is*, for comparison: its flattened filesystem (from `docker save`, layers
//! applied in order with whiteouts) and the runtime fields of its config. Never mtimes.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::docker::docker_ok;
use crate::{sha256, tarball};

/// Paths left out of every snapshot, with the reason. Each is something a container runtime
/// puts into (or mounts over) the rootfs of *every* container a builder runs, so whether a
/// stub of it ends up in a layer depends on the runtime, not on the Dockerfile:
/// - `/.dockerenv`: the marker file dockerd creates in each container it starts;
/// - `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`: bind-mounted into every RUN
///   container by dockerd and by BuildKit's runc executor (empty mount-point stubs may stay);
/// - `/proc`, `/sys`, `/dev` and everything below them: kernel filesystems and the device
///   tree mounted into every container (`/dev/console`, `/dev/pts`, `/dev/shm` ...).
///
/// A Dockerfile that really writes one of these paths is therefore not checked there.
/// (`/etc/mtab`, which `docker export` of a container shows, is in no layer: snapshots are
/// read from `docker save`, so it needs no entry.)
pub const IGNORED: &[&str] = &[
    "/.dockerenv",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/proc",
    "/sys",
    "/dev",
];

/// The config fields compared, as Docker spells them in the image config.
pub const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
    "ArgsEscaped",
];

pub fn is_ignored(path: &str) -> bool {
    IGNORED
        .iter()
        .any(|i| path == *i || path.strip_prefix(i).is_some_and(|r| r.starts_with('/')))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Only while reading a layer: [`flatten`] turns hardlinks into files.
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Other(u8),
}

impl Kind {
    fn from_flag(flag: u8) -> Kind {
        match flag {
            b'0' | b'7' => Kind::File,
            b'5' => Kind::Dir,
            b'2' => Kind::Symlink,
            b'1' => Kind::Hardlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        }
    }
}

/// Everything compared about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky (`mode & 0o7777`); 0o777 for symlinks,
    /// whose mode Linux ignores.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Content size (files, and hardlinks: their target's).
    pub size: u64,
    /// SHA-256 of the content (files and hardlinks).
    pub digest: Option<String>,
    /// Symlink target as stored, or a hardlink's target path (absolute).
    pub link: Option<String>,
    /// (major, minor) of a device node.
    pub device: Option<(u64, u64)>,
    /// Extended attributes, name → value in hex.
    pub xattrs: BTreeMap<String, String>,
    /// The other paths hardlinked to this one (sorted). A hardlink is a file like its
    /// target: which member of a group a layer stored first, and which as a link, does not
    /// count.
    pub hardlinks: Vec<String>,
}

impl Entry {
    /// One-line description, as diffs print it: `file 0644 0:0 3B sha256:2cf24dba5fb0 "hi\n"`.
    pub fn describe(&self, content: Option<&[u8]>) -> String {
        let kind = match self.kind {
            Kind::File => "file".to_string(),
            Kind::Dir => "dir".to_string(),
            Kind::Symlink => "symlink".to_string(),
            Kind::Hardlink => "hardlink".to_string(),
            Kind::CharDevice => "chardev".to_string(),
            Kind::BlockDevice => "blockdev".to_string(),
            Kind::Fifo => "fifo".to_string(),
            Kind::Other(c) => format!("type({})", c as char),
        };
        let mut s = format!("{kind} {:04o} {}:{}", self.mode, self.uid, self.gid);
        if let Some(l) = &self.link {
            s.push_str(&format!(" -> {l}"));
        }
        if let Some((ma, mi)) = self.device {
            s.push_str(&format!(" dev {ma},{mi}"));
        }
        if let Some(d) = &self.digest {
            s.push_str(&format!(" {}B sha256:{}", self.size, &d[..12]));
            if let Some(c) = content {
                if c.len() <= 48 && std::str::from_utf8(c).is_ok() {
                    s.push_str(&format!(" {:?}", String::from_utf8_lossy(c)));
                }
            }
        }
        for (k, v) in &self.xattrs {
            s.push_str(&format!(" xattr:{k}={v}"));
        }
        if !self.hardlinks.is_empty() {
            s.push_str(&format!(" (hardlinked with {})", self.hardlinks.join(", ")));
        }
        s
    }
}

/// An image's flattened filesystem and compared config, read back from the daemon.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What it was taken of (a tag or id).
    pub image: String,
    pub id: String,
    /// Absolute path → entry, without the root and without [`IGNORED`] paths.
    pub fs: BTreeMap<String, Entry>,
    /// File contents by path (files and hardlinks), for direct assertions.
    pub contents: BTreeMap<String, Vec<u8>>,
    /// The [`CONFIG_FIELDS`] present in the config; empty values (null, false, "", [], {})
    /// are left out, since Docker treats them all as unset.
    pub config: BTreeMap<String, Value>,
    /// How many layers the image has (informational: never compared).
    pub layers: usize,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

type Tree = BTreeMap<String, (Entry, Vec<u8>)>;

/// Absolute path → entry.
pub type Entries = BTreeMap<String, Entry>;
/// Absolute path → file content.
pub type Contents = BTreeMap<String, Vec<u8>>;

/// path → hardlink group number, for paths that were ever part of a hardlink.
type Groups = BTreeMap<String, usize>;

fn remove_tree(fs: &mut Tree, groups: &mut Groups, path: &str, keep_root: bool) {
    let prefix = if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    };
    let doomed: Vec<String> = fs
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        fs.remove(&k);
        groups.remove(&k);
    }
    if !keep_root {
        fs.remove(path);
        groups.remove(path);
    }
}

fn parent_and_base(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

/// Applies layer tars (bottom first) the way Docker's layer store does: whiteouts
/// (`.wh.NAME`) delete NAME from lower layers, an opaque marker (`.wh..wh..opq`) empties a
/// directory of lower content, and a non-directory replacing a directory drops its subtree.
pub fn flatten(layers: &[Vec<u8>]) -> Result<(Entries, Contents), String> {
    let mut fs = Tree::new();
    let mut groups = Groups::new();
    let mut next_group = 0;
    for (n, layer) in layers.iter().enumerate() {
        let members = tarball::read(layer).map_err(|e| format!("layer {n}: {e}"))?;
        // Whiteouts first: they refer to lower layers only.
        let mut adds = Vec::new();
        for m in members {
            let path = tarball::normalize(&m.name);
            let (parent, base) = parent_and_base(&path);
            if base == ".wh..wh..opq" {
                remove_tree(&mut fs, &mut groups, parent, true);
            } else if base.starts_with(".wh..wh.") {
                // aufs bookkeeping (.wh..wh.plnk and friends): not content
            } else if let Some(name) = base.strip_prefix(".wh.") {
                let victim = if parent == "/" {
                    format!("/{name}")
                } else {
                    format!("{parent}/{name}")
                };
                remove_tree(&mut fs, &mut groups, &victim, false);
            } else if path != "/" {
                adds.push((path, m));
            }
        }
        for (path, m) in adds {
            let kind = Kind::from_flag(m.kind);
            let (mut kind, mut mode) = (kind, m.mode & 0o7777);
            let (mut digest, mut size, mut data, mut link) = (None, 0, Vec::new(), None);
            let mut group = None;
            match kind {
                Kind::File => {
                    digest = Some(sha256::hex(&m.data));
                    size = m.data.len() as u64;
                    data = m.data;
                }
                Kind::Hardlink => {
                    let target = tarball::normalize(&m.link);
                    let (t, bytes) = fs
                        .get(&target)
                        .ok_or_else(|| format!("layer {n}: hardlink {path} -> missing {target}"))?;
                    (kind, mode) = (t.kind, t.mode);
                    digest = t.digest.clone();
                    size = t.size;
                    data = bytes.clone();
                    link = t.link.clone();
                    group = Some(*groups.entry(target).or_insert_with(|| {
                        next_group += 1;
                        next_group
                    }));
                }
                Kind::Symlink => link = Some(m.link.clone()),
                _ => {}
            }
            groups.remove(&path);
            if kind != Kind::Dir {
                remove_tree(&mut fs, &mut groups, &path, true);
            }
            if let Some(g) = group {
                groups.insert(path.clone(), g);
            }
            let device = matches!(kind, Kind::CharDevice | Kind::BlockDevice)
                .then_some((m.dev_major, m.dev_minor));
            let entry = Entry {
                kind,
                mode: if kind == Kind::Symlink { 0o777 } else { mode },
                uid: m.uid,
                gid: m.gid,
                size,
                digest,
                link,
                device,
                xattrs: m.xattrs.iter().map(|(k, v)| (k.clone(), hex(v))).collect(),
                hardlinks: Vec::new(),
            };
            fs.insert(path, (entry, data));
        }
    }
    let mut members: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (path, g) in &groups {
        members.entry(*g).or_default().push(path.clone());
    }
    for paths in members.values().filter(|p| p.len() > 1) {
        for p in paths {
            if let Some((e, _)) = fs.get_mut(p) {
                e.hardlinks = paths.iter().filter(|o| *o != p).cloned().collect();
            }
        }
    }
    let mut entries = BTreeMap::new();
    let mut contents = BTreeMap::new();
    for (path, (entry, data)) in fs {
        if is_ignored(&path) {
            continue;
        }
        if entry.digest.is_some() {
            contents.insert(path.clone(), data);
        }
        entries.insert(path, entry);
    }
    Ok((entries, contents))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The compared part of an image config object (`config` in the saved image JSON, the same
/// struct `docker image inspect` shows as `.Config`).
pub fn config_fields(config: &Value) -> BTreeMap<String, Value> {
    CONFIG_FIELDS
        .iter()
        .filter_map(|f| {
            let v = config.get(*f)?;
            (!is_empty(v)).then(|| (f.to_string(), v.clone()))
        })
        .collect()
}

impl Snapshot {
    /// `docker save IMAGE`, flattened. Reading the config from the same archive as the
    /// layers means both describe one image even if a tag moves meanwhile.
    pub fn of(image: &str) -> Snapshot {
        // `docker save` (20.10) refuses an image without layers (a bare `FROM scratch`):
        // it has no filesystem, only a config.
        let inspected = docker_ok(&["image", "inspect", "--format", "{{json .}}", image]);
        let inspected: Value = serde_json::from_slice(&inspected.stdout)
            .unwrap_or_else(|e| panic!("`docker image inspect {image}`: {e}"));
        let no_layers = inspected["RootFS"]["Layers"]
            .as_array()
            .is_none_or(|l| l.is_empty());
        if no_layers {
            return Snapshot {
                image: image.to_string(),
                id: inspected["Id"].as_str().unwrap_or_default().to_string(),
                fs: BTreeMap::new(),
                contents: BTreeMap::new(),
                config: config_fields(&inspected["Config"]),
                layers: 0,
            };
        }
        let saved = docker_ok(&["save", image]);
        Snapshot::from_saved(image, &saved.stdout)
            .unwrap_or_else(|e| panic!("reading `docker save {image}`: {e}"))
    }

    pub fn from_saved(image: &str, archive: &[u8]) -> Result<Snapshot, String> {
        let members = tarball::read(archive)?;
        let file = |name: &str| {
            members
                .iter()
                .find(|m| tarball::normalize(&m.name) == tarball::normalize(name))
                .map(|m| m.data.clone())
                .ok_or_else(|| format!("{name} is not in the archive"))
        };
        let manifest: Value = serde_json::from_slice(&file("manifest.json")?)
            .map_err(|e| format!("manifest.json: {e}"))?;
        let first = &manifest[0];
        let config_name = first["Config"].as_str().ok_or("manifest without Config")?;
        let image_json: Value = serde_json::from_slice(&file(config_name)?)
            .map_err(|e| format!("{config_name}: {e}"))?;
        let layer_names: Vec<&str> = first["Layers"]
            .as_array()
            .ok_or("manifest without Layers")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let layers = layer_names
            .iter()
            .map(|l| file(l))
            .collect::<Result<Vec<_>, _>>()?;
        let (fs, contents) = flatten(&layers)?;
        let id = format!(
            "sha256:{}",
            config_name
                .trim_end_matches(".json")
                .trim_start_matches("blobs/sha256/")
        );
        Ok(Snapshot {
            image: image.to_string(),
            id,
            fs,
            contents,
            config: config_fields(&image_json["config"]),
            layers: layers.len(),
        })
    }

    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.fs.get(path)
    }

    /// The content of a file, or a panic naming what is there instead.
    pub fn content(&self, path: &str) -> &[u8] {
        match self.contents.get(path) {
            Some(c) => c,
            None => panic!(
                "{}: {path} is not a file in the image (found: {})",
                self.image,
                self.describe(path)
            ),
        }
    }

    pub fn text(&self, path: &str) -> String {
        String::from_utf8_lossy(self.content(path)).into_owned()
    }

    /// `describe()` of a path, or `(absent)`.
    pub fn describe(&self, path: &str) -> String {
        self.fs
            .get(path)
            .map(|e| e.describe(self.contents.get(path).map(Vec::as_slice)))
            .unwrap_or_else(|| "(absent)".to_string())
    }

    /// Paths under `dir` (not `dir` itself).
    pub fn under(&self, dir: &str) -> Vec<&str> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.fs
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .map(String::as_str)
            .collect()
    }

    pub fn config_str(&self, field: &str) -> Option<String> {
        self.config.get(field).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}
