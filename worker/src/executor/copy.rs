//! COPY/ADD: Docker's destination rules (BuildKit's `fsutil` copy), planned against the
//! current image's filesystem, then written as one tar archive at `/`.
//!
//! Rules followed: the destination is relative to WORKDIR; a destination ending in `/`
//! (or `.`) is a directory, created if missing; a file copied onto an existing directory
//! goes inside it; a directory source copies its contents; missing directories on the
//! way are created 0755 and owned by `--chown` (root without it); directories copied from
//! the source overwrite the mode and owner of existing ones, the destination root keeps
//! its own; files keep their mode unless `--chmod`; context files are owned by root,
//! files from `--from` keep their owner unless `--chown`.
use std::collections::{BTreeMap, HashMap, HashSet};

use model::context::{path_match, ContextManifest, IgnoreMatcher};
use model::keys::clean_source;
use model::task::StageError;

use super::config::clean_abs;
use super::layers::Mirror;
use super::tree::{context_tree, Kind, Node, SourceTree};
use crate::daemon::Daemon;

/// Plans the nodes one COPY writes.
pub struct CopyPlanner<'a> {
    pub daemon: &'a Daemon,
    /// A container of the image being copied into (never started), for stats.
    pub container: String,
    /// When `container` is the stage's mirror: what earlier steps wrote into it.
    pub mirror: Option<&'a mut Mirror>,
    pub owner: Option<(u32, u32)>,
    pub chmod: Option<u32>,
    pub nodes: BTreeMap<String, Node>,
    /// Stat cache: absolute path → is a directory (`None`: missing).
    pub seen: HashMap<String, Option<bool>>,
    /// Paths that are symlinks in the container (followed by `is_dir`).
    pub linked: HashSet<String>,
}

impl<'a> CopyPlanner<'a> {
    pub fn new(
        daemon: &'a Daemon,
        container: &str,
        owner: Option<(u32, u32)>,
        chmod: Option<u32>,
    ) -> Self {
        CopyPlanner {
            daemon,
            container: container.to_string(),
            mirror: None,
            owner,
            chmod,
            nodes: BTreeMap::new(),
            seen: HashMap::new(),
            linked: HashSet::new(),
        }
    }

    /// Whether `path` is (or will be) a directory; `None` if it does not exist.
    async fn is_dir(&mut self, path: &str) -> Result<Option<bool>, StageError> {
        if let Some(n) = self.nodes.get(path) {
            return Ok(Some(matches!(n.kind, Kind::Dir)));
        }
        if let Some(v) = self.seen.get(path) {
            return Ok(*v);
        }
        if let Some(m) = self.mirror.as_deref() {
            if let Some(known) = m.known_dir(path) {
                return Ok(Some(known));
            }
        }
        // Below a directory the container lacks, nothing exists: no round trip per file
        // of a directory copied to a new place (a stat is ~4 ms).
        if self.under_missing(path) {
            return Ok(None);
        }
        if let Some(m) = self.mirror.as_deref_mut() {
            m.sync_for(self.daemon, path).await?;
        }
        let v = match self.daemon.stat(&self.container, path).await? {
            Some(s) if s.is_symlink => {
                self.linked.insert(path.to_string());
                self.daemon
                    .stat_follow(&self.container, &s.link_target)
                    .await?
                    .map(|s| s.is_dir)
            }
            other => other.map(|s| s.is_dir),
        };
        self.seen.insert(path.to_string(), v);
        Ok(v)
    }

    /// Whether the nearest ancestor of `path` that was looked up is missing.
    fn under_missing(&self, path: &str) -> bool {
        let mut cur = parent(path);
        loop {
            if let Some(v) = self.seen.get(cur) {
                return v.is_none();
            }
            if cur == "/" {
                return false;
            }
            cur = parent(cur);
        }
    }

    /// `mkdir -p` with mode 0755 and the copy's owner for each directory it creates.
    pub async fn mkdir_all(&mut self, path: &str) -> Result<(), StageError> {
        let path = clean_abs(path);
        let mut cur = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            match self.is_dir(&cur).await? {
                Some(true) => {}
                Some(false) => {
                    return Err(StageError::new(format!(
                        "cannot create directory {cur}: a file of that name exists"
                    )))
                }
                None => {
                    let (uid, gid) = self.owner.unwrap_or((0, 0));
                    self.nodes.insert(
                        cur.clone(),
                        Node {
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid,
                            gid,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Copies one source tree to `dest` (absolute; `dest_dir` when it ended in `/`).
    pub async fn add_tree(
        &mut self,
        tree: &SourceTree,
        dest: &str,
        dest_dir: bool,
        excludes: Option<&IgnoreMatcher>,
    ) -> Result<(), StageError> {
        let dest = clean_abs(dest);
        if dest_dir {
            self.mkdir_all(&dest).await?;
        } else {
            self.mkdir_all(parent(&dest)).await?;
        }
        let dest_is_dir = self.is_dir(&dest).await?;
        let mut target = dest.clone();
        if !tree.is_dir() && dest_is_dir == Some(true) {
            target = join(&dest, &tree.name);
        }
        if tree.is_dir() && dest_is_dir.is_none() {
            self.mkdir_all(&target).await?;
        } else {
            self.mkdir_all(parent(&target)).await?;
        }
        for e in &tree.entries {
            if !e.rel.is_empty() {
                if let Some(m) = excludes {
                    if m.matches(&e.rel) {
                        continue;
                    }
                }
            }
            let path = if e.rel.is_empty() {
                target.clone()
            } else {
                join(&target, &e.rel)
            };
            if e.rel.is_empty() && tree.is_dir() {
                // The destination root keeps its own mode and owner.
                continue;
            }
            let (uid, gid) = match (self.owner, tree.keep_owner) {
                (Some(o), _) => o,
                (None, true) => (e.uid, e.gid),
                (None, false) => (0, 0),
            };
            let mode = match (&e.kind, self.chmod) {
                (Kind::Symlink(_), _) => 0o777,
                (_, Some(m)) => m,
                _ => e.mode,
            };
            let kind = match &e.kind {
                Kind::Hardlink(t) => Kind::Hardlink(join(&target, t)),
                k => k.clone(),
            };
            if !matches!(kind, Kind::Dir) {
                if let Some(true) = self.is_dir(&path).await? {
                    return Err(StageError::new(format!(
                        "cannot replace to directory {path} with file"
                    )));
                }
            }
            self.nodes.insert(
                path,
                Node {
                    kind,
                    mode,
                    uid,
                    gid,
                },
            );
        }
        Ok(())
    }
}

/// `a/b` → `a`, `/a` → `/`.
pub fn parent(p: &str) -> &str {
    match p.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((d, _)) => d,
    }
}

pub fn join(dir: &str, name: &str) -> String {
    clean_abs(&format!("{dir}/{name}"))
}

/// The destination of a COPY: absolute (relative to `workdir`), and whether it names a
/// directory (ends in `/`, or is `.`).
pub fn destination(dest: &str, workdir: &str) -> (String, bool) {
    let dir = dest.ends_with('/') || dest == "." || dest.is_empty() || dest.ends_with("/.");
    let abs = if dest.starts_with('/') {
        clean_abs(dest)
    } else {
        clean_abs(&format!(
            "{}/{dest}",
            if workdir.is_empty() { "/" } else { workdir }
        ))
    };
    (abs, dir)
}

pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The context paths a source selects: itself, or its wildcard matches (BuildKit's
/// `ResolveWildcards`: a matching directory is not searched further).
pub fn context_matches(manifest: &ContextManifest, src: &str) -> Vec<String> {
    let clean = clean_source(src);
    if !has_wildcard(&clean) {
        return vec![clean];
    }
    let parts: Vec<&str> = clean.split('/').collect();
    let first = parts.iter().position(|p| has_wildcard(p)).unwrap_or(0);
    let base = parts[..first].join("/");
    let pattern = parts[first..].join("/");
    let prefix = if base.is_empty() {
        String::new()
    } else {
        format!("{base}/")
    };
    let mut out: Vec<String> = Vec::new();
    for e in manifest.iter() {
        let Some(rel) = e.path.strip_prefix(&prefix) else {
            continue;
        };
        if out.iter().any(|m| e.path.starts_with(&format!("{m}/"))) {
            continue;
        }
        if path_match(&pattern, rel).unwrap_or(false) {
            out.push(e.path.clone());
        }
    }
    out
}

/// The tree for one context source (wildcards already resolved).
pub fn context_source(manifest: &ContextManifest, path: &str) -> Result<SourceTree, StageError> {
    context_tree(manifest, path)
        .map_err(|e| StageError::new(format!("failed to compute cache key: {e}")))
}

/// Parses `--chmod` (octal, as BuildKit's Dockerfile frontend accepts).
pub fn parse_chmod(s: &str) -> Result<u32, StageError> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            StageError::new(format!(
                "invalid chmod parameter {s:?}: use octal digits, e.g. 0755"
            ))
        })
}

/// The ADD/COPY `--parents` destination of a source: the path below the context root.
pub fn parents_dest(dest: &str, src_path: &str) -> String {
    join(dest, parent(&format!("/{src_path}")))
}

/// For `--parents`: splits a source at its pivot, the first `/./` (BuildKit's rule: the
/// path below the pivot is what is kept under the destination), into the pivot directory
/// (clean, "" for the context root) and the rest, which may hold wildcards.
pub fn split_pivot(src: &str) -> Result<(String, String), StageError> {
    let Some((pivot, below)) = src.split_once("/./") else {
        return Ok((String::new(), src.to_string()));
    };
    let pivot = clean_source(pivot);
    if has_wildcard(&pivot) {
        return Err(StageError::new(format!(
            "COPY --parents {src}: wildcards before the /./ pivot are not supported; put them after it"
        )));
    }
    Ok((pivot, below.to_string()))
}

/// The part of a context path (`src_path`, below `pivot`) that `--parents` keeps.
pub fn below_pivot<'p>(src_path: &'p str, pivot: &str) -> &'p str {
    if pivot.is_empty() {
        return src_path;
    }
    match src_path.strip_prefix(pivot) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => src_path,
    }
}

/// For `--parents`: the directories of `kept` (a path below `pivot`) that the copy
/// recreates, each with its mode in the context (BuildKit copies them like the source's
/// own directories): every parent, and `kept` itself when the source is a directory.
pub fn parent_dirs(
    manifest: &ContextManifest,
    pivot: &str,
    kept: &str,
    include_self: bool,
) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let parts: Vec<&str> = kept.split('/').filter(|p| !p.is_empty()).collect();
    let n = if include_self {
        parts.len()
    } else {
        parts.len().saturating_sub(1)
    };
    for p in parts.iter().take(n) {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(p);
        let in_context = if pivot.is_empty() {
            cur.clone()
        } else {
            format!("{pivot}/{cur}")
        };
        let mode = manifest.get(&in_context).map(|e| e.mode).unwrap_or(0o755);
        out.push((cur.clone(), mode));
    }
    out
}

/// Recognises a tar archive by its header, or a compressed stream by its magic bytes
/// (the daemon decompresses gzip, bzip2 and xz when the archive is uploaded).
pub fn archive_kind(head: &[u8]) -> Option<&'static str> {
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Some("tar");
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Some("gzip");
    }
    if head.starts_with(b"BZh") {
        return Some("bzip2");
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Some("xz");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(destination("x", "/app"), ("/app/x".to_string(), false));
        assert_eq!(destination("x/", "/app"), ("/app/x".to_string(), true));
        assert_eq!(destination(".", "/app"), ("/app".to_string(), true));
        assert_eq!(destination("/abs", ""), ("/abs".to_string(), false));
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert_eq!(parents_dest("/d", "a/b/c.txt"), "/d/a/b");
    }

    #[test]
    fn parents_pivot() {
        let split = |s: &str| split_pivot(s).unwrap();
        assert_eq!(
            split("./dir/./sub/x.txt"),
            ("dir".into(), "sub/x.txt".into())
        );
        assert_eq!(split("./a/./*/f"), ("a".into(), "*/f".into()));
        assert_eq!(split("dir/sub/x.txt"), ("".into(), "dir/sub/x.txt".into()));
        assert_eq!(split("/./x"), ("".into(), "x".into()));
        assert!(split_pivot("d*/./x").is_err());
        assert_eq!(below_pivot("dir/sub/x.txt", "dir"), "sub/x.txt");
        assert_eq!(below_pivot("dir/sub/x.txt", ""), "dir/sub/x.txt");
        assert_eq!(below_pivot("dirx/y", "dir"), "dirx/y");
        assert_eq!(below_pivot("dir", "dir"), "");
    }

    #[test]
    fn archives() {
        assert_eq!(archive_kind(&[0x1f, 0x8b, 8]), Some("gzip"));
        assert_eq!(archive_kind(b"hello"), None);
        let mut t = vec![0u8; 512];
        t[257..262].copy_from_slice(b"ustar");
        assert_eq!(archive_kind(&t), Some("tar"));
    }
}
