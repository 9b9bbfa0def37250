//! `dbuild parse FILE`
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct ParseArgs {
    /// The Dockerfile to parse.
    pub file: PathBuf,
}

pub fn run(args: ParseArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let df = model::frontend::parser::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}:{}: {}", args.file.display(), e.line, e.message))?;
    let mut out = std::io::stdout().lock();
    out.write_all(model::frontend::dump::dump(&df).as_bytes())?;
    out.flush()?;
    Ok(())
}
