//! Executor-level builds, as the worker's tests run them: StageTasks made from a
//! Dockerfile string the one way the scheduler makes them, run on a [`DockerExecutor`] of
//! the local daemon, and compared with BuildKit's image of the same Dockerfile. Every tag
//! of every task made here is noted for removal ([`crate::leftovers`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, ListVolumesOptionsBuilder,
};
use coordinator::scheduler::{external_images, stage_task, BuildRequest, PinnedImages};
use model::context::{scan, ScanOptions};
use model::frontend::parser::parse;
use model::frontend::plan::{plan, PlanOptions};
use model::keys::compute_keys;
use model::task::{
    instruction_image_tag, stage_image_tag, BuildInputs, Executor, LocalContext, StageError,
    StageLog, StageResult, StageTask,
};
use tokio_util::sync::CancellationToken;
use worker::DockerExecutor;

use crate::compare::assert_same_image;
use crate::leftovers::{self, Claim};
use crate::snapshot::Snapshot;

/// The busybox base image every executor test builds on (an empty config).
pub const BUSYBOX: &str = crate::images::BARE_BUSYBOX;

/// A [`DockerExecutor`] for one test (it derefs to one): while it lives, the images of
/// the tasks it was given stay; after, they are removed with the rest of what the tests
/// noted ([`crate::leftovers`]).
pub struct TestExecutor {
    ex: DockerExecutor,
    _claim: Claim,
}

impl std::ops::Deref for TestExecutor {
    type Target = DockerExecutor;
    fn deref(&self) -> &DockerExecutor {
        &self.ex
    }
}

impl TestExecutor {
    fn map(self, f: impl FnOnce(DockerExecutor) -> DockerExecutor) -> TestExecutor {
        TestExecutor {
            ex: f(self.ex),
            _claim: self._claim,
        }
    }
    /// [`DockerExecutor::with_scratch_dir`].
    pub fn with_scratch_dir(self, dir: &Path) -> TestExecutor {
        self.map(|ex| ex.with_scratch_dir(dir))
    }
    /// [`DockerExecutor::without_local_shortcuts`].
    pub fn without_local_shortcuts(self) -> TestExecutor {
        self.map(DockerExecutor::without_local_shortcuts)
    }
    /// [`DockerExecutor::without_upper_dirs`].
    pub fn without_upper_dirs(self) -> TestExecutor {
        self.map(DockerExecutor::without_upper_dirs)
    }
}

/// Connects an executor named `name` to the local daemon, with the base images made (use
/// names that are not prefixes of each other: [`leftovers`] finds containers by name).
pub async fn executor(name: &str) -> TestExecutor {
    crate::images::base_images();
    let claim = Claim::new();
    let ex = DockerExecutor::connect(None, name)
        .await
        .expect("docker daemon");
    TestExecutor { ex, _claim: claim }
}

/// Runs the docker CLI (20.10, with BuildKit built in), returning stdout (or stderr).
pub fn docker(args: &[&str]) -> Result<String, String> {
    crate::docker::docker(args).into_result()
}

/// Writes a context directory: `(path, mode, content)`; a content starting with `->`
/// makes a symlink; a path ending in `/` a directory.
pub fn write_context(dir: &Path, files: &[(&str, u32, &[u8])]) {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode, content) in files {
        let p = dir.join(path.trim_end_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        if path.ends_with('/') {
            std::fs::create_dir_all(&p).unwrap();
        } else if let Some(target) = content.strip_prefix(b"->") {
            std::os::unix::fs::symlink(std::str::from_utf8(target).unwrap(), &p).unwrap();
            continue;
        } else {
            std::fs::write(&p, content).unwrap();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
}

/// The tasks of every stage the target needs, in order, and the build's inputs.
pub async fn tasks(
    ex: &DockerExecutor,
    dir: &Path,
    dockerfile: &str,
    secrets: BTreeMap<String, Vec<u8>>,
) -> (Vec<StageTask>, BuildInputs) {
    tasks_with(ex, dir, dockerfile, secrets, BTreeMap::new()).await
}

/// [`tasks`] with `--build-arg` values. The tasks are made the one way the scheduler makes
/// them ([`stage_task`] of a [`BuildRequest`]), with every external image pinned on `ex`.
pub async fn tasks_with(
    ex: &DockerExecutor,
    dir: &Path,
    dockerfile: &str,
    secrets: BTreeMap<String, Vec<u8>>,
    build_args: BTreeMap<String, String>,
) -> (Vec<StageTask>, BuildInputs) {
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let df = parse(dockerfile.as_bytes()).expect("parse");
    let opts = PlanOptions {
        build_args,
        ..PlanOptions::default()
    };
    let plan = plan(&df, &opts).expect("plan");
    let (manifest, _) = scan(dir, &ScanOptions::default()).expect("scan");
    let mut pinned = BTreeMap::new();
    for reference in external_images(&plan) {
        let id = ex.resolve_image(&reference, false).await.expect("resolve");
        pinned.insert(reference, id);
    }
    let pinned = PinnedImages(pinned);
    let keys = compute_keys(&plan, &manifest, &pinned);
    let req = BuildRequest {
        build_id: "test".into(),
        plan: Arc::new(plan),
        keys: Arc::new(keys),
        pinned,
        no_cache: true,
        no_cache_stages: Default::default(),
        network: None,
        exports: Default::default(),
    };
    let out: Vec<StageTask> = req
        .plan
        .stages
        .iter()
        .filter(|s| req.plan.built[s.index])
        .map(|s| stage_task(&req, s.index))
        .collect();
    leftovers::note_tags(leftovers::absent_tags(
        out.iter().flat_map(task_tags).collect(),
    ));
    leftovers::note_volumes(leftovers::absent_volumes(leftovers::cache_volumes(
        ex.name_prefix(),
        dockerfile,
    )));
    let inputs = BuildInputs {
        manifest: Arc::new(manifest),
        context: Arc::new(LocalContext {
            root: dir.to_path_buf(),
        }),
        secrets: Arc::new(secrets),
    };
    (out, inputs)
}

/// The tags a task's images get: its stage's and each instruction's.
fn task_tags(t: &StageTask) -> impl Iterator<Item = String> + '_ {
    std::iter::once(stage_image_tag(&t.key))
        .chain(t.instructions.iter().map(|i| instruction_image_tag(&i.key)))
}

/// Runs every task in order; returns each stage's result (or the first error) and the
/// log lines.
pub async fn run_all(
    ex: &DockerExecutor,
    tasks: &[StageTask],
    inputs: &BuildInputs,
) -> (Result<Vec<StageResult>, StageError>, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StageLog>();
    let mut results = Vec::new();
    let mut err = None;
    for t in tasks {
        match ex
            .run_stage(
                t.clone(),
                inputs.clone(),
                tx.clone(),
                CancellationToken::new(),
            )
            .await
        {
            Ok(r) => results.push(r),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    // Stage images are written in the background; the tests read them with the CLI.
    if let Err(e) = ex.settle_all().await {
        err.get_or_insert(e);
    }
    leftovers::note_current(tasks.iter().flat_map(task_tags).collect());
    let mut lines = Vec::new();
    while let Some(l) = rx.recv().await {
        lines.push(l.line);
    }
    (err.map_or(Ok(results), Err), lines)
}

/// Builds the whole Dockerfile with the executor and returns the final stage's tag.
pub async fn build_ours(ex: &DockerExecutor, dir: &Path, dockerfile: &str) -> String {
    let (tasks, inputs) = tasks(ex, dir, dockerfile, BTreeMap::new()).await;
    let (r, lines) = run_all(ex, &tasks, &inputs).await;
    if let Err(e) = &r {
        panic!("our build failed: {e:?}\nlog:\n{}", lines.join("\n"));
    }
    stage_image_tag(&tasks.last().unwrap().key)
}

/// Builds with BuildKit (`DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none`); the
/// tag is removed with the test's images.
pub fn build_buildkit(dir: &Path, dockerfile: &str, tag: &str) {
    build_buildkit_with(dir, dockerfile, tag, &[]);
}

/// [`build_buildkit`] with extra `docker build` flags (e.g. `--secret`).
pub fn build_buildkit_with(dir: &Path, dockerfile: &str, tag: &str, extra: &[&str]) {
    buildkit_image(dir, dockerfile, tag, extra);
    leftovers::note_current(vec![tag.to_string()]);
}

/// A base image for later builds, made by BuildKit and kept like the base images of
/// [`crate::images`] (removing it would change the keys of every build on it).
pub fn buildkit_base(dir: &Path, dockerfile: &str, tag: &str) {
    buildkit_image(dir, dockerfile, tag, &[]);
}

fn buildkit_image(dir: &Path, dockerfile: &str, tag: &str, extra: &[&str]) {
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let mut args = vec!["build", "--network=none", "-q", "-t", tag];
    args.extend_from_slice(extra);
    args.push(dir.to_str().unwrap());
    docker(&args).unwrap_or_else(|e| panic!("BuildKit build failed:\n{e}"));
}

/// An image's filesystem, as the comparison of [`Snapshot`]s sees it: path (relative, as
/// in a tar) → its one-line description.
pub fn image_fs(image: &str) -> BTreeMap<String, String> {
    let s = Snapshot::of(image);
    s.fs.keys()
        .map(|p| (p.trim_start_matches('/').to_string(), s.describe(p)))
        .collect()
}

/// Side-by-side differences of two maps, empty when equal.
pub fn diff<V: std::fmt::Debug + PartialEq>(
    ours: &BTreeMap<String, V>,
    theirs: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    for k in keys {
        let (a, b) = (ours.get(k), theirs.get(k));
        if a != b {
            out.push(format!("{k}\n    ours:     {a:?}\n    buildkit: {b:?}"));
        }
    }
    out
}

/// Asserts that our image and BuildKit's have the same filesystem and config.
pub fn assert_same(ours: &str, theirs: &str) {
    assert_same_image(&Snapshot::of(theirs), &Snapshot::of(ours));
}

/// Containers, volumes and bare images this executor left behind.
pub async fn leftovers(ex: &DockerExecutor) -> Vec<String> {
    let _ = ex.settle_all().await;
    let prefix = format!("{}-", ex.name_prefix());
    let mut out = Vec::new();
    let opts = ListContainersOptionsBuilder::default().all(true).build();
    for c in ex
        .daemon()
        .docker()
        .list_containers(Some(opts))
        .await
        .unwrap()
    {
        for n in c.names.unwrap_or_default() {
            if n.trim_start_matches('/').starts_with(&prefix) {
                out.push(format!("container {n}"));
            }
        }
    }
    let vols = ex
        .daemon()
        .docker()
        .list_volumes(Some(ListVolumesOptionsBuilder::default().build()))
        .await
        .unwrap();
    for v in vols.volumes.unwrap_or_default() {
        if v.name.starts_with(&prefix) {
            out.push(format!("volume {}", v.name));
        }
    }
    let imgs = ex
        .daemon()
        .docker()
        .list_images(Some(ListImagesOptionsBuilder::default().all(true).build()))
        .await
        .unwrap();
    for i in imgs {
        for t in i.repo_tags {
            if t.starts_with(&format!("dbuild-bare:{prefix}")) {
                out.push(format!("image {t}"));
            }
        }
    }
    out
}
