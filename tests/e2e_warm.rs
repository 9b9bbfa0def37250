//! `dbuild warm`, as the nightly cron job runs it: a TOML list of builds, output none, one
//! summary per entry, a non-zero exit when any entry failed; and the builds it warmed are
//! then cache hits for a developer's `dbuild submit`.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

fn dbuild(data: &Path, args: &[&str]) -> Output {
    Command::new(DBUILD)
        .args(args)
        .env("DBUILD_DATA_DIR", data)
        .env_remove("DBUILD_COORDINATOR")
        .output()
        .unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn warm_builds_each_entry_reports_failures_and_leaves_hits_for_submit() {
    testkit::base_images();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let _made = testkit::leftovers::DataDirAt::new(&data);
    let marker = testkit::unique_tag("warm");
    let app = root.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("Dockerfile"),
        format!(
            "FROM alpine:latest AS deps\nARG LEVEL\nRUN echo {marker} $LEVEL > /deps\n\
             FROM alpine:latest AS tool\nRUN echo tool > /tool\n\
             FROM alpine:latest\nCOPY --from=deps /deps /deps\n"
        ),
    )
    .unwrap();
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("build.Dockerfile"),
        "FROM alpine:latest\nRUN exit 3\n",
    )
    .unwrap();
    // Paths relative to the TOML file; one entry names a target, one a Dockerfile.
    let list = root.path().join("builds.toml");
    std::fs::write(
        &list,
        "[[build]]\ncontext = \"app\"\nbuild_args = { LEVEL = \"2\" }\n\n\
         [[build]]\ncontext = \"app\"\ntarget = \"tool\"\n\n\
         [[build]]\ncontext = \"broken\"\ndockerfile = \"broken/build.Dockerfile\"\n",
    )
    .unwrap();

    let out = dbuild(
        &data,
        &[
            "warm",
            "--file",
            list.to_str().unwrap(),
            "--progress",
            "json",
        ],
    );
    assert!(!out.status.success(), "a failed entry fails the run");
    let entries: Vec<Value> = json_lines(&out)
        .into_iter()
        .filter(|e| e["event"] == "warm_entry")
        .collect();
    assert_eq!(entries.len(), 3, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(entries[0]["ok"], true);
    assert_eq!(
        entries[0]["built"], 2,
        "deps and the final stage: {}",
        entries[0]
    );
    assert_eq!(entries[1]["ok"], true);
    assert_eq!(entries[1]["target"], "tool");
    assert_eq!(entries[2]["ok"], false);
    assert!(
        entries[2]["error"].as_str().unwrap_or("").contains("exit"),
        "{}",
        entries[2]
    );

    // Warming again finds everything; the plain summary says so.
    let ok_list = root.path().join("ok.toml");
    std::fs::write(
        &ok_list,
        "[[build]]\ncontext = \"app\"\nbuild_args = { LEVEL = \"2\" }\n",
    )
    .unwrap();
    let out = dbuild(&data, &["warm", "--file", ok_list.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 stages cached, 0 built, 0 failed"),
        "{stdout}"
    );

    // A developer's submit of the warmed build builds nothing.
    let out = dbuild(
        &data,
        &[
            "submit",
            app.to_str().unwrap(),
            "--build-arg",
            "LEVEL=2",
            "--progress",
            "json",
            "--output",
            "type=none",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = json_lines(&out);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "stage_cached")
            .count(),
        2
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "stage_started")
            .count(),
        0
    );
}
