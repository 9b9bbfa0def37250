//! RUN: the command line BuildKit would run (shell form, exec form, heredocs), its
//! environment, its `--mount`s as Docker volumes and tmpfs, and running it with output
//! streamed and cancellation honoured.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, HostConfig, Mount as DockerMount, MountType as DockerMountType,
    MountVolumeOptions, VolumeCreateRequest,
};
use bollard::query_parameters::{KillContainerOptionsBuilder, LogsOptionsBuilder};
use coordinator::digest::BlobDigest;
use coordinator::frontend::instructions::{CacheSharing, HeredocBody, MountType, Run};
use coordinator::frontend::parser::{chomp_heredoc_content, parse_heredoc};
use coordinator::task::{StageError, StageLog};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::config::{clean_abs, ImageConfig};
use super::docker::{derr, is_not_found, Daemon, Resources};
use super::tree::{Kind, Node};

/// How many output lines a failed RUN reports.
const TAIL_LINES: usize = 20;

/// Locks for `sharing=locked` cache mounts, by volume name.
pub type CacheLocks = Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// The argv of a RUN as BuildKit builds it, and a script to mount for a `#!` heredoc.
pub fn run_argv(run: &Run, config: &ImageConfig) -> (Vec<String>, Option<(String, Vec<u8>)>) {
    if run.command.json {
        return (run.command.args.clone(), None);
    }
    let cmd = run.command.args.join(" ");
    let line = match (run.heredocs.as_slice(), parse_heredoc(&cmd)) {
        ([], _) => cmd,
        ([h], Ok(Some(_))) => {
            let data = heredoc_data(h);
            if data.starts_with("#!") {
                // A script with its own interpreter: BuildKit mounts it and runs the file.
                let argv = vec![format!("/dev/pipes/{}", h.name)];
                return (argv, Some((h.name.clone(), data.into_bytes())));
            }
            data
        }
        (docs, _) => {
            // Anything more complex goes to the shell as the heredoc it was written as.
            let mut full = cmd;
            for h in docs {
                full.push('\n');
                full.push_str(&h.content);
                full.push_str(&h.name);
            }
            full
        }
    };
    let mut argv = config.shell_or_default();
    argv.push(line);
    (argv, None)
}

fn heredoc_data(h: &HeredocBody) -> String {
    if h.chomp {
        chomp_heredoc_content(&h.content)
    } else {
        h.content.clone()
    }
}

/// The RUN environment: the image's ENV, then the build args ENV does not shadow.
pub fn run_env(config: &ImageConfig, args: &BTreeMap<String, String>) -> Vec<String> {
    let mut env = config.env.clone();
    if config.env_get("PATH").is_none() {
        env.push(format!("PATH={}", super::config::DEFAULT_PATH));
    }
    for (k, v) in args {
        if config.env_get(k).is_none() {
            env.push(format!("{k}={v}"));
        }
    }
    env
}

/// What a mount needs before the container starts.
pub enum MountPrep {
    /// A volume to fill with these nodes (paths relative to the volume root).
    Fill {
        volume: String,
        nodes: BTreeMap<String, Node>,
    },
}

/// Docker mounts for RUN's `--mount`s (bind sources already turned into node sets by
/// the caller and passed in `bind_nodes`, aligned with `run.mounts`).
pub struct MountPlan {
    pub mounts: Vec<DockerMount>,
    pub tmpfs: HashMap<String, String>,
    pub prep: Vec<MountPrep>,
    /// Locks held while the command runs (`sharing=locked`).
    pub locks: Vec<Arc<tokio::sync::Mutex<()>>>,
}

fn volume_mount(target: &str, volume: &str, read_only: bool) -> DockerMount {
    DockerMount {
        target: Some(target.to_string()),
        source: Some(volume.to_string()),
        typ: Some(DockerMountType::VOLUME),
        read_only: Some(read_only),
        volume_options: Some(MountVolumeOptions {
            no_copy: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates a volume named by this executor (removed with the stage's resources).
pub async fn temp_volume(daemon: &Daemon, res: &Resources) -> Result<String, StageError> {
    let name = daemon.unique("v");
    daemon
        .docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| derr("create volume", e))?;
    res.volume(&name);
    Ok(name)
}

/// Plans the Docker side of every mount. `binds[i]` is the content of bind mount `i`
/// (`None` for other kinds); `secrets` are the build's secrets.
#[allow(clippy::too_many_arguments)]
pub async fn plan_mounts(
    daemon: &Daemon,
    res: &Resources,
    locks: &CacheLocks,
    run: &Run,
    workdir: &str,
    mut binds: Vec<Option<MountPrepSource>>,
    secrets: &BTreeMap<String, Vec<u8>>,
    script: Option<(String, Vec<u8>)>,
) -> Result<MountPlan, StageError> {
    let mut plan = MountPlan {
        mounts: Vec::new(),
        tmpfs: HashMap::new(),
        prep: Vec::new(),
        locks: Vec::new(),
    };
    let abs = |t: &str| {
        if t.starts_with('/') {
            clean_abs(t)
        } else {
            clean_abs(&format!(
                "{}/{t}",
                if workdir.is_empty() { "/" } else { workdir }
            ))
        }
    };
    for (i, m) in run.mounts.iter().enumerate() {
        let target = m.target.as_deref().map(abs);
        match m.kind {
            MountType::Cache => {
                let target = target.ok_or_else(|| StageError::new("cache mount needs a target"))?;
                let id = m.id.clone().unwrap_or_else(|| target.clone());
                let hash = BlobDigest::of(format!("{}\0{id}", daemon.prefix).as_bytes());
                let volume = match m.sharing {
                    CacheSharing::Private => temp_volume(daemon, res).await?,
                    _ => {
                        let name = format!("dbuild-cache-{}", &hash.to_hex()[..32]);
                        ensure_volume(daemon, &name).await?;
                        name
                    }
                };
                if m.sharing == CacheSharing::Locked {
                    let lock = locks
                        .lock()
                        .unwrap()
                        .entry(volume.clone())
                        .or_default()
                        .clone();
                    plan.locks.push(lock);
                }
                plan.mounts.push(volume_mount(&target, &volume, m.readonly));
            }
            MountType::Tmpfs => {
                let target = target.ok_or_else(|| StageError::new("tmpfs mount needs a target"))?;
                let opts = m
                    .size
                    .as_ref()
                    .map(|s| format!("size={s}"))
                    .unwrap_or_default();
                plan.tmpfs.insert(target, opts);
            }
            MountType::Secret => {
                let id =
                    m.id.clone()
                        .or_else(|| m.source.clone())
                        .unwrap_or_default();
                let Some(data) = secrets.get(&id) else {
                    if m.required {
                        return Err(StageError::new(format!(
                            "secret {id} is required but was not provided (pass --secret id={id},src=<file>)"
                        )));
                    }
                    continue;
                };
                if m.env.is_some() && m.target.is_none() {
                    return Err(StageError::new(format!(
                        "secret {id}: env= secrets are not supported by this executor yet"
                    )));
                }
                let target =
                    target.ok_or_else(|| StageError::new("secret mount needs a target"))?;
                let (dir, name) = split_file(&target);
                let volume = temp_volume(daemon, res).await?;
                let mut nodes = BTreeMap::new();
                nodes.insert(
                    format!("/{name}"),
                    Node {
                        kind: Kind::File(super::tree::Content::Bytes(Arc::new(data.clone()))),
                        mode: m.mode.unwrap_or(0o400),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    },
                );
                plan.prep.push(MountPrep::Fill {
                    volume: volume.clone(),
                    nodes,
                });
                plan.mounts.push(volume_mount(&dir, &volume, true));
            }
            MountType::Bind => {
                let target = target.unwrap_or_else(|| abs("."));
                let src = binds
                    .get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| StageError::new(format!("bind mount at {target}: no source")))?;
                let volume = temp_volume(daemon, res).await?;
                let MountPrepSource::Nodes(nodes) = src;
                plan.prep.push(MountPrep::Fill {
                    volume: volume.clone(),
                    nodes,
                });
                plan.mounts.push(volume_mount(&target, &volume, m.readonly));
            }
            MountType::Ssh => {
                if m.required {
                    return Err(StageError::new(
                        "ssh mounts are not supported by this executor yet",
                    ));
                }
            }
        }
    }
    if let Some((name, data)) = script {
        let volume = temp_volume(daemon, res).await?;
        let mut nodes = BTreeMap::new();
        nodes.insert(
            format!("/{name}"),
            Node {
                kind: Kind::File(super::tree::Content::Bytes(Arc::new(data))),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        );
        plan.prep.push(MountPrep::Fill {
            volume: volume.clone(),
            nodes,
        });
        plan.mounts.push(volume_mount("/dev/pipes", &volume, true));
    }
    Ok(plan)
}

/// What a bind mount shows (paths relative to the mount).
pub enum MountPrepSource {
    Nodes(BTreeMap<String, Node>),
}

fn split_file(p: &str) -> (String, String) {
    match p.rsplit_once('/') {
        Some(("", f)) => ("/".into(), f.into()),
        Some((d, f)) => (d.into(), f.into()),
        None => ("/".into(), p.into()),
    }
}

async fn ensure_volume(daemon: &Daemon, name: &str) -> Result<(), StageError> {
    match daemon.docker.inspect_volume(name).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => daemon
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.to_string()),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| derr(format!("create cache volume {name}"), e)),
        Err(e) => Err(derr(format!("inspect volume {name}"), e)),
    }
}

/// Everything needed to run one RUN container.
pub struct RunSpec {
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub user: String,
    pub workdir: String,
    /// Docker network mode (`None`: the daemon's default).
    pub network: Option<String>,
    pub mounts: Vec<DockerMount>,
    pub tmpfs: HashMap<String, String>,
}

/// How a RUN ended.
pub enum RunOutcome {
    Exited {
        container: String,
        elapsed: Duration,
    },
    Failed {
        code: i64,
        tail: Vec<String>,
    },
    Cancelled,
}

/// Creates, starts and waits for the RUN container, streaming its output to `logs`.
pub async fn run_container(
    daemon: &Daemon,
    res: &Resources,
    spec: RunSpec,
    stage: usize,
    logs: &tokio::sync::mpsc::UnboundedSender<StageLog>,
    cancel: &CancellationToken,
) -> Result<RunOutcome, StageError> {
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(spec.argv),
        entrypoint: None,
        env: Some(spec.env),
        user: (!spec.user.is_empty()).then_some(spec.user),
        working_dir: (!spec.workdir.is_empty()).then_some(spec.workdir),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        host_config: Some(HostConfig {
            network_mode: spec.network,
            mounts: (!spec.mounts.is_empty()).then_some(spec.mounts),
            tmpfs: (!spec.tmpfs.is_empty()).then_some(spec.tmpfs),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = daemon.create(body, res).await?;
    if cancel.is_cancelled() {
        return Ok(RunOutcome::Cancelled);
    }
    let started = Instant::now();
    daemon
        .docker
        .start_container(&id, None)
        .await
        .map_err(|e| derr("start RUN container", e))?;
    let log_task = {
        let docker = daemon.docker.clone();
        let id = id.clone();
        let logs = logs.clone();
        tokio::spawn(async move {
            let opts = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut stream = docker.logs(&id, Some(opts));
            let mut tail: VecDeque<String> = VecDeque::new();
            let mut partial: HashMap<bool, String> = HashMap::new();
            let push = |line: String, tail: &mut VecDeque<String>| {
                let _ = logs.send(StageLog {
                    stage,
                    line: line.clone(),
                    placed_on: None,
                });
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            };
            while let Some(Ok(out)) = stream.next().await {
                let err = matches!(out, bollard::container::LogOutput::StdErr { .. });
                let buf = partial.entry(err).or_default();
                buf.push_str(&String::from_utf8_lossy(out.as_ref()));
                while let Some(pos) = buf.find('\n') {
                    let line: String = buf.drain(..=pos).collect();
                    push(line.trim_end_matches(['\n', '\r']).to_string(), &mut tail);
                }
            }
            for (_, rest) in partial {
                if !rest.is_empty() {
                    push(rest, &mut tail);
                }
            }
            tail.into_iter().collect::<Vec<_>>()
        })
    };
    let mut wait = daemon.docker.wait_container(&id, None);
    let code = tokio::select! {
        r = wait.next() => match r {
            Some(Ok(r)) => r.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(derr("wait for RUN container", e)),
            None => return Err(StageError::new("wait for RUN container: no answer")),
        },
        _ = cancel.cancelled() => {
            let opts = KillContainerOptionsBuilder::default().signal("SIGKILL").build();
            let _ = daemon.docker.kill_container(&id, Some(opts)).await;
            log_task.abort();
            return Ok(RunOutcome::Cancelled);
        }
    };
    let elapsed = started.elapsed();
    let tail = log_task.await.unwrap_or_default();
    if code != 0 {
        return Ok(RunOutcome::Failed { code, tail });
    }
    Ok(RunOutcome::Exited {
        container: id,
        elapsed,
    })
}

/// Fills the volumes a RUN's mounts show, through a helper container (never started)
/// that mounts them read-write.
pub async fn fill_volumes(
    daemon: &Daemon,
    res: &Resources,
    helper_image: &str,
    prep: Vec<MountPrep>,
    ctx: Arc<dyn coordinator::task::ContextFiles>,
) -> Result<(), StageError> {
    if prep.is_empty() {
        return Ok(());
    }
    let mut mounts = Vec::new();
    for (i, p) in prep.iter().enumerate() {
        let MountPrep::Fill { volume, .. } = p;
        mounts.push(volume_mount(&format!("/v{i}"), volume, false));
    }
    let helper = daemon
        .create(
            ContainerCreateBody {
                image: Some(helper_image.to_string()),
                host_config: Some(HostConfig {
                    mounts: Some(mounts),
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            res,
        )
        .await?;
    for (i, p) in prep.into_iter().enumerate() {
        let at = format!("/v{i}");
        let MountPrep::Fill { nodes, .. } = p;
        let ctx = ctx.clone();
        let tar = tokio::task::spawn_blocking(move || {
            super::tree::write_tar(Vec::new(), &nodes, ctx.as_ref())
        })
        .await
        .map_err(|e| StageError::new(format!("build mount archive: {e}")))?
        .map_err(|e| StageError::new(format!("build mount archive: {e}")))?;
        daemon.upload(&helper, &at, tar).await?;
    }
    Ok(())
}
