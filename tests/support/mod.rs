//! Shared by the end-to-end tests (`mod support;`): local base images (no registry here),
//! reference builds with BuildKit, builds with `dbuild submit`, image snapshots and their
//! side-by-side comparison, and the Dockerfile corpus in `tests/corpus/`.
#![allow(dead_code, unused_imports)]

pub mod compare;
pub mod corpus;
pub mod farm;
pub mod images;
/// SHA-256 as the executor computes it (Docker's layer digests).
pub use worker::executor::sha256;
pub mod snapshot;
pub mod tarball;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use compare::{assert_same_image, differences, render, Difference};
pub use corpus::Case;
pub use images::base_images;
pub use snapshot::Snapshot;

/// The Docker client that builds with the daemon's own BuildKit (20.10): the newer client
/// on PATH wants a buildx plugin this machine does not have.
pub const DOCKER: &str = "/usr/bin/docker";

/// Longest a single build may take before the test kills it and fails.
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

/// `docker ARGS`, whatever its outcome.
pub fn docker(args: &[&str]) -> Run {
    let mut cmd = Command::new(DOCKER);
    cmd.args(args);
    run_with(cmd, None, BUILD_TIMEOUT)
}

/// `docker ARGS`, which must succeed.
pub fn docker_ok(args: &[&str]) -> Run {
    let r = docker(args);
    assert!(r.ok(), "{}", r.report());
    r
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
        docker(&["image", "inspect", &self.tag]).ok()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if std::env::var_os("DBUILD_E2E_KEEP").is_none() {
            let _ = docker(&["rmi", "--force", "--no-prune", &self.tag]);
        }
    }
}

/// What to build: a context directory, a Dockerfile and `docker build`-style flags
/// (`--target`, `--build-arg`, `--secret`, `--no-cache`) that both builders accept.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub context: PathBuf,
    pub dockerfile: Option<PathBuf>,
    pub flags: Vec<String>,
}

impl BuildSpec {
    pub fn new(context: impl Into<PathBuf>) -> BuildSpec {
        BuildSpec {
            context: context.into(),
            dockerfile: None,
            flags: Vec::new(),
        }
    }
    pub fn file(mut self, f: impl Into<PathBuf>) -> BuildSpec {
        self.dockerfile = Some(f.into());
        self
    }
    pub fn flags<S: AsRef<str>>(mut self, flags: &[S]) -> BuildSpec {
        self.flags
            .extend(flags.iter().map(|s| s.as_ref().to_string()));
        self
    }
}

/// The reference: `DOCKER_BUILDKIT=1 docker build --network=none -q -t TAG [-f F] FLAGS CTX`.
pub fn buildkit_build(spec: &BuildSpec, tag: &str) -> Result<Image, Run> {
    let mut cmd = Command::new(DOCKER);
    cmd.env("DOCKER_BUILDKIT", "1")
        .args(["build", "--network=none", "-q", "-t", tag]);
    if let Some(f) = &spec.dockerfile {
        cmd.arg("-f").arg(f);
    }
    cmd.args(&spec.flags).arg(&spec.context);
    let r = run_with(cmd, None, BUILD_TIMEOUT);
    if r.ok() {
        Ok(Image::new(tag.to_string()))
    } else {
        Err(r)
    }
}

/// The dbuild binary under test.
pub fn dbuild_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dbuild")
}

/// `dbuild submit CTX [-f F] FLAGS EXTRA` with `DBUILD_DATA_DIR=data_dir`, whatever its
/// outcome. `extra` holds submit-only flags (`-t`, `--progress`, `--output` ...).
pub fn dbuild_submit(spec: &BuildSpec, extra: &[&str], data_dir: &Path) -> Run {
    let mut cmd = Command::new(dbuild_bin());
    cmd.env("DBUILD_DATA_DIR", data_dir)
        .arg("submit")
        .arg(&spec.context);
    if let Some(f) = &spec.dockerfile {
        cmd.arg("-f").arg(f);
    }
    cmd.args(&spec.flags).args(extra);
    run_with(cmd, None, BUILD_TIMEOUT)
}

/// `dbuild submit ... -t TAG --progress plain`, which must succeed.
pub fn dbuild_build(spec: &BuildSpec, tag: &str, data_dir: &Path) -> Result<Image, Run> {
    let r = dbuild_submit(spec, &["-t", tag, "--progress", "plain"], data_dir);
    if r.ok() {
        Ok(Image::new(tag.to_string()))
    } else {
        Err(r)
    }
}

/// Builds `spec` with BuildKit (from `reference`, when given, instead of the spec's own
/// Dockerfile) and with dbuild, then compares the two images; panics with the
/// side-by-side table when they differ.
pub fn assert_parity(label: &str, spec: &BuildSpec, reference: Option<&BuildSpec>) {
    base_images();
    let bk = buildkit_build(
        reference.unwrap_or(spec),
        &unique_tag(&format!("{label}-buildkit")),
    )
    .unwrap_or_else(|r| {
        panic!(
            "{label}: the reference BuildKit build failed\n{}",
            r.report()
        )
    });
    let data = tempfile::tempdir().unwrap();
    let db = dbuild_build(spec, &unique_tag(&format!("{label}-dbuild")), data.path())
        .unwrap_or_else(|r| panic!("{label}: dbuild submit failed\n{}", r.report()));
    let (expected, actual) = (bk.snapshot(), db.snapshot());
    assert_same_image(&expected, &actual);
}

/// Runs a case from `tests/corpus/` through [`assert_parity`].
pub fn corpus_parity(name: &str) {
    let case = Case::load(name);
    let reference = case.reference_spec();
    assert_parity(name, &case.spec(), reference.as_ref());
}

/// `docker run --rm IMAGE ARGS...` (no network), which must succeed; its stdout.
pub fn run_image(image: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--network=none", image];
    all.extend_from_slice(args);
    docker_ok(&all).stdout_text()
}
