//! Parked stage images: written to the worker's data directory as the `docker load`
//! archive they would have been sent as, and loaded into the daemon only when something
//! needs them there.
//!
//! Registering a layer costs the daemon about 50 ms whatever its size (it re-executes
//! itself to unpack each layer in a chroot; measured here on overlay2 and on
//! fuse-overlayfs alike), and the daemon takes loads one at a time. A stage that the
//! build reads only through `COPY --from` (its consumers read the trees its layers hold)
//! does not need its images on the daemon at all: writing them there only delayed the
//! target's own load. Its images, with their tags, are parked instead; the stage cache
//! still finds them by tag ([`Parked::peek`]), and the first call that needs one on the
//! daemon (a container of it, a tag, an export, a later `FROM`) loads the archive
//! ([`super::Daemon::settle`]).
//!
//! Layout under the directory: `archives/`, a [`BlobStore`] of `docker load` archives
//! (each holding the layers the daemon may lack; named by blake3, verified when read),
//! and `names/<sha256 of a tag or image id>.json` pointing at its archive. The archive's
//! other layers belong to the image named `base`, which must still be on the daemon for
//! the parked image to count. Every file is written to a temporary name and renamed, so a
//! reader in another process sees all or nothing.
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use model::blobs::{BlobError, BlobStore};
use model::digest::BlobDigest;
use serde::{Deserialize, Serialize};

/// How old an archive no name points at must be before a sweep removes it.
const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// The directory parked images live in, under a data directory.
pub const DIR: &str = "parked";

/// What a parked name points at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParkedName {
    /// The name itself (a tag or an image id).
    #[serde(default)]
    pub name: String,
    /// The archive's blob digest (hex).
    pub archive: String,
    /// The image id the name resolves to.
    pub id: String,
    /// The image whose layers the archive leaves out (`None`: it sends them all).
    pub base: Option<String>,
    /// The image's layers above the base, top first, where the archive holds them all
    /// (else empty).
    #[serde(default)]
    pub layers: Vec<ParkedLayer>,
}

/// One layer of a parked image in its archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParkedLayer {
    /// The layer tar's file name in the archive.
    pub file: String,
    /// Absolute paths the layer holds whole (directories a RUN added).
    pub whole: Vec<String>,
}

/// One parked archive, as [`Parked::archives`] lists it.
#[derive(Debug, Clone)]
pub struct ParkedArchive {
    pub archive: String,
    pub bytes: u64,
    pub modified: std::time::SystemTime,
    pub names: Vec<String>,
}

/// A directory of parked images (see the module docs).
#[derive(Debug, Clone)]
pub struct Parked {
    dir: PathBuf,
    /// The archives, as blobs: named by their blake3 digest, verified when read.
    archives: BlobStore,
}

fn store_err(e: BlobError) -> io::Error {
    io::Error::other(e)
}

/// An archive's blob digest, from the name a [`ParkedName`] records.
fn digest(archive: &str) -> io::Result<BlobDigest> {
    BlobDigest::from_hex(archive)
        .ok_or_else(|| io::Error::other(format!("not a parked archive's name: {archive}")))
}

impl Parked {
    pub fn open(dir: &Path) -> io::Result<Self> {
        Ok(Parked {
            dir: dir.to_path_buf(),
            archives: BlobStore::open(&dir.join("archives")).map_err(store_err)?,
        })
    }

    fn name_path(&self, name: &str) -> PathBuf {
        self.dir.join("names").join(format!(
            "{}.json",
            crate::executor::sha256::hex(name.as_bytes())
        ))
    }

    /// Parks `archive` (a `docker load` archive) under every name given (its `archive`
    /// field is filled in here).
    pub fn put(&self, archive: &[u8], names: &[(String, ParkedName)]) -> io::Result<()> {
        let file = self.archives.put(archive).map_err(store_err)?.to_hex();
        // A name parked again (a stage rebuilt under the same key, or a step two stages
        // share) leaves its old archive behind: that goes once no tag names it.
        let replaced: BTreeSet<String> = names
            .iter()
            .filter_map(|(n, _)| self.peek(n))
            .map(|e| e.archive)
            .filter(|a| *a != file)
            .collect();
        for (name, entry) in names {
            let entry = ParkedName {
                name: name.clone(),
                archive: file.clone(),
                ..entry.clone()
            };
            let json = serde_json::to_vec(&entry).expect("a parked name serializes");
            write_atomic(&self.name_path(name), &json)?;
        }
        self.drop_untagged(&replaced)
    }

    /// What `name` (a tag or an image id) points at, if it is parked. A name whose
    /// archive is gone is dropped.
    pub fn peek(&self, name: &str) -> Option<ParkedName> {
        let path = self.name_path(name);
        let bytes = std::fs::read(&path).ok()?;
        let entry: ParkedName = serde_json::from_slice(&bytes).ok()?;
        if !digest(&entry.archive).is_ok_and(|d| self.archives.contains(&d)) {
            let _ = remove_if_there(&path);
            return None;
        }
        Some(entry)
    }

    /// The bytes of `archive`, verified (a corrupt one is deleted and is an error).
    pub fn read(&self, archive: &str) -> io::Result<Vec<u8>> {
        self.archives.read(&digest(archive)?).map_err(store_err)
    }

    /// Drops `names` (tags or ids: pruned, or written to the daemon since), and each
    /// archive they pointed at that no tag names any more, with its other names. An
    /// archive another stage's tag still names stays.
    pub fn forget(&self, names: &[String]) -> io::Result<()> {
        let archives: BTreeSet<String> = names
            .iter()
            .filter_map(|n| self.peek(n))
            .map(|e| e.archive)
            .collect();
        if archives.is_empty() {
            return Ok(());
        }
        for n in names {
            remove_if_there(&self.name_path(n))?;
        }
        self.drop_untagged(&archives)
    }

    /// Drops those of `archives` that no tag names (their image-id names go with them).
    fn drop_untagged(&self, archives: &BTreeSet<String>) -> io::Result<()> {
        if archives.is_empty() {
            return Ok(());
        }
        let tagged: std::collections::HashSet<String> = self
            .names()?
            .into_iter()
            .filter(|(_, e)| !e.name.starts_with("sha256:"))
            .map(|(_, e)| e.archive)
            .collect();
        for a in archives.iter().filter(|a| !tagged.contains(*a)) {
            self.unpark(a)?;
        }
        self.sweep()
    }

    /// Drops every name pointing at `archive`, then the archive itself (once loaded).
    pub fn unpark(&self, archive: &str) -> io::Result<()> {
        for (path, entry) in self.names()? {
            if entry.archive == archive {
                remove_if_there(&path)?;
            }
        }
        self.archives.remove(&digest(archive)?).map_err(store_err)?;
        Ok(())
    }

    /// Every parked archive: its name, size, last use and the names pointing at it.
    pub fn archives(&self) -> io::Result<Vec<ParkedArchive>> {
        let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (_, e) in self.names()? {
            by.entry(e.archive).or_default().push(e.name);
        }
        let mut out = Vec::new();
        for (archive, names) in by {
            let Some(meta) = self.archives.metadata(&digest(&archive)?) else {
                continue;
            };
            out.push(ParkedArchive {
                bytes: meta.len(),
                modified: meta.modified()?,
                archive,
                names,
            });
        }
        Ok(out)
    }

    /// The layer tars `files` of parked archive `archive`, by file name (those it holds).
    /// Reading counts as a use of the archive (the image cap's order).
    pub fn layer_files(
        &self,
        archive: &str,
        files: &[&str],
    ) -> io::Result<std::collections::HashMap<String, Vec<u8>>> {
        let bytes = self.read(archive)?;
        self.archives.touch(&digest(archive)?);
        let mut out = std::collections::HashMap::new();
        let mut ar = tar::Archive::new(bytes.as_slice());
        for e in ar.entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().to_string();
            if files.contains(&name.as_str()) {
                let mut data = Vec::with_capacity(e.size() as usize);
                io::Read::read_to_end(&mut e, &mut data)?;
                out.insert(name, data);
            }
        }
        Ok(out)
    }

    fn names(&self) -> io::Result<Vec<(PathBuf, ParkedName)>> {
        let dir = self.dir.join("names");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "json") {
                if let Some(entry) = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                {
                    out.push((path, entry));
                }
            }
        }
        Ok(out)
    }

    /// Removes the archives no name points at, once older than [`GRACE`] (another
    /// process writes an archive before its names).
    fn sweep(&self) -> io::Result<()> {
        let used: std::collections::HashSet<String> =
            self.names()?.into_iter().map(|(_, e)| e.archive).collect();
        for (d, _) in self.archives.list().map_err(store_err)? {
            let old = self
                .archives
                .metadata(&d)
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| t.elapsed().unwrap_or_default() > GRACE);
            if old && !used.contains(&d.to_hex()) {
                self.archives.remove(&d).map_err(store_err)?;
            }
        }
        Ok(())
    }
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `data` to `path` through a temporary file in the same directory (flushed to
/// disk, then renamed), creating the directory if needed: a name file, which another
/// process reads whole or not at all.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("a parked file has a directory");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Parked {
        fn holds(&self, archive: &str) -> bool {
            self.archives.contains(&digest(archive).unwrap())
        }
    }

    fn n(id: &str, base: Option<&str>) -> ParkedName {
        ParkedName {
            name: String::new(),
            archive: String::new(),
            id: id.to_string(),
            base: base.map(str::to_string),
            layers: Vec::new(),
        }
    }

    #[test]
    fn put_peek_unpark_forget() {
        let d = tempfile::tempdir().unwrap();
        let p = Parked::open(d.path()).unwrap();
        let names = vec![
            (
                "dbuild-stage:aa".to_string(),
                n("sha256:1", Some("sha256:base")),
            ),
            ("sha256:1".to_string(), n("sha256:1", Some("sha256:base"))),
        ];
        p.put(b"archive one", &names).unwrap();
        p.put(
            b"archive two",
            &[("dbuild-stage:bb".into(), n("sha256:2", None))],
        )
        .unwrap();
        let e = p.peek("dbuild-stage:aa").unwrap();
        assert_eq!(e.id, "sha256:1");
        assert_eq!(e.base.as_deref(), Some("sha256:base"));
        assert_eq!(p.peek("sha256:1").unwrap().archive, e.archive);
        assert_eq!(p.read(&e.archive).unwrap(), b"archive one");
        assert!(p.peek("dbuild-stage:cc").is_none());
        let listed = p.archives().unwrap();
        assert_eq!(listed.len(), 2);
        let one = listed.iter().find(|a| a.archive == e.archive).unwrap();
        assert_eq!(one.bytes, 11);
        let mut names = one.names.clone();
        names.sort();
        assert_eq!(names, ["dbuild-stage:aa", "sha256:1"]);

        p.unpark(&e.archive).unwrap();
        assert!(p.peek("dbuild-stage:aa").is_none() && p.peek("sha256:1").is_none());
        assert!(!p.holds(&e.archive));

        // Parked again under the same tag: the old archive and its other names go.
        p.put(
            b"old",
            &[
                ("t:x".into(), n("sha256:o", None)),
                ("sha256:o".into(), n("sha256:o", None)),
            ],
        )
        .unwrap();
        let old = p.peek("t:x").unwrap();
        p.put(b"new", &[("t:x".into(), n("sha256:n", None))])
            .unwrap();
        assert_eq!(p.peek("t:x").unwrap().id, "sha256:n");
        assert!(p.peek("sha256:o").is_none());
        assert!(!p.holds(&old.archive));

        let two = p.peek("dbuild-stage:bb").unwrap();
        p.put(b"archive two", &[("sha256:2".into(), n("sha256:2", None))])
            .unwrap();
        p.forget(&["dbuild-stage:bb".to_string()]).unwrap();
        assert!(p.peek("dbuild-stage:bb").is_none());
        assert!(
            p.peek("sha256:2").is_none(),
            "the archive's other names go too"
        );
        assert!(!p.holds(&two.archive));
    }

    #[test]
    fn a_step_two_stages_share_keeps_both_archives() {
        let d = tempfile::tempdir().unwrap();
        let p = Parked::open(d.path()).unwrap();
        let names = |stage: &str, id: &str| {
            [
                format!("dbuild-stage:{stage}"),
                "dbuild-cache:k1".into(),
                id.into(),
            ]
            .map(|name| (name, n(id, None)))
        };
        p.put(b"stage a", &names("a", "sha256:a")).unwrap();
        p.put(b"stage b", &names("b", "sha256:b")).unwrap();
        let a = p
            .peek("dbuild-stage:a")
            .expect("a's archive stays: its tag names it");
        assert!(p.peek("sha256:a").is_some());
        assert_eq!(p.peek("dbuild-cache:k1").unwrap().id, "sha256:b");

        // b pruned (its tags): a stays.
        p.forget(&["dbuild-stage:b".into(), "dbuild-cache:k1".into()])
            .unwrap();
        assert!(p.peek("dbuild-stage:b").is_none() && p.peek("sha256:b").is_none());
        assert!(p.peek("dbuild-stage:a").is_some());

        // An archive gone under a name (another process's sweep): the name goes too.
        p.archives.remove(&digest(&a.archive).unwrap()).unwrap();
        assert!(p.peek("dbuild-stage:a").is_none());
        assert!(p
            .names()
            .unwrap()
            .iter()
            .all(|(_, e)| e.name != "dbuild-stage:a"));
    }
}
