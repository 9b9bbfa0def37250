//! The farm harness of the end-to-end tests: a coordinator and worker processes of the
//! `dbuild` binary on loopback, and `dbuild submit --coordinator` with its JSON events.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DBUILD: &str = env!("CARGO_BIN_EXE_dbuild");

/// A process killed when dropped.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_coordinator(data: &Path) -> (Proc, String) {
    start_coordinator_on(data, "127.0.0.1:0")
}

/// A coordinator listening on `listen` (a fixed port, for a restart at the same URL).
pub fn start_coordinator_on(data: &Path, listen: &str) -> (Proc, String) {
    let mut child = Command::new(DBUILD)
        .args(["coordinator", "--listen", listen, "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("coordinator starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (Proc(child), format!("http://{addr}"))
}

pub fn start_worker(
    url: &str,
    name: &str,
    slots: usize,
    data: &Path,
    docker_host: Option<&str>,
) -> Proc {
    let mut cmd = Command::new(DBUILD);
    cmd.args([
        "worker",
        "--coordinator",
        url,
        "--name",
        name,
        "--slots",
        &slots.to_string(),
        "--data-dir",
    ])
    .arg(data)
    .env_remove("DOCKER_HOST")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(h) = docker_host {
        cmd.args(["--docker-host", h]);
    }
    Proc(cmd.spawn().expect("worker starts"))
}

pub fn wait_for_workers(url: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(DBUILD)
            .args(["workers", "--coordinator", url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.lines().filter(|l| l.contains("ready")).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "workers did not register:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Submitted {
    pub ok: bool,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl Submitted {
    /// A finished `dbuild submit --progress json`: its exit, events and stderr.
    pub fn from_output(out: std::process::Output) -> Submitted {
        Submitted {
            ok: out.status.success(),
            events: String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Which worker each stage was placed on (its stage_started event names it).
    pub fn placement(&self, stage: u64) -> Option<String> {
        self.events.iter().find_map(|e| {
            (e["event"] == "stage_started" && e["stage"] == stage)
                .then(|| e["worker"].as_str().map(str::to_string))
                .flatten()
        })
    }
    pub fn count(&self, event: &str) -> usize {
        self.events.iter().filter(|e| e["event"] == event).count()
    }
}

pub fn submit(url: &str, ctx: &Path, args: &[&str], data: &Path) -> Submitted {
    let out = Command::new(DBUILD)
        .arg("submit")
        .arg(ctx)
        .args(["--coordinator", url, "--progress", "json"])
        .args(args)
        .env("DBUILD_DATA_DIR", data)
        .env_remove("DOCKER_HOST")
        .output()
        .expect("submit runs");
    Submitted::from_output(out)
}
