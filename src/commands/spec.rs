//! The flags every command that reads a build takes (`plan`, `submit`), and the one way
//! they become an analysed build.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use model::analysis::{analyze, Analysis, AnalysisRequest};
use model::frontend::plan::{PlanOptions, Platform};
use model::keys::Unresolved;

#[derive(clap::Args)]
pub struct BuildSpec {
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
    /// Where dbuild keeps its stat cache and store.
    #[arg(long, env = "DBUILD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl BuildSpec {
    pub fn dockerfile(&self) -> PathBuf {
        self.file
            .clone()
            .unwrap_or_else(|| self.context.join("Dockerfile"))
    }

    pub fn build_args(&self) -> anyhow::Result<BTreeMap<String, String>> {
        parse_build_args(&self.build_args)
    }

    /// Parses, plans, scans the context (through the stat cache) and keys the build.
    pub fn analyze(&self) -> anyhow::Result<Analysis> {
        if !self.context.is_dir() {
            bail!(
                "build context {} is not a directory (give the directory holding your sources)",
                self.context.display()
            );
        }
        let data = data_dir(self.data_dir.clone());
        let dockerfile = self.dockerfile();
        let req = AnalysisRequest {
            context_dir: &self.context,
            dockerfile: &dockerfile,
            options: PlanOptions {
                target: self.target.clone(),
                build_args: self.build_args()?,
                platform: Platform::host(),
            },
            // Without a usable data dir every file is simply hashed again.
            stat_cache: model::context::stat_cache_path(&data, &self.context).ok(),
        };
        Ok(analyze(&req, &Unresolved)?)
    }
}

/// `--build-arg K=V` as docker takes it: `K` alone reads the environment, and is dropped
/// when the environment has no such variable.
pub fn parse_build_args(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        match a.split_once('=') {
            Some(("", _)) => bail!("--build-arg {a:?}: the name before '=' is empty"),
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
