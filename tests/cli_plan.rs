//! `dbuild plan` and `dbuild parse`, run as a user runs them: the real binary, real files.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn dbuild(args: &[&str], data_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dbuild"))
        .args(args)
        .env("DBUILD_DATA_DIR", data_dir)
        .output()
        .expect("runs dbuild")
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "dbuild failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr_err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "dbuild should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/href-counter")
}

/// A copy of the example in its own temp dir, so a test can edit it.
fn example_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(example()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn plan_json(ctx: &Path, extra: &[&str]) -> Value {
    let data = tempfile::tempdir().unwrap();
    let mut args = vec!["plan", ctx.to_str().unwrap(), "--format", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&stdout_ok(&dbuild(&args, data.path()))).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plan_json_has_the_documented_shape() {
    let v = plan_json(&example(), &[]);
    assert_eq!(v["target"], 1);
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    let b = &stages[0];
    assert_eq!(b["index"], 0);
    assert_eq!(b["name"], "builder");
    assert_eq!(b["base"], "golang:1.7.3");
    assert_eq!(b["depends_on"], serde_json::json!([]));
    assert_eq!(b["built"], true);
    assert_eq!(b["context_files"], serde_json::json!(["app.go"]));
    assert_eq!(b["key"].as_str().unwrap().len(), 64);
    let r = &stages[1];
    assert_eq!(r["name"], Value::Null);
    assert_eq!(r["base"], "alpine:latest");
    assert_eq!(r["depends_on"], serde_json::json!([0]));
    assert_eq!(r["context_files"], serde_json::json!([]));
}

#[test]
fn target_builder_marks_the_runtime_stage_unbuilt() {
    let v = plan_json(&example(), &["--target", "builder"]);
    assert_eq!(v["target"], 0);
    assert_eq!(v["stages"][0]["built"], true);
    assert_eq!(v["stages"][1]["built"], false);
}

#[test]
fn from_index_and_external_image_variants() {
    let ex = example();
    let v = plan_json(
        &ex,
        &["-f", ex.join("Dockerfile.from-index").to_str().unwrap()],
    );
    assert_eq!(v["stages"][0]["name"], Value::Null);
    assert_eq!(v["stages"][1]["depends_on"], serde_json::json!([0]));
    let v = plan_json(
        &ex,
        &["-f", ex.join("Dockerfile.external").to_str().unwrap()],
    );
    // nginx:latest is an image, not a stage: no extra dependency.
    assert_eq!(v["stages"][1]["depends_on"], serde_json::json!([0]));
    assert_eq!(v["stages"].as_array().unwrap().len(), 2);
}

#[test]
fn keys_do_not_depend_on_where_the_context_lives() {
    let a = example_copy();
    let b = example_copy();
    assert_eq!(
        keys(&plan_json(a.path(), &[])),
        keys(&plan_json(b.path(), &[]))
    );
    assert_eq!(
        keys(&plan_json(a.path(), &[])),
        keys(&plan_json(&example(), &[]))
    );
}

#[test]
fn editing_a_file_changes_only_the_stages_that_use_it() {
    let dir = example_copy();
    let before = keys(&plan_json(dir.path(), &[]));
    fs::write(dir.path().join("README.md"), "edited").unwrap();
    assert_eq!(
        keys(&plan_json(dir.path(), &[])),
        before,
        "README is copied by no stage"
    );
    fs::write(dir.path().join("app.go"), "package main // edited\n").unwrap();
    let after = keys(&plan_json(dir.path(), &[]));
    assert_ne!(after[0], before[0]);
    assert_ne!(after[1], before[1], "the runtime copies from the builder");
}

#[test]
fn dockerignore_hides_files_from_stages() {
    let dir = example_copy();
    fs::write(dir.path().join(".dockerignore"), "*.go\n").unwrap();
    let v = plan_json(dir.path(), &[]);
    assert_eq!(v["stages"][0]["context_files"], serde_json::json!([]));
    assert_eq!(v["stages"][0]["missing"], serde_json::json!(["app.go"]));
    // <Dockerfile>.dockerignore wins over .dockerignore.
    fs::write(dir.path().join("Dockerfile.dockerignore"), "README.md\n").unwrap();
    let v = plan_json(dir.path(), &[]);
    assert_eq!(
        v["stages"][0]["context_files"],
        serde_json::json!(["app.go"])
    );
}

#[test]
fn only_the_dockerfile_present_lists_missing_sources() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(example().join("Dockerfile"), dir.path().join("Dockerfile")).unwrap();
    let v = plan_json(dir.path(), &[]);
    assert_eq!(v["stages"][0]["missing"], serde_json::json!(["app.go"]));
    assert_eq!(v["stages"][1]["depends_on"], serde_json::json!([0]));
}

#[test]
fn build_args_change_keys_where_used() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("Dockerfile"),
        "ARG BASE=alpine\nFROM $BASE AS a\nARG V=1\nRUN echo $V\nFROM alpine AS b\nRUN echo b\n",
    )
    .unwrap();
    let one = keys(&plan_json(dir.path(), &[]));
    let two = keys(&plan_json(dir.path(), &["--build-arg", "V=2"]));
    assert_ne!(one[0], two[0]);
    assert_eq!(one[1], two[1]);
    let v = plan_json(dir.path(), &["--build-arg", "BASE=busybox"]);
    assert_eq!(v["stages"][0]["base"], "busybox");
}

#[test]
fn text_plan_shows_tree_keys_and_files() {
    let data = tempfile::tempdir().unwrap();
    let out = stdout_ok(&dbuild(&["plan", example().to_str().unwrap()], data.path()));
    assert!(out.contains("target: #1 stage-1"), "{out}");
    assert!(out.contains("└── #0 builder"), "{out}");
    assert!(out.contains("app.go"), "{out}");
    let v = plan_json(&example(), &[]);
    assert!(
        out.contains(v["stages"][0]["key"].as_str().unwrap()),
        "{out}"
    );
}

#[test]
fn errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("Dockerfile");
    fs::write(&df, "FROM alpine\nCOPY --form=x a b\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let err = stderr_err(&dbuild(
        &["plan", dir.path().to_str().unwrap()],
        data.path(),
    ));
    assert!(
        err.contains(&format!("{}:2: unknown flag: --form", df.display())),
        "{err}"
    );

    fs::write(&df, "FROM alpine AS a\n").unwrap();
    let err = stderr_err(&dbuild(
        &["plan", dir.path().to_str().unwrap(), "--target", "b"],
        data.path(),
    ));
    assert!(
        err.contains("target stage \"b\" could not be found") && err.contains(": a"),
        "{err}"
    );

    fs::write(&df, "").unwrap();
    let err = stderr_err(&dbuild(&["parse", df.to_str().unwrap()], data.path()));
    assert!(err.contains(&format!("{}:", df.display())), "{err}");

    let err = stderr_err(&dbuild(&["plan", "/nonexistent/ctx"], data.path()));
    assert!(err.contains("/nonexistent/ctx"), "{err}");
}

#[test]
fn parse_prints_buildkit_dump() {
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("Dockerfile");
    fs::write(&df, "FROM --platform=$BUILDPLATFORM golang:1.22 AS build\nENV a=1 b=\"2 3\"\nONBUILD RUN echo hi\nCMD [\"a\", \"b\"]\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = stdout_ok(&dbuild(&["parse", df.to_str().unwrap()], data.path()));
    assert_eq!(
        out,
        "(from [\"--platform=$BUILDPLATFORM\"] \"golang:1.22\" \"AS\" \"build\")\n(env \"a\" \"1\" \"=\" \"b\" \"\\\"2 3\\\"\" \"=\")\n(onbuild (run \"echo hi\"))\n(cmd \"a\" \"b\")\n"
    );
}
