//! `dbuild plan [CONTEXT] [-f FILE] [--target T] [--build-arg K=V]... [--format text|json]`
use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Context;
use model::analysis::Analysis;
use model::frontend::plan::StageRef;

use super::spec::BuildSpec;
use serde_json::json;

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub spec: BuildSpec,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let analysis = args.spec.analyze()?;
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
