//! `dbuild warm`: builds for the cache-warming cron job. Each entry (a context given on the
//! command line, or a `[[build]]` table of a TOML file) is built with output none; a
//! summary line per entry says what was cached, built or failed; any failure makes the
//! exit status non-zero after every entry has been tried.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::spec::BuildSpec;
use super::submit::{submit, SubmitArgs};
use crate::progress::ProgressMode;

#[derive(clap::Args)]
pub struct WarmArgs {
    /// Build contexts to warm (each with its Dockerfile and the last stage).
    pub contexts: Vec<PathBuf>,
    /// A TOML file of builds: `[[build]]` tables with `context`, and optionally
    /// `dockerfile` (relative to the file), `target` and `build_args` (a table).
    #[arg(long = "file", short = 'f', value_name = "TOML")]
    pub file: Option<PathBuf>,
    /// auto, plain, tty or json (json: the build events, then one `warm_entry` object per
    /// entry, on stdout).
    #[arg(long, value_enum, default_value = "plain")]
    pub progress: ProgressMode,
    /// A farm's coordinator; without it, the embedded build on the local daemon.
    #[arg(long, env = "DBUILD_COORDINATOR")]
    pub coordinator: Option<String>,
    #[arg(long, env = "DBUILD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, env = "DBUILD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Stages built at the same time (embedded builds).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// One `[[build]]` of the TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    context: PathBuf,
    dockerfile: Option<PathBuf>,
    target: Option<String>,
    #[serde(default)]
    build_args: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmFile {
    #[serde(default)]
    build: Vec<Entry>,
}

fn read_file(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: WarmFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {} (expected [[build]] tables with context, dockerfile, target, build_args)",
            path.display(),
            e.to_string().trim()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(f.build
        .into_iter()
        .map(|mut e| {
            e.context = base.join(&e.context);
            e.dockerfile = e.dockerfile.map(|d| base.join(d));
            e
        })
        .collect())
}

pub fn run(args: WarmArgs) -> anyhow::Result<()> {
    let mut entries: Vec<Entry> = args
        .contexts
        .iter()
        .map(|c| Entry {
            context: c.clone(),
            dockerfile: None,
            target: None,
            build_args: BTreeMap::new(),
        })
        .collect();
    if let Some(f) = &args.file {
        entries.extend(read_file(f)?);
    }
    if entries.is_empty() {
        bail!("nothing to warm: give build contexts or --file builds.toml");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let json = args.progress == ProgressMode::Json;
    let mut failed = 0;
    for e in &entries {
        let label = match &e.target {
            Some(t) => format!("{} (target {t})", e.context.display()),
            None => e.context.display().to_string(),
        };
        let sub = SubmitArgs {
            spec: BuildSpec {
                context: e.context.clone(),
                file: e.dockerfile.clone(),
                target: e.target.clone(),
                build_args: e
                    .build_args
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
                data_dir: args.data_dir.clone(),
            },
            tags: Vec::new(),
            secrets: Vec::new(),
            no_cache: false,
            no_cache_filter: Vec::new(),
            pull: false,
            progress: args.progress,
            output: "type=none".into(),
            iidfile: None,
            jobs: args.jobs,
            network: "default".into(),
            docker_host: args.docker_host.clone(),
            coordinator: args.coordinator.clone(),
            token: args.token.clone(),
        };
        let started = Instant::now();
        let result = runtime.block_on(submit(&sub));
        let secs = started.elapsed().as_secs_f64();
        let line = match &result {
            Ok(s) => {
                if json {
                    serde_json::json!({"event": "warm_entry", "context": e.context, "target": e.target,
                        "ok": true, "cached": s.cached, "built": s.built, "failed": 0, "seconds": secs})
                    .to_string()
                } else {
                    format!(
                        "warm {label}: {} stages cached, {} built, 0 failed in {secs:.1}s",
                        s.cached, s.built
                    )
                }
            }
            Err(err) => {
                failed += 1;
                if json {
                    serde_json::json!({"event": "warm_entry", "context": e.context, "target": e.target,
                        "ok": false, "failed": 1, "seconds": secs, "error": format!("{err:#}")})
                    .to_string()
                } else {
                    format!("warm {label}: FAILED in {secs:.1}s: {err:#}")
                }
            }
        };
        // Summaries are the command's result: stdout (progress goes to stderr).
        println!("{line}");
        std::io::stdout().flush()?;
    }
    if failed > 0 {
        bail!("{failed} of {} warm builds failed", entries.len());
    }
    Ok(())
}
