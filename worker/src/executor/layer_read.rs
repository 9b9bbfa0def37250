//! What a `COPY --from` of a stage reads, worked out from the layers the stage wrote
//! itself, without a container and an archive read of the finished image.
//!
//! A stage's consumers are keyed on the content of the paths they copy
//! ([`super::tree::trees_digest`]), so every stage that feeds a `COPY --from` used to end
//! with a container of its image and an archive read per path: up to half a second when
//! several stages finish at once. Most such paths were written by the stage's last steps
//! (a RUN that builds a binary, a COPY of a file), and those layers are still in memory.
//!
//! The merged filesystem is settled by the layers, top first, only in the cases below;
//! anything else returns `None` and the caller reads the image as before:
//! - a layer that does not name the path, anything below it, or a whiteout of it is
//!   transparent, provided it neither deletes nor hides a directory above the path (a
//!   whiteout, an opaque marker) nor replaces one with a non-directory;
//! - the first layer that names the path must also name every directory above it as a
//!   directory (so no symlink in the base image lies on the way), and the path must be a
//!   regular file there, or a directory the layer holds whole: one a RUN added (the
//!   daemon's change list says so; [`super::diff_layer`] fetched it with everything
//!   below it, in the archive API's own order). A symlink at the path (COPY follows it),
//!   or a hard link or a whiteout at or below it, also gives up.
use std::io::Read;
use std::sync::Arc;

use super::tree::{Content, Kind, SourceTree, SrcEntry};

/// One layer of the stage's image as the executor knows it, top layer first.
pub struct LayerView {
    /// The layer's tar, if the executor still holds it (else the layer is opaque to us).
    pub tar: Option<Arc<Vec<u8>>>,
    /// Absolute paths the layer holds whole (directories a RUN added).
    pub whole: Arc<Vec<String>>,
}

/// What the layer says about one path: nothing, or enough to stop looking further down.
enum Seen {
    Transparent,
    Unknown,
    Found(SourceTree),
}

/// The tree `COPY --from` reads for absolute, clean, wildcard-free `path`, if the layers
/// settle it (see the module docs).
pub fn tree_from_layers(layers: &[LayerView], path: &str) -> Option<SourceTree> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return None;
    }
    for l in layers {
        match scan(l.tar.as_deref()?, &l.whole, rel).ok()? {
            Seen::Transparent => continue,
            Seen::Unknown => return None,
            Seen::Found(t) => return Some(t),
        }
    }
    None
}

fn is_below(name: &str, dir: &str) -> bool {
    name.len() > dir.len() && name.starts_with(dir) && name.as_bytes()[dir.len()] == b'/'
}

fn scan(tar: &[u8], whole: &[String], rel: &str) -> std::io::Result<Seen> {
    let ancestors: Vec<&str> = rel.match_indices('/').map(|(i, _)| &rel[..i]).collect();
    let mut dirs_seen = std::collections::BTreeSet::new();
    let mut root: Option<SrcEntry> = None;
    let mut below: Vec<SrcEntry> = Vec::new();
    let mut mentioned = false;
    let mut odd = false;
    let mut ar = tar::Archive::new(tar);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().to_string();
        let name = name
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let (parent, base) = match name.rsplit_once('/') {
            Some((p, b)) => (p, b),
            None => ("", name.as_str()),
        };
        if let Some(hidden) = base.strip_prefix(".wh.") {
            if hidden == ".wh..opq" {
                // An opaque directory at or above the path hides what lies below it.
                if parent == rel || is_below(parent, rel) {
                    mentioned = true;
                    odd = true;
                } else if ancestors.contains(&parent) {
                    return Ok(Seen::Unknown);
                }
                continue;
            }
            let gone = if parent.is_empty() {
                hidden.to_string()
            } else {
                format!("{parent}/{hidden}")
            };
            if gone == rel || ancestors.contains(&gone.as_str()) {
                return Ok(Seen::Unknown);
            }
            if is_below(&gone, rel) {
                mentioned = true;
                odd = true;
            }
            continue;
        }
        let kind = entry.header().entry_type();
        if ancestors.contains(&name.as_str()) {
            if !kind.is_dir() {
                return Ok(Seen::Unknown);
            }
            dirs_seen.insert(name.clone());
            continue;
        }
        let at = name == rel;
        if !at && !is_below(&name, rel) {
            continue;
        }
        mentioned = true;
        // (The tar crate puts PAX `uid`/`gid` records, which Docker writes for ids past
        // 2^21, into the header, as it does for the archive read.)
        let h = entry.header();
        let (mode, uid, gid) = (h.mode()? & 0o7777, h.uid()? as u32, h.gid()? as u32);
        let kind = match kind {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf)?;
                Kind::File(Content::Bytes(Arc::new(buf)))
            }
            // Below the path a link is kept as it is, as the archive read keeps it.
            t if t.is_symlink() && !at => Kind::Symlink(
                entry
                    .link_name()?
                    .map(|l| l.to_string_lossy().to_string())
                    .unwrap_or_default(),
            ),
            // Devices, FIFOs: what the archive read skips too.
            t if !t.is_symlink() && !t.is_hard_link() => continue,
            _ => {
                odd = true;
                continue;
            }
        };
        let e = SrcEntry {
            rel: if at {
                String::new()
            } else {
                name[rel.len() + 1..].to_string()
            },
            kind,
            mode,
            uid,
            gid,
        };
        if at {
            root = Some(e);
        } else {
            below.push(e);
        }
    }
    if !mentioned {
        return Ok(Seen::Transparent);
    }
    let Some(root) = root else {
        return Ok(Seen::Unknown);
    };
    if odd || dirs_seen.len() < ancestors.len() {
        return Ok(Seen::Unknown);
    }
    let settled = match root.kind {
        Kind::File(_) => below.is_empty(),
        Kind::Dir => {
            let abs = format!("/{rel}");
            whole.iter().any(|w| *w == abs || is_below(&abs, w))
        }
        _ => false,
    };
    if !settled {
        return Ok(Seen::Unknown);
    }
    let mut entries = vec![root];
    entries.extend(below);
    // A path written twice in one layer (the later one wins when it is applied) is not
    // what a read of the image lists.
    let distinct: std::collections::HashSet<&str> =
        entries.iter().map(|e| e.rel.as_str()).collect();
    if distinct.len() != entries.len() {
        return Ok(Seen::Unknown);
    }
    Ok(Seen::Found(SourceTree {
        name: rel.rsplit('/').next().unwrap_or("").to_string(),
        path: rel.to_string(),
        entries,
        keep_owner: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Link(&'a str, &'a str),
    }

    fn layer(entries: &[E]) -> LayerView {
        layer_whole(entries, &[])
    }

    fn layer_whole(entries: &[E], whole: &[&str]) -> LayerView {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o750);
            h.set_uid(3);
            h.set_gid(4);
            match e {
                E::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{n}/"), std::io::empty())
                        .unwrap();
                }
                E::File(n, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, n, *d).unwrap();
                }
                E::Link(n, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, n, t).unwrap();
                }
            }
        }
        LayerView {
            tar: Some(Arc::new(b.into_inner().unwrap())),
            whole: Arc::new(whole.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn file_bytes(t: &SourceTree) -> &[u8] {
        match &t.root().kind {
            Kind::File(Content::Bytes(b)) => b,
            _ => panic!("not a file"),
        }
    }

    #[test]
    fn a_file_in_the_top_layer() {
        let t = tree_from_layers(&[layer(&[E::File("out", b"x")])], "/out").unwrap();
        assert_eq!((t.name.as_str(), t.path.as_str()), ("out", "out"));
        assert_eq!(file_bytes(&t), b"x");
        assert_eq!((t.root().mode, t.root().uid, t.root().gid), (0o750, 3, 4));
    }

    #[test]
    fn a_file_needs_its_directories_in_the_same_layer() {
        let nested = [E::Dir("app"), E::Dir("app/bin"), E::File("app/bin/x", b"y")];
        let t = tree_from_layers(&[layer(&nested)], "/app/bin/x").unwrap();
        assert_eq!(t.name, "x");
        assert_eq!(t.path, "app/bin/x");
        // `app` might be a symlink in the base image: not settled.
        let partial = [E::Dir("app/bin"), E::File("app/bin/x", b"y")];
        assert!(tree_from_layers(&[layer(&partial)], "/app/bin/x").is_none());
    }

    #[test]
    fn layers_that_do_not_touch_the_path_are_transparent() {
        let layers = [
            layer(&[E::File("other", b"1"), E::Dir("app")]),
            layer(&[E::File("out", b"old")]),
        ];
        assert_eq!(
            file_bytes(&tree_from_layers(&layers, "/out").unwrap()),
            b"old"
        );
        // A layer the executor no longer holds could hide it: not settled.
        let unknown = LayerView {
            tar: None,
            whole: Arc::new(Vec::new()),
        };
        let layers = [unknown, layer(&[E::File("out", b"old")])];
        assert!(tree_from_layers(&layers, "/out").is_none());
        // Nothing names it: it comes from the base image.
        assert!(tree_from_layers(&[layer(&[E::File("other", b"1")])], "/out").is_none());
    }

    #[test]
    fn deleted_replaced_or_hidden_paths_are_not_settled() {
        let under = layer(&[E::Dir("app"), E::File("app/x", b"1")]);
        for top in [
            layer(&[E::File(".wh.app", b"")]),
            layer(&[E::Dir("app"), E::File("app/.wh.x", b"")]),
            layer(&[E::Dir("app"), E::File("app/.wh..wh..opq", b"")]),
            layer(&[E::File("app", b"now a file")]),
            layer(&[E::Link("app", "/elsewhere")]),
        ] {
            assert!(tree_from_layers(&[top, layer(&[])], "/app/x").is_none());
        }
        assert!(tree_from_layers(&[under], "/app/x").is_some());
        // A symlink at the path: COPY follows it, the archive read resolves it.
        assert!(tree_from_layers(&[layer(&[E::Link("out", "/x")])], "/out").is_none());
    }

    #[test]
    fn directories_only_when_the_layer_holds_them_whole() {
        let entries = [
            E::Dir("app"),
            E::Dir("app/dist"),
            E::File("app/dist/a", b"1"),
            E::Dir("app/dist/sub"),
            E::File("app/dist/sub/b", b"2"),
        ];
        assert!(tree_from_layers(&[layer(&entries)], "/app/dist").is_none());
        for whole in ["/app/dist", "/app"] {
            let t = tree_from_layers(&[layer_whole(&entries, &[whole])], "/app/dist").unwrap();
            let rels: Vec<&str> = t.entries.iter().map(|e| e.rel.as_str()).collect();
            assert_eq!(rels, ["", "a", "sub", "sub/b"]);
            assert!(t.is_dir());
        }
        // A file later added into the directory by a layer above: not settled.
        let above = layer(&[
            E::Dir("app"),
            E::Dir("app/dist"),
            E::File("app/dist/c", b"3"),
        ]);
        assert!(
            tree_from_layers(&[above, layer_whole(&entries, &["/app"])], "/app/dist").is_none()
        );
    }
}
