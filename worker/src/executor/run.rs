//! RUN: the command line BuildKit would run (shell form, exec form, heredocs), and running
//! it with output streamed and cancellation honoured (its mounts: `mounts.rs`; its
//! environment: `vars.rs`).
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig, Mount as DockerMount};
use model::frontend::instructions::{HeredocBody, Run};
use model::frontend::parser::{chomp_heredoc_content, parse_heredoc};
use model::task::{StageError, StageLog};
use tokio_util::sync::CancellationToken;

use super::config::ImageConfig;
use crate::daemon::{Daemon, Resources};

/// How many output lines a failed RUN reports.
const TAIL_LINES: usize = 20;

/// Locks for `sharing=locked` cache mounts, by volume name.
pub type CacheLocks = Arc<parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

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

/// The `/etc/hosts` Docker writes for a container without a network.
const HOSTS_NONE: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
    fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
    ff02::2\tip6-allrouters\n";

/// A `--network=none` container without the daemon's network sandbox, and the files it
/// bind-mounts, or `None` when that does not apply.
///
/// For network mode `none` the daemon still sets up a sandbox (a network namespace and
/// the `/etc/hosts` and `/etc/resolv.conf` it bind-mounts), which is half of a
/// container's start: 0.19 s of 0.29 here, and more when six start at once. With
/// `NetworkDisabled` the runtime gives the container a fresh namespace with only its
/// loopback up, which is what `none` means; the two files are then bind-mounted from
/// the worker's scratch directory, with what the daemon would have written. Only beside
/// the daemon (it must see the files), and only when no mount of the RUN's own is at
/// those paths.
fn sandbox_free(
    daemon: &Daemon,
    body: &ContainerCreateBody,
) -> Option<(tempfile::TempDir, ContainerCreateBody)> {
    let hc = body.host_config.as_ref()?;
    if hc.network_mode.as_deref() != Some("none") || !daemon.scratch_visible.load(Ordering::Relaxed)
    {
        return None;
    }
    const FILES: [&str; 2] = ["/etc/hosts", "/etc/resolv.conf"];
    let taken = |t: &str| {
        FILES
            .iter()
            .any(|f| t == *f || f.starts_with(&format!("{t}/")))
    };
    let own = hc
        .mounts
        .iter()
        .flatten()
        .filter_map(|m| m.target.as_deref());
    let tmpfs = hc.tmpfs.iter().flat_map(|t| t.keys().map(String::as_str));
    if own
        .chain(tmpfs)
        .any(|t| taken(t.trim_end_matches('/')) || t == "/")
    {
        return None;
    }
    let write = || -> std::io::Result<tempfile::TempDir> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&daemon.scratch)?;
        let dir = tempfile::Builder::new()
            .prefix("dbuild-net-")
            .tempdir_in(&daemon.scratch)?;
        let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        for (name, data) in [("hosts", HOSTS_NONE.as_bytes()), ("resolv.conf", &resolv)] {
            let p = dir.path().join(name);
            std::fs::write(&p, data)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(dir)
    };
    let dir = write()
        .map_err(|e| tracing::debug!(error = %e, "cannot write a RUN's network files"))
        .ok()?;
    let mut fast = body.clone();
    fast.network_disabled = Some(true);
    let hc = fast.host_config.get_or_insert_with(Default::default);
    let mounts = hc.mounts.get_or_insert_with(Vec::new);
    for (name, target) in [("hosts", FILES[0]), ("resolv.conf", FILES[1])] {
        mounts.push(DockerMount {
            target: Some(target.to_string()),
            source: Some(dir.path().join(name).to_string_lossy().into_owned()),
            typ: Some(bollard::models::MountType::BIND),
            ..Default::default()
        });
    }
    Some((dir, fast))
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
        // Reset: the image may be the state's own, with its entrypoint.
        entrypoint: Some(Vec::new()),
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
    // Only beside the daemon (which must see the files) are they written at all.
    let fast = if daemon.beside_daemon().await {
        sandbox_free(daemon, &body)
    } else {
        None
    };
    let id = match fast {
        Some((files, fast)) => {
            match daemon.create(fast, res).await {
                Ok(id) => {
                    // Kept until the container is removed: every archive read of it
                    // mounts these files again.
                    res.keep_dir(files);
                    id
                }
                Err(e) => {
                    // Most likely the daemon cannot see the scratch directory.
                    tracing::debug!(error = %e.message, "no RUN without a network sandbox here");
                    let id = daemon.create(body, res).await?;
                    // The same container without the scratch bind mounts was made: those
                    // were what the daemon refused, so later RUNs skip them.
                    daemon.scratch_visible.store(false, Ordering::Relaxed);
                    id
                }
            }
        }
        _ => daemon.create(body, res).await?,
    };
    if cancel.is_cancelled() {
        return Ok(RunOutcome::Cancelled);
    }
    let started = Instant::now();
    daemon.start(&id).await?;
    let log_task = {
        let daemon = daemon.clone();
        let id = id.clone();
        let logs = logs.clone();
        tokio::spawn(async move {
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
            daemon
                .follow_logs(&id, |out| {
                    let err = matches!(out, bollard::container::LogOutput::StdErr { .. });
                    let buf = partial.entry(err).or_default();
                    buf.push_str(&String::from_utf8_lossy(out.as_ref()));
                    while let Some(pos) = buf.find('\n') {
                        let line: String = buf.drain(..=pos).collect();
                        push(line.trim_end_matches(['\n', '\r']).to_string(), &mut tail);
                    }
                })
                .await;
            for (_, rest) in partial {
                if !rest.is_empty() {
                    push(rest, &mut tail);
                }
            }
            tail.into_iter().collect::<Vec<_>>()
        })
    };
    // Cancel safe: when the cancel branch wins, the dropped `daemon.wait` only stops
    // waiting (the container is killed here and removed by the stage's cleanup); when
    // the wait wins, the dropped `cancelled()` loses nothing (the token stays cancelled).
    let code = tokio::select! {
        r = daemon.wait(&id) => r?,
        _ = cancel.cancelled() => {
            let _ = daemon.kill(&id).await;
            log_task.abort();
            return Ok(RunOutcome::Cancelled);
        }
    };
    let elapsed = started.elapsed();
    tracing::debug!(ms = elapsed.as_secs_f64() * 1000.0, "run start+wait");
    let tail = log_task.await.unwrap_or_default();
    if code != 0 {
        return Ok(RunOutcome::Failed { code, tail });
    }
    Ok(RunOutcome::Exited {
        container: id,
        elapsed,
    })
}
