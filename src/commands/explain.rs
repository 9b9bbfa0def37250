//! `dbuild explain`: for every stage the target needs, hit or miss, and for a miss what
//! differs from the most recent build of the same stage of the same Dockerfile.
use std::io::Write;
use std::sync::Arc;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use coordinator::cache::StageCache;
use coordinator::frontend::plan::StageRef;
use coordinator::keys::{content_paths, rekey_stage};
use coordinator::store::Store;
use coordinator::task::Executor;

use super::history::{dockerfile_id, open_index, why_rebuilt};
use super::spec::{data_dir, BuildSpec};

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub spec: BuildSpec,
    /// Docker daemon that pins the base images (as submit does).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(explain(args))
}

async fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let analysis = tokio::task::block_in_place(|| args.spec.analyze())?;
    let executor: Arc<dyn Executor> = Arc::new(
        worker::DockerExecutor::connect(args.docker_host.as_deref(), "local")
            .await
            .context("connecting to the Docker daemon (explain pins base images as submit does)")?,
    );
    let (pinned, keys) = super::submit::pin_and_key(&*executor, &analysis, false).await?;
    let index = open_index(&data_dir(args.spec.data_dir.clone()))
        .context("the build history (<data-dir>/index) is unavailable")?;
    let cache = StageCache::new(Arc::clone(&index) as Arc<dyn Store>, None)
        .context("opening the stage cache")?;
    let id = dockerfile_id(&args.spec.dockerfile());
    let why = why_rebuilt(&index, &id, &analysis.plan, &keys);
    let plan = &analysis.plan;
    let paths = content_paths(plan);
    // Keyed as submit keys them: a stage that copies from a cached stage is keyed on the
    // content it copies, which the cache record (or the image) tells.
    let mut keys = keys;
    let mut contents: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
    let mut missed: BTreeSet<usize> = BTreeSet::new();
    let mut out = std::io::stdout().lock();
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        let i = s.index;
        keys[i] = rekey_stage(plan, i, &keys, &analysis.manifest, &pinned, &contents);
        let key = keys[i].key;
        let label = format!("#{i} {}", s.display_name());
        if let Some(image) = executor.stage_image(&key).await {
            writeln!(out, "{label}: hit ({})", &key.to_hex()[..12])?;
            let want: Vec<String> = paths.get(&i).into_iter().flatten().cloned().collect();
            let mut have = cache
                .get(&key)
                .ok()
                .flatten()
                .map(|r| r.contents)
                .unwrap_or_default();
            let lacking: Vec<String> = want
                .into_iter()
                .filter(|p| !have.contains_key(p))
                .collect();
            if !lacking.is_empty() {
                have.extend(executor.contents(&image, &lacking).await);
            }
            contents.insert(i, have);
            continue;
        }
        missed.insert(i);
        // Stages this one only copies from, which will be rebuilt: if they make the same
        // files again, this stage's key (on their content) is one already built.
        let pending: Vec<String> = s
            .depends_on
            .iter()
            .filter(|d| missed.contains(d) && s.base != StageRef::Stage(**d))
            .filter(|d| paths.contains_key(d))
            .map(|d| plan.stages[*d].display_name())
            .collect();
        if pending.is_empty() {
            writeln!(out, "{label}: miss ({})", &key.to_hex()[..12])?;
        } else {
            writeln!(
                out,
                "{label}: miss ({}), unless stage {} rebuilds the files copied from it unchanged",
                &key.to_hex()[..12],
                pending.join(", ")
            )?;
        }
        for r in &why[&i] {
            writeln!(out, "  - {r}")?;
        }
    }
    Ok(())
}
