//! Builds of one context by the reference (the daemon's BuildKit) and by `dbuild submit`,
//! and the parity check between the two images.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::compare::assert_same_image;
use crate::corpus::Case;
use crate::docker::{command, run_with, unique_tag, Image, Run, BUILD_TIMEOUT};
use crate::images::base_images;
use crate::leftovers;

/// A context directory holding `files` (path, text), directories made as needed.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    dir
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
    let mut cmd = command(None);
    cmd.args(["build", "--network=none", "-q", "-t", tag]);
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

/// The dbuild binary under test: `DBUILD_BIN`, else the `dbuild` cargo built beside the
/// running test binary (`target/<profile>/deps/<test>` → `target/<profile>/dbuild`).
pub fn dbuild_bin() -> PathBuf {
    find_dbuild().expect(
        "no dbuild binary beside the test binary: cargo builds it for the root package's \
         tests (or set DBUILD_BIN)",
    )
}

/// [`dbuild_bin`], or `None` when there is none.
pub fn find_dbuild() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("DBUILD_BIN") {
        return Some(bin.into());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.join("dbuild")).filter(|b| b.is_file())
}

/// `dbuild submit CTX [-f F] FLAGS EXTRA` with `DBUILD_DATA_DIR=data_dir`, whatever its
/// outcome. `extra` holds submit-only flags (`-t`, `--progress`, `--output` ...).
pub fn dbuild_submit(spec: &BuildSpec, extra: &[&str], data_dir: &Path) -> Run {
    let dockerfile = spec
        .dockerfile
        .clone()
        .unwrap_or_else(|| spec.context.join("Dockerfile"));
    let text = std::fs::read_to_string(dockerfile).unwrap_or_default();
    // The embedded build's executor is named `local`.
    leftovers::note_volumes(leftovers::absent_volumes(leftovers::cache_volumes(
        "dbuild-w-local",
        &text,
    )));
    let mut cmd = Command::new(dbuild_bin());
    cmd.env("DBUILD_DATA_DIR", data_dir)
        .arg("submit")
        .arg(&spec.context);
    if let Some(f) = &spec.dockerfile {
        cmd.arg("-f").arg(f);
    }
    cmd.args(&spec.flags).args(extra);
    let r = run_with(cmd, None, BUILD_TIMEOUT);
    leftovers::note_cache(data_dir);
    r
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
    let data = leftovers::data_dir();
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
