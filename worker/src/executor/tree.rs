//! Source trees for COPY/ADD and bind mounts: what one source brings (from the context, an
//! image's tar export, a heredoc or a URL), and writing planned nodes as a tar archive.
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use model::context::{ContextManifest, EntryKind};
use model::keys::clean_source;
use model::task::ContextFiles;

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    /// A context file (relative path) and the size the manifest recorded.
    Context(String, u64),
    Bytes(Arc<Vec<u8>>),
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File(Content),
    Symlink(String),
    /// A hard link to another entry of the same tree (its relative path).
    Hardlink(String),
}

/// One entry of a source tree; `rel` is relative to the tree's root ("" is the root).
#[derive(Debug, Clone)]
pub struct SrcEntry {
    pub rel: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What one COPY source brings: its root (a file or a directory) and, for a directory,
/// everything below it (parents before children).
#[derive(Debug, Clone)]
pub struct SourceTree {
    /// The source's own name, as `filepath.Base` of the source path.
    pub name: String,
    /// The source path relative to its root context (for `--parents`).
    pub path: String,
    pub entries: Vec<SrcEntry>,
    /// Keep the source's owners (COPY --from) instead of root.
    pub keep_owner: bool,
}

impl SourceTree {
    pub fn root(&self) -> &SrcEntry {
        &self.entries[0]
    }
    pub fn is_dir(&self) -> bool {
        matches!(self.root().kind, Kind::Dir)
    }
}

/// Why a source tree could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A context path whose symlinks do not end within 32 links.
    #[error("too many levels of symbolic links: {0}")]
    SymlinkLoop(String),
    /// A context source the context lacks (its clean path, without the leading `/`).
    #[error("\"/{0}\": not found")]
    NotInContext(String),
    /// An archive that does not read as tar.
    #[error(transparent)]
    Archive(#[from] std::io::Error),
    /// An archive with no entry for the source path.
    #[error("{0}: not found")]
    NotInArchive(String),
}

impl From<TreeError> for model::task::StageError {
    fn from(e: TreeError) -> Self {
        model::task::StageError::new(e.to_string())
    }
}

/// Resolves a context path through symlinks (as COPY follows a source that is a link),
/// staying inside the context.
pub fn follow_context<'m>(
    manifest: &'m ContextManifest,
    path: &str,
) -> Result<Option<&'m model::context::ManifestEntry>, TreeError> {
    let mut p = path.to_string();
    for _ in 0..32 {
        match manifest.get(&p) {
            Some(e) => match &e.kind {
                EntryKind::Symlink { target } => {
                    let base = p.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    p = if target.starts_with('/') {
                        clean_source(target)
                    } else {
                        clean_source(&format!("{base}/{target}"))
                    };
                    if p.is_empty() {
                        return Ok(None);
                    }
                }
                _ => return Ok(Some(e)),
            },
            None => return Ok(None),
        }
    }
    Err(TreeError::SymlinkLoop(path.to_string()))
}

/// The tree a context source path selects (`""` is the whole context). Symlinks named as
/// the source are followed; symlinks below it are kept as links.
pub fn context_tree(manifest: &ContextManifest, src: &str) -> Result<SourceTree, TreeError> {
    let clean = clean_source(src);
    let name = clean.rsplit('/').next().unwrap_or("").to_string();
    let mut entries = Vec::new();
    let root_path = if clean.is_empty() {
        entries.push(SrcEntry {
            rel: String::new(),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        });
        String::new()
    } else {
        let e = follow_context(manifest, &clean)?
            .ok_or_else(|| TreeError::NotInContext(clean.clone()))?;
        entries.push(SrcEntry {
            rel: String::new(),
            kind: entry_kind(e),
            mode: e.mode,
            uid: 0,
            gid: 0,
        });
        e.path.clone()
    };
    if matches!(entries[0].kind, Kind::Dir) {
        let prefix = if root_path.is_empty() {
            String::new()
        } else {
            format!("{root_path}/")
        };
        for e in manifest.iter().filter(|e| e.path.starts_with(&prefix)) {
            entries.push(SrcEntry {
                rel: e.path[prefix.len()..].to_string(),
                kind: entry_kind(e),
                mode: e.mode,
                uid: 0,
                gid: 0,
            });
        }
    }
    Ok(SourceTree {
        name,
        path: clean,
        entries,
        keep_owner: false,
    })
}

fn entry_kind(e: &model::context::ManifestEntry) -> Kind {
    match &e.kind {
        EntryKind::Dir => Kind::Dir,
        EntryKind::File { size, .. } => Kind::File(Content::Context(e.path.clone(), *size)),
        EntryKind::Symlink { target } => Kind::Symlink(target.clone()),
    }
}

/// Reads a tar archive from `GET /containers/{id}/archive` into a tree: the first entry
/// is the root (named by its base name), the rest are below it.
pub fn tar_tree(data: &[u8], src_path: &str) -> Result<SourceTree, TreeError> {
    let mut ar = tar::Archive::new(data);
    let mut entries = Vec::new();
    let mut root_name: Option<String> = None;
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?;
        let path = path.to_string_lossy().trim_end_matches('/').to_string();
        let root = root_name.get_or_insert_with(|| path.clone()).clone();
        let rel = if path == root {
            String::new()
        } else if let Some(r) = path.strip_prefix(&format!("{root}/")) {
            r.to_string()
        } else {
            continue;
        };
        let h = entry.header();
        let mode = h.mode()? & 0o7777;
        let uid = h.uid()? as u32;
        let gid = h.gid()? as u32;
        let link = || -> Result<String, TreeError> {
            Ok(entry
                .link_name()?
                .map(|l| l.to_string_lossy().to_string())
                .unwrap_or_default())
        };
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(link()?),
            tar::EntryType::Link => {
                let target = link()?;
                let t = target.trim_end_matches('/');
                Kind::Hardlink(t.strip_prefix(&format!("{root}/")).unwrap_or(t).to_string())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf)?;
                Kind::File(Content::Bytes(Arc::new(buf)))
            }
            // Devices, FIFOs and the like: BuildKit copies devices; skip the rest.
            _ => continue,
        };
        entries.push(SrcEntry {
            rel,
            kind,
            mode,
            uid,
            gid,
        });
    }
    if entries.is_empty() {
        return Err(TreeError::NotInArchive(src_path.to_string()));
    }
    let name = src_path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    Ok(SourceTree {
        name,
        path: src_path.trim_start_matches('/').to_string(),
        entries,
        keep_owner: true,
    })
}

/// The digest of what a `COPY --from` of these trees copies: each tree's name and path,
/// and every entry's relative path, type, mode, owner, content and link target; never
/// mtimes. Equal digests copy equal files, so a consumer keyed on it stays valid.
pub fn trees_digest(trees: &[SourceTree]) -> String {
    let mut h = blake3::Hasher::new_derive_key("dbuild 2026-11 copied content v1");
    let mut field = |s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    for t in trees {
        field(&t.name);
        field(&t.path);
        field(&t.entries.len().to_string());
        for e in &t.entries {
            field(&e.rel);
            field(&format!("{:o} {} {}", e.mode, e.uid, e.gid));
            let kind = match &e.kind {
                Kind::Dir => "dir".to_string(),
                Kind::File(Content::Bytes(b)) => format!("file {}", blake3::hash(b).to_hex()),
                // Image trees hold bytes; a context path is named by its manifest digest.
                Kind::File(Content::Context(p, size)) => format!("context {p} {size}"),
                Kind::Symlink(t) => format!("symlink {t}"),
                Kind::Hardlink(t) => format!("hardlink {t}"),
            };
            field(&kind);
        }
    }
    h.finalize().to_hex().to_string()
}

/// What `COPY --from` sources of an image read, by (image id, absolute source path), kept
/// for a while: a stage's contents are read once to key its consumers, and the consumer's
/// COPY --from then needs no second read (a container and an archive round trip). Images
/// are immutable, so an entry never goes stale; the cache holds at most [`TreeCache::BUDGET`]
/// bytes, oldest entries out first.
#[derive(Default)]
pub struct TreeCache {
    map: std::collections::HashMap<(String, String), Arc<Vec<SourceTree>>>,
    order: std::collections::VecDeque<(String, String)>,
    bytes: usize,
}

impl TreeCache {
    pub const BUDGET: usize = 64 << 20;

    pub fn get(&self, image_id: &str, path: &str) -> Option<Arc<Vec<SourceTree>>> {
        self.map
            .get(&(image_id.to_string(), path.to_string()))
            .cloned()
    }

    pub fn put(&mut self, image_id: &str, path: &str, trees: Vec<SourceTree>) {
        let size = trees_bytes(&trees);
        if size > Self::BUDGET / 4 {
            return;
        }
        let key = (image_id.to_string(), path.to_string());
        if self.map.insert(key.clone(), Arc::new(trees)).is_some() {
            return;
        }
        self.order.push_back(key);
        self.bytes += size;
        while self.bytes > Self::BUDGET {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.map.remove(&old) {
                self.bytes -= trees_bytes(&t);
            }
        }
    }
}

fn trees_bytes(trees: &[SourceTree]) -> usize {
    trees
        .iter()
        .flat_map(|t| &t.entries)
        .map(|e| match &e.kind {
            Kind::File(Content::Bytes(b)) => b.len() + 64,
            _ => 64,
        })
        .sum()
}

/// A single file made by the executor (heredoc, URL download).
pub fn bytes_tree(name: &str, data: Vec<u8>, mode: u32) -> SourceTree {
    SourceTree {
        name: name.to_string(),
        path: name.to_string(),
        entries: vec![SrcEntry {
            rel: String::new(),
            kind: Kind::File(Content::Bytes(Arc::new(data))),
            mode,
            uid: 0,
            gid: 0,
        }],
        keep_owner: false,
    }
}

/// A node to write into the image: an absolute path and what goes there.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// `tree` as the archive API names a path's archive: the root entry after the source's
/// own name, everything below it under that name (mtimes 0). `Ok(None)` when a file's
/// bytes are not in the tree (a context file).
pub fn tree_archive(tree: &SourceTree) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = tar::Builder::new(Vec::new());
    let under = |rel: &str| {
        if rel.is_empty() {
            tree.name.clone()
        } else {
            format!("{}/{rel}", tree.name)
        }
    };
    for e in &tree.entries {
        let meta = (e.mode, e.uid, e.gid);
        if !append_entry(&mut out, &under(&e.rel), &e.kind, meta, under, None)? {
            return Ok(None);
        }
    }
    out.into_inner().map(Some)
}

/// Writes `nodes` (absolute path → node, parents sort before children) as a tar archive
/// to `out`. Hard link targets are absolute paths here; the links come after everything
/// else, since a link must follow its target and path order alone can put it first
/// (`/x/a.b` sorts before `/x/a/c`). Context files are read through `ctx` and must still
/// have the size the manifest recorded.
pub fn write_tar<W: std::io::Write>(
    out: W,
    nodes: &BTreeMap<String, Node>,
    ctx: &dyn ContextFiles,
) -> std::io::Result<W> {
    let mut tar = tar::Builder::new(out);
    let is_link = |n: &Node| matches!(n.kind, Kind::Hardlink(_));
    let others = nodes.iter().filter(|(_, n)| !is_link(n));
    for (path, n) in others.chain(nodes.iter().filter(|(_, n)| is_link(n))) {
        let name = path.trim_start_matches('/');
        if name.is_empty() {
            continue;
        }
        let absolute = |t: &str| t.trim_start_matches('/').to_string();
        append_entry(
            &mut tar,
            name,
            &n.kind,
            (n.mode, n.uid, n.gid),
            absolute,
            Some(ctx),
        )?;
    }
    tar.into_inner()
}

/// Appends one entry called `name` with `meta` (mode, uid, gid) and no mtime; a hard
/// link points at `link(target)`. A context file's bytes are read through `ctx` and must
/// still have the size the manifest recorded; without `ctx` nothing is written and the
/// answer is `false`.
fn append_entry<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    kind: &Kind,
    (mode, uid, gid): (u32, u32, u32),
    link: impl Fn(&str) -> String,
    ctx: Option<&dyn ContextFiles>,
) -> std::io::Result<bool> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(uid as u64);
    h.set_gid(gid as u64);
    h.set_mtime(0);
    h.set_size(0);
    match kind {
        Kind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            tar.append_data(&mut h, format!("{name}/"), std::io::empty())?;
        }
        Kind::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            tar.append_link(&mut h, name, target)?;
        }
        Kind::Hardlink(target) => {
            h.set_entry_type(tar::EntryType::Link);
            tar.append_link(&mut h, name, link(target))?;
        }
        Kind::File(Content::Bytes(b)) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(b.len() as u64);
            tar.append_data(&mut h, name, b.as_slice())?;
        }
        Kind::File(Content::Context(p, size)) => {
            let Some(ctx) = ctx else {
                return Ok(false);
            };
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(*size);
            // `take` plus the length check: a file that changed since the scan must not
            // produce a corrupt archive.
            let mut counted = CountingReader {
                inner: ctx.open(p)?.take(*size),
                n: 0,
            };
            tar.append_data(&mut h, name, &mut counted)?;
            if counted.n != *size {
                return Err(std::io::Error::other(format!(
                    "context file {p} changed while building (expected {size} bytes, read {})",
                    counted.n
                )));
            }
        }
    }
    Ok(true)
}

struct CountingReader<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_link_is_written_after_its_target() {
        let node = |kind: Kind| Node {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let nodes: BTreeMap<String, Node> = [
            ("/x".to_string(), node(Kind::Dir)),
            ("/x/a".to_string(), node(Kind::Dir)),
            ("/x/a.b".to_string(), node(Kind::Hardlink("/x/a/c".into()))),
            (
                "/x/a/c".to_string(),
                node(Kind::File(Content::Bytes(Arc::new(b"hi".to_vec())))),
            ),
        ]
        .into();
        let ctx = model::task::LocalContext {
            root: std::path::PathBuf::from("/nonexistent"),
        };
        let tar = write_tar(Vec::new(), &nodes, &ctx).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tar::Archive::new(tar.as_slice())
            .unpack(dir.path())
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("x/a.b")).unwrap(), b"hi");
    }

    #[test]
    fn a_tree_archive_is_named_like_the_archive_api_names_a_path() {
        let e = |rel: &str, kind: Kind, mode: u32, uid: u32| SrcEntry {
            rel: rel.into(),
            kind,
            mode,
            uid,
            gid: uid + 1,
        };
        let bytes = |b: &[u8]| Kind::File(Content::Bytes(Arc::new(b.to_vec())));
        let tree = SourceTree {
            name: "out".into(),
            path: "out".into(),
            entries: vec![
                e("", Kind::Dir, 0o750, 0),
                e("bin", bytes(b"elf"), 0o4755, 3_000_000),
                e("link", Kind::Symlink("bin".into()), 0o777, 0),
                e("same", Kind::Hardlink("bin".into()), 0o4755, 3_000_000),
            ],
            keep_owner: true,
        };
        let tar = tree_archive(&tree).unwrap().unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        type Listed = (String, u32, u64, Option<String>, Vec<u8>);
        let got: Vec<Listed> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mode().unwrap(),
                    e.header().uid().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().into_owned()),
                    data,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("out/".into(), 0o750, 0, None, vec![]),
                ("out/bin".into(), 0o4755, 3_000_000, None, b"elf".to_vec()),
                ("out/link".into(), 0o777, 0, Some("bin".into()), vec![]),
                (
                    "out/same".into(),
                    0o4755,
                    3_000_000,
                    Some("out/bin".into()),
                    vec![]
                ),
            ]
        );
        // A context file's bytes are not in the tree: no archive.
        let ctx = SourceTree {
            entries: vec![e("", Kind::File(Content::Context("a".into(), 1)), 0o644, 0)],
            ..tree
        };
        assert!(tree_archive(&ctx).unwrap().is_none());
    }
}
