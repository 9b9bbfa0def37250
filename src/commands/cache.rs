//! `dbuild cache ls|stats|prune`: the stage cache of a coordinator (`--coordinator`) or of
//! the embedded build (`<data-dir>/index`; pruning it also removes the stage images from
//! the local daemon).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use coordinator::cache::{
    parse_duration, parse_size, CacheStats, PruneOptions, PruneReport, StageCache, StageRecord,
    StageRecords,
};
use coordinator::store::Store;
use proto::v1::{CacheListRequest, CacheStatsRequest, Document};
use wire::{document, from_document};

use super::spec::data_dir;

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
    /// A farm's coordinator; without it, the embedded build's cache.
    #[arg(long, env = "DBUILD_COORDINATOR", global = true)]
    pub coordinator: Option<String>,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The embedded build's data dir (default: the user's cache directory).
    #[arg(long, env = "DBUILD_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Docker daemon of the embedded build (its stage images are removed on prune).
    #[arg(long, env = "DOCKER_HOST", global = true)]
    pub docker_host: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Subcommand)]
pub enum CacheCommand {
    /// One line per cached stage, most recently used first.
    Ls,
    /// Entries, bytes, hit ratio, bytes and build time saved.
    Stats,
    /// Remove stages, least recently used first, with the blobs only they use.
    Prune {
        /// Keep at most this much (e.g. 10GB, 512MiB).
        #[arg(long, value_name = "SIZE")]
        keep_storage: Option<String>,
        /// Remove stages unused for this long (e.g. 24h, 7d).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Remove everything.
        #[arg(long)]
        all: bool,
    },
}

/// The cache, wherever it lives.
enum Target {
    Farm(wire::client::Cache),
    /// The index, the Docker host and the data directory (where parked images live).
    Local(Arc<StageCache>, Option<String>, PathBuf),
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(cache(args))
}

fn parse<T: wire::Doc>(d: Document) -> anyhow::Result<T> {
    from_document(Some(&d)).map_err(|s| anyhow::anyhow!("{}", s.message()))
}

async fn cache(args: CacheArgs) -> anyhow::Result<()> {
    let target = match &args.coordinator {
        Some(url) => Target::Farm(wire::Clients::connect(url, args.token.clone()).await?.cache),
        None => {
            let dir = data_dir(args.data_dir.clone());
            let index =
                coordinator::store::SledStore::open(&dir.join("index")).with_context(|| {
                    format!(
                        "opening the cache in {} (is a build running?)",
                        dir.display()
                    )
                })?;
            let cache = StageCache::new(Arc::new(index) as Arc<dyn Store>, None)?;
            Target::Local(Arc::new(cache), args.docker_host.clone(), dir)
        }
    };
    match args.command {
        CacheCommand::Ls => {
            let list: Vec<StageRecord> = match &target {
                Target::Farm(c) => {
                    parse::<StageRecords>(c.clone().list(CacheListRequest {}).await?.into_inner())?
                        .0
                }
                Target::Local(c, _, _) => c.list()?,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<14} {:<20} {:>10} {:>8} {:>5}  {:<20} HOLDERS",
                "KEY", "STAGE", "SIZE", "BUILD", "HITS", "LAST USED"
            );
            for r in &list {
                println!(
                    "{:<14} {:<20} {:>10} {:>7.1}s {:>5}  {:<20} {}",
                    &r.key[..12.min(r.key.len())],
                    r.name,
                    human(r.size),
                    r.duration_ms as f64 / 1000.0,
                    r.hits,
                    ago(r.last_used_ms),
                    r.holders.iter().cloned().collect::<Vec<_>>().join(",")
                );
            }
        }
        CacheCommand::Stats => {
            let s: CacheStats = match &target {
                Target::Farm(c) => {
                    parse(c.clone().stats(CacheStatsRequest {}).await?.into_inner())?
                }
                Target::Local(c, _, _) => c.stats()?,
            };
            if args.json {
                let mut v = serde_json::to_value(&s)?;
                v["hit_ratio"] = serde_json::json!(s.hit_ratio());
                println!("{v}");
                return Ok(());
            }
            println!("entries      {}", s.entries);
            println!("size         {}", human(s.bytes));
            println!("hits         {}", s.hits);
            println!("builds       {}", s.misses);
            println!("hit ratio    {:.1}%", s.hit_ratio() * 100.0);
            println!("bytes saved  {}", human(s.bytes_saved));
            println!("time saved   {:.1}s", s.time_saved_ms as f64 / 1000.0);
        }
        CacheCommand::Prune {
            keep_storage,
            older_than,
            all,
        } => {
            let opts = PruneOptions {
                keep_bytes: keep_storage
                    .map(|s| parse_size(&s).map_err(|e| anyhow::anyhow!("--keep-storage: {e}")))
                    .transpose()?,
                older_than: older_than
                    .map(|s| parse_duration(&s).map_err(|e| anyhow::anyhow!("--older-than: {e}")))
                    .transpose()?,
                all,
            };
            anyhow::ensure!(
                opts.all || opts.keep_bytes.is_some() || opts.older_than.is_some(),
                "say what to prune: --keep-storage SIZE, --older-than DURATION or --all"
            );
            let report: PruneReport = match &target {
                Target::Farm(c) => parse(c.clone().prune(document(&opts)).await?.into_inner())?,
                Target::Local(c, host, dir) => {
                    let report = c.prune(&opts)?;
                    remove_images(host.as_deref(), dir, &report).await?;
                    report
                }
            };
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            }
            println!(
                "removed {} stages, {} blobs, {} freed",
                report.removed.len(),
                report.blobs_removed,
                human(report.bytes_freed)
            );
        }
    }
    Ok(())
}

/// Removes the daemon images of pruned embedded stages (tags another record still
/// names are kept), and those parked under the data directory `data`.
pub(crate) async fn remove_images(
    host: Option<&str>,
    data: &Path,
    report: &PruneReport,
) -> anyhow::Result<()> {
    if report.removed.is_empty() {
        return Ok(());
    }
    let tags: Vec<String> = report.removed.iter().flat_map(|r| r.tags.clone()).collect();
    let parked = data.join(worker::executor::park::DIR);
    if let Err(e) = worker::executor::park::Parked::open(&parked).and_then(|p| p.forget(&tags)) {
        tracing::warn!(error = %e, "could not remove the parked images of pruned stages");
    }
    let daemon = crate::output::connect(host).await?;
    for r in &report.removed {
        for tag in &r.tags {
            match daemon.remove_image(tag, true).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                // In use by a container or another tag's child: it stays, the record is gone.
                Err(e) => tracing::warn!(tag, error = %e, "could not remove a pruned stage image"),
            }
        }
    }
    Ok(())
}

pub fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn ago(ms: u64) -> String {
    let now = coordinator::cache::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}
