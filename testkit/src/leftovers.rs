//! What the tests leave on the daemon, and its removal: every test removes the images,
//! containers and volumes it made, and only those (other people's tests share the daemon,
//! so nothing here sweeps all of dbuild's images).
//!
//! A test notes what it made ([`note_tags`], [`note_current`], [`note_volumes`]): a
//! [`DataDir`] and the submits of [`crate::build`] and [`crate::farm`] the tags their stage
//! cache records, an executor of [`crate::executor`] the tags of the tasks it was given.
//! Removal waits until no test of this process holds a [`Claim`]: tests of one binary run
//! in parallel and often build the same keys, and a build reuses a stage image it finds on
//! the daemon, so removing one test's images while another runs could pull an image from
//! under it. What the daemon had when the first claim was taken is never removed (a tag a
//! build here moved is put back on its old image), nor a tag that meanwhile names another
//! image than the ones this process's builds left under it (another run moved it). The base images ([`crate::images`]) are
//! never noted: they are shared, and made again only when their spec changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use crate::build::find_dbuild;
use crate::docker::{docker, docker_ok, run_with, BUILD_TIMEOUT};

struct Made {
    /// Tests of this process at work.
    live: usize,
    /// The tags the daemon had when the first of them began, with their images: never
    /// removed; one a test moved to an image of its own is put back.
    before: BTreeMap<String, String>,
    /// Every image the daemon had then, tagged or not: never removed.
    had: BTreeSet<String>,
    /// Tag → the images this process saw it name (none known: whatever it names).
    tags: BTreeMap<String, BTreeSet<String>>,
    /// Tag prefixes: every tag starting with one is ours (`dbuild-paths:<key>-`).
    prefixes: BTreeSet<String>,
    /// Image ids: removed once nothing tags them any more (a tag moved to a rebuilt image).
    ids: BTreeSet<String>,
    volumes: BTreeSet<String>,
}

static MADE: Mutex<Made> = Mutex::new(Made {
    live: 0,
    before: BTreeMap::new(),
    had: BTreeSet::new(),
    tags: BTreeMap::new(),
    prefixes: BTreeSet::new(),
    ids: BTreeSet::new(),
    volumes: BTreeSet::new(),
});

fn made() -> std::sync::MutexGuard<'static, Made> {
    MADE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test at work: what the tests of this process noted is removed when the last claim
/// goes (a new claim waits for that removal to finish).
#[derive(Debug)]
pub struct Claim(());

impl Claim {
    pub fn new() -> Claim {
        let mut m = made();
        if m.live == 0 {
            let now = images();
            m.had = now.iter().map(|(_, id)| id.clone()).collect();
            m.before = now.into_iter().filter(|(t, _)| t != UNTAGGED).collect();
        }
        m.live += 1;
        Claim(())
    }
}

impl Default for Claim {
    fn default() -> Self {
        Claim::new()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut m = made();
        m.live -= 1;
        if m.live == 0 {
            remove(&mut m);
        }
    }
}

/// Tags a test made on the local daemon (a BuildKit result, the images of tasks it is
/// about to run ...): each goes whatever it then names, unless the daemon had it before.
pub fn note_tags(tags: impl IntoIterator<Item = String>) {
    let mut m = made();
    for t in tags {
        m.tags.entry(t).or_default();
    }
}

/// Of `tags`, those the daemon does not have now: a test that is about to make them notes
/// those (never one another run made).
pub fn absent_tags(tags: Vec<String>) -> Vec<String> {
    let now: BTreeSet<String> = images().into_iter().map(|(t, _)| t).collect();
    tags.into_iter().filter(|t| !now.contains(t)).collect()
}

/// Notes `tags` with the images they name now: each goes while it still names one of
/// those; a parallel build of the same key that moves it leaves this one's image
/// untagged, and that image goes.
pub fn note_current(tags: Vec<String>) {
    if tags.is_empty() {
        return;
    }
    let wanted: BTreeSet<&String> = tags.iter().collect();
    let now: Vec<(String, String)> = images()
        .into_iter()
        .filter(|(t, _)| wanted.contains(t))
        .collect();
    let mut m = made();
    for (t, id) in now {
        m.tags.entry(t).or_default().insert(id.clone());
        m.ids.insert(id);
    }
}

/// Tag prefixes of images a test made: every tag that starts with one goes.
pub fn note_tag_prefixes(prefixes: impl IntoIterator<Item = String>) {
    made().prefixes.extend(prefixes);
}

/// Image ids a test made; each goes once no tag names it.
pub fn note_images(ids: impl IntoIterator<Item = String>) {
    made().ids.extend(ids);
}

/// Volumes a test made (a cache mount's, say).
pub fn note_volumes(names: impl IntoIterator<Item = String>) {
    made().volumes.extend(names);
}

/// Every image on the daemon: tag (`<none>:<none>` for none) and full id, one per tag.
fn images() -> Vec<(String, String)> {
    // Never a panic: this runs in drops, also while a failed test unwinds.
    docker(&[
        "images",
        "-a",
        "--no-trunc",
        "--format",
        "{{.Repository}}:{{.Tag}} {{.ID}}",
    ])
    .stdout_text()
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(t, id)| (t.to_string(), id.to_string()))
    .collect()
}

const UNTAGGED: &str = "<none>:<none>";

fn rmi(references: &[String]) {
    for chunk in references.chunks(100) {
        let mut args = vec!["rmi"];
        args.extend(chunk.iter().map(String::as_str));
        // In use by a container, or named by another tag: it stays (never forced).
        let _ = docker(&args);
    }
}

fn remove(m: &mut Made) {
    let before = std::mem::take(&mut m.before);
    let had = std::mem::take(&mut m.had);
    let tags = std::mem::take(&mut m.tags);
    let prefixes = std::mem::take(&mut m.prefixes);
    let mut ids = std::mem::take(&mut m.ids);
    let volumes = std::mem::take(&mut m.volumes);
    if std::env::var_os("DBUILD_E2E_KEEP").is_some() {
        return;
    }
    let ours = |tag: &str, id: &str| match tags.get(tag) {
        Some(seen) => seen.is_empty() || seen.contains(id),
        None => prefixes.iter().any(|p| tag.starts_with(p.as_str())),
    };
    let mut present = Vec::new();
    for (t, id) in images() {
        if !ours(&t, &id) {
            continue;
        }
        match before.get(&t) {
            None => present.push(t),
            Some(was) if *was == id => continue,
            // A build of this process moved a tag the daemon had: it names its old image
            // again (or, that one gone, goes).
            Some(was) => {
                if !docker(&["tag", was, &t]).ok() {
                    present.push(t);
                }
            }
        }
        ids.insert(id);
    }
    // Untagging prunes the untagged parents too (a committed image's bare base).
    rmi(&present);
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (t, id) in images() {
        *names.entry(id).or_default() += usize::from(t != UNTAGGED);
    }
    // Never an image the daemon had before, even one untagged since.
    let dangling: Vec<String> = ids
        .into_iter()
        .filter(|id| names.get(id) == Some(&0) && !had.contains(id))
        .collect();
    rmi(&dangling);
    if !volumes.is_empty() {
        let mut args = vec!["volume", "rm"];
        args.extend(volumes.iter().map(String::as_str));
        let _ = docker(&args);
    }
}

/// The records of the stage cache in `data` (an embedded build's, or a stopped
/// coordinator's), as `dbuild cache ls --json` prints them.
pub fn cache_records(data: &Path) -> Vec<Value> {
    let Some(bin) = find_dbuild().filter(|_| data.join("index").exists()) else {
        return Vec::new();
    };
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["cache", "ls", "--json"])
        .env("DBUILD_DATA_DIR", data)
        .env_remove("DBUILD_COORDINATOR");
    let r = run_with(cmd, None, BUILD_TIMEOUT);
    serde_json::from_slice::<Value>(&r.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Notes the images the stage cache in `data` names: each record's tags (an embedded
/// build records its stage's and instructions' tags), its stage tag, the images of its
/// copied paths a farm worker imported, and its image.
pub fn note_cache(data: &Path) {
    let mut tags = Vec::new();
    for r in cache_records(data) {
        let named = r["tags"].as_array().into_iter().flatten();
        tags.extend(named.filter_map(Value::as_str).map(str::to_string));
        if let Some(key) = r["key"].as_str() {
            tags.push(format!("dbuild-stage:{key}"));
            note_tag_prefixes([format!("dbuild-paths:{key}-")]);
        }
    }
    note_current(tags);
}

/// A data directory for embedded `dbuild` commands (`DBUILD_DATA_DIR`): when dropped, the
/// images its stage cache names are noted for removal, then the directory goes.
#[derive(Debug)]
pub struct DataDir {
    dir: tempfile::TempDir,
    _claim: Claim,
}

/// A fresh [`DataDir`].
pub fn data_dir() -> DataDir {
    DataDir {
        dir: tempfile::tempdir().expect("a temporary data dir"),
        _claim: Claim::new(),
    }
}

impl DataDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        note_cache(self.dir.path());
    }
}

/// An embedded data dir at a path the test chose (under its own temporary directory):
/// noted like a [`DataDir`] when dropped, which must come before that directory goes.
#[derive(Debug)]
pub struct DataDirAt {
    path: PathBuf,
    _claim: Claim,
}

impl DataDirAt {
    pub fn new(path: impl Into<PathBuf>) -> DataDirAt {
        DataDirAt {
            path: path.into(),
            _claim: Claim::new(),
        }
    }
}

impl Drop for DataDirAt {
    fn drop(&mut self) {
        note_cache(&self.path);
    }
}

/// Ids of the containers that exist now.
pub fn containers() -> BTreeSet<String> {
    lines(&["ps", "-aq", "--no-trunc"])
}

/// Names of the volumes that exist now.
pub fn volumes() -> BTreeSet<String> {
    lines(&["volume", "ls", "-q"])
}

fn lines(args: &[&str]) -> BTreeSet<String> {
    docker_ok(args)
        .stdout_text()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The volumes the executor named `prefix` (`dbuild-w-<name>`) keeps for the shared and
/// locked cache mounts (`RUN --mount=type=cache,...` with an absolute target) of
/// `dockerfile`, named as `worker/src/executor/mounts.rs` names them.
pub fn cache_volumes(prefix: &str, dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in dockerfile.split_whitespace() {
        let Some(spec) = word.strip_prefix("--mount=") else {
            continue;
        };
        let opts: BTreeMap<&str, &str> =
            spec.split(',').filter_map(|o| o.split_once('=')).collect();
        if opts.get("type") != Some(&"cache") || opts.get("sharing") == Some(&"private") {
            continue;
        }
        let Some(target) = opts.get("target").filter(|t| t.starts_with('/')) else {
            continue;
        };
        let id = opts
            .get("id")
            .copied()
            .unwrap_or(target.trim_end_matches('/'));
        let mut key = format!("{prefix}\0{id}");
        if ["uid", "gid", "mode"].iter().any(|k| opts.contains_key(k)) {
            let num = |k: &str, radix: u32, default: u32| {
                opts.get(k)
                    .and_then(|v| u32::from_str_radix(v, radix).ok())
                    .unwrap_or(default)
            };
            key.push_str(&format!(
                "\0{}:{}:{:o}",
                num("uid", 10, 0),
                num("gid", 10, 0),
                num("mode", 8, 0o755)
            ));
        }
        let hash = model::digest::BlobDigest::of(key.as_bytes());
        out.push(format!("dbuild-cache-{}", &hash.to_hex()[..32]));
    }
    out
}

/// Of `names`, the volumes that do not exist yet: a test notes those it then makes, and
/// never one that was there before it (a developer's own build cache, say).
pub fn absent_volumes(names: Vec<String>) -> Vec<String> {
    if names.is_empty() {
        return names;
    }
    let now = volumes();
    names.into_iter().filter(|n| !now.contains(n)).collect()
}
