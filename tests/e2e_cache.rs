//! The stage cache for real: a coordinator process with its sled index and blob store, two
//! worker processes, builds submitted with `dbuild submit --coordinator`; and concurrent
//! embedded submits sharing one data dir.
//!
//! One test function per setting, cases in order: they build on each other's cache.
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use testkit::farm::*;
use testkit::image_exists;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

const DOCKERFILE: &str = "\
FROM alpine:latest AS a
COPY a.txt /a.txt
RUN cat /a.txt > /a.out
FROM alpine:latest AS b
COPY b.txt /b.txt
RUN cat /b.txt > /b.out
FROM alpine:latest
COPY --from=a /a.out /a.out
COPY --from=b /b.out /b.out
";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Stage indexes with an event of this kind.
fn stages(s: &Submitted, event: &str) -> Vec<u64> {
    let mut v: Vec<u64> = s
        .events
        .iter()
        .filter(|e| e["event"] == event)
        .filter_map(|e| e["stage"].as_u64())
        .collect();
    v.sort();
    v
}

/// The key an event of this kind reported for `stage`.
fn stage_key(s: &Submitted, event: &str, stage: u64) -> String {
    s.events
        .iter()
        .find(|e| e["event"] == event && e["stage"] == stage)
        .and_then(|e| e["key"].as_str())
        .unwrap()
        .to_string()
}

fn image_id(s: &Submitted) -> String {
    s.events
        .iter()
        .find(|e| e["event"] == "build_finished")
        .and_then(|e| e["image_id"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn cache_json(url: &str, what: &[&str]) -> Value {
    let out = Command::new(DBUILD)
        .arg("cache")
        .args(what)
        .args(["--json", "--coordinator", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbuild cache {what:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An embedded `dbuild submit` of `ctx` on the data dir `data` (output none, JSON events).
fn local_submit(ctx: &Path, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Submitted {
    let mut args = vec!["--output", "type=none"];
    args.extend_from_slice(extra);
    embedded_submit(ctx, data, &args, env)
}

/// `dbuild cache <what> --json` on the embedded data dir `data`, which must succeed.
fn local_cache(data: &Path, what: &[&str]) -> Value {
    let out = Command::new(DBUILD)
        .arg("cache")
        .args(what)
        .arg("--json")
        .env("DBUILD_DATA_DIR", data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbuild cache {what:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn run(tag: &str, path: &str) -> String {
    let out = Command::new("docker")
        .args(["run", "--rm", "--network=none", tag, "cat", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn farm_cache_reuses_across_builds_restarts_and_concurrent_submits() {
    testkit::base_images();
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), "Dockerfile", DOCKERFILE);
    write(ctx.path(), "a.txt", "a1\n");
    write(ctx.path(), "b.txt", "b1\n");
    let data = testkit::data_dir();
    let coord_dir = data.path().join("coordinator");
    let client = data.path().join("client");
    let tag = testkit::unique_tag("cache");

    let (coord, url) = start_coordinator(&coord_dir);
    let w1 = start_worker(&url, "c1", 2, &data.path().join("w1"), None);
    let w2 = start_worker(&url, "c2", 2, &data.path().join("w2"), None);
    wait_for_workers(&url, 2);

    // A first build builds every stage.
    let first = submit(&url, ctx.path(), &["-t", &tag], &client);
    assert!(first.ok, "{}", first.stderr);
    assert_eq!(stages(&first, "stage_finished"), vec![0, 1, 2]);

    // Unchanged: nothing is built, the image is the same.
    let again = submit(&url, ctx.path(), &["-t", &tag], &client);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(stages(&again, "stage_cached"), vec![0, 1, 2]);
    assert_eq!(again.count("stage_started"), 0, "{:?}", again.events);
    assert_eq!(image_id(&again), image_id(&first));

    // One file edited: exactly the stage using it and its dependent are built.
    write(ctx.path(), "b.txt", "b2\n");
    let edited = submit(&url, ctx.path(), &["-t", &tag], &client);
    assert!(edited.ok, "{}", edited.stderr);
    assert_eq!(stages(&edited, "stage_cached"), vec![0]);
    assert_eq!(stages(&edited, "stage_finished"), vec![1, 2]);
    assert_eq!(run(&tag, "/b.out"), "b2\n");

    // Eight concurrent identical submits of a new variant build each stage once.
    write(ctx.path(), "a.txt", "a3\n");
    let subs: Vec<Submitted> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (url, ctx, client) = (&url, ctx.path(), client.join(format!("c{i}")));
                s.spawn(move || submit(url, ctx, &["--output", "type=none"], &client))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &subs {
        assert!(s.ok, "{}", s.stderr);
    }
    let built: Vec<u64> = subs
        .iter()
        .flat_map(|s| stages(s, "stage_finished"))
        .collect::<Vec<_>>();
    let mut sorted = built.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![0, 2],
        "each changed stage built once: {built:?}"
    );
    let ids: std::collections::BTreeSet<String> = subs.iter().map(image_id).collect();
    assert_eq!(ids.len(), 1, "all eight got the same image: {ids:?}");

    // A rebuilt stage that makes the same file again leaves its consumer cached: the final
    // stage is keyed on the content it copies (as BuildKit's cache is). a.txt's mode bits
    // are in stage a's key; /a.out, made by `cat`, does not carry them.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        ctx.path().join("a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let same = submit(&url, ctx.path(), &["--output", "type=none"], &client);
    assert!(same.ok, "{}", same.stderr);
    assert_eq!(
        stages(&same, "stage_finished"),
        vec![0],
        "{:?}",
        same.events
    );
    assert_eq!(stages(&same, "stage_cached"), vec![1, 2]);
    assert_eq!(image_id(&same), image_id(&subs[0]));

    // A coordinator restart keeps every entry.
    let before = cache_json(&url, &["ls"]);
    drop((w1, w2, coord));
    let (_coord, url) = start_coordinator(&coord_dir);
    let _w1 = start_worker(&url, "c1", 2, &data.path().join("w1"), None);
    wait_for_workers(&url, 1);
    let after = cache_json(&url, &["ls"]);
    let keys = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(keys(&before), keys(&after));
    // (Output none: the concurrent builds exported no image of the final stage.)
    let restarted = submit(&url, ctx.path(), &["--output", "type=none"], &client);
    assert!(restarted.ok, "{}", restarted.stderr);
    assert_eq!(stages(&restarted, "stage_cached"), vec![0, 1, 2]);

    // A corrupted blob is detected, dropped, and its stage built again; never served.
    let a_key = stage_key(&restarted, "stage_cached", 0);
    let record = after
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == a_key.as_str())
        .expect("stage a is recorded")
        .clone();
    let digest = record["paths"]["/a.out"]["digest"]
        .as_str()
        .expect("stage a's /a.out artifact is recorded")
        .to_string();
    let blob = coord_dir.join("blobs").join(&digest[..2]).join(&digest);
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    let n = bad.len() / 2;
    bad[n] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    let healed = submit(&url, ctx.path(), &["-t", &tag], &client);
    assert!(healed.ok, "{}", healed.stderr);
    // Stage a again (its artifact was corrupt); the final stage too, since no build
    // exported its image yet.
    assert_eq!(
        stages(&healed, "stage_finished"),
        vec![0, 2],
        "{:?}",
        healed.events
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        good,
        "the blob was stored again, intact"
    );
    assert_eq!(run(&tag, "/a.out"), "a3\n");

    // Pruning to a size honours it, least recently used first.
    let stats = cache_json(&url, &["stats"]);
    let bytes = stats["bytes"].as_u64().unwrap();
    assert!(stats["hits"].as_u64().unwrap() > 0, "{stats}");
    let keep = bytes / 2;
    let report = cache_json(&url, &["prune", "--keep-storage", &keep.to_string()]);
    assert!(
        !report["removed"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let stats = cache_json(&url, &["stats"]);
    assert!(stats["bytes"].as_u64().unwrap() <= keep, "{stats} > {keep}");
    // What was pruned is built again when needed.
    cache_json(&url, &["prune", "--all"]);
    let rebuilt = submit(&url, ctx.path(), &["-t", &tag], &client);
    assert!(rebuilt.ok, "{}", rebuilt.stderr);
    assert!(rebuilt.count("stage_finished") > 0, "{:?}", rebuilt.events);
    let _ = Command::new("docker").args(["rmi", &tag]).output();
}

/// Embedded submits on one data dir: a second run builds nothing; eight at once build
/// each stage once (single-flight across processes), and `cache stats` counts the hits.
#[test]
fn embedded_cache_and_single_flight_across_processes() {
    testkit::base_images();
    let ctx = tempfile::tempdir().unwrap();
    // A marker no earlier run left on the daemon, so the stages really are new.
    let marker = testkit::unique_tag("sf");
    write(
        ctx.path(),
        "Dockerfile",
        &format!(
            "FROM alpine:latest AS one\nRUN sleep 1 && echo {marker} > /one\n\
             FROM alpine:latest\nCOPY --from=one /one /one\nRUN cat /one > /two\n"
        ),
    );
    let data = testkit::data_dir();
    let submit_local = |extra: &[&str]| local_submit(ctx.path(), data.path(), extra, &[]);
    let subs: Vec<Submitted> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| submit_local(&[]))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &subs {
        assert!(s.ok, "{}", s.stderr);
    }
    let mut built: Vec<u64> = subs
        .iter()
        .flat_map(|s| stages(s, "stage_finished"))
        .collect();
    built.sort();
    assert_eq!(
        built,
        vec![0, 1],
        "each stage built once across eight processes"
    );

    let again = submit_local(&[]);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(stages(&again, "stage_cached"), vec![0, 1]);
    // Every lock was deleted by its holder on release.
    let left: Vec<_> = std::fs::read_dir(data.path().join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "lock files left behind: {left:?}");

    // --no-cache-filter builds the named stage again (and records it).
    // Its /one comes out the same, so the final stage, keyed on what it copies, is cached.
    let filtered = submit_local(&["--no-cache-filter", "one"]);
    assert!(filtered.ok, "{}", filtered.stderr);
    assert_eq!(stages(&filtered, "stage_finished"), vec![0]);
    assert_eq!(stages(&filtered, "stage_cached"), vec![1]);

    let stats = local_cache(data.path(), &["stats"]);
    assert!(stats["entries"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["hits"].as_u64().unwrap() >= 2, "{stats}");

    // Pruning everything removes the stage images from the daemon too.
    local_cache(data.path(), &["prune", "--all"]);
    let again = submit_local(&[]);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(
        stages(&again, "stage_finished"),
        vec![0, 1],
        "{:?}",
        again.events
    );
}

/// The embedded cache keeps under `DBUILD_CACHE_MAX_SIZE`: past it, the least recently
/// used stages go, their records and their images on the daemon.
#[test]
fn embedded_cache_keeps_under_its_cap() {
    testkit::base_images();
    let ctx = tempfile::tempdir().unwrap();
    let marker = testkit::unique_tag("cap");
    write(
        ctx.path(),
        "Dockerfile",
        &format!(
            "FROM alpine:latest AS one\nRUN echo {marker} > /one\n\
             FROM alpine:latest\nCOPY --from=one /one /one\n"
        ),
    );
    let data = testkit::data_dir();
    let submit_local = |cap: Option<&str>| {
        let env: Vec<(&str, &str)> = cap
            .map(|c| ("DBUILD_CACHE_MAX_SIZE", c))
            .into_iter()
            .collect();
        local_submit(ctx.path(), data.path(), &[], &env)
    };
    let entries = || {
        local_cache(data.path(), &["stats"])["entries"]
            .as_u64()
            .unwrap()
    };
    let first = submit_local(None);
    assert!(first.ok, "{}", first.stderr);
    let key = stage_key(&first, "stage_finished", 0);
    assert_eq!(entries(), 2);
    // A cap nothing fits under: after the build, every stage is evicted.
    let capped = submit_local(Some("1"));
    assert!(capped.ok, "{}", capped.stderr);
    assert_eq!(entries(), 0);
    let gone = Command::new("docker")
        .args(["image", "inspect", &format!("dbuild-stage:{key}")])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the evicted stage's image is removed"
    );
    assert_eq!(
        parked(data.path()),
        0,
        "the evicted stage's parked image is removed"
    );
    let again = submit_local(None);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(stages(&again, "stage_finished"), vec![0, 1]);
}

/// A context and a data dir for embedded builds of Dockerfiles written in turn.
struct Embedded {
    ctx: tempfile::TempDir,
    data: testkit::DataDir,
}

impl Embedded {
    fn new() -> Self {
        testkit::base_images();
        Embedded {
            ctx: tempfile::tempdir().unwrap(),
            data: testkit::data_dir(),
        }
    }

    /// Writes `dockerfile` and builds it (output none, then `extra`); it must succeed.
    fn build(&self, dockerfile: &str, extra: &[&str]) -> Submitted {
        write(self.ctx.path(), "Dockerfile", dockerfile);
        let s = local_submit(self.ctx.path(), self.data.path(), extra, &[]);
        assert!(s.ok, "{}", s.stderr);
        s
    }

    fn parked(&self) -> usize {
        parked(self.data.path())
    }
}

/// How many image archives are parked in the embedded data dir `data` (blobs, in
/// directories named by their digests' first two hex digits).
fn parked(data: &Path) -> usize {
    let shards = std::fs::read_dir(data.join("parked/archives"))
        .into_iter()
        .flatten();
    shards
        .flatten()
        .filter(|s| s.file_name().len() == 2)
        .flat_map(|s| std::fs::read_dir(s.path()).into_iter().flatten())
        .count()
}

/// A stage the build reads only through `COPY --from` is parked in the data dir, not
/// loaded into the daemon: a later build that edits its consumer reads the copied path
/// from the parked archive (the image stays off the daemon); one built FROM it, or one
/// that outputs it as the target, loads it then.
#[test]
fn copy_from_only_stages_are_parked_until_needed() {
    let e = Embedded::new();
    let marker = testkit::unique_tag("park");
    let producers = format!(
        "FROM alpine:latest AS one\nRUN mkdir /d && echo {marker} > /d/one\n\
         FROM alpine:latest AS two\nRUN echo {marker} > /two\n"
    );
    // Builds the producers and `consumer` (which also copies /two), checks that `path`
    // of the result holds the producer's file, and returns the build.
    let build = |consumer: &str, path: &str| {
        let s = e.build(
            &format!("{producers}{consumer}COPY --from=two /two /two\n"),
            &[],
        );
        assert_eq!(run(&image_id(&s), path).trim(), marker);
        s
    };
    let first = build("FROM alpine:latest\nCOPY --from=one /d/one /one\n", "/one");
    let tag_of = |stage| {
        format!(
            "dbuild-stage:{}",
            stage_key(&first, "stage_finished", stage)
        )
    };
    let (one, two) = (tag_of(0), tag_of(1));
    assert!(
        !image_exists(&one) && !image_exists(&two),
        "the producers stay off the daemon"
    );
    assert_eq!(e.parked(), 2);

    // The consumer changes: the producers are hits and their files come from the archives.
    let edited = build(
        "FROM alpine:latest\nCOPY --from=one /d/one /again\n",
        "/again",
    );
    assert_eq!(stages(&edited, "stage_cached"), vec![0, 1]);
    assert!(
        !image_exists(&one) && !image_exists(&two),
        "read without loading them"
    );
    assert_eq!(e.parked(), 2);

    // Built FROM: that parked image is loaded (and no longer parked).
    let from = build("FROM one\nRUN cat /d/one > /from\n", "/from");
    assert_eq!(stages(&from, "stage_cached"), vec![0, 1]);
    assert!(image_exists(&one) && !image_exists(&two));
    assert_eq!(e.parked(), 1);

    // A parked stage as the target, found in the cache: the output loads and tags it.
    let tag = testkit::unique_tag("parked-target");
    let args = ["--target", "two", "-t", &tag];
    let target = embedded_submit(e.ctx.path(), e.data.path(), &args, &[]);
    assert!(target.ok, "{}", target.stderr);
    assert_eq!(stages(&target, "stage_cached"), vec![1]);
    assert_eq!(run(&tag, "/two").trim(), marker);
    assert_eq!(e.parked(), 0);
    let _ = Command::new("docker")
        .args(["rmi", "-f", &tag, &one, &two])
        .output();
}

/// A parked stage rebuilt with `--no-cache` and written to the daemon (a stage is built
/// FROM it now): its consumer is built on the new image, never on the parked one.
#[test]
fn a_rebuilt_stage_replaces_its_parked_image() {
    let e = Embedded::new();
    let marker = testkit::unique_tag("reparked");
    let producer = format!(
        "FROM alpine:latest AS s\nRUN echo {marker} && cat /proc/sys/kernel/random/uuid > /n\n"
    );
    let first = e.build(
        &format!("{producer}FROM alpine:latest\nCOPY --from=s /n /n\n"),
        &[],
    );
    let old = run(&image_id(&first), "/n");
    let stage_tag = format!("dbuild-stage:{}", stage_key(&first, "stage_finished", 0));
    assert_eq!(e.parked(), 1);

    let rebuilt = e.build(
        &format!("{producer}FROM s\nRUN cp /n /m\n"),
        &["--no-cache"],
    );
    let new = run(&stage_tag, "/n");
    assert_ne!(new, old, "the stage was built again");
    assert_eq!(run(&image_id(&rebuilt), "/m"), new);
    assert_eq!(e.parked(), 0, "the stale parked image is gone");
    let _ = Command::new("docker")
        .args(["rmi", "-f", &stage_tag])
        .output();
}

/// A parked image whose base left the daemon is dropped, not loaded: the stage is built
/// again. Here the base is a step image reused from an earlier build (the first `RUN`),
/// the parked image adds one more `RUN`, and the step image is then removed.
#[test]
fn a_parked_image_without_its_base_is_rebuilt() {
    let e = Embedded::new();
    let marker = testkit::unique_tag("baseless");
    let step = format!("FROM alpine:latest AS s\nRUN echo {marker} > /a\n");
    let build = |df: String| e.build(&df, &[]);
    // The RUN's image stays on the daemon (a stage is built FROM s).
    let first = build(format!("{step}FROM s\nRUN cat /a\n"));
    let run_image = format!("dbuild-stage:{}", stage_key(&first, "stage_finished", 0));
    // s with one more step, only copied from: parked on top of the RUN's image.
    let parked_df = |dest: &str| {
        format!("{step}RUN echo {marker} > /b\nFROM alpine:latest\nCOPY --from=s /b {dest}\n")
    };
    let second = build(parked_df("/b"));
    assert_eq!(e.parked(), 1);
    let tags = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{join .RepoTags \" \"}}",
            &run_image,
        ])
        .output()
        .unwrap();
    for t in String::from_utf8_lossy(&tags.stdout).split_whitespace() {
        let _ = Command::new("docker").args(["rmi", t]).output();
    }
    assert!(!image_exists(&run_image));

    let third = build(parked_df("/c"));
    assert_eq!(
        stages(&third, "stage_finished"),
        vec![0, 1],
        "s is built again"
    );
    assert_eq!(run(&image_id(&third), "/c").trim(), marker);
    let _ = (second, first);
}
