//! `dbuild coordinator`, `dbuild worker` and `dbuild workers`: running and inspecting a farm.
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use proto::v1::ListWorkersRequest;
use tokio_util::sync::CancellationToken;
use wire::Clients;
use worker::farm::{run_worker, WorkerConfig};

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Where the coordinator keeps its index (`index/`), blobs (`blobs/`) and locks.
    #[arg(long, env = "DBUILD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Require this bearer token on every RPC.
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Cap on the stage cache (e.g. 50GB, 200GiB): least recently used stages are
    /// evicted past it. Default: 10% of the data dir's filesystem.
    #[arg(long, value_name = "SIZE")]
    pub cache_max_size: Option<String>,
}

/// 10% of the filesystem holding `dir` (BuildKit's default GC share), at least 1 GiB.
pub fn default_cache_max(dir: &std::path::Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    Some((total / 10).max(1 << 30))
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The coordinator's URL, e.g. http://10.0.0.5:7700.
    #[arg(long, env = "DBUILD_COORDINATOR")]
    pub coordinator: String,
    /// This worker's name (unique in the farm).
    #[arg(long)]
    pub name: String,
    /// Stages run at the same time (default: one per CPU of the daemon's host).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Local blob cache and scratch space.
    #[arg(long, env = "DBUILD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The Docker daemon this worker drives.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Most bytes of stage images to keep on the daemon (e.g. 20GB); least recently used
    /// go first. `0` keeps everything.
    #[arg(long, value_name = "SIZE", default_value = "20GB")]
    pub image_cap: String,
}

#[derive(clap::Args)]
pub struct WorkersArgs {
    #[arg(
        long,
        env = "DBUILD_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Cancelled on Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send to stop).
fn ctrl_c_token() -> CancellationToken {
    let t = CancellationToken::new();
    let c = t.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        // Cancel safe: the first signal wins and the process is stopping; the other
        // branch's dropped future only unregisters its signal listener.
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        c.cancel();
    });
    t
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating {}", args.data_dir.display()))?;
        let listener = coordinator::service::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Scripts and tests wait for this line.
        println!("dbuild coordinator listening on {addr}");
        std::io::stdout().flush()?;
        let stop = ctrl_c_token();
        let cache_max_bytes = match &args.cache_max_size {
            Some(s) => Some(
                coordinator::cache::parse_size(s)
                    .map_err(|e| anyhow::anyhow!("--cache-max-size: {e}"))?,
            ),
            None => default_cache_max(&args.data_dir),
        };
        let opts = coordinator::service::ServeOptions {
            token: args.token,
            cache_max_bytes,
        };
        coordinator::service::serve(listener, &args.data_dir, opts, async move {
            stop.cancelled().await
        })
        .await?;
        Ok(())
    })
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating {}", args.data_dir.display()))?;
        let address = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let image_cap = coordinator::cache::parse_size(&args.image_cap)
            .map_err(|e| anyhow::anyhow!("--image-cap: {e}"))?;
        let cfg = WorkerConfig {
            image_cap: (image_cap > 0).then_some(image_cap),
            coordinator: args.coordinator,
            name: args.name,
            slots: args.slots.map(|n| n.max(1)),
            data_dir: args.data_dir,
            docker_host: args.docker_host,
            token: args.token,
            address,
        };
        run_worker(cfg, ctrl_c_token()).await?;
        Ok(())
    })
}

pub fn workers(args: WorkersArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut clients = Clients::connect(&args.coordinator, args.token).await?;
        let list = clients
            .builds
            .list_workers(ListWorkersRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?
            .into_inner()
            .workers;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:<20} {:<24} {:>5} {:>7}  STATE",
            "NAME", "ADDRESS", "SLOTS", "RUNNING"
        )?;
        for w in list {
            writeln!(
                out,
                "{:<20} {:<24} {:>5} {:>7}  {}",
                w.name, w.address, w.slots, w.running, w.state
            )?;
        }
        Ok(())
    })
}
