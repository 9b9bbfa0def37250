//! Ctrl-C during `dbuild submit`: every running stage is cancelled, the command exits
//! non-zero, and no container or temporary volume is left on the daemon.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The containers of this test's build (their commands carry the test's id) that exist.
fn containers_of(id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--no-trunc",
            "--format",
            "{{.Names}} {{.Command}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_string)
        .collect()
}

#[test]
fn ctrl_c_cancels_every_stage_and_leaves_nothing() {
    testkit::base_images();
    let ctx = tempfile::tempdir().unwrap();
    let data = testkit::data_dir();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM alpine:latest AS a\nRUN echo cancel-test-{id} && sleep 60\nFROM alpine:latest AS b\nRUN --mount=type=tmpfs,target=/t echo cancel-test-{id} && sleep 60\nFROM alpine:latest\nCOPY --from=a /etc/passwd /a\nCOPY --from=b /etc/passwd /b\n",
            id = std::process::id()
        ),
    )
    .unwrap();
    let id = format!("cancel-test-{}", std::process::id());
    let child = Command::new(env!("CARGO_BIN_EXE_dbuild"))
        .args([
            "submit",
            "--no-cache",
            "--jobs",
            "2",
            "--progress",
            "json",
            "--output",
            "type=none",
        ])
        .arg(ctx.path())
        .env("DBUILD_DATA_DIR", data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both RUN containers exist, then press Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers_of(&id).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the RUN containers never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pressed = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a cancelled build must not succeed");
    assert!(
        pressed.elapsed() < Duration::from_secs(30),
        "cancel took {:?}",
        pressed.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cancelled"), "{stderr}");
    let left = containers_of(&id);
    assert!(left.is_empty(), "left behind: {left:?}");
}
