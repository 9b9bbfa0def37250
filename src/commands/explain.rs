//! `dbuild explain`: for every stage the target needs, hit or miss, and for a miss what
//! differs from the most recent build of the same stage of the same Dockerfile. Embedded
//! (the local daemon's images and `<data-dir>/index`), or with `--coordinator` the farm's
//! stage cache and history (the coordinator plans, pins and keys; nothing is uploaded).
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use coordinator::cache::StageCache;
use coordinator::explain::{explain as explain_build, Explanation, Lookup, StageLookup};
use coordinator::store::Store;
use model::keys::StageKey;
use model::task::Executor;

use super::history::{dockerfile_id, open_index};
use super::spec::{data_dir, BuildSpec};
use crate::output::Output;

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub spec: BuildSpec,
    /// Docker daemon that pins the base images (as submit does).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Explain against a farm: the coordinator's URL (its stage cache and build history;
    /// a worker pins the base images). Without it, the embedded build's.
    #[arg(long, env = "DBUILD_COORDINATOR")]
    pub coordinator: Option<String>,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The output the build would have (as submit's --output): on a farm the target is a
    /// hit only when its cached result holds what that output needs.
    #[arg(short = 'o', long = "output", default_value = "type=docker")]
    pub output: String,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(explain(args))
}

async fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let output = Output::parse(&args.output)?;
    let analysis = tokio::task::block_in_place(|| args.spec.analyze())?;
    let explanation = match &args.coordinator {
        Some(url) => {
            super::remote::explain(
                url,
                args.token.clone(),
                &args.spec,
                &analysis,
                output != Output::None,
            )
            .await?
        }
        None => embedded(&args, &analysis).await?,
    };
    let mut out = std::io::stdout().lock();
    for line in explanation.lines() {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Against the local daemon and `<data-dir>/index`, keyed as `submit` keys.
async fn embedded(
    args: &ExplainArgs,
    analysis: &model::analysis::Analysis,
) -> anyhow::Result<Explanation> {
    let data = data_dir(args.spec.data_dir.clone());
    // Stages the embedded build parked count as they do for `submit`.
    let executor: Arc<dyn Executor> = Arc::new(
        worker::DockerExecutor::connect(args.docker_host.as_deref(), "local")
            .await
            .context("connecting to the Docker daemon (explain pins base images as submit does)")?
            .with_park_dir(&data.join(worker::executor::park::DIR)),
    );
    let (pinned, keys) =
        coordinator::build::pin_and_key(&*executor, &analysis.plan, &analysis.manifest, false)
            .await?;
    let index = open_index(&data).context("the build history (<data-dir>/index) is unavailable")?;
    let cache = StageCache::new(Arc::clone(&index) as Arc<dyn Store>, None)
        .context("opening the stage cache")?;
    let lookup = DaemonLookup { executor, cache };
    Ok(explain_build(
        &analysis.plan,
        &analysis.manifest,
        &pinned,
        &keys,
        &*index,
        &dockerfile_id(&args.spec.dockerfile()),
        &lookup,
    )
    .await)
}

/// The embedded build's lookup: a hit is a stage image the daemon still holds. The
/// contents its consumers are keyed on come from its cache record, else from the image.
struct DaemonLookup {
    executor: Arc<dyn Executor>,
    cache: StageCache,
}

#[async_trait::async_trait]
impl StageLookup for DaemonLookup {
    async fn lookup(&self, _stage: usize, key: &StageKey, paths: &[String]) -> Lookup {
        let Some(image) = self.executor.stage_image(key).await else {
            return Lookup::Miss;
        };
        // The record's contents describe its image: only if that is the one the daemon holds.
        let mut have: BTreeMap<String, String> = self
            .cache
            .get(key)
            .ok()
            .flatten()
            .filter(|r| r.image_id == image)
            .map(|r| r.contents)
            .unwrap_or_default();
        coordinator::scheduler::fill_contents(&*self.executor, &image, &mut have, paths).await;
        Lookup::Hit(have)
    }
}
