//! `dbuild submit` end to end, as a user runs it: the href-counter example and its variants
//! are built and the images run; a failing RUN; no containers left behind; `--output`,
//! `--iidfile`, `--progress json`, the cache and `--no-cache`.
//!
//! Run: `cargo test --test e2e_submit` (`DBUILD_E2E_KEEP=1` keeps the images).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::leftovers::{containers, volumes};
use testkit::*;

/// Tests that start containers (dbuild builds, `docker run`) hold this for reading; the
/// test that counts leftover containers holds it for writing, so nothing else in this
/// binary starts or removes containers while it looks.
static CONTAINERS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    CONTAINERS.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    CONTAINERS.write().unwrap_or_else(|e| e.into_inner())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/href-counter")
}

/// `dbuild submit` of `spec` tagged `tag`, which must succeed.
fn build(spec: &BuildSpec, tag: &str, data: &Path) -> Image {
    dbuild_build(spec, tag, data).unwrap_or_else(|r| panic!("dbuild submit failed\n{}", r.report()))
}

#[test]
fn href_counter_builds_and_runs() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let image = build(&BuildSpec::new(example()), &unique_tag("href"), data.path());
    // CMD ["./app"] in WORKDIR /root/: the binary the builder stage made.
    assert_eq!(run_image(&image.tag, &[]).trim(), images::FAKE_GO_OUTPUT);
    let s = image.snapshot();
    assert_eq!(s.config_str("WorkingDir").as_deref(), Some("/root/"));
    assert_eq!(s.config["Cmd"], serde_json::json!(["./app"]));
    assert!(
        s.entry("/go").is_none(),
        "the runtime image must not contain the builder's files"
    );
    assert_eq!(s.entry("/root/app").map(|e| e.mode), Some(0o755));
}

#[test]
fn href_counter_from_index_builds_and_runs() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let spec = BuildSpec::new(example()).file(example().join("Dockerfile.from-index"));
    let image = build(&spec, &unique_tag("href-index"), data.path());
    assert_eq!(run_image(&image.tag, &[]).trim(), images::FAKE_GO_OUTPUT);
}

#[test]
fn href_counter_target_builder_is_the_builder_stage() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let spec = BuildSpec::new(example()).flags(&["--target", "builder"]);
    let image = build(&spec, &unique_tag("href-builder"), data.path());
    let s = image.snapshot();
    let wd = "/go/src/github.com/alexellis/href-counter";
    assert_eq!(
        s.config_str("WorkingDir").as_deref(),
        Some(format!("{wd}/").as_str())
    );
    let app_go = fs::read(example().join("app.go")).unwrap();
    assert_eq!(s.content(&format!("{wd}/app.go")), app_go.as_slice());
    assert!(
        s.config["Env"].to_string().contains("GOLANG_VERSION=1.7.3"),
        "the builder keeps golang's ENV: {}",
        s.config["Env"]
    );
    assert_eq!(
        run_image(&image.tag, &["./app"]).trim(),
        images::FAKE_GO_OUTPUT
    );
}

#[test]
fn href_counter_external_copies_from_an_image() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let spec = BuildSpec::new(example()).file(example().join("Dockerfile.external"));
    let image = build(&spec, &unique_tag("href-external"), data.path());
    assert_eq!(run_image(&image.tag, &[]).trim(), images::FAKE_GO_OUTPUT);
    assert_eq!(
        run_image(&image.tag, &["cat", "/etc/nginx/nginx.conf"]),
        images::NGINX_CONF
    );
}

const FAILING: &str = "FROM alpine:latest AS compile
RUN echo 'log line one' && echo 'log line two' && echo 'the last words before failing' && exit 3

FROM alpine:latest
COPY --from=compile /nothing /
";

#[test]
fn failing_run_names_the_stage_and_shows_its_log() {
    base_images();
    let _g = shared();
    let ctx = context(&[("Dockerfile", FAILING)]);
    let data = testkit::data_dir();
    let tag = unique_tag("failing");
    let r = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["-t", &tag, "--progress", "plain"],
        data.path(),
    );
    assert!(!r.ok(), "a failing RUN must fail the build\n{}", r.report());
    let err = r.stderr_text();
    assert!(
        err.contains("compile"),
        "stderr must name the failing stage\n{}",
        r.report()
    );
    assert!(
        err.contains("the last words before failing"),
        "stderr must show the last lines of the stage's log\n{}",
        r.report()
    );
    assert!(!image_exists(&tag), "a failed build must not tag {tag}");
}

/// Containers created since `before` that are still there after a grace period (others
/// may be starting and removing short-lived containers of their own meanwhile).
fn leftovers(before: &BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let new: Vec<String> = containers().difference(before).cloned().collect();
        if new.is_empty() || Instant::now() > deadline {
            return new
                .iter()
                .map(|id| {
                    docker(&[
                        "ps",
                        "-a",
                        "--filter",
                        &format!("id={id}"),
                        "--format",
                        "{{.ID}} image={{.Image}} name={{.Names}} status={{.Status}} cmd={{.Command}} labels={{.Labels}}",
                    ])
                    .stdout_text()
                    .trim()
                    .to_string()
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn no_containers_are_left_behind() {
    base_images();
    let _g = exclusive();
    let before = containers();
    let volumes_before = volumes();
    let data = testkit::data_dir();
    // Success, with RUN steps in both stages and the cache bypassed so they really run.
    let tag = unique_tag("leftover-ok");
    let _image = Image::new(tag.clone());
    let ok = dbuild_submit(
        &BuildSpec::new(example()).flags(&["--no-cache"]),
        &["-t", &tag, "--progress", "plain"],
        data.path(),
    );
    assert!(ok.ok(), "{}", ok.report());
    let after_success = leftovers(&before);
    // Failure in a RUN.
    let ctx = context(&[("Dockerfile", FAILING)]);
    let failed = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["--progress", "plain"],
        data.path(),
    );
    assert!(!failed.ok(), "{}", failed.report());
    let after_failure = leftovers(&before);
    // A build whose RUN runs under VOLUMEs.
    let ctx = context(&[(
        "Dockerfile",
        "FROM alpine:latest\nVOLUME /data /cache\nRUN mkdir -p /data && echo x > /data/x\n",
    )]);
    let with_volumes = dbuild_submit(
        &BuildSpec::new(ctx.path()).flags(&["--no-cache"]),
        &["--progress", "plain", "--output", "type=none"],
        data.path(),
    );
    assert!(with_volumes.ok(), "{}", with_volumes.report());
    let after_volumes = leftovers(&before);
    let new_volumes: Vec<String> = volumes().difference(&volumes_before).cloned().collect();
    assert!(
        after_success.is_empty() && after_failure.is_empty() && after_volumes.is_empty(),
        "dbuild left containers behind\nafter a successful build:\n  {}\nafter a failed build:\n  {}\nafter a build with VOLUMEs:\n  {}",
        after_success.join("\n  "),
        after_failure.join("\n  "),
        after_volumes.join("\n  ")
    );
    assert!(
        new_volumes.is_empty(),
        "dbuild left volumes behind: {new_volumes:?}"
    );
}

#[test]
fn output_tar_is_docker_loadable() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("image.tar");
    let tag = unique_tag("output-tar");
    let r = dbuild_submit(
        &BuildSpec::new(example()),
        &[
            "-t",
            &tag,
            "--progress",
            "plain",
            "--output",
            &format!("type=tar,dest={}", dest.display()),
        ],
        data.path(),
    );
    let image = Image::new(tag.clone());
    assert!(r.ok(), "{}", r.report());
    assert!(
        dest.is_file(),
        "--output type=tar wrote no {}",
        dest.display()
    );
    assert!(
        !image_exists(&tag),
        "--output type=tar must not load {tag} into the daemon"
    );
    let loaded = docker_ok(&["load", "-i", dest.to_str().unwrap()]).stdout_text();
    assert!(
        loaded.contains(&tag) || loaded.contains("sha256:"),
        "docker load: {loaded}"
    );
    let reference = if image_exists(&tag) {
        tag.clone()
    } else {
        loaded
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(run_image(&reference, &[]).trim(), images::FAKE_GO_OUTPUT);
    // The archive describes the image it loads as (its config digest is the image id).
    let loaded_image = Image::new(reference);
    let snap = Snapshot::from_saved(&tag, &fs::read(&dest).unwrap()).unwrap();
    assert_eq!(snap.id, loaded_image.id());
    drop(image);
}

#[test]
fn output_none_builds_without_loading() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let tag = unique_tag("output-none");
    let r = dbuild_submit(
        &BuildSpec::new(example()),
        &["-t", &tag, "--progress", "plain", "--output", "type=none"],
        data.path(),
    );
    let _image = Image::new(tag.clone());
    assert!(r.ok(), "{}", r.report());
    assert!(!image_exists(&tag), "--output type=none must not tag {tag}");
}

#[test]
fn iidfile_holds_the_image_id_and_every_tag_is_set() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let iid = data.path().join("iid");
    let (t1, t2) = (unique_tag("iid-a"), unique_tag("iid-b"));
    let r = dbuild_submit(
        &BuildSpec::new(example()),
        &[
            "-t",
            &t1,
            "-t",
            &t2,
            "--progress",
            "plain",
            "--iidfile",
            iid.to_str().unwrap(),
        ],
        data.path(),
    );
    let (a, b) = (Image::new(t1), Image::new(t2));
    assert!(r.ok(), "{}", r.report());
    let written = fs::read_to_string(&iid).expect("--iidfile was not written");
    assert!(
        written.starts_with("sha256:"),
        "--iidfile holds {written:?}, not an image id"
    );
    assert_eq!(written.trim(), a.id());
    assert_eq!(a.id(), b.id());
}

const EVENTS: &[&str] = &[
    "stage_started",
    "stage_finished",
    "stage_cached",
    "stage_failed",
    "stage_reasons",
    "log",
    "build_finished",
];

/// Parses `--progress json` output, checking each line's shape; returns the events.
fn events(r: &Run) -> Vec<Value> {
    let mut out = Vec::new();
    for (n, line) in r.stdout_text().lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "--progress json line {} is not JSON ({e}): {line}\n{}",
                n + 1,
                r.report()
            )
        });
        let event = v["event"].as_str().unwrap_or_else(|| {
            panic!("line {} has no \"event\": {line}", n + 1);
        });
        assert!(EVENTS.contains(&event), "unknown event {event:?}: {line}");
        if event.starts_with("stage_") {
            assert!(v["stage"].is_u64(), "{event} without a stage index: {line}");
            // An unnamed stage has `"name": null`.
            assert!(
                v["name"].is_string() || v.get("name") == Some(&Value::Null),
                "{event} without a name: {line}"
            );
            let key = v["key"].as_str().unwrap_or_default();
            assert!(
                key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()),
                "{event} without a 64-hex key: {line}"
            );
        }
        if matches!(event, "stage_started" | "stage_finished") {
            assert!(v["worker"].is_string(), "{event} without a worker: {line}");
        }
        if event == "log" {
            assert!(v["stage"].is_u64(), "log without a stage: {line}");
        }
        out.push(v);
    }
    out
}

fn stages_with(events: &[Value], event: &str) -> BTreeSet<u64> {
    events
        .iter()
        .filter(|e| e["event"] == event)
        .filter_map(|e| e["stage"].as_u64())
        .collect()
}

/// `--progress json`: one event object per line; a first build runs both stages, the
/// same build again takes both from the cache (and yields the same image), `--no-cache`
/// runs them again and yields an image equal in content.
#[test]
fn progress_json_cache_and_no_cache() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let spec = BuildSpec::new(example());
    let submit = |tag: &str, extra: &[&str]| {
        let mut args = vec!["-t", tag, "--progress", "json"];
        args.extend_from_slice(extra);
        let r = dbuild_submit(&spec, &args, data.path());
        assert!(r.ok(), "{}", r.report());
        r
    };
    let both: BTreeSet<u64> = [0, 1].into();

    // First build: the daemon may already hold the stages from other tests, so each stage
    // is either run or taken from the cache, and named.
    let first_tag = unique_tag("progress-1");
    let first = submit(&first_tag, &["--no-cache"]);
    let first_image = Image::new(first_tag);
    let ev = events(&first);
    assert_eq!(
        ev.last().map(|e| e["event"].clone()),
        Some(Value::from("build_finished")),
        "the last event must be build_finished\n{}",
        first.stdout_text()
    );
    assert_eq!(
        stages_with(&ev, "stage_started"),
        both,
        "{}",
        first.stdout_text()
    );
    assert_eq!(
        stages_with(&ev, "stage_finished"),
        both,
        "{}",
        first.stdout_text()
    );
    assert!(stages_with(&ev, "stage_failed").is_empty());
    let builder = ev
        .iter()
        .find(|e| e["event"] == "stage_finished" && e["stage"] == 0)
        .unwrap();
    assert_eq!(builder["name"], "builder");
    assert!(
        ev.iter().any(|e| e["event"] == "log"),
        "running RUN steps must log\n{}",
        first.stdout_text()
    );

    // Same build, same data dir: everything cached, the same image.
    let second_tag = unique_tag("progress-2");
    let second = submit(&second_tag, &[]);
    let second_image = Image::new(second_tag);
    let ev2 = events(&second);
    assert_eq!(
        stages_with(&ev2, "stage_cached"),
        both,
        "{}",
        second.stdout_text()
    );
    assert!(
        stages_with(&ev2, "stage_finished").is_empty(),
        "a cached stage must not run again\n{}",
        second.stdout_text()
    );
    assert_eq!(
        second_image.id(),
        first_image.id(),
        "a fully cached build must give the very same image"
    );

    // --no-cache: both stages run again; the image is equal in content.
    let third_tag = unique_tag("progress-3");
    let third = submit(&third_tag, &["--no-cache"]);
    let third_image = Image::new(third_tag);
    let ev3 = events(&third);
    assert_eq!(
        stages_with(&ev3, "stage_finished"),
        both,
        "{}",
        third.stdout_text()
    );
    assert!(
        stages_with(&ev3, "stage_cached").is_empty(),
        "{}",
        third.stdout_text()
    );
    assert_same_image(&first_image.snapshot(), &third_image.snapshot());
}

/// `--pull` asks the registry even for images the daemon has; with no registry reachable
/// (this machine, CI) that must fail, naming the image, as `docker build --pull` does here
/// ("failed to resolve source metadata ... alpine:latest"), rather than fall back to the
/// local image.
#[test]
fn pull_goes_to_the_registry() {
    base_images();
    let _g = shared();
    let ctx = context(&[("Dockerfile", "FROM alpine:latest\nRUN true\n")]);
    let data = testkit::data_dir();
    let r = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["--pull", "--progress", "plain", "--output", "type=none"],
        data.path(),
    );
    assert!(
        !r.ok(),
        "--pull succeeded without a registry: was it ignored?\n{}",
        r.report()
    );
    assert!(r.stderr_text().contains("alpine"), "{}", r.report());
}

/// `--network none` (as `docker build --network none`): RUN sees only the loopback
/// interface; the network is in no key (a default-network rebuild is cached).
#[test]
fn network_none_applies_to_every_run() {
    base_images();
    let _g = shared();
    let marker = unique_tag("net");
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM alpine:latest\nRUN echo {marker} && ls /sys/class/net > /nets\n"),
    )]);
    let data = testkit::data_dir();
    let tag = unique_tag("network-none");
    let r = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["-t", &tag, "--progress", "plain", "--network", "none"],
        data.path(),
    );
    let _image = Image::new(tag.clone());
    assert!(r.ok(), "{}", r.report());
    assert_eq!(run_image(&tag, &["cat", "/nets"]).trim(), "lo");
    let r = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["--progress", "json", "--output", "type=none"],
        data.path(),
    );
    assert!(r.ok(), "{}", r.report());
    assert_eq!(stages_with(&events(&r), "stage_cached").len(), 1);
    let bad = dbuild_submit(
        &BuildSpec::new(ctx.path()),
        &["--network", "bridge0", "--output", "type=none"],
        data.path(),
    );
    assert!(!bad.ok());
}

/// A stage's work before it first reads another stage (its first segment) runs while that
/// stage builds, as BuildKit schedules instructions rather than stages; and it is reused
/// when only the stage it copies from changed.
#[test]
fn a_final_stages_prefix_runs_while_its_sources_build() {
    base_images();
    let _g = shared();
    let data = testkit::data_dir();
    let dockerfile = |v: &str| {
        format!(
            "FROM alpine:latest AS src\nRUN sleep 2 && echo {v} > /v\n\n\
             FROM alpine:latest\nRUN sleep 2 && echo prefix > /p\nCOPY --from=src /v /v\n"
        )
    };
    let ctx = context(&[("Dockerfile", &dockerfile("one"))]);
    let submit = |extra: &[&str]| {
        let mut args = vec!["--progress", "json", "--output", "type=none"];
        args.extend_from_slice(extra);
        let r = dbuild_submit(&BuildSpec::new(ctx.path()), &args, data.path());
        assert!(r.ok(), "{}", r.report());
        events(&r)
    };
    let position = |ev: &[Value], event: &str, stage: u64| {
        ev.iter()
            .position(|e| e["event"] == event && e["stage"] == stage)
            .unwrap_or_else(|| panic!("no {event} of stage {stage} in {ev:#?}"))
    };
    let finished = |ev: &[Value], stage: u64| ev[position(ev, "stage_finished", stage)].clone();

    let cold = submit(&["--no-cache"]);
    assert!(
        position(&cold, "stage_started", 1) < position(&cold, "stage_finished", 0),
        "the final stage waited for the stage it copies from:\n{cold:#?}"
    );
    let last = finished(&cold, 1);
    assert_eq!(
        (last["executed"].as_u64(), last["reused"].as_u64()),
        (Some(1), Some(1)),
        "the final stage's task runs only its COPY --from, reusing its first segment's RUN:\n{last:#}"
    );

    // Only the source changes: the final stage's RUN before the COPY is not run again.
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile("two")).unwrap();
    let edited = submit(&[]);
    assert_eq!(
        finished(&edited, 0)["executed"].as_u64(),
        Some(1),
        "{edited:#?}"
    );
    let last = finished(&edited, 1);
    assert_eq!(
        (last["executed"].as_u64(), last["reused"].as_u64()),
        (Some(1), Some(1)),
        "only the COPY --from runs again:\n{last:#}"
    );
}
