//! `dbuild submit`: the flags of `docker build`, run by the embedded scheduler and the
//! local Docker executor (one process, the same pieces a farm runs).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use coordinator::build::{BuildOptions, Session};
use coordinator::cache::StageCache;
use coordinator::scheduler::BuildError;
use coordinator::store::Store;
use model::ids::BuildId;
use model::task::{BuildInputs, Executor, LocalContext};
use tokio_util::sync::CancellationToken;

use super::history::{dockerfile_id, open_index};
use super::spec::{data_dir, BuildSpec};
use crate::output::{self, Output};
use crate::progress::{self, ProgressMode};

#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub spec: BuildSpec,
    /// Name and optionally a tag for the final image (repeatable).
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// A secret for RUN --mount=type=secret: id=ID,src=PATH (or env=VAR).
    #[arg(long = "secret", value_name = "id=ID,src=PATH")]
    pub secrets: Vec<String>,
    /// Run every instruction again, reusing nothing (results are still stored).
    #[arg(long)]
    pub no_cache: bool,
    /// Build these stages (names or indexes, comma-separated or repeated) without
    /// looking them up; their results are still stored.
    #[arg(
        long = "no-cache-filter",
        value_name = "STAGE,...",
        value_delimiter = ','
    )]
    pub no_cache_filter: Vec<String>,
    /// Pull base images even when the daemon has them.
    #[arg(long)]
    pub pull: bool,
    /// auto, plain, tty or json (one event object per line on stdout).
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// type=docker (default: load into the local daemon), type=tar,dest=PATH, type=none.
    #[arg(short = 'o', long = "output", default_value = "type=docker")]
    pub output: String,
    /// Write the final image id to this file.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Stages built at the same time (default: every ready stage, up to 64).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Network for RUN instructions: default, none or host (as `docker build --network`).
    #[arg(long, default_value = "default", value_parser = ["default", "none", "host"])]
    pub network: String,
    /// Docker daemon to build on (default: DOCKER_HOST or the local socket).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Build on a farm: the coordinator's URL. Without it, dbuild runs an embedded
    /// coordinator and one worker on the local daemon.
    #[arg(long, env = "DBUILD_COORDINATOR")]
    pub coordinator: Option<String>,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `--secret id=ID,src=PATH` / `id=ID,env=VAR` → id → bytes.
pub(crate) fn read_secrets(raw: &[String]) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for spec in raw {
        let mut id = None;
        let mut src = None;
        let mut env = None;
        for field in spec.split(',') {
            match field.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", "file" | "env")) => {}
                _ => bail!("--secret {spec:?}: expected id=ID,src=PATH or id=ID,env=VAR"),
            }
        }
        let id = match (id, &src, &env) {
            (Some(id), _, _) => id,
            (None, Some(p), _) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            (None, None, Some(e)) => e.clone(),
            _ => bail!("--secret {spec:?}: give id=ID"),
        };
        let bytes = match (src, env) {
            (Some(p), _) => std::fs::read(&p)
                .with_context(|| format!("--secret id={id}: cannot read {}", p.display()))?,
            (None, Some(e)) => std::env::var(&e)
                .with_context(|| format!("--secret id={id}: environment variable {e} is not set"))?
                .into_bytes(),
            (None, None) => std::env::var(&id)
                .with_context(|| format!("--secret id={id}: give src=PATH or env=VAR"))?
                .into_bytes(),
        };
        out.insert(id, bytes);
    }
    Ok(out)
}

pub fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(submit(&args)).map(|_| ())
}

/// `--jobs` when not given: every ready stage, as BuildKit runs every ready step. Stage
/// work waits on the daemon (containers, image writes), not on this process's CPU, so
/// the number of cores is no limit to aim for; the cap keeps a Dockerfile of hundreds of
/// independent stages from starting hundreds of containers at once.
pub const DEFAULT_JOBS: usize = 64;

/// What a successful build did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub built: usize,
    pub cached: usize,
}

/// Builds as `dbuild submit` does (on the farm with a coordinator, else embedded).
pub async fn submit(args: &SubmitArgs) -> anyhow::Result<Summary> {
    let output = Output::parse(&args.output)?;
    let dockerfile = args.spec.dockerfile();
    let secrets = read_secrets(&args.secrets)?;
    let context_dir = args.spec.context.clone();
    let analysis = tokio::task::block_in_place(|| args.spec.analyze())?;
    if let Some(url) = args.coordinator.clone() {
        return super::remote::submit(args, &url, &dockerfile, analysis, secrets, &output).await;
    }

    let data = data_dir(args.spec.data_dir.clone());
    let local = Arc::new(
        worker::DockerExecutor::connect(args.docker_host.as_deref(), "local")
            .await
            .context("connecting to the Docker daemon")?
            .with_scratch_dir(&data.join("tmp"))
            .with_park_dir(&data.join(worker::executor::park::DIR)),
    );
    let jobs = args.jobs.unwrap_or(DEFAULT_JOBS);
    let mut session = Session::new(Arc::clone(&local) as Arc<dyn Executor>, jobs)
        .with_single_flight(data.join("locks"));
    // The stage cache shares the index with the history; another dbuild holding the
    // index means this build neither counts nor records (the daemon's images still hit).
    let history = open_index(&data);
    if let Some(index) = &history {
        session = session.with_history(Arc::clone(index) as Arc<dyn Store>);
        match StageCache::new(Arc::clone(index) as Arc<dyn Store>, None) {
            Ok(c) => session = session.with_cache(Arc::new(c)).with_cap(cache_cap()),
            Err(e) => tracing::warn!(error = %e, "stage cache unavailable for this build"),
        }
    }
    let options = BuildOptions {
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        pull: args.pull,
        network: args.network.parse()?,
        export_target_image: false,
    };
    let prepared = session
        .prepare(
            |target| BuildId(format!("{}-{}", std::process::id(), target.to_hex())),
            analysis.plan,
            analysis.manifest,
            &options,
        )
        .await?;
    let plan = Arc::clone(&prepared.request.plan);
    let history_id = dockerfile_id(&dockerfile);
    let why = history
        .as_ref()
        .map(|h| prepared.why_rebuilt(&**h, &history_id))
        .unwrap_or_default();
    let inputs = BuildInputs {
        manifest: Arc::clone(&prepared.manifest),
        context: Arc::new(LocalContext { root: context_dir }),
        secrets: Arc::new(secrets),
    };
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let renderer = tokio::spawn(progress::render(
        args.progress,
        Arc::clone(&plan),
        why,
        events_rx,
    ));
    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    let result = session
        .run(&prepared, inputs, Some(&history_id), events_tx, cancel)
        .await;
    // Stage images are written in the background; all of them are on the daemon before
    // the output reads one or the process ends (a failed build keeps what it built).
    let written = local.settle_all().await;
    let _ = renderer.await;
    let ran = match result {
        Ok(o) => o,
        Err(BuildError::Cancelled) => bail!("build cancelled"),
        Err(BuildError::Stage { name, error, .. }) => {
            bail!(failure_message(
                &name,
                &dockerfile,
                error.line,
                &error.message,
                &error.log_tail
            ))
        }
    };
    let outcome = ran.outcome;
    written.map_err(|e| anyhow::anyhow!(e.message))?;
    // A target found in the cache may be parked (built before as a stage only copied
    // from): the output needs it on the daemon.
    if output != crate::output::Output::None {
        local
            .settle(&outcome.image_id)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    output::deliver(
        args.docker_host.as_deref(),
        &output,
        &outcome.image_id,
        &args.tags,
    )
    .await?;
    if let Some(path) = &args.iidfile {
        std::fs::write(path, &outcome.image_id)
            .with_context(|| format!("writing --iidfile {}", path.display()))?;
    }
    // The cap evicted these records after the build; their images go from the daemon.
    if let Some(report) = &ran.evicted {
        if let Err(e) =
            super::cache::remove_images(args.docker_host.as_deref(), &data, report).await
        {
            tracing::warn!(error = %e, "could not remove the images of evicted stages");
        }
    }
    Ok(Summary {
        built: outcome.results.len(),
        cached: outcome.cached.len(),
    })
}

/// The embedded cache's cap (`DBUILD_CACHE_MAX_SIZE`, default 20GB; `0` for none): past
/// it, the least recently used stages go, records and daemon images, as `dbuild cache
/// prune --keep-storage` would do. Sizes are the stage images' own sizes on the daemon.
fn cache_cap() -> u64 {
    match std::env::var("DBUILD_CACHE_MAX_SIZE") {
        Ok(s) => match coordinator::cache::parse_size(&s) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "DBUILD_CACHE_MAX_SIZE ignored");
                0
            }
        },
        Err(_) => 20_000_000_000,
    }
}

/// The one message a failed build ends with: stage, Dockerfile line, error, last log lines.
pub(crate) fn failure_message(
    stage: &str,
    dockerfile: &std::path::Path,
    line: Option<usize>,
    error: &str,
    log_tail: &[String],
) -> String {
    let mut msg = format!("stage {stage} failed");
    if let Some(line) = line {
        msg.push_str(&format!(" at {}:{line}", dockerfile.display()));
    }
    msg.push_str(&format!(": {error}"));
    if !log_tail.is_empty() {
        msg.push_str("\n--- last lines of its log ---\n");
        msg.push_str(&log_tail.join("\n"));
    }
    msg
}
