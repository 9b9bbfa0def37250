//! The stat cache: remembers each file's digest together with the `stat` data it had when it
//! was hashed, so an unchanged context is not read again.
//!
//! Decisions:
//! * **Validity check.** A cached digest is reused only if size, mtime (ns), ctime (ns) and
//!   inode all equal the current `lstat`. ctime is included (as git does by default) because
//!   it cannot be set from user space: it catches edits whose mtime was put back (`touch -d`,
//!   `rsync -t`, archive extraction over an existing file); the price is a re-hash after a
//!   `chmod`/`chown`/rename, which is cheap. The device number is *not* compared (git doesn't
//!   either): it is unstable across reboots/remounts on btrfs, NFS and overlay filesystems.
//! * **Racy entries.** A file modified again within the filesystem's timestamp granularity
//!   after we stat it keeps the same stat data with different content. Each cache file records
//!   when the scan that wrote it *started* (before any stat); an entry whose mtime is not older
//!   than that minus [`RACY_MARGIN_NS`] is never trusted and gets re-hashed. Using the scan
//!   start rather than the cache write time is stricter (a file modified during a long hash
//!   cannot slip through). The 2 s margin covers coarse kernel clocks and 1-2 s filesystems
//!   (ext3, FAT, HFS+); recently edited files are simply hashed again on the next scan.
//! * **Keying.** One cache file per context. The file stores the canonical context path and
//!   is ignored if it belongs to another context, so any path is safe; [`stat_cache_path`]
//!   names the file after blake3 of the canonical path so several contexts can share a data
//!   dir.
//! * **Format.** Compact little-endian binary with a blake3 trailer (see [`StatCache::encode`]);
//!   written to a temporary file in the same directory and renamed over the old one. A
//!   missing, corrupt, truncated, foreign or old-version file is silently treated as empty.
use super::error::ContextError;
use crate::digest::BlobDigest;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Entries whose mtime is within this margin before the start of the scan that cached them
/// (or later) are re-hashed.
pub const RACY_MARGIN_NS: i64 = 2_000_000_000;

const MAGIC: &[u8; 8] = b"DBSTATC1";
const ENTRY_FIXED: usize = 4 + 8 + 8 + 8 + 8 + 32;

/// The `stat` fields a cached digest is tied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl FileStat {
    /// Extracts the fields from `lstat` metadata.
    pub fn from_metadata(m: &fs::Metadata) -> Self {
        FileStat {
            size: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
            ino: m.ino(),
        }
    }
}

/// A loaded stat cache for one context: relative path -> (stat, digest).
#[derive(Debug, Clone, Default)]
pub struct StatCache {
    scan_started_ns: i64,
    entries: HashMap<String, (FileStat, BlobDigest)>,
}

impl StatCache {
    /// Loads the cache at `path` written for `canonical_context`. Never fails: any problem
    /// (missing, unreadable, corrupt, other context, other version) yields an empty cache.
    pub fn load(path: &Path, canonical_context: &Path) -> Self {
        match fs::read(path) {
            Ok(bytes) => Self::decode(&bytes, canonical_context).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "ignoring unusable stat cache");
                StatCache::default()
            }),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read stat cache");
                }
                StatCache::default()
            }
        }
    }

    /// Number of cached entries (trusted or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached digest of `rel` if its cached stat equals `stat` and the entry is not racy.
    pub fn lookup(&self, rel: &str, stat: &FileStat) -> Option<BlobDigest> {
        let (cached, digest) = self.entries.get(rel)?;
        let trusted_before = self.scan_started_ns.saturating_sub(RACY_MARGIN_NS);
        (cached == stat && stat.mtime_ns < trusted_before).then_some(*digest)
    }

    /// Serializes a cache: magic `DBSTATC1`, scan start (i64 ns), context path (u32 length +
    /// bytes), entry count (u32), then per entry path (u32 length + bytes), size u64,
    /// mtime i64, ctime i64, inode u64, digest [32]; finally blake3 of everything before.
    pub fn encode<'a>(
        canonical_context: &Path,
        scan_started_ns: i64,
        entries: impl ExactSizeIterator<Item = (&'a str, FileStat, BlobDigest)>,
    ) -> Vec<u8> {
        let ctx = canonical_context.as_os_str().as_bytes();
        let mut out = Vec::with_capacity(64 + ctx.len() + entries.len() * (ENTRY_FIXED + 48));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&scan_started_ns.to_le_bytes());
        out.extend_from_slice(&(ctx.len() as u32).to_le_bytes());
        out.extend_from_slice(ctx);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (path, st, digest) in entries {
            out.extend_from_slice(&(path.len() as u32).to_le_bytes());
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(&st.size.to_le_bytes());
            out.extend_from_slice(&st.mtime_ns.to_le_bytes());
            out.extend_from_slice(&st.ctime_ns.to_le_bytes());
            out.extend_from_slice(&st.ino.to_le_bytes());
            out.extend_from_slice(&digest.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn decode(bytes: &[u8], canonical_context: &Path) -> Option<Self> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader(body);
        if r.take(8)? != MAGIC {
            return None;
        }
        let scan_started_ns = r.i64()?;
        let ctx_len = r.u32()? as usize;
        if r.take(ctx_len)? != canonical_context.as_os_str().as_bytes() {
            return None;
        }
        let count = r.u32()? as usize;
        let mut entries = HashMap::with_capacity(count.min(body.len() / ENTRY_FIXED));
        for _ in 0..count {
            let len = r.u32()? as usize;
            let path = std::str::from_utf8(r.take(len)?).ok()?.to_string();
            let st = FileStat {
                size: r.u64()?,
                mtime_ns: r.i64()?,
                ctime_ns: r.i64()?,
                ino: r.u64()?,
            };
            let digest = BlobDigest(r.take(32)?.try_into().ok()?);
            entries.insert(path, (st, digest));
        }
        r.0.is_empty().then_some(StatCache {
            scan_started_ns,
            entries,
        })
    }

    /// Atomically replaces the cache file at `path` (creating its directory) with `entries`,
    /// recording `scan_started_ns` (wall-clock ns at the start of the scan that produced them).
    pub fn save<'a>(
        path: &Path,
        canonical_context: &Path,
        scan_started_ns: i64,
        entries: impl ExactSizeIterator<Item = (&'a str, FileStat, BlobDigest)>,
    ) -> io::Result<()> {
        let bytes = Self::encode(canonical_context, scan_started_ns, entries);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir)?;
        }
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "stat cache path has no file name",
            )
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}-{}", std::process::id(), now_ns()));
        let tmp = path.with_file_name(tmp_name);
        let result = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| fs::rename(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Where a data dir keeps the stat cache of `context_dir`:
/// `<data_dir>/context-stat-cache/<first 32 hex digits of blake3(canonical path)>.bin`.
pub fn stat_cache_path(data_dir: &Path, context_dir: &Path) -> Result<PathBuf, ContextError> {
    let canonical = fs::canonicalize(context_dir).map_err(|e| ContextError::io(context_dir, e))?;
    let hex = blake3::hash(canonical.as_os_str().as_bytes()).to_hex();
    Ok(data_dir
        .join("context-stat-cache")
        .join(format!("{}.bin", &hex[..32])))
}

/// Wall-clock time in ns since the Unix epoch (the clock file timestamps use).
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}
