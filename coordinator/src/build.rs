//! One build session, the same for the embedded `submit` and the farm's `BuildServer`:
//! [`Session::prepare`] takes a planned Dockerfile and its context manifest, pins the
//! external images through the executor, keys the plan (keys are derived here, never
//! taken from a client) and works out what each stage must export; [`Session::run`] runs
//! it with the scheduler, records the build history, and keeps the cache under its cap.
//!
//! The caller owns what differs between the two: where the Dockerfile and context come
//! from, how events are rendered or streamed, and how the final image is delivered.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use model::context::ContextManifest;
use model::frontend::plan::Plan;
use model::ids::BuildId;
use model::keys::{compute_keys, StageKey, StageKeys};
use model::task::{BuildInputs, Executor, StageError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{PruneOptions, PruneReport, StageCache};
use crate::explain;
use crate::scheduler::{
    external_images, BuildError, BuildEvent, BuildOutcome, BuildRequest, PinnedImages, Scheduler,
};
use crate::store::Store;

/// Pins every external image `plan` reads to its id through `executor` (pulling per
/// `pull`) and keys the plan with those ids: a moved tag is a miss, and every stage
/// builds from the pinned id.
pub async fn pin_and_key(
    executor: &dyn Executor,
    plan: &Plan,
    manifest: &ContextManifest,
    pull: bool,
) -> Result<(PinnedImages, Vec<StageKeys>), PrepareError> {
    let references: Vec<String> = external_images(plan)
        .into_iter()
        .filter(|r| !r.eq_ignore_ascii_case("scratch"))
        .collect();
    let pinned = PinnedImages(
        executor
            .pin_images(&references, pull)
            .await
            .map_err(|e: StageError| PrepareError::Pin(e.message))?,
    );
    let keys = compute_keys(plan, manifest, &pinned);
    Ok((pinned, keys))
}

/// `--network` for RUN instructions without their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// The daemon's default network.
    #[default]
    Default,
    None,
    Host,
}

impl std::str::FromStr for Network {
    type Err = PrepareError;
    fn from_str(s: &str) -> Result<Self, PrepareError> {
        match s {
            "" | "default" => Ok(Network::Default),
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            other => Err(PrepareError::Network(other.to_string())),
        }
    }
}

impl Network {
    /// As the executor takes it (`None`: the daemon's default).
    fn for_tasks(self) -> Option<String> {
        match self {
            Network::Default => None,
            Network::None => Some("none".into()),
            Network::Host => Some("host".into()),
        }
    }
}

/// What a build asks for beyond its Dockerfile and context (validated flags).
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub no_cache: bool,
    /// `--no-cache-filter`: stage names or indexes.
    pub no_cache_filter: Vec<String>,
    pub pull: bool,
    pub network: Network,
    /// The client wants the target's image back (a farm exports it to the blob store).
    pub export_target_image: bool,
}

/// Why a build could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("--network {0}: a build's RUN network is default, none or host")]
    Network(String),
    #[error("--no-cache-filter: {0}")]
    NoCacheFilter(String),
    /// An external image could not be pinned (missing, or no worker could resolve it).
    #[error("{0}")]
    Pin(String),
}

/// A build planned, pinned and keyed: what [`Session::run`] runs.
pub struct Prepared {
    pub request: BuildRequest,
    pub manifest: Arc<ContextManifest>,
    /// The static keys (before any stage is re-keyed on the contents it copies): what
    /// the history records and `explain` compares.
    pub keys: Arc<Vec<StageKeys>>,
}

impl Prepared {
    /// Why each stage may be rebuilt: its key against the last recorded build of the same
    /// Dockerfile (`history_id`) in `index`.
    pub fn why_rebuilt(&self, index: &dyn Store, history_id: &str) -> BTreeMap<usize, Vec<String>> {
        explain::why_rebuilt(index, history_id, &self.request.plan, &self.keys)
    }
}

/// How a successful run ended, and what the cache cap evicted after it.
pub struct Ran {
    pub outcome: BuildOutcome,
    /// Records the cap evicted (their images are the executor's to remove).
    pub evicted: Option<PruneReport>,
}

/// One executor, its stage cache, its single-flight locks and its history: everything a
/// build runs against.
pub struct Session {
    executor: Arc<dyn Executor>,
    jobs: usize,
    cache: Option<Arc<StageCache>>,
    locks: Option<PathBuf>,
    history: Option<Arc<dyn Store>>,
    cap: Option<u64>,
}

impl Session {
    /// A session on `executor`, at most `jobs` stages at once.
    pub fn new(executor: Arc<dyn Executor>, jobs: usize) -> Self {
        Session {
            executor,
            jobs,
            cache: None,
            locks: None,
            history: None,
            cap: None,
        }
    }

    /// Looks stages up in and records them into `cache`.
    pub fn with_cache(mut self, cache: Arc<StageCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Single-flight locks under `dir` (one builder per stage key, across processes).
    pub fn with_single_flight(mut self, dir: PathBuf) -> Self {
        self.locks = Some(dir);
        self
    }

    /// Records each successful build's static keys in `index` (for `explain`).
    pub fn with_history(mut self, index: Arc<dyn Store>) -> Self {
        self.history = Some(index);
        self
    }

    /// After each build, evicts least recently used records past `bytes` (`0`: none).
    pub fn with_cap(mut self, bytes: u64) -> Self {
        self.cap = (bytes > 0).then_some(bytes);
        self
    }

    /// Pins the plan's external images through the session's executor and keys the plan
    /// (see [`pin_and_key`]).
    pub async fn pin_and_key(
        &self,
        plan: &Plan,
        manifest: &ContextManifest,
        pull: bool,
    ) -> Result<(PinnedImages, Vec<StageKeys>), PrepareError> {
        pin_and_key(&*self.executor, plan, manifest, pull).await
    }

    /// Pins, keys and works out the exports of a planned build; `name` gives the build
    /// its id from the target's key.
    pub async fn prepare(
        &self,
        name: impl FnOnce(&StageKey) -> BuildId,
        plan: Plan,
        manifest: ContextManifest,
        options: &BuildOptions,
    ) -> Result<Prepared, PrepareError> {
        let (pinned, keys) = self.pin_and_key(&plan, &manifest, options.pull).await?;
        let build_id = name(&keys[plan.target].key);
        let no_cache_stages: BTreeSet<usize> = plan
            .stage_indices(&options.no_cache_filter)
            .map_err(|e| PrepareError::NoCacheFilter(e.to_string()))?;
        // An executor that places stages on workers moves them through the blob store;
        // one daemon holds every stage's image, and nothing more is exported.
        let exports = if self.executor.places_stages() {
            crate::pool::exports(&plan, options.export_target_image)
        } else {
            BTreeMap::new()
        };
        let keys = Arc::new(keys);
        Ok(Prepared {
            request: BuildRequest {
                build_id,
                plan: Arc::new(plan),
                keys: Arc::clone(&keys),
                pinned,
                no_cache: options.no_cache,
                no_cache_stages,
                network: options.network.for_tasks(),
                exports,
            },
            manifest: Arc::new(manifest),
            keys,
        })
    }

    /// Runs a prepared build; on success records its history under `history_id` and
    /// applies the cache cap.
    ///
    /// **Cancel safety**: as [`Scheduler::run`]: cancel through `cancel` and keep
    /// awaiting.
    pub async fn run(
        &self,
        prepared: &Prepared,
        inputs: BuildInputs,
        history_id: Option<&str>,
        events: mpsc::UnboundedSender<BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<Ran, BuildError> {
        let mut scheduler = Scheduler::new(Arc::clone(&self.executor), self.jobs);
        if let Some(c) = &self.cache {
            scheduler = scheduler.with_cache(Arc::clone(c));
        }
        if let Some(dir) = &self.locks {
            scheduler = scheduler.with_single_flight(dir.clone());
        }
        let outcome = scheduler
            .run(&prepared.request, inputs, events, cancel)
            .await?;
        if let (Some(index), Some(id)) = (&self.history, history_id) {
            let built = outcome.results.keys().chain(&outcome.cached).copied();
            explain::remember(&**index, id, &prepared.request.plan, &prepared.keys, built);
        }
        let evicted = self.apply_cap();
        Ok(Ran { outcome, evicted })
    }

    fn apply_cap(&self) -> Option<PruneReport> {
        let (cap, cache) = (self.cap?, self.cache.as_ref()?);
        if cache.stats().map(|s| s.bytes <= cap).unwrap_or(true) {
            return None;
        }
        let opts = PruneOptions {
            keep_bytes: Some(cap),
            ..Default::default()
        };
        match cache.prune(&opts) {
            Ok(report) => Some(report),
            Err(e) => {
                tracing::warn!(error = %e, "cache cap not enforced");
                None
            }
        }
    }
}
