//! `dbuild`: a cached, distributed Docker build runner. This binary only parses flags and
//! wires the library crates together.
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod output;
mod progress;

#[derive(Parser)]
#[command(name = "dbuild", version, about = "Cached, distributed Docker builds", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a Dockerfile's syntax tree in BuildKit's parser-test format.
    Parse(commands::parse::ParseArgs),
    /// Show the stages, their DAG, which will be built, their cache keys and context files.
    Plan(commands::plan::PlanArgs),
    /// Build an image, like `docker build`: independent stages at the same time.
    Submit(Box<commands::submit::SubmitArgs>),
    /// Run a coordinator: plans builds and schedules their stages on workers.
    Coordinator(commands::farm::CoordinatorArgs),
    /// Run a worker: builds the stages a coordinator gives it on a Docker daemon.
    Worker(commands::farm::WorkerArgs),
    /// List the workers registered with a coordinator.
    Workers(commands::farm::WorkersArgs),
    /// For every stage: cache hit or miss, and for a miss what changed since its last build.
    Explain(commands::explain::ExplainArgs),
    /// Build contexts (or a TOML list of builds) to fill the cache, e.g. from a cron job.
    Warm(commands::warm::WarmArgs),
    /// List, count and prune the stage cache (a coordinator's, or the embedded one).
    Cache(commands::cache::CacheArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DBUILD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Parse(args) => commands::parse::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Submit(args) => commands::submit::run(*args),
        Command::Coordinator(args) => commands::farm::coordinator(args),
        Command::Worker(args) => commands::farm::worker(args),
        Command::Workers(args) => commands::farm::workers(args),
        Command::Explain(args) => commands::explain::run(args),
        Command::Warm(args) => commands::warm::run(args),
        Command::Cache(args) => commands::cache::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "dbuild: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
