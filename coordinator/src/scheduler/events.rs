//! What a build reports: progress events, and how it ended.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use model::keys::{StageKey, StageKeys};
use model::task::{StageError, StageResult};
use serde::Serialize;

/// Progress of a build. Serialized as `{"event": "stage_started", "stage": 0, ...}`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    StageStarted {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
    },
    StageCached {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: String,
    },
    StageFinished {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: String,
        executed: usize,
        reused: usize,
        duration_ms: u64,
        /// Time spent inside RUN commands; the rest is dbuild's and Docker's overhead.
        command_ms: u64,
    },
    StageFailed {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        error: String,
        line: Option<usize>,
        log_tail: Vec<String>,
    },
    Log {
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        line: String,
    },
    /// `stage`, `name` and `key` are the target's.
    BuildFinished {
        ok: bool,
        stage: usize,
        name: Option<String>,
        key: String,
        worker: String,
        image_id: Option<String>,
        duration_ms: u64,
    },
}

/// How a successful build ended.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub target: usize,
    pub target_key: StageKey,
    /// The target's image id on the executor's daemon.
    pub image_id: String,
    /// Every stage's keys as built: a stage reading another with `COPY --from` is keyed on
    /// the contents it read once that stage is done, so these can differ from the plan's.
    pub keys: Vec<StageKeys>,
    pub results: BTreeMap<usize, StageResult>,
    pub cached: BTreeSet<usize>,
    pub duration: Duration,
}

/// Why a build failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("stage {name} (#{stage}) failed: {error}")]
    Stage {
        stage: usize,
        name: String,
        error: StageError,
    },
    #[error("build cancelled")]
    Cancelled,
}
