//! Scanning a build context: walk it under `.dockerignore`, hash files in parallel, reuse
//! digests from the stat cache.
use super::error::ContextError;
use super::ignore::{read_ignore_patterns, IgnoreMatcher, MatchInfo};
use super::manifest::{ContextManifest, EntryKind, ManifestEntry};
use super::statcache::{now_ns, FileStat, StatCache};
use crate::digest::BlobDigest;
use rayon::prelude::*;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Files at least this large are hashed through a memory map with blake3's multi-threaded
/// `update_mmap_rayon`; smaller ones are read whole and hashed on one thread each.
pub const MMAP_THRESHOLD: u64 = 4 << 20;

/// How to scan a context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanOptions {
    /// The Dockerfile, used only to find `<dockerfile>.dockerignore` (see
    /// [`read_ignore_patterns`]); `None` means `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    /// The stat cache file (in the data dir, e.g. from
    /// [`stat_cache_path`](super::statcache::stat_cache_path)); `None` disables caching.
    pub stat_cache: Option<PathBuf>,
}

/// What a scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Regular files in the manifest and their total size.
    pub files: usize,
    pub bytes: u64,
    /// Files actually read and hashed this time, and their total size.
    pub hashed_files: usize,
    pub hashed_bytes: u64,
    /// Files whose digest came from the stat cache.
    pub stat_cache_hits: usize,
}

/// Scans `context_dir` and returns its manifest.
///
/// Guarantees:
/// * ignore patterns come from [`read_ignore_patterns`] and are applied exactly like BuildKit's
///   context walker: an excluded directory is skipped unless an exception could re-include
///   something below it; an excluded directory that has re-included descendants is listed
///   itself too (so the manifest is closed under parents). The Dockerfile and `.dockerignore`
///   get no special treatment: if the patterns exclude them, they are not in the manifest
///   (BuildKit sends the Dockerfile separately anyway);
/// * symlinks are recorded with their target text and never followed (not even into
///   directories); sockets, FIFOs and device nodes are skipped silently;
/// * every listed file is read exactly once (unless its digest comes from the stat cache);
///   its digest is plain blake3 of the bytes read and its size the number of bytes read;
/// * entries that vanish while the walk runs are left out; any other I/O failure (unreadable
///   file or directory) is an error naming the path, except an unreadable directory that is
///   itself excluded (as in BuildKit). Non-UTF-8 names are an error unless excluded;
/// * the stat cache (if any) is updated only when something changed; failing to write it is
///   logged, not an error. A corrupt cache is ignored.
///
/// Memory-mapped hashing of large files assumes they are not truncated while being hashed
/// (that would raise SIGBUS), the usual caveat of mmap-based hashing (b3sum, git).
pub fn scan(
    context_dir: &Path,
    opts: &ScanOptions,
) -> Result<(ContextManifest, ScanStats), ContextError> {
    let scan_started_ns = now_ns();
    let meta = fs::metadata(context_dir).map_err(|e| ContextError::io(context_dir, e))?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory(context_dir.to_path_buf()));
    }
    let patterns = read_ignore_patterns(context_dir, opts.dockerfile.as_deref())?;
    let matcher = IgnoreMatcher::new(&patterns)?;
    let cache_target = match &opts.stat_cache {
        Some(path) => {
            let canonical =
                fs::canonicalize(context_dir).map_err(|e| ContextError::io(context_dir, e))?;
            Some((path.as_path(), canonical))
        }
        None => None,
    };
    let walker = Walker { matcher: &matcher };
    let (found, cache) = rayon::join(
        || walker.walk_dir("", context_dir, &MatchInfo::default(), false),
        || match &cache_target {
            Some((path, canonical)) => StatCache::load(path, canonical),
            None => StatCache::default(),
        },
    );
    let found = found?;

    let mut stats = ScanStats::default();
    let mut digests: Vec<Option<(BlobDigest, u64)>> = vec![None; found.len()];
    let mut to_hash = Vec::new();
    for (i, f) in found.iter().enumerate() {
        if let FoundKind::File = f.kind {
            match cache.lookup(&f.rel, &f.stat) {
                Some(d) => {
                    digests[i] = Some((d, f.stat.size));
                    stats.stat_cache_hits += 1;
                }
                None => to_hash.push(i),
            }
        }
    }
    // Biggest first, so the large mmap+rayon jobs start early and small files fill the gaps.
    to_hash.sort_unstable_by_key(|&i| Reverse(found[i].stat.size));
    let hashed = to_hash
        .par_iter()
        .map(|&i| hash_file(&context_dir.join(&found[i].rel), found[i].stat.size).map(|r| (i, r)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (digest, len)) in hashed {
        stats.hashed_files += 1;
        stats.hashed_bytes += len;
        digests[i] = Some((digest, len));
    }

    let mut cache_rows = Vec::new(); // (index into entries, stat, digest)
    let mut entries = Vec::with_capacity(found.len());
    for (f, d) in found.into_iter().zip(digests) {
        let kind = match f.kind {
            FoundKind::File => {
                let (digest, size) = d.expect("every file is hashed or cached");
                stats.files += 1;
                stats.bytes += size;
                // A length different from the pre-read stat means the file changed under us:
                // don't let that stat vouch for this digest.
                if size == f.stat.size {
                    cache_rows.push((entries.len(), f.stat, digest));
                }
                EntryKind::File { size, digest }
            }
            FoundKind::Dir => EntryKind::Dir,
            FoundKind::Symlink(target) => EntryKind::Symlink { target },
        };
        entries.push(ManifestEntry {
            path: f.rel,
            mode: f.mode,
            kind,
        });
    }

    if let Some((path, canonical)) = &cache_target {
        if stats.hashed_files > 0 || cache.len() != cache_rows.len() {
            let rows = cache_rows
                .iter()
                .map(|&(i, stat, digest)| (entries[i].path.as_str(), stat, digest));
            if let Err(e) = StatCache::save(path, canonical, scan_started_ns, rows) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write stat cache");
            }
        }
    }
    tracing::debug!(context = %context_dir.display(), ?stats, "scanned build context");
    Ok((ContextManifest::from_entries(entries), stats))
}

/// Hashes one file, reading it once: (digest, bytes hashed).
fn hash_file(path: &Path, size_hint: u64) -> Result<(BlobDigest, u64), ContextError> {
    if size_hint >= MMAP_THRESHOLD {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| ContextError::io(path, e))?;
        Ok((hasher.finalize().into(), hasher.count()))
    } else {
        // One reusable buffer per thread; the size is known, so no extra stat or realloc.
        thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = const {
            std::cell::RefCell::new(Vec::new())
        });
        BUF.with_borrow_mut(|buf| {
            buf.clear();
            buf.reserve(size_hint as usize + 1);
            fs::File::open(path)
                .and_then(|mut f| f.read_to_end(buf))
                .map_err(|e| ContextError::io(path, e))?;
            let out = (BlobDigest::of(buf), buf.len() as u64);
            if buf.capacity() > 2 * MMAP_THRESHOLD as usize {
                *buf = Vec::new(); // a file grew a lot under us: don't keep that memory
            }
            Ok(out)
        })
    }
}

enum FoundKind {
    File,
    Dir,
    Symlink(String),
}

struct Found {
    rel: String,
    mode: u32,
    stat: FileStat,
    kind: FoundKind,
}

struct SubDir {
    rel: String,
    abs: PathBuf,
    info: MatchInfo,
    excluded: bool,
}

struct Walker<'a> {
    matcher: &'a IgnoreMatcher,
}

/// Errors a walk shrugs off: entries vanishing, and permission problems below excluded dirs.
fn tolerable(e: &io::Error, excluded: bool) -> bool {
    e.kind() == io::ErrorKind::NotFound || (excluded && e.kind() == io::ErrorKind::PermissionDenied)
}

impl Walker<'_> {
    /// Lists directory `abs` (context path `rel`, "" for the root) and, in parallel, its
    /// subdirectories. `excluded`: the directory itself is excluded (walked for exceptions).
    fn walk_dir(
        &self,
        rel: &str,
        abs: &Path,
        info: &MatchInfo,
        excluded: bool,
    ) -> Result<Vec<Found>, ContextError> {
        let read_dir = match fs::read_dir(abs) {
            Ok(rd) => rd,
            Err(e) if tolerable(&e, excluded) => return Ok(Vec::new()),
            Err(e) => return Err(ContextError::io(abs, e)),
        };
        let mut out = Vec::new();
        let mut subdirs = Vec::new();
        for entry in read_dir {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if tolerable(&e, excluded) => continue,
                Err(e) => return Err(ContextError::io(abs, e)),
            };
            let os_name = entry.file_name();
            let name = os_name.to_string_lossy();
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let (child_excluded, child_info) = if self.matcher.is_empty() {
                (false, MatchInfo::default())
            } else {
                self.matcher.matches_using_parent(&child_rel, info)
            };
            if child_excluded {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir && self.matcher.should_descend_excluded(&child_rel) {
                    subdirs.push(SubDir {
                        rel: child_rel,
                        abs: entry.path(),
                        info: child_info,
                        excluded: true,
                    });
                }
                continue;
            }
            if let Cow::Owned(_) = name {
                return Err(ContextError::NonUtf8Path(entry.path()));
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if tolerable(&e, false) => continue,
                Err(e) => return Err(ContextError::io(entry.path(), e)),
            };
            let ft = meta.file_type();
            let kind = if ft.is_file() {
                FoundKind::File
            } else if ft.is_dir() {
                subdirs.push(SubDir {
                    rel: child_rel.clone(),
                    abs: entry.path(),
                    info: child_info,
                    excluded: false,
                });
                FoundKind::Dir
            } else if ft.is_symlink() {
                let path = entry.path();
                let target = match fs::read_link(&path) {
                    Ok(t) => t,
                    Err(e) if tolerable(&e, false) => continue,
                    Err(e) => return Err(ContextError::io(path, e)),
                };
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| ContextError::NonUtf8Path(path))?;
                FoundKind::Symlink(target)
            } else {
                continue; // socket, FIFO, block or character device
            };
            out.push(Found {
                rel: child_rel,
                mode: meta.mode() & 0o7777,
                stat: FileStat::from_metadata(&meta),
                kind,
            });
        }
        let nested = subdirs
            .into_par_iter()
            .map(|sub| self.walk_subdir(sub))
            .collect::<Result<Vec<_>, _>>()?;
        for v in nested {
            out.extend(v);
        }
        Ok(out)
    }

    fn walk_subdir(&self, sub: SubDir) -> Result<Vec<Found>, ContextError> {
        let mut found = self.walk_dir(&sub.rel, &sub.abs, &sub.info, sub.excluded)?;
        if sub.excluded && !found.is_empty() {
            // Like BuildKit: an excluded directory is still sent when something below it is.
            let meta = match fs::symlink_metadata(&sub.abs) {
                Ok(m) => m,
                Err(e) if tolerable(&e, false) => return Ok(Vec::new()),
                Err(e) => return Err(ContextError::io(&sub.abs, e)),
            };
            found.push(Found {
                rel: sub.rel,
                mode: meta.mode() & 0o7777,
                stat: FileStat::from_metadata(&meta),
                kind: FoundKind::Dir,
            });
        }
        Ok(found)
    }
}
