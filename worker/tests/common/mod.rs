//! Test helpers: a busybox base image, StageTasks from a Dockerfile string, BuildKit
//! builds, and filesystem/config comparison of two images. Real daemon, no mocks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    ListVolumesOptionsBuilder,
};
use coordinator::scheduler::{external_images, stage_task, BuildRequest, PinnedImages};
use futures::StreamExt;
use model::context::{scan, ScanOptions};
use model::frontend::parser::parse;
use model::frontend::plan::{plan, PlanOptions};
use model::keys::compute_keys;
use model::task::{
    stage_image_tag, BuildInputs, Executor, LocalContext, StageError, StageLog, StageResult,
    StageTask,
};
use tokio_util::sync::CancellationToken;
use worker::DockerExecutor;

/// The busybox base image every test builds on.
pub const BUSYBOX: &str = "dbuild-worker-test/busybox:latest";

static BASE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// A rootfs tar: /bin/busybox, its applets as symlinks, /etc/passwd and /etc/group with
/// root and `app` (1000:1000), and /tmp.
fn rootfs_tar() -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let dir = |t: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        t.append_data(&mut h, name, std::io::empty()).unwrap();
    };
    let file = |t: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        t.append_data(&mut h, name, data).unwrap();
    };
    dir(&mut t, "bin/", 0o755);
    dir(&mut t, "etc/", 0o755);
    dir(&mut t, "tmp/", 0o1777);
    dir(&mut t, "root/", 0o700);
    dir(&mut t, "home/", 0o755);
    file(
        &mut t,
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
    );
    file(
        &mut t,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    );
    file(&mut t, "etc/group", 0o644, b"root:x:0:\napp:x:1000:\n");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" || applet.contains('/') || applet.is_empty() {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        t.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    t.into_inner().unwrap()
}

/// Connects an executor named `name` (use names that are not prefixes of each other:
/// leftovers are found by name).
pub async fn executor(name: &str) -> DockerExecutor {
    let ex = DockerExecutor::connect(None, name)
        .await
        .expect("docker daemon");
    BASE.get_or_init(|| async {
        if docker(&["image", "inspect", BUSYBOX]).is_ok() {
            return;
        }
        let opts = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo("dbuild-worker-test/busybox")
            .tag("latest")
            .build();
        let mut s = ex.daemon().docker().create_image(
            Some(opts),
            Some(bollard::body_full(rootfs_tar().into())),
            None,
        );
        while let Some(r) = s.next().await {
            r.expect("import busybox rootfs");
        }
    })
    .await;
    ex
}

/// Runs the docker CLI (20.10, with BuildKit built in), returning stdout.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("/usr/bin/docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
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
    let out = req
        .plan
        .stages
        .iter()
        .filter(|s| req.plan.built[s.index])
        .map(|s| stage_task(&req, s.index))
        .collect();
    let inputs = BuildInputs {
        manifest: Arc::new(manifest),
        context: Arc::new(LocalContext {
            root: dir.to_path_buf(),
        }),
        secrets: Arc::new(secrets),
    };
    (out, inputs)
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

/// Builds with BuildKit (`DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none`).
pub fn build_buildkit(dir: &Path, dockerfile: &str, tag: &str) {
    build_buildkit_with(dir, dockerfile, tag, &[]);
}

/// [`build_buildkit`] with extra `docker build` flags (e.g. `--secret`).
pub fn build_buildkit_with(dir: &Path, dockerfile: &str, tag: &str, extra: &[&str]) {
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let mut args = vec!["build", "--network=none", "-q", "-t", tag];
    args.extend_from_slice(extra);
    args.push(dir.to_str().unwrap());
    docker(&args).unwrap_or_else(|e| panic!("BuildKit build failed:\n{e}"));
}

/// Paths the daemon adds to any container outside the Dockerfile's control.
const IGNORED: &[&str] = &[
    ".dockerenv",
    "dev",
    "proc",
    "sys",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/mtab",
];

fn ignored(path: &str) -> bool {
    IGNORED
        .iter()
        .any(|i| path == *i || path.starts_with(&format!("{i}/")))
}

/// An image's filesystem: path → "type mode uid:gid size blake3 -> link".
pub fn image_fs(image: &str) -> BTreeMap<String, String> {
    let c = docker(&["create", image, "/nonexistent"])
        .expect("create")
        .trim()
        .to_string();
    let out = Command::new("/usr/bin/docker")
        .args(["export", &c])
        .output()
        .expect("export");
    docker(&["rm", "-v", &c]).expect("rm");
    let mut ar = tar::Archive::new(out.stdout.as_slice());
    let mut fs = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        if path.is_empty() || ignored(&path) {
            continue;
        }
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Regular => "file",
            _ => "other",
        };
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| format!(" -> {}", l.to_string_lossy()))
            .unwrap_or_default();
        let size = if kind == "dir" { 0 } else { data.len() };
        fs.insert(
            path,
            format!(
                "{kind} {:04o} {}:{} {size} {}{link}",
                h.mode().unwrap() & 0o7777,
                h.uid().unwrap(),
                h.gid().unwrap(),
                &blake3::hash(&data).to_hex()[..12],
            ),
        );
    }
    fs
}

/// The compared config fields, with empty values dropped.
pub fn image_config(image: &str) -> BTreeMap<String, serde_json::Value> {
    let raw = docker(&["image", "inspect", "--format", "{{json .Config}}", image]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let keep = [
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "Labels",
        "ExposedPorts",
        "Volumes",
        "StopSignal",
        "Healthcheck",
        "Shell",
        "OnBuild",
        "ArgsEscaped",
    ];
    v.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .filter(|(_, v)| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => !s.is_empty(),
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Object(o) => !o.is_empty(),
            _ => true,
        })
        .map(|(k, v)| (k.clone(), v.clone()))
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
    let fs = diff(&image_fs(ours), &image_fs(theirs));
    let cfg = diff(&image_config(ours), &image_config(theirs));
    if !fs.is_empty() || !cfg.is_empty() {
        panic!(
            "images differ ({ours} vs BuildKit {theirs})\nfilesystem:\n{}\nconfig:\n{}",
            fs.join("\n"),
            cfg.join("\n")
        );
    }
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
