//! `dbuild plan [CONTEXT] [-f FILE] [--target T] [--build-arg K=V]... [--format text|json]`
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use coordinator::analysis::{analyze, Analysis, AnalysisRequest};
use coordinator::frontend::plan::{PlanOptions, Platform, StageRef};
use coordinator::keys::Unresolved;
use serde_json::json;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The build context directory.
    #[arg(default_value = ".")]
    pub context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// The stage to build (default: the last stage).
    #[arg(long)]
    pub target: Option<String>,
    /// A build argument, KEY=VALUE (or KEY to take the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Where dbuild keeps its stat cache and store.
    #[arg(long, env = "DBUILD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// `--build-arg K=V` as docker takes it: `K` alone reads the environment, and is dropped
/// when the environment has no such variable.
pub fn parse_build_args(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        match a.split_once('=') {
            Some(("", _)) => {
                anyhow::bail!("--build-arg {a:?}: the name before '=' is empty")
            }
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// `--data-dir`, else `$XDG_CACHE_HOME/dbuild`, else `~/.cache/dbuild`.
pub fn data_dir(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("dbuild")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dbuild")))
        .unwrap_or_else(|| std::env::temp_dir().join("dbuild"))
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let dockerfile = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    if !args.context.is_dir() {
        anyhow::bail!(
            "build context {} is not a directory (give the directory holding your sources)",
            args.context.display()
        );
    }
    let data = data_dir(args.data_dir.clone());
    // Without a usable data dir every file is simply hashed again.
    let stat_cache = coordinator::context::stat_cache_path(&data, &args.context).ok();
    let req = AnalysisRequest {
        context_dir: &args.context,
        dockerfile: &dockerfile,
        options: PlanOptions {
            target: args.target.clone(),
            build_args: parse_build_args(&args.build_args)?,
            platform: Platform::host(),
        },
        stat_cache,
    };
    let analysis = analyze(&req, &Unresolved)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &plan_json(&analysis))
                .context("writing the plan")?;
            writeln!(out)?;
        }
        Format::Text => write_text(&mut out, &analysis)?,
    }
    out.flush()?;
    Ok(())
}

fn base_string(base: &StageRef) -> String {
    match base {
        StageRef::Image(r) => r.clone(),
        StageRef::Scratch => "scratch".into(),
        StageRef::Stage(i) => format!("stage:{i}"),
    }
}

/// The fixed JSON shape scripts rely on.
pub fn plan_json(a: &Analysis) -> serde_json::Value {
    let stages: Vec<_> = a
        .plan
        .stages
        .iter()
        .zip(&a.keys)
        .map(|(s, k)| {
            json!({
                "index": s.index,
                "name": s.name,
                "base": base_string(&s.base),
                "depends_on": s.depends_on.iter().collect::<Vec<_>>(),
                "built": a.plan.built[s.index],
                "key": k.key.to_hex(),
                "context_files": k.context_files,
                "missing": k.missing,
            })
        })
        .collect();
    json!({ "target": a.plan.target, "stages": stages })
}

fn write_text(out: &mut impl Write, a: &Analysis) -> anyhow::Result<()> {
    let plan = &a.plan;
    let target = &plan.stages[plan.target];
    writeln!(
        out,
        "target: #{} {} (platform {})",
        target.index,
        target.display_name(),
        plan.platform
    )?;
    writeln!(out)?;
    writeln!(out, "stage tree (what the target needs):")?;
    tree(out, a, plan.target, "", &mut BTreeSet::new())?;
    writeln!(out)?;
    for (s, k) in plan.stages.iter().zip(&a.keys) {
        let built = if plan.built[s.index] {
            "build"
        } else {
            "skip (not needed by the target)"
        };
        writeln!(out, "#{} {}: {}", s.index, s.display_name(), built)?;
        writeln!(
            out,
            "  base:     {}",
            match &s.base {
                StageRef::Stage(i) => format!("stage #{i} {}", plan.stages[*i].display_name()),
                other => base_string(other),
            }
        )?;
        if !s.depends_on.is_empty() {
            let deps: Vec<String> = s
                .depends_on
                .iter()
                .map(|d| format!("#{d} {}", plan.stages[*d].display_name()))
                .collect();
            writeln!(out, "  needs:    {}", deps.join(", "))?;
        }
        writeln!(out, "  key:      {}", k.key)?;
        writeln!(out, "  steps:    {}", s.instructions.len())?;
        if k.context_files.is_empty() {
            writeln!(out, "  context:  (none)")?;
        } else {
            writeln!(out, "  context:  {} files", k.context_files.len())?;
            for f in k.context_files.iter().take(20) {
                writeln!(out, "            {f}")?;
            }
            if k.context_files.len() > 20 {
                writeln!(
                    out,
                    "            ... and {} more",
                    k.context_files.len() - 20
                )?;
            }
        }
        for m in &k.missing {
            writeln!(
                out,
                "  missing:  {m} (not in the context: building this stage would fail)"
            )?;
        }
    }
    Ok(())
}

/// Prints the stages the target needs as a tree; a stage reached twice is printed once.
fn tree(
    out: &mut impl Write,
    a: &Analysis,
    i: usize,
    prefix: &str,
    shown: &mut BTreeSet<usize>,
) -> anyhow::Result<()> {
    let s = &a.plan.stages[i];
    if !shown.insert(i) && !s.depends_on.is_empty() {
        writeln!(out, "{prefix}#{} {} (see above)", i, s.display_name())?;
        return Ok(());
    }
    writeln!(out, "{prefix}#{} {}", i, s.display_name())?;
    let child_prefix = prefix.replace("├── ", "│   ").replace("└── ", "    ");
    for (n, d) in s.depends_on.iter().enumerate() {
        let branch = if n + 1 == s.depends_on.len() {
            "└── "
        } else {
            "├── "
        };
        tree(out, a, *d, &format!("{child_prefix}{branch}"), shown)?;
    }
    Ok(())
}
