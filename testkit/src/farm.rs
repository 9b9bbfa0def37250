//! Farm processes for the end-to-end tests: a coordinator and worker processes of the
//! `dbuild` binary on loopback, a second Docker daemon, and `dbuild submit` (farm or
//! embedded) with its JSON events.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::build::dbuild_bin;
use crate::docker::docker_on;
use crate::leftovers::{self, Claim};

/// A farm process, stopped when dropped: SIGTERM first, so a worker finishes writing the
/// images it loads in the background and removes its temporary ones (as it does for
/// systemd), SIGKILL if it has not exited 15 s later. A coordinator's then notes the stage
/// images its cache names for removal ([`crate::leftovers`]).
pub struct Proc(pub Child, Option<Tracked>);

struct Tracked {
    data: PathBuf,
    _claim: Claim,
}

impl Proc {
    /// A process that is only killed.
    pub fn new(child: Child) -> Proc {
        Proc(child, None)
    }
}

impl Proc {
    /// SIGTERM, then SIGKILL after `grace`; waits for the exit.
    fn stop(&mut self, grace: Duration) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .arg(self.0.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
        if let Some(t) = &self.1 {
            // Its index is free once it exited.
            leftovers::note_cache(&t.data);
        }
    }
}

pub fn start_coordinator(data: &Path) -> (Proc, String) {
    start_coordinator_on(data, "127.0.0.1:0")
}

/// A coordinator listening on `listen` (a fixed port, for a restart at the same URL).
pub fn start_coordinator_on(data: &Path, listen: &str) -> (Proc, String) {
    let mut child = Command::new(dbuild_bin())
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
    let tracked = Tracked {
        data: data.to_path_buf(),
        _claim: Claim::new(),
    };
    (Proc(child, Some(tracked)), format!("http://{addr}"))
}

pub fn start_worker(
    url: &str,
    name: &str,
    slots: usize,
    data: &Path,
    docker_host: Option<&str>,
) -> Proc {
    let mut cmd = Command::new(dbuild_bin());
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
    let child = cmd.spawn().expect("worker starts");
    if docker_host.is_none() {
        // The temporary images of a worker killed mid-stage (`DockerExecutor::unique`).
        let pid = child.id();
        let prefix = format!("dbuild-bare:dbuild-w-{name}");
        leftovers::note_tag_prefixes(["b", "l"].map(|w| format!("{prefix}-{w}-{pid}-")));
    }
    Proc::new(child)
}

pub fn wait_for_workers(url: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(dbuild_bin())
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

/// `dbuild submit CTX --coordinator URL --progress json ARGS` with the client data dir
/// `data`.
pub fn submit(url: &str, ctx: &Path, args: &[&str], data: &Path) -> Submitted {
    let out = Command::new(dbuild_bin())
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

/// An embedded `dbuild submit CTX --progress json ARGS` on the data dir `data`, with
/// `env` set.
pub fn embedded_submit(ctx: &Path, data: &Path, args: &[&str], env: &[(&str, &str)]) -> Submitted {
    let out = Command::new(dbuild_bin())
        .arg("submit")
        .arg(ctx)
        .args(["--progress", "json"])
        .args(args)
        .env("DBUILD_DATA_DIR", data)
        .env_remove("DBUILD_COORDINATOR")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    leftovers::note_cache(data);
    Submitted::from_output(out)
}

/// A second Docker daemon in its own network namespace (so it leaves the host's docker0
/// alone), on vfs, with the base images made. Stopped, and everything on it gone, when
/// dropped.
pub struct SecondDaemon {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl SecondDaemon {
    pub fn start() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("dbuild-d2-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("daemon.json"), "{}").map_err(|e| e.to_string())?;
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let log = std::fs::File::create(dir.path().join("log")).map_err(|e| e.to_string())?;
        let child = Command::new("unshare")
            .args([
                "--net",
                "dockerd",
                "--config-file",
                &p("daemon.json"),
                "--data-root",
                &p("root"),
                "--exec-root",
                &p("exec"),
                "--pidfile",
                &p("pid"),
                "--host",
                &format!("unix://{}", p("sock")),
                "--bridge=none",
                "--iptables=false",
                "--storage-driver=vfs",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start dockerd: {e}"))?;
        let d = SecondDaemon {
            proc: Proc::new(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if docker_on(Some(&d.host()), &["version"]).ok() {
                crate::images::base_images_on(Some(&d.host()))?;
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(format!(
            "second dockerd did not come up: {}",
            std::fs::read_to_string(d.dir.path().join("log")).unwrap_or_default()
        ))
    }

    /// Its `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("sock").display())
    }
}

impl Drop for SecondDaemon {
    fn drop(&mut self) {
        // SIGTERM lets dockerd unmount; then the temp dir can go.
        self.proc.stop(Duration::from_secs(20));
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path())
            .status();
    }
}
