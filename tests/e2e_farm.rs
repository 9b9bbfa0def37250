//! The farm for real: a coordinator process and worker processes on loopback gRPC, one of
//! the workers on a second Docker daemon of its own (so artifacts really cross daemons),
//! builds submitted with `dbuild submit --coordinator`, results run with `docker run`.
//!
//! One test function runs every case in order: the second daemon takes seconds to start
//! and the cases share it.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::docker::docker_at;
use testkit::farm::*;
use testkit::run_image;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn write_ctx(dockerfile: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("Dockerfile"), dockerfile).unwrap();
    d
}

#[test]
fn farm_builds_across_workers_and_daemons() {
    testkit::base_images();
    let second = match SecondDaemon::start() {
        Ok(d) => d,
        Err(e) => {
            testkit::ci::skip(format!("a second Docker daemon cannot run here: {e}"));
            return;
        }
    };
    let data = testkit::data_dir();
    let (_coord, url) = start_coordinator(&data.path().join("coord"));
    let _w1 = start_worker(&url, "w1", 1, &data.path().join("w1"), None);
    let _w2 = start_worker(&url, "w2", 1, &data.path().join("w2"), Some(&second.host()));
    wait_for_workers(&url, 2);
    let client = data.path().join("client");
    let tag = |s: &str| format!("dbuild-farm-test:{s}-{}", std::process::id());

    // The seed example and its variants; the final image runs.
    let ex = root().join("examples/href-counter");
    let t = tag("href");
    let r = submit(&url, &ex, &["-t", &t], &client);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(run_image(&t, &[]).trim(), "{\"external\":0,\"internal\":0}");
    // The same image as a docker-load archive, reassembled by the client from its layers.
    let archive = data.path().join("href.tar");
    let dest = format!("type=tar,dest={}", archive.display());
    let r = submit(&url, &ex, &["--output", &dest], &client);
    assert!(r.ok, "{}", r.stderr);
    let loaded = Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    for (file, extra) in [
        ("Dockerfile.from-index", vec![]),
        ("Dockerfile.external", vec![]),
        ("Dockerfile", vec!["--target", "builder"]),
    ] {
        let t = tag("variant");
        let f = ex.join(file);
        let mut args = vec!["-f", f.to_str().unwrap(), "-t", &t];
        args.extend(extra.iter().copied());
        let r = submit(&url, &ex, &args, &client);
        assert!(r.ok, "{file} {extra:?}: {}", r.stderr);
        let expect = if extra.is_empty() {
            "/root/app"
        } else {
            "/go/src/github.com/alexellis/href-counter/app"
        };
        run_image(&t, &["test", "-x", expect]);
        if file == "Dockerfile.external" {
            assert!(run_image(&t, &["cat", "/etc/nginx/nginx.conf"]).contains("events"));
        }
        let _ = docker_at("unix:///var/run/docker.sock", &["rmi", &t]);
    }

    // Base images are pinned once per build, by a daemon that has them; a worker whose
    // daemon lacks the pinned image loads it from the store. A tag that moved is a miss.
    let only = format!("dbuild-pin-only-here:{}", std::process::id());
    let local = "unix:///var/run/docker.sock";
    // An image of its own (a label makes its id unique), on the local daemon only.
    let c = docker_at(local, &["create", "alpine:latest"]);
    let c = String::from_utf8(c.stdout).unwrap();
    let made = docker_at(
        local,
        &[
            "commit",
            "--change",
            &format!("LABEL pin={only}"),
            c.trim(),
            &only,
        ],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let _ = docker_at(local, &["rm", c.trim()]);
    // The tag moves to golang's image below: the committed one goes once untagged.
    testkit::leftovers::note_images([made.stdout_text().trim().to_string()]);
    let pin = write_ctx(&format!(
        "FROM {only} AS a\nRUN echo a > /a && sleep 2\nFROM {only} AS b\nRUN echo b > /b && sleep 2\nFROM {only}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n"
    ));
    let r = submit(&url, pin.path(), &["--output", "type=none"], &client);
    assert!(r.ok, "{}", r.stderr);
    let placed: Vec<String> = (0..2).filter_map(|s| r.placement(s)).collect();
    assert!(
        placed.contains(&"w1".into()) && placed.contains(&"w2".into()),
        "placement {placed:?}"
    );
    let id =
        String::from_utf8(docker_at(local, &["image", "inspect", "-f", "{{.Id}}", &only]).stdout)
            .unwrap();
    assert!(
        docker_at(&second.host(), &["image", "inspect", id.trim()])
            .status
            .success(),
        "the second daemon loaded the pinned image {id}"
    );
    let again = submit(&url, pin.path(), &["--output", "type=none"], &client);
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(again.count("stage_cached"), 3, "{:?}", again.events);
    assert!(docker_at(local, &["tag", "golang:1.7.3", &only])
        .status
        .success());
    let moved = submit(&url, pin.path(), &["--output", "type=none"], &client);
    assert!(moved.ok, "{}", moved.stderr);
    assert_eq!(moved.count("stage_cached"), 0, "{:?}", moved.events);
    assert_eq!(moved.count("stage_finished"), 3);
    let _ = docker_at(local, &["rmi", &only]);

    // A fan-out: stages on both workers at the same time, then a final stage on one of
    // them that needs the others' files (which crossed daemons), owners and modes intact.
    let fan = write_ctx(&format!(
        "FROM alpine:latest AS a\nRUN echo a-{n} > /a && sleep 2\nFROM alpine:latest AS b\nRUN echo b-{n} > /b && sleep 2\nFROM alpine:latest AS c\nRUN mkdir -p /out/sub && echo c > /out/sub/c && chown 1000:1000 /out/sub/c && chmod 640 /out/sub/c && sleep 2\nFROM alpine:latest\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /out /out\n",
        n = std::process::id()
    ));
    let t = tag("fan");
    let r = submit(&url, fan.path(), &["-t", &t, "--no-cache"], &client);
    assert!(r.ok, "{}", r.stderr);
    let placed: Vec<String> = (0..3).filter_map(|s| r.placement(s)).collect();
    assert!(
        placed.contains(&"w1".into()) && placed.contains(&"w2".into()),
        "placement {placed:?}"
    );
    assert_eq!(
        run_image(&t, &["stat", "-c", "%u:%g %a", "/out/sub/c"]).trim(),
        "1000:1000 640"
    );
    assert_eq!(
        run_image(&t, &["cat", "/a", "/b"]),
        format!("a-{n}\nb-{n}\n", n = std::process::id())
    );

    // COPY --from a path that is a symlink copies what it points to, across daemons too.
    let links = write_ctx(&format!(
        "FROM alpine:latest AS a\nRUN mkdir /real && echo a-{n} > /real/f && ln -s /real/f /link && sleep 2\n         FROM alpine:latest AS b\nRUN mkdir /real && echo b-{n} > /real/f && ln -s real /dir && sleep 2\n         FROM alpine:latest\nCOPY --from=a /link /a\nCOPY --from=b /dir /b/\n",
        n = std::process::id()
    ));
    let t = tag("links");
    let r = submit(&url, links.path(), &["-t", &t], &client);
    assert!(r.ok, "{}", r.stderr);
    let placed: Vec<String> = (0..2).filter_map(|s| r.placement(s)).collect();
    assert!(
        placed.contains(&"w1".into()) && placed.contains(&"w2".into()),
        "placement {placed:?}"
    );
    assert_eq!(
        run_image(&t, &["cat", "/a", "/b/f"]),
        format!("a-{n}\nb-{n}\n", n = std::process::id())
    );
    let _ = docker_at("unix:///var/run/docker.sock", &["rmi", &t]);

    // A diamond (FROM a stage, COPY --from another), and a failing stage nobody needs.
    let t = tag("diamond");
    let diamond = write_ctx("FROM alpine:latest AS base\nRUN echo base > /base\nFROM base AS left\nRUN echo left > /left\nFROM base AS right\nRUN echo right > /right\nFROM alpine:latest AS unused\nRUN false\nFROM left AS final\nCOPY --from=right /right /right\n");
    let r = submit(&url, diamond.path(), &["-t", &t], &client);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        run_image(&t, &["cat", "/base", "/left", "/right"]),
        "base\nleft\nright\n"
    );
    assert!(r.placement(3).is_none(), "the unused stage is never built");
    // Stage images are stored as layers: the base layer every stage image starts with
    // is one blob, named by several records (uploaded once, fetched only where lacking).
    let ls = Command::new(DBUILD)
        .args(["cache", "ls", "--json", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let records: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let mut uses: std::collections::BTreeMap<String, usize> = Default::default();
    for r in records.as_array().unwrap() {
        for p in r["image_parts"].as_array().into_iter().flatten() {
            *uses
                .entry(p["digest"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(
        uses.values().any(|n| *n >= 2),
        "no layer blob shared between stage images: {uses:?}"
    );

    // A failing RUN names its stage and line and shows its output.
    let bad = write_ctx("FROM alpine:latest AS ok\nRUN true\nFROM alpine:latest AS broken\nRUN echo about to fail && exit 3\n");
    let r = submit(&url, bad.path(), &[], &client);
    assert!(!r.ok);
    assert!(r.stderr.contains("stage broken failed"), "{}", r.stderr);
    assert!(r.stderr.contains("about to fail"), "{}", r.stderr);
    assert_eq!(r.count("stage_failed"), 1);
    let failed = r
        .events
        .iter()
        .find(|e| e["event"] == "stage_failed")
        .unwrap();
    assert!(r.placement(failed["stage"].as_u64().unwrap()).is_some());

    for t in ["href", "fan", "diamond"] {
        let _ = docker_at("unix:///var/run/docker.sock", &["rmi", &tag(t)]);
    }
    drop(second);
}

/// A worker that dies mid-stage loses its lease; the stage is placed again on another
/// worker and the build still succeeds.
#[test]
fn a_silent_worker_loses_its_stage_to_another() {
    testkit::base_images();
    let data = testkit::data_dir();
    let (_coord, url) = start_coordinator(&data.path().join("coord"));
    let mut w1 = start_worker(&url, "doomed", 1, &data.path().join("w1"), None);
    wait_for_workers(&url, 1);
    let id = std::process::id();
    let ctx = write_ctx(&format!(
        "FROM alpine:latest\nRUN echo lease-{id} && sleep 6 && echo done > /done\n"
    ));
    let t = format!("dbuild-farm-test:lease-{id}");
    let client = data.path().join("client");
    let (url2, ctx_path, client2, t2) = (
        url.clone(),
        ctx.path().to_path_buf(),
        client.clone(),
        t.clone(),
    );
    let submit_thread =
        std::thread::spawn(move || submit(&url2, &ctx_path, &["-t", &t2, "--no-cache"], &client2));
    // Wait until the doomed worker runs the stage, then kill it without a word.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(DBUILD)
            .args(["workers", "--coordinator", &url])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("doomed") && l.contains(" 1  busy"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stage never reached the first worker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = w1.0.kill();
    let _ = w1.0.wait();
    let _w2 = start_worker(&url, "heir", 1, &data.path().join("w2"), None);
    let r = submit_thread.join().unwrap();
    assert!(r.ok, "{}", r.stderr);
    let started: Vec<&str> = r
        .events
        .iter()
        .filter(|e| e["event"] == "stage_started")
        .filter_map(|e| e["worker"].as_str())
        .collect();
    assert_eq!(started, vec!["doomed", "heir"]);
    assert_eq!(run_image(&t, &["cat", "/done"]).trim(), "done");
    // The killed worker could not clean up its container: the test does.
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", "name=dbuild-w-doomed"])
        .output()
        .unwrap();
    for c in String::from_utf8_lossy(&out.stdout).lines() {
        let _ = Command::new("docker").args(["rm", "-f", c]).output();
    }
    let out = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
        .unwrap();
    for img in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|i| i.contains("dbuild-w-doomed"))
    {
        let _ = Command::new("docker").args(["rmi", "-f", img]).output();
    }
    let _ = Command::new("docker").args(["rmi", &t]).output();
}

/// Farm processes stop cleanly on SIGTERM (what systemd, Docker and Kubernetes send), and
/// a worker outlives a coordinator restart: it registers again at the same URL and builds.
#[test]
fn sigterm_stops_cleanly_and_workers_survive_a_coordinator_restart() {
    testkit::base_images();
    let data = testkit::data_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let (mut coord, url) = start_coordinator_on(&data.path().join("coord"), &listen);
    let mut w = start_worker(&url, "survivor", 1, &data.path().join("w"), None);
    wait_for_workers(&url, 1);

    let term = |p: &mut Proc| {
        assert!(Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit 15 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(term(&mut coord).success(), "coordinator exit status");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w.0.try_wait().unwrap().is_none(),
        "the worker waits for its coordinator to come back"
    );
    let (_coord, url) = start_coordinator_on(&data.path().join("coord"), &listen);
    wait_for_workers(&url, 1);
    let ctx = write_ctx(&format!(
        "FROM alpine:latest\nRUN echo back-{} > /b\n",
        std::process::id()
    ));
    let r = submit(
        &url,
        ctx.path(),
        &["--output", "type=none"],
        &data.path().join("client"),
    );
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.placement(0).as_deref(), Some("survivor"));
    assert!(term(&mut w).success(), "worker exit status");
}

/// On a farm too, a final stage's work before its first COPY --from (its first segment)
/// runs while the stage it copies from builds, and the stage continues on the worker
/// that ran it.
#[test]
fn a_final_stages_prefix_runs_while_its_source_builds_on_a_farm() {
    testkit::base_images();
    let data = testkit::data_dir();
    let (_coord, url) = start_coordinator(&data.path().join("coord"));
    let _w1 = start_worker(&url, "seg-a", 1, &data.path().join("w1"), None);
    let _w2 = start_worker(&url, "seg-b", 1, &data.path().join("w2"), None);
    wait_for_workers(&url, 2);
    let id = std::process::id();
    let ctx = write_ctx(&format!(
        "FROM alpine:latest AS src\nRUN sleep 2 && echo src-{id} > /v\n\n\
         FROM alpine:latest\nRUN sleep 2 && echo prefix-{id} > /p\nCOPY --from=src /v /v\n"
    ));
    let t = format!("dbuild-farm-test:segments-{id}");
    // Removed however the test ends.
    let _image = testkit::docker::Image::new(t.clone());
    let r = submit(
        &url,
        ctx.path(),
        &["-t", &t, "--no-cache"],
        &data.path().join("client"),
    );
    assert!(r.ok, "{}", r.stderr);
    let position = |event: &str, stage: u64| {
        r.events
            .iter()
            .position(|e| e["event"] == event && e["stage"] == stage)
            .unwrap_or_else(|| panic!("no {event} of stage {stage}: {:#?}", r.events))
    };
    assert!(
        position("stage_started", 1) < position("stage_finished", 0),
        "the final stage waited for the stage it copies from: {:#?}",
        r.events
    );
    let last = &r.events[position("stage_finished", 1)];
    assert_eq!(
        last["executed"].as_u64(),
        Some(1),
        "the stage continued where its first segment ran: {last:#}"
    );
    assert_eq!(
        run_image(&t, &["cat", "/p", "/v"]).trim(),
        format!("prefix-{id}\nsrc-{id}")
    );
}
