//! The one way the tests run the Docker CLI (and any other command): a timeout, stdin fed
//! from memory, stdout and stderr kept for the failure message.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::snapshot::Snapshot;

/// The Docker client that builds with the daemon's own BuildKit (20.10): the newer client
/// on PATH wants a buildx plugin this machine does not have.
pub const DOCKER: &str = "/usr/bin/docker";

/// Longest a single command (a build, say) may take before the test kills it and fails.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Its stdout when it succeeded, else its stderr.
    pub fn into_result(self) -> Result<String, String> {
        if self.ok() {
            Ok(self.stdout_text())
        } else {
            Err(self.stderr_text())
        }
    }
    /// A readable account for failure messages (stdout only when it is text and short).
    pub fn report(&self) -> String {
        let out = self.stdout_text();
        let out = if self.stdout.len() > 20_000 {
            format!("<{} bytes>", self.stdout.len())
        } else {
            out
        };
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.status,
            out.trim_end(),
            self.stderr_text().trim_end()
        )
    }
}

fn describe_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with `stdin` fed to it, killing it (by its own pid) after `timeout`.
pub fn run_with(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Run {
    let what = describe_command(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("waiting for a killed child");
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "`{what}` did not finish within {timeout:?} and was killed ({status})\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Run {
        what,
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// The Docker CLI on the daemon `host` (`None`: the local one, or `DOCKER_HOST`).
pub fn command(host: Option<&str>) -> Command {
    let mut cmd = Command::new(DOCKER);
    cmd.env("DOCKER_BUILDKIT", "1");
    if let Some(h) = host {
        cmd.env("DOCKER_HOST", h);
    }
    cmd
}

/// `docker ARGS` on `host`, whatever its outcome.
pub fn docker_on(host: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = command(host);
    cmd.args(args);
    run_with(cmd, None, BUILD_TIMEOUT)
}

/// `docker ARGS` on the daemon `host`, whatever its outcome.
pub fn docker_at(host: &str, args: &[&str]) -> Run {
    docker_on(Some(host), args)
}

/// `docker ARGS`, whatever its outcome.
pub fn docker(args: &[&str]) -> Run {
    docker_on(None, args)
}

/// `docker ARGS`, which must succeed.
pub fn docker_ok(args: &[&str]) -> Run {
    let r = docker(args);
    assert!(r.ok(), "{}", r.report());
    r
}

/// Whether the daemon has an image of that name or id.
pub fn image_exists(reference: &str) -> bool {
    docker(&["image", "inspect", reference]).ok()
}

/// `docker run --rm IMAGE ARGS...` (no network), which must succeed; its stdout.
pub fn run_image(image: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--network=none", image];
    all.extend_from_slice(args);
    docker_ok(&all).stdout_text()
}

/// A tag no other test (or earlier run) uses: `dbuild-e2e/<label>:<pid>-<n>`.
pub fn unique_tag(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let clean: String = label
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "dbuild-e2e/{clean}:{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A tag this test created; `docker rmi`'d when dropped (set DBUILD_E2E_KEEP=1 to keep
/// images for inspection).
#[derive(Debug)]
pub struct Image {
    pub tag: String,
}

impl Image {
    pub fn new(tag: String) -> Image {
        Image { tag }
    }
    pub fn id(&self) -> String {
        docker_ok(&["image", "inspect", "--format", "{{.Id}}", &self.tag])
            .stdout_text()
            .trim()
            .to_string()
    }
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::of(&self.tag)
    }
    pub fn exists(&self) -> bool {
        image_exists(&self.tag)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if std::env::var_os("DBUILD_E2E_KEEP").is_none() {
            // Never forced: forced by id, it would take every other tag of the image with
            // it (`dbuild-stage:<key>` of a stage a parallel test is about to reuse).
            // Untagged parents go too (prune): a committed image's bare base, say.
            let _ = docker(&["rmi", &self.tag]);
        }
    }
}
