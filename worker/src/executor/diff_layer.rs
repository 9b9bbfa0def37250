//! A RUN's layer written from the container's changes instead of `docker commit`.
//!
//! On daemons whose storage driver diffs naively (fuse-overlayfs, vfs) a commit sleeps
//! until the next whole second after its diff, so every RUN cost up to one more second.
//! The daemon's change list (`GET /containers/{id}/changes`, the same diff a commit
//! makes) says which paths were added, modified and deleted; the executor fetches those
//! paths through the archive API and writes the layer itself: an added path comes whole
//! (an added directory with everything under it, which is all new), a modified directory
//! as its header only, a deleted path as a whiteout. The layer reaches the daemon with
//! the next `docker load`, like a COPY layer.
//!
//! The archive API shows a container's mounts while it reads, so nothing is read at or
//! below a RUN's mount targets: a target the runtime had to create goes into the layer as
//! the plain directory the runtime made (0755, root), as a commit records it.
//!
//! Large changes are left to `docker commit` (more than [`MAX_FETCHES`] archive calls or
//! [`MAX_BYTES`] of content): holding them in memory or fetching path by path would cost
//! more than the commit saves, and so are RUNs with mounts (the caller commits them) and
//! layers where two files look like hard links of each other (same size, mtime and
//! content): separate archive reads cannot tell a hard link from a copy.
use std::collections::BTreeSet;

use bollard::models::ChangeType;
use futures::StreamExt;
use model::task::StageError;

use super::copy as cp;
use crate::daemon::{timed, Daemon};

/// At most this many archive calls per RUN layer.
pub const MAX_FETCHES: usize = 256;
/// At most this many bytes of archive per RUN layer.
pub const MAX_BYTES: usize = 64 << 20;

/// One path of the change list, as fetched.
struct Fetched {
    path: String,
    /// Archive bytes: the whole archive of the path, or only as much as holds its first
    /// entry when `whole` is false. `None`: a mount point the runtime created.
    tar: Option<Vec<u8>>,
    whole: bool,
}

/// Paths in tree order: a directory, then everything below it, then its next sibling. A
/// plain string sort puts `/out.stamp` between `/out` and `/out/bin` (`.` sorts before
/// `/`), which would end the skip of what an added or deleted `/out` already covers.
fn tree_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Whether `path` is strictly below `dir`.
fn below(path: &str, dir: &str) -> bool {
    dir == "/" || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// A RUN's layer and the paths it holds whole: those the RUN added, each written with
/// everything below it (see [`super::layer_read`]).
pub struct RunLayer {
    pub tar: Vec<u8>,
    pub whole: Vec<String>,
}

/// The layer a container's changes make, skipping `skip` (file mount points the runtime
/// created) and what lies below `targets` (every mount target of the RUN), or `None`
/// when the changes are too large for this path (use a commit). `Some(None)`: the RUN
/// changed nothing.
pub async fn layer_from_changes(
    daemon: &Daemon,
    container: &str,
    skip: &[String],
    targets: &[String],
) -> Result<Option<Option<RunLayer>>, StageError> {
    if skip.is_empty() && targets.is_empty() && daemon.reads_upper_dirs().await {
        if let Some(dirs) = super::upper::container_dirs(daemon, container).await {
            let read = tokio::task::spawn_blocking(move || {
                super::upper::layer_from_upper(&dirs, MAX_BYTES)
            });
            match timed("upper dir", read).await {
                Ok(Ok(layer)) => return Ok(layer),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "upper directory not readable as a layer; using the change list")
                }
                Err(e) => tracing::debug!(error = %e, "upper directory read failed"),
            }
        }
    }
    let changes = daemon.changes(container).await?;
    let skip: BTreeSet<&str> = skip.iter().map(String::as_str).collect();
    let mut changes: Vec<(String, ChangeType)> = changes
        .into_iter()
        .filter(|c| c.path != "/" && !skip.contains(c.path.as_str()))
        .filter(|c| !targets.iter().any(|t| below(&c.path, t)))
        .map(|c| (c.path, c.kind))
        .collect();
    changes.sort_by(|a, b| tree_order(&a.0, &b.0));
    if changes.is_empty() {
        return Ok(Some(None));
    }
    // What to fetch, in path order; a path below an added directory comes with it and
    // a path below a deleted one is gone with it.
    let mut fetch: Vec<(String, Option<bool>)> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    let mut covered: Option<String> = None;
    for (path, kind) in &changes {
        if let Some(c) = &covered {
            if path.starts_with(&format!("{c}/")) {
                continue;
            }
        }
        match kind {
            ChangeType::_2 => {
                deleted.push(path.clone());
                covered = Some(path.clone());
            }
            // A mount target: never read (the mount would show).
            ChangeType::_1 if targets.contains(path) => fetch.push((path.clone(), None)),
            ChangeType::_0 if targets.contains(path) => {}
            // An added directory comes whole, unless a mount lies below it: then its
            // header, and its (all added) contents one by one.
            ChangeType::_1 if targets.iter().any(|t| below(t, path)) => {
                fetch.push((path.clone(), Some(false)))
            }
            ChangeType::_1 => {
                fetch.push((path.clone(), Some(true)));
                covered = Some(path.clone());
            }
            ChangeType::_0 => fetch.push((path.clone(), Some(false))),
        }
    }
    if fetch.len() > MAX_FETCHES {
        return Ok(None);
    }
    let mut fetched = futures::stream::iter(fetch.into_iter().map(|(path, whole)| async move {
        let Some(whole) = whole else {
            return Ok(Some(Fetched {
                path,
                tar: None,
                whole: false,
            }));
        };
        let tar = fetch_path(daemon, container, &path, whole, MAX_BYTES).await?;
        Ok::<_, StageError>(tar.map(|tar| Fetched {
            path,
            tar: Some(tar),
            whole,
        }))
    }))
    .buffered(8);
    let mut all = Vec::new();
    let mut total = 0usize;
    while let Some(f) = fetched.next().await {
        let Some(f) = f? else { return Ok(None) };
        total += f.tar.as_ref().map_or(0, Vec::len);
        if total > MAX_BYTES {
            return Ok(None);
        }
        all.push(f);
    }
    drop(fetched);
    if maybe_hardlinked(&all) {
        return Ok(None);
    }
    let skip: BTreeSet<String> = skip.iter().map(|s| s.to_string()).collect();
    let targets: BTreeSet<String> = targets.iter().cloned().collect();
    let whole = all
        .iter()
        .filter(|f| f.whole)
        .map(|f| f.path.clone())
        .filter(|p| !skip.iter().any(|s| s == p || below(s, p)))
        .collect();
    let tar = tokio::task::spawn_blocking(move || write_layer(&all, &deleted, &skip, &targets))
        .await
        .map_err(|e| StageError::new(format!("build RUN layer: {e}")))?
        .map_err(|e| StageError::new(format!("build RUN layer: {e}")))?;
    Ok(Some(Some(RunLayer { tar, whole })))
}

/// The archive of `path` in a container: whole, or cut after the first entry when
/// `whole` is false and that entry is a directory. `None` past `limit` bytes.
async fn fetch_path(
    daemon: &Daemon,
    container: &str,
    path: &str,
    whole: bool,
    limit: usize,
) -> Result<Option<Vec<u8>>, StageError> {
    // Read on while under the limit and, for a header only, until the first entry is
    // whole and a directory.
    let buf = daemon
        .download_while(container, path, |buf| {
            buf.len() <= limit && (whole || !first_is_dir(buf))
        })
        .await?;
    if buf.len() > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Whether two fetched regular files (not empty) have the same size, mtime and content:
/// likely hard links of each other, which separate archive reads cannot tell, so the
/// layer is left to a commit.
fn maybe_hardlinked(all: &[Fetched]) -> bool {
    use std::io::Read;
    let mut seen = std::collections::HashSet::new();
    for f in all {
        let Some(tar) = &f.tar else { continue };
        let mut ar = tar::Archive::new(tar.as_slice());
        let Ok(entries) = ar.entries() else { continue };
        for (n, e) in entries.enumerate() {
            if n > 0 && !f.whole {
                break;
            }
            let Ok(mut e) = e else { break };
            let h = e.header();
            if !h.entry_type().is_file() || h.size().unwrap_or(0) == 0 {
                continue;
            }
            let (size, mtime) = (h.size().unwrap_or(0), h.mtime().unwrap_or(0));
            let mut data = Vec::new();
            if e.read_to_end(&mut data).is_err() {
                continue;
            }
            if !seen.insert((size, mtime, blake3::hash(&data))) {
                return true;
            }
        }
    }
    false
}

/// Whether the first entry of a (possibly cut) archive is complete and a directory.
fn first_is_dir(buf: &[u8]) -> bool {
    let mut ar = tar::Archive::new(buf);
    let Ok(mut entries) = ar.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(e)) if e.header().entry_type().is_dir())
}

/// Writes the layer: every fetched entry under its path in the image, then whiteouts.
fn write_layer(
    all: &[Fetched],
    deleted: &[String],
    skip: &BTreeSet<String>,
    targets: &BTreeSet<String>,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = tar::Builder::new(Vec::new());
    for f in all {
        let Some(tar) = &f.tar else {
            let mut h = empty_entry(tar::EntryType::Directory, 0o755);
            let rel = format!("{}/", f.path.trim_start_matches('/'));
            out.append_data(&mut h, &rel, std::io::empty())?;
            continue;
        };
        // The archive names entries from the fetched path's own name down.
        let base = cp::parent(&f.path).to_string();
        let mut ar = tar::Archive::new(tar.as_slice());
        for (n, entry) in ar.entries()?.enumerate() {
            if n > 0 && !f.whole {
                break;
            }
            let mut entry = match entry {
                Ok(e) => e,
                // A cut archive ends inside its second entry.
                Err(_) if n > 0 && !f.whole => break,
                Err(e) => return Err(e),
            };
            let name = entry.path()?.to_string_lossy().to_string();
            let full = cp::join(&base, &name);
            if skip.contains(&full) || targets.iter().any(|t| below(&full, t) || *t == full) {
                continue;
            }
            let rel = full.trim_start_matches('/').to_string();
            let mut header = entry.header().clone();
            let link = entry.link_name()?.map(|l| l.to_string_lossy().to_string());
            if let Some(ext) = entry.pax_extensions()? {
                let keep: Vec<(String, Vec<u8>)> = ext
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let k = e.key().ok()?.to_string();
                        (k != "path" && k != "linkpath").then(|| (k, e.value_bytes().to_vec()))
                    })
                    .collect();
                if !keep.is_empty() {
                    out.append_pax_extensions(
                        keep.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    )?;
                }
            }
            let kind = header.entry_type();
            if kind.is_symlink() {
                out.append_link(&mut header, &rel, link.unwrap_or_default())?;
            } else if kind.is_hard_link() {
                let target = cp::join(&base, &link.unwrap_or_default());
                out.append_link(&mut header, &rel, target.trim_start_matches('/'))?;
            } else if kind.is_dir() {
                let rel = format!("{rel}/");
                out.append_data(&mut header, &rel, std::io::empty())?;
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                out.append_data(&mut header, &rel, data.as_slice())?;
            }
        }
    }
    for d in deleted {
        append_whiteout(&mut out, d)?;
    }
    out.into_inner()
}

/// The header of an empty entry owned by root, with no mtime.
pub(super) fn empty_entry(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h.set_mtime(0);
    h
}

/// Appends the whiteout entry that deletes absolute `path` in the layers below.
pub fn append_whiteout<W: std::io::Write>(
    out: &mut tar::Builder<W>,
    path: &str,
) -> std::io::Result<()> {
    let name = path.rsplit('/').next().unwrap_or("");
    let wh = cp::join(cp::parent(path), &format!(".wh.{name}"));
    let mut h = empty_entry(tar::EntryType::Regular, 0o644);
    out.append_data(&mut h, wh.trim_start_matches('/'), std::io::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_sort_in_tree_order() {
        let mut paths = vec![
            "/out.stamp",
            "/out/bin/sh",
            "/out",
            "/out-x",
            "/out/bin",
            "/a",
        ];
        paths.sort_by(|a, b| tree_order(a, b));
        assert_eq!(
            paths,
            [
                "/a",
                "/out",
                "/out/bin",
                "/out/bin/sh",
                "/out-x",
                "/out.stamp"
            ]
        );
    }

    fn archive(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o750);
            h.set_uid(7);
            h.set_gid(8);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                b.append_link(&mut h, name, l).unwrap();
            } else {
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn listing(layer: &[u8]) -> Vec<(String, String, u32, u64, Option<String>)> {
        let mut ar = tar::Archive::new(layer);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().to_string(),
                    format!("{:?}", h.entry_type()),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn names_entries_by_their_path_in_the_image_and_whiteouts_deletions() {
        use tar::EntryType as T;
        let added = archive(&[
            ("app", T::Directory, b"", None),
            ("app/bin", T::Regular, b"x", None),
            ("app/same", T::Link, b"", Some("app/bin")),
            ("app/mnt", T::Regular, b"", None),
        ]);
        let modified_dir = archive(&[
            ("etc", T::Directory, b"", None),
            ("etc/x", T::Regular, b"1", None),
        ]);
        let file = archive(&[("passwd", T::Regular, b"root", None)]);
        let link = archive(&[("sh", T::Symlink, b"", Some("busybox"))]);
        let all = vec![
            Fetched {
                path: "/opt/app".into(),
                tar: Some(added),
                whole: true,
            },
            Fetched {
                path: "/etc".into(),
                tar: Some(modified_dir),
                whole: false,
            },
            Fetched {
                path: "/etc/passwd".into(),
                tar: Some(file),
                whole: true,
            },
            Fetched {
                path: "/bin/sh".into(),
                tar: Some(link),
                whole: false,
            },
            Fetched {
                path: "/cache".into(),
                tar: None,
                whole: false,
            },
        ];
        let skip = ["/opt/app/mnt".to_string()].into_iter().collect();
        let targets = ["/opt/app/bin".to_string(), "/cache".to_string()]
            .into_iter()
            .collect();
        let layer = write_layer(&all, &["/bin/vi".into()], &skip, &targets).unwrap();
        let got = listing(&layer);
        let names: Vec<_> = got
            .iter()
            .map(|g| (g.0.as_str(), g.1.as_str(), g.4.as_deref()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("opt/app/", "Directory", None),
                ("opt/app/same", "Link", Some("opt/app/bin")),
                ("etc/", "Directory", None),
                ("etc/passwd", "Regular", None),
                ("bin/sh", "Symlink", Some("busybox")),
                ("cache/", "Directory", None),
                ("bin/.wh.vi", "Regular", None),
            ]
        );
        // Metadata is the container's, not a default.
        assert_eq!((got[0].2, got[0].3), (0o750, 7));
    }

    #[test]
    fn a_cut_archive_is_a_directory_only_once_its_first_header_is_whole() {
        let full = archive(&[
            ("d", tar::EntryType::Directory, b"", None),
            ("d/f", tar::EntryType::Regular, b"abc", None),
        ]);
        assert!(first_is_dir(&full[..512]));
        assert!(!first_is_dir(&full[..100]));
        let file = archive(&[("f", tar::EntryType::Regular, b"abc", None)]);
        assert!(!first_is_dir(&file));
    }
}
