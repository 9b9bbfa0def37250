//! One call from a Dockerfile and a context directory to a keyed [`Plan`]: what `plan`
//! prints and what `submit` will send.
use std::path::{Path, PathBuf};

use crate::context::{self, ContextError, ContextManifest, ScanOptions, ScanStats};
use crate::frontend::parser;
use crate::frontend::plan::{self, Plan, PlanOptions};
use crate::keys::{self, BaseResolver, StageKeys};

/// What to analyse.
pub struct AnalysisRequest<'a> {
    pub context_dir: &'a Path,
    pub dockerfile: &'a Path,
    pub options: PlanOptions,
    /// The stat cache file (in the data dir); `None` hashes every file.
    pub stat_cache: Option<PathBuf>,
}

/// A parsed, planned and keyed build.
pub struct Analysis {
    pub plan: Plan,
    pub manifest: ContextManifest,
    pub keys: Vec<StageKeys>,
    pub scan: ScanStats,
}

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A Dockerfile problem, reported as `FILE:LINE: message`.
    #[error("{}:{}{message}", path.display(), line.map(|l| format!("{l}: ")).unwrap_or_else(|| " ".into()))]
    Dockerfile {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("build context {}: {source}", dir.display())]
    Context { dir: PathBuf, source: ContextError },
}

impl AnalysisError {
    /// The Dockerfile line to blame, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            AnalysisError::Dockerfile { line, .. } => *line,
            _ => None,
        }
    }
}

/// Parses and plans the Dockerfile only (no context needed).
pub fn plan_dockerfile(dockerfile: &Path, options: &PlanOptions) -> Result<Plan, AnalysisError> {
    let bytes = std::fs::read(dockerfile).map_err(|source| AnalysisError::Read {
        path: dockerfile.to_path_buf(),
        source,
    })?;
    plan_source(&bytes, dockerfile, options)
}

/// Parses and plans a Dockerfile's bytes; errors name `dockerfile` and the line.
pub fn plan_source(
    bytes: &[u8],
    dockerfile: &Path,
    options: &PlanOptions,
) -> Result<Plan, AnalysisError> {
    let df = parser::parse(bytes).map_err(|e| AnalysisError::Dockerfile {
        path: dockerfile.to_path_buf(),
        line: Some(e.line),
        message: e.message,
    })?;
    plan::plan(&df, options).map_err(|e| AnalysisError::Dockerfile {
        path: dockerfile.to_path_buf(),
        line: e.line,
        message: e.message,
    })
}

/// Parses, plans, scans the context and computes every stage's keys.
pub fn analyze(
    req: &AnalysisRequest<'_>,
    resolver: &dyn BaseResolver,
) -> Result<Analysis, AnalysisError> {
    let plan = plan_dockerfile(req.dockerfile, &req.options)?;
    let (manifest, scan) = context::scan(
        req.context_dir,
        &ScanOptions {
            dockerfile: Some(req.dockerfile.to_path_buf()),
            stat_cache: req.stat_cache.clone(),
        },
    )
    .map_err(|source| AnalysisError::Context {
        dir: req.context_dir.to_path_buf(),
        source,
    })?;
    let keys = keys::compute_keys(&plan, &manifest, resolver);
    Ok(Analysis {
        plan,
        manifest,
        keys,
        scan,
    })
}
