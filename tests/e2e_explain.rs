//! `dbuild explain` and the reasons `submit --progress plain` prints, on the real daemon.

use std::path::Path;

use std::process::Command;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

fn run(args: &[&str], data: &Path) -> (bool, String, String) {
    let out = Command::new(DBUILD)
        .args(args)
        .env("DBUILD_DATA_DIR", data)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn explain_names_the_changed_file_and_build_arg() {
    testkit::base_images();
    let ctx = tempfile::tempdir().unwrap();
    let data = testkit::data_dir();
    let c = ctx.path();
    let id = std::process::id();
    std::fs::write(
        c.join("Dockerfile"),
        // `stamp` is read only through COPY --from: its image is parked, not loaded.
        format!("FROM alpine:latest AS builder\nARG VERSION=1\nCOPY app.go /src/\nRUN echo {id}-$VERSION > /src/version\n\n\
                 FROM alpine:latest AS stamp\nRUN echo {id} > /stamp\n\n\
                 FROM alpine:latest\nCOPY --from=builder /src /app\nCOPY --from=stamp /stamp /stamp\n"),
    )
    .unwrap();
    std::fs::write(c.join("app.go"), "package main\n").unwrap();
    std::fs::write(c.join("notes.txt"), "not copied\n").unwrap();
    let ctx_s = c.to_str().unwrap();

    let (ok, out, err) = run(&["explain", ctx_s], data.path());
    assert!(ok, "{err}");
    assert!(
        out.contains("#0 builder: miss") && out.contains("no earlier build"),
        "{out}"
    );

    let (ok, _, err) = run(
        &[
            "submit",
            ctx_s,
            "--output",
            "type=none",
            "--progress",
            "plain",
        ],
        data.path(),
    );
    assert!(ok, "{err}");
    let (_, out, _) = run(&["explain", ctx_s], data.path());
    assert!(
        out.contains("#0 builder: hit")
            && out.contains("#1 stamp: hit")
            && out.contains("#2 stage-2: hit"),
        "{out}"
    );

    // A file no stage copies changes nothing.
    std::fs::write(c.join("notes.txt"), "edited\n").unwrap();
    let (_, out, _) = run(&["explain", ctx_s], data.path());
    assert!(out.contains("#0 builder: hit"), "{out}");

    std::fs::write(c.join("app.go"), "package main // edited\n").unwrap();
    let (_, out, _) = run(&["explain", ctx_s, "--build-arg", "VERSION=2"], data.path());
    assert!(out.contains("#0 builder: miss"), "{out}");
    assert!(out.contains("file app.go changed"), "{out}");
    assert!(out.contains("build arg VERSION 1 → 2"), "{out}");
    assert!(
        out.contains("depends on stage builder, which changed"),
        "{out}"
    );

    // submit --progress plain gives the same reasons next to the rebuilt stages.
    let (ok, _, err) = run(
        &[
            "submit",
            ctx_s,
            "--output",
            "type=none",
            "--progress",
            "plain",
            "--build-arg",
            "VERSION=2",
        ],
        data.path(),
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("#0 builder rebuilt: file app.go changed"),
        "{err}"
    );
    assert!(
        err.contains("#0 builder rebuilt: build arg VERSION 1 → 2"),
        "{err}"
    );

    // --progress json gives them as a `stage_reasons` event after the stage starts.
    let (ok, out, err) = run(
        &[
            "submit",
            ctx_s,
            "--output",
            "type=none",
            "--progress",
            "json",
            "--build-arg",
            "VERSION=3",
        ],
        data.path(),
    );
    assert!(ok, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let at = |kind: &str| {
        events
            .iter()
            .position(|e| e["event"] == kind && e["stage"] == 0)
            .unwrap_or_else(|| panic!("no {kind} for stage 0 in {out}"))
    };
    assert!(at("stage_started") < at("stage_reasons"), "{out}");
    assert_eq!(
        events[at("stage_reasons")]["reasons"],
        serde_json::json!(["build arg VERSION 2 → 3"]),
        "{out}"
    );
}
