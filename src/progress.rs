//! Renders build events: `plain` (prefixed lines), `tty` (one live line per stage), `json`
//! (one event object per line on stdout).
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use coordinator::scheduler::BuildEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use model::frontend::plan::Plan;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    Auto,
    Plain,
    Tty,
    Json,
}

fn label(stage: usize, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("#{stage} {n}"),
        None => format!("#{stage} stage-{stage}"),
    }
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// Consumes events until the sender is dropped. `why` holds, per stage, why its key
/// differs from its last recorded build: plain progress prints it when the stage starts.
pub async fn render(
    mode: ProgressMode,
    plan: Arc<Plan>,
    why: BTreeMap<usize, Vec<String>>,
    mut events: UnboundedReceiver<BuildEvent>,
) {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Tty,
        ProgressMode::Auto => ProgressMode::Plain,
        m => m,
    };
    match mode {
        ProgressMode::Json => {
            while let Some(e) = events.recv().await {
                let mut out = std::io::stdout().lock();
                let _ = serde_json::to_writer(&mut out, &e);
                let _ = writeln!(out);
                // Why a started stage is rebuilt, as plain progress prints it.
                if let BuildEvent::StageStarted {
                    stage, name, key, ..
                } = &e
                {
                    if let Some(reasons) = why.get(stage).filter(|r| !r.is_empty()) {
                        let line = serde_json::json!({
                            "event": "stage_reasons",
                            "stage": stage,
                            "name": name,
                            "key": key,
                            "reasons": reasons,
                        });
                        let _ = writeln!(out, "{line}");
                    }
                }
            }
        }
        ProgressMode::Tty => render_tty(plan, events).await,
        _ => {
            while let Some(e) = events.recv().await {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{}", plain_line(&e));
                if let BuildEvent::StageStarted { stage, name, .. } = &e {
                    for r in why.get(stage).into_iter().flatten() {
                        let _ = writeln!(err, "{} rebuilt: {r}", label(*stage, name));
                    }
                }
            }
        }
    }
}

/// One line of `--progress plain`.
pub fn plain_line(e: &BuildEvent) -> String {
    match e {
        BuildEvent::StageStarted {
            stage,
            name,
            key,
            worker,
        } => {
            format!(
                "{} started on {worker} (key {})",
                label(*stage, name),
                short(key)
            )
        }
        BuildEvent::StageCached {
            stage,
            name,
            worker,
            ..
        } => {
            format!("{} cached on {worker}", label(*stage, name))
        }
        BuildEvent::StageFinished {
            stage,
            name,
            executed,
            reused,
            duration_ms,
            ..
        } => format!(
            "{} done in {:.1}s ({executed} run, {reused} reused)",
            label(*stage, name),
            *duration_ms as f64 / 1000.0
        ),
        BuildEvent::StageFailed {
            stage, name, error, ..
        } => {
            format!("{} FAILED: {error}", label(*stage, name))
        }
        BuildEvent::Log {
            stage, name, line, ..
        } => format!("{} | {line}", label(*stage, name)),
        BuildEvent::BuildFinished {
            ok,
            image_id,
            duration_ms,
            ..
        } => format!(
            "build {} in {:.1}s{}",
            if *ok { "finished" } else { "failed" },
            *duration_ms as f64 / 1000.0,
            image_id
                .as_deref()
                .map(|i| format!(": {i}"))
                .unwrap_or_default()
        ),
    }
}

async fn render_tty(plan: Arc<Plan>, mut events: UnboundedReceiver<BuildEvent>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let style = ProgressStyle::with_template("{prefix:.bold} {spinner} [{elapsed:>4}] {wide_msg}")
        .expect("valid template");
    let done_style =
        ProgressStyle::with_template("{prefix:.bold} {wide_msg}").expect("valid template");
    let mut bars: BTreeMap<usize, ProgressBar> = BTreeMap::new();
    let width = plan
        .stages
        .iter()
        .map(|s| label(s.index, &s.name).len())
        .max()
        .unwrap_or(10);
    let mut bar = |multi: &MultiProgress, stage: usize, name: &Option<String>| {
        bars.entry(stage)
            .or_insert_with(|| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(format!("{:width$}", label(stage, name)));
                b.enable_steady_tick(Duration::from_millis(100));
                b
            })
            .clone()
    };
    while let Some(e) = events.recv().await {
        match &e {
            BuildEvent::StageStarted {
                stage,
                name,
                worker,
                ..
            } => {
                bar(&multi, *stage, name).set_message(format!("running on {worker}"));
            }
            BuildEvent::Log {
                stage, name, line, ..
            } => {
                bar(&multi, *stage, name).set_message(line.clone());
            }
            BuildEvent::StageCached { stage, name, .. }
            | BuildEvent::StageFinished { stage, name, .. }
            | BuildEvent::StageFailed { stage, name, .. } => {
                let b = bar(&multi, *stage, name);
                b.set_style(done_style.clone());
                // The bar's prefix already names the stage.
                let line = plain_line(&e);
                let prefix = label(*stage, name);
                b.finish_with_message(
                    line.strip_prefix(&prefix)
                        .unwrap_or(&line)
                        .trim_start()
                        .to_string(),
                );
            }
            BuildEvent::BuildFinished { .. } => {
                let _ = multi.println(plain_line(&e));
            }
        }
    }
}
