//! `dbuild explain`: for every stage the target needs, hit or miss, and for a miss what
//! differs from the most recent build of the same stage of the same Dockerfile.
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
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
    let (_, keys) = super::submit::pin_and_key(&*executor, &analysis, false).await?;
    let index = open_index(&data_dir(args.spec.data_dir.clone()))
        .context("the build history (<data-dir>/index) is unavailable")?;
    let id = dockerfile_id(&args.spec.dockerfile());
    let why = why_rebuilt(&index, &id, &analysis.plan, &keys);
    let mut out = std::io::stdout().lock();
    for s in analysis
        .plan
        .stages
        .iter()
        .filter(|s| analysis.plan.built[s.index])
    {
        let k = &keys[s.index];
        let hit = executor.stage_image(&k.key).await.is_some();
        let label = format!("#{} {}", s.index, s.display_name());
        if hit {
            writeln!(out, "{label}: hit ({})", &k.key.to_hex()[..12])?;
            continue;
        }
        writeln!(out, "{label}: miss ({})", &k.key.to_hex()[..12])?;
        for r in &why[&s.index] {
            writeln!(out, "  - {r}")?;
        }
    }
    Ok(())
}
