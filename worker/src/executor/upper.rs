//! A RUN's layer read straight from the container's upper directory.
//!
//! On overlay2 and fuse-overlayfs a container's own changes are the files of one directory
//! on the daemon's host (`GraphDriver.Data.UpperDir`): what it added or changed, a
//! character device 0/0 for each deletion, an opaque mark on a directory that hides what
//! lay below. When this process can read that directory (a worker beside its daemon, with
//! the daemon's permissions), the RUN's layer is that directory in tar form, the way the
//! overlay2 driver itself diffs a container. That spares the daemon's change list (on
//! fuse-overlayfs a naive diff that walks and compares the whole image: 0.1–0.3 s per RUN
//! here) and one archive call per changed path.
//!
//! Anything this reader does not know (a redirect or metacopy mark, a name that is not
//! UTF-8, a socket, an unreadable entry) makes it give up with an error, and the caller
//! takes the change-list path ([`super::diff_layer`]), which works on every daemon.
//!
//! What the reader must match, entry for entry, is what the change-list path writes:
//! - an added path (no lower layer names it) is written with everything below it and is
//!   listed in [`RunLayer::whole`];
//! - a changed directory is written as its header, then what changed below it;
//! - a deletion is a `.wh.` whiteout; a directory that was replaced (opaque, over one a
//!   lower layer has) also carries the `.wh..wh..opq` marker, so nothing of the old one
//!   shows through;
//! - a file only copied up (a hard link made to a lower file, a chmod to the mode it had)
//!   is the same as below and not written, as the daemon's diff and BuildKit's leave it
//!   out;
//! - fuse-overlayfs's own marks (the `.wh..wh..opq` file and `.wh..opq` device it leaves
//!   in every directory it created, its `user.fuseoverlayfs.*` attributes) are not content.
//!
//! Owners, modes, mtimes, device numbers and the `security.capability` attribute (the
//! only one Docker's archives carry) come from the upper directory's own entries; hard
//! links between changed files stay hard links.
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::diff_layer::{append_whiteout, empty_entry, RunLayer};
use crate::daemon::Daemon;

/// Storage drivers whose container layer is an overlay upper directory.
const OVERLAY_DRIVERS: &[&str] = &["overlay2", "fuse-overlayfs", "overlay"];

/// fuse-overlayfs's marks of a directory it made opaque.
const OPAQUE_FILE: &str = ".wh..wh..opq";
const OPAQUE_DEV: &str = ".wh..opq";

/// The host directories of a container's overlay: its upper directory and the lower
/// ones, top first (the container's init layer, then the image's layers).
#[derive(Debug, Clone)]
pub struct OverlayDirs {
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
}

/// The overlay directories of `container`, when its daemon stores it as an overlay and
/// this process can read the upper directory.
pub async fn container_dirs(daemon: &Daemon, container: &str) -> Option<OverlayDirs> {
    let driver = daemon.graph_driver(container).await?;
    if !OVERLAY_DRIVERS.contains(&driver.name.as_str()) {
        return None;
    }
    let upper = PathBuf::from(driver.data.get("UpperDir")?);
    let lowers = driver
        .data
        .get("LowerDir")
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();
    // The container's layer id is random: a directory of that name here is that layer,
    // and one we cannot open (another host's daemon, no permission) is not ours to read.
    std::fs::read_dir(&upper).ok()?;
    Some(OverlayDirs { upper, lowers })
}

/// The layer the upper directory holds: `Ok(Some(None))` when the RUN changed nothing,
/// `Ok(None)` when its files pass `max_bytes` (the caller commits), an error when the
/// directory holds something this reader does not know (the caller takes the change
/// list).
pub fn layer_from_upper(
    dirs: &OverlayDirs,
    max_bytes: usize,
) -> io::Result<Option<Option<RunLayer>>> {
    let mut w = Walk {
        lowers: &dirs.lowers,
        out: tar::Builder::new(Vec::new()),
        whole: Vec::new(),
        links: HashMap::new(),
        bytes: 0,
        max_bytes,
        entries: 0,
    };
    if !w.dir(&dirs.upper, "", false)? {
        return Ok(None);
    }
    if w.entries == 0 {
        return Ok(Some(None));
    }
    let tar = w.out.into_inner()?;
    Ok(Some(Some(RunLayer {
        tar,
        whole: w.whole,
    })))
}

fn unsupported(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what)
}

struct Walk<'a> {
    lowers: &'a [PathBuf],
    out: tar::Builder<Vec<u8>>,
    whole: Vec<String>,
    /// First path written for each (device, inode) with more than one link.
    links: HashMap<(u64, u64), String>,
    bytes: usize,
    max_bytes: usize,
    entries: usize,
}

impl Walk<'_> {
    /// Writes what lies below `host` (absolute image path `path`, "" for the root), in
    /// tree order. `new`: the directory is added, so everything below it is too. `false`
    /// once the files pass the byte limit.
    fn dir(&mut self, host: &Path, path: &str, new: bool) -> io::Result<bool> {
        let mut names: Vec<OsString> = std::fs::read_dir(host)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        // Byte order within a directory, and each directory's contents right after it:
        // the order of the archive API, which the layer reader expects.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let Some(name) = name.to_str().map(str::to_string) else {
                return Err(unsupported(format!("a name in {path}/ that is not UTF-8")));
            };
            if name == OPAQUE_FILE || name == OPAQUE_DEV {
                continue;
            }
            let h = host.join(&name);
            let p = format!("{path}/{name}");
            let meta = std::fs::symlink_metadata(&h)?;
            let ft = meta.file_type();
            // A whiteout: a 0/0 device, or a `.wh.` file (fuse-overlayfs without mknod).
            let deleted = match name.strip_prefix(".wh.") {
                Some(hidden) => Some(format!("{path}/{hidden}")),
                None => (ft.is_char_device() && meta.rdev() == 0).then(|| p.clone()),
            };
            if let Some(deleted) = deleted {
                append_whiteout(&mut self.out, &deleted)?;
                self.entries += 1;
                continue;
            }
            let marks = Marks::read(&h)?;
            let lower = if new { Lower::Absent } else { self.lower(&p)? };
            if let Lower::Found(lh, lmeta) = &lower {
                // Copied up but the same as below (a hard link made to a lower file, a
                // chmod to the mode it had): not a change, as the daemon's diff and
                // BuildKit's see it.
                if !ft.is_dir() && same_entry(&h, &meta, &marks, lh, lmeta)? {
                    continue;
                }
            }
            let added = matches!(lower, Lower::Absent);
            if added && !new {
                self.whole.push(p.clone());
            }
            self.entries += 1;
            if ft.is_dir() {
                let opaque = marks.opaque || h.join(OPAQUE_FILE).symlink_metadata().is_ok();
                let mut hd = header(&meta);
                self.append_marked(&mut hd, &format!("{}/", rel(&p)), &marks, io::empty())?;
                if opaque && !added {
                    // Replaced: what a lower layer holds below it must not show.
                    let wh = format!("{}/{OPAQUE_FILE}", rel(&p));
                    let mut hd = empty_entry(tar::EntryType::Regular, 0o644);
                    self.out.append_data(&mut hd, wh, io::empty())?;
                }
                // Below a replaced directory nothing of the lower layers shows: all new.
                if !self.dir(&h, &p, added || opaque)? {
                    return Ok(false);
                }
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&h)?;
                let mut hd = header(&meta);
                self.out.append_link(&mut hd, rel(&p), &target)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    let id = (meta.dev(), meta.ino());
                    if let Some(first) = self.links.get(&id) {
                        let mut hd = header(&meta);
                        hd.set_entry_type(tar::EntryType::Link);
                        hd.set_size(0);
                        let first = rel(first).to_string();
                        self.out.append_link(&mut hd, rel(&p), first)?;
                        continue;
                    }
                    self.links.insert(id, p.clone());
                }
                self.bytes = self.bytes.saturating_add(meta.len() as usize);
                if self.bytes > self.max_bytes {
                    return Ok(false);
                }
                let mut hd = header(&meta);
                let file = std::fs::File::open(&h)?;
                self.append_marked(&mut hd, rel(&p), &marks, file)?;
            } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                let mut hd = header(&meta);
                if !ft.is_fifo() {
                    let dev = meta.rdev();
                    hd.set_device_major(libc::major(dev))?;
                    hd.set_device_minor(libc::minor(dev))?;
                }
                self.append_marked(&mut hd, rel(&p), &marks, io::empty())?;
            } else {
                return Err(unsupported(format!("{p}: a socket")));
            }
        }
        Ok(true)
    }

    fn append_marked<R: io::Read>(
        &mut self,
        hd: &mut tar::Header,
        rel: &str,
        marks: &Marks,
        data: R,
    ) -> io::Result<()> {
        if !marks.capability.is_empty() {
            self.out.append_pax_extensions([(
                "SCHILY.xattr.security.capability",
                marks.capability.as_slice(),
            )])?;
        }
        self.out.append_data(hd, rel, data)
    }

    /// What the lower layers show at absolute `path`, the way the overlay merges them:
    /// the topmost layer naming it wins, a whiteout or a non-directory on the way hides
    /// it, and an opaque directory on the way hides what lies below that layer.
    fn lower(&self, path: &str) -> io::Result<Lower> {
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for l in self.lowers {
            let mut at = l.clone();
            let mut opaque_above = false;
            for (i, c) in parts.iter().enumerate() {
                if at.join(format!(".wh.{c}")).symlink_metadata().is_ok() {
                    return Ok(Lower::Absent);
                }
                at.push(c);
                let Ok(meta) = std::fs::symlink_metadata(&at) else {
                    if opaque_above {
                        return Ok(Lower::Absent);
                    }
                    break;
                };
                let ft = meta.file_type();
                if ft.is_char_device() && meta.rdev() == 0 {
                    return Ok(Lower::Absent);
                }
                if i + 1 == parts.len() {
                    return Ok(Lower::Found(at, meta));
                }
                if ft.is_symlink() {
                    // Resolving it on the host is not resolving it in the image.
                    return Ok(Lower::Unsure);
                }
                if !ft.is_dir() {
                    return Ok(Lower::Absent);
                }
                opaque_above |=
                    Marks::read(&at)?.opaque || at.join(OPAQUE_FILE).symlink_metadata().is_ok();
            }
        }
        Ok(Lower::Absent)
    }
}

/// What the lower layers show at a path.
enum Lower {
    /// Nothing: the path is new.
    Absent,
    /// A symlink lies on the way: treated as there, so nothing is taken for new.
    Unsure,
    /// This entry (host path and its metadata).
    Found(PathBuf, std::fs::Metadata),
}

/// Whether an upper entry (not a directory) is the lower one unchanged: type, mode,
/// owner, device, size, mtime, link target and capability all equal, and the content too
/// when neither mtime has nanoseconds (a coarse clock could hide a write).
fn same_entry(
    h: &Path,
    meta: &std::fs::Metadata,
    marks: &Marks,
    lh: &Path,
    lmeta: &std::fs::Metadata,
) -> io::Result<bool> {
    if meta.mode() != lmeta.mode()
        || meta.uid() != lmeta.uid()
        || meta.gid() != lmeta.gid()
        || meta.rdev() != lmeta.rdev()
        || meta.len() != lmeta.len()
        || meta.mtime() != lmeta.mtime()
        || meta.mtime_nsec() != lmeta.mtime_nsec()
    {
        return Ok(false);
    }
    if Marks::read(lh)?.capability != marks.capability {
        return Ok(false);
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Ok(std::fs::read_link(h)? == std::fs::read_link(lh)?);
    }
    if ft.is_file() && meta.mtime_nsec() == 0 {
        return Ok(std::fs::read(h)? == std::fs::read(lh)?);
    }
    Ok(true)
}

/// The image-relative tar name of absolute `path`.
fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// A header with the entry's type, owner, mode bits and mtime.
fn header(meta: &std::fs::Metadata) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_mode(meta.mode() & 0o7777);
    h
}

/// What an upper entry's extended attributes say.
#[derive(Default)]
struct Marks {
    opaque: bool,
    capability: Vec<u8>,
}

impl Marks {
    /// Reads the attributes of `path` (not following a symlink). Overlay marks this
    /// reader does not handle (redirect, metacopy, fuse-overlayfs's own stat override)
    /// are an error.
    fn read(path: &Path) -> io::Result<Marks> {
        let mut marks = Marks::default();
        for name in list_xattrs(path)? {
            match name.as_str() {
                "trusted.overlay.opaque" | "user.overlay.opaque" => {
                    marks.opaque = get_xattr(path, &name)?.as_slice() == b"y";
                }
                "security.capability" => marks.capability = get_xattr(path, &name)?,
                // Where a copied-up file came from, and bookkeeping: not content.
                "trusted.overlay.origin"
                | "user.overlay.origin"
                | "trusted.overlay.impure"
                | "user.overlay.impure"
                | "trusted.overlay.nlink"
                | "user.overlay.nlink"
                | "user.fuseoverlayfs.origin" => {}
                n if n.starts_with("trusted.overlay.")
                    || n.starts_with("user.overlay.")
                    || n.starts_with("user.fuseoverlayfs.")
                    || n.starts_with("user.containers.") =>
                {
                    return Err(unsupported(format!(
                        "{}: overlay attribute {n}",
                        path.display()
                    )));
                }
                // Other attributes: Docker's archives do not carry them either.
                _ => {}
            }
        }
        Ok(marks)
    }
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| unsupported(format!("{}: a NUL in the path", path.display())))
}

/// The extended attribute names of `path` (not following a symlink).
fn list_xattrs(path: &Path) -> io::Result<Vec<String>> {
    let c = c_path(path)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `c` is a NUL-terminated path and `buf` is writable for its length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

/// The value of attribute `name` of `path` (not following a symlink).
fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let c = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(|_| unsupported(name.to_string()))?;
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
        let got =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 16 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}
