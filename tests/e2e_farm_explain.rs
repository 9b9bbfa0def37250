//! `dbuild explain --coordinator URL`: hit or miss per stage from the farm's stage cache,
//! and for a miss what changed since the farm last built the stage (its build history),
//! with a coordinator and one worker on the local daemon.

use std::path::Path;
use std::process::Command;

use testkit::farm::*;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

/// `dbuild explain CTX --coordinator URL ARGS` (or with the URL in DBUILD_COORDINATOR).
fn explain(url: &str, by_env: bool, ctx: &Path, args: &[&str], data: &Path) -> (bool, String) {
    let mut cmd = Command::new(DBUILD);
    cmd.arg("explain").arg(ctx).args(args);
    if by_env {
        cmd.env("DBUILD_COORDINATOR", url);
    } else {
        cmd.args(["--coordinator", url])
            .env_remove("DBUILD_COORDINATOR");
    }
    let out = cmd
        .env("DBUILD_DATA_DIR", data)
        .env_remove("DOCKER_HOST")
        .output()
        .expect("explain runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.success(),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

/// The lines of stage `label` (`#1 stage-1`): its status line and its reasons.
fn stage_lines<'a>(out: &'a str, label: &str) -> Vec<&'a str> {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{label}: ")));
    let first = lines.next().into_iter();
    first
        .chain(lines.take_while(|l| l.starts_with("  - ")))
        .collect()
}

#[test]
fn farm_explain_names_the_changed_file_and_build_arg() {
    testkit::base_images();
    let coord_data = tempfile::tempdir().unwrap();
    let worker_data = tempfile::tempdir().unwrap();
    let client_data = tempfile::tempdir().unwrap();
    let (_coordinator, url) = start_coordinator(coord_data.path());
    let _worker = start_worker(&url, "w1", 2, worker_data.path(), None);
    wait_for_workers(&url, 1);

    let ctx = tempfile::tempdir().unwrap();
    let c = ctx.path();
    let id = std::process::id();
    std::fs::write(
        c.join("Dockerfile"),
        format!(
            "FROM alpine:latest AS tools\nCOPY tool.txt /tool/\nRUN echo {id} > /tool/stamp\n\n\
             FROM alpine:latest\nARG VERSION=1\nCOPY app.go /src/\nCOPY --from=tools /tool /tool\n\
             RUN echo {id}-$VERSION > /src/version\n"
        ),
    )
    .unwrap();
    std::fs::write(c.join("app.go"), "package main\n").unwrap();
    std::fs::write(c.join("tool.txt"), "a tool\n").unwrap();
    let data = client_data.path();
    let none = ["--output", "type=none"];

    // Nothing built yet: every stage misses, and no history explains it.
    let (ok, out) = explain(&url, false, c, &none, data);
    assert!(ok, "{out}");
    let tools = stage_lines(&out, "#0 tools");
    assert!(tools[0].starts_with("#0 tools: miss ("), "{out}");
    assert!(
        tools.contains(&"  - no earlier build of this stage is recorded"),
        "{out}"
    );
    let last = stage_lines(&out, "#1 stage-1");
    assert!(
        last[0].starts_with("#1 stage-1: miss (")
            && last[0].ends_with("unless stage tools rebuilds the files copied from it unchanged"),
        "{out}"
    );
    assert!(
        last.contains(&"  - no earlier build of this stage is recorded"),
        "{out}"
    );

    let built = submit(&url, c, &none, data);
    assert!(built.ok, "{}", built.stderr);
    assert_eq!(built.count("stage_finished"), 2, "{:?}", built.events);

    // Everything is cached for the same output.
    let (ok, out) = explain(&url, false, c, &none, data);
    assert!(ok, "{out}");
    for label in ["#0 tools", "#1 stage-1"] {
        let lines = stage_lines(&out, label);
        assert!(
            lines.len() == 1 && lines[0].starts_with(&format!("{label}: hit (")),
            "{out}"
        );
    }

    // The default output wants the target's image, which that build did not export.
    let (ok, out) = explain(&url, false, c, &[], data);
    assert!(ok, "{out}");
    assert!(out.contains("#0 tools: hit ("), "{out}");
    let last = stage_lines(&out, "#1 stage-1");
    assert!(last[0].starts_with("#1 stage-1: miss ("), "{out}");
    assert!(
        last.iter()
            .any(|l| l.contains("lacks what this build needs from it: the image")),
        "{out}"
    );

    // An edited file and another build arg: the stage using them misses and names both
    // (the edited file was never uploaded: explain needs no blob); the other stage hits.
    std::fs::write(c.join("app.go"), "package main // edited\n").unwrap();
    let mut args = none.to_vec();
    args.extend(["--build-arg", "VERSION=2"]);
    let (ok, out) = explain(&url, true, c, &args, data);
    assert!(ok, "{out}");
    assert_eq!(stage_lines(&out, "#0 tools").len(), 1, "{out}");
    assert!(out.contains("#0 tools: hit ("), "{out}");
    let last = stage_lines(&out, "#1 stage-1");
    assert!(last[0].starts_with("#1 stage-1: miss ("), "{out}");
    assert!(last.contains(&"  - file app.go changed"), "{out}");
    assert!(last.contains(&"  - build arg VERSION 1 → 2"), "{out}");
    assert!(!out.contains("no earlier build"), "{out}");

    // A farm submit prints the same reasons next to the stage it rebuilds.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbuild"))
        .arg("submit")
        .arg(c)
        .args(["--coordinator", &url, "--progress", "plain"])
        .args(&args)
        .env("DBUILD_DATA_DIR", data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("rebuilt: file app.go changed"), "{err}");
    assert!(err.contains("build arg VERSION 1 → 2"), "{err}");
}
