//! What the scheduler hands an executor, and what comes back. The same types travel to
//! remote workers over gRPC (as `wire` documents), so everything here is plain data; the build's
//! context files and secrets reach the executor through [`BuildInputs`].
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::context::ContextManifest;
use crate::frontend::instructions::Instruction;
use crate::keys::{InstructionKey, StageKey};

/// Tag under which an executor keeps a stage's result image on its daemon.
pub fn stage_image_tag(key: &StageKey) -> String {
    format!("dbuild-stage:{}", key.to_hex())
}

/// Tag under which an executor keeps the image committed after one instruction, so an
/// unchanged prefix of a stage is never run again.
pub fn instruction_image_tag(key: &InstructionKey) -> String {
    format!("dbuild-cache:{}", key.to_hex())
}

/// Where a stage starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskBase {
    Scratch,
    /// An external image, with the immutable id it was pinned to for this build.
    Image {
        reference: String,
        id: String,
    },
    /// The result of an earlier stage.
    Stage {
        index: usize,
        key: StageKey,
    },
}

/// What a `COPY --from` or `RUN --mount from=` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskSource {
    Scratch,
    Image {
        reference: String,
        id: String,
    },
    Stage {
        index: usize,
        key: StageKey,
        /// The stage's image as this build found or built it: read by id, since the tag
        /// can be moved meanwhile (and a farm worker may hold another image under it).
        #[serde(default)]
        image_id: Option<String>,
    },
}

/// One instruction of a stage task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskInstruction {
    /// The instruction with only the Dockerfile's own ARG/ENV expanded; references to the
    /// base image's ENV are still `$NAME` (see `raw` and `args`).
    pub instruction: Instruction,
    /// The instruction as typed from the Dockerfile, unexpanded. The executor expands it
    /// once against the image's ENV and `args` (ENV wins), as Docker does.
    pub raw: Instruction,
    /// ARG values in scope at this instruction (RUN gets them in its environment).
    pub args: BTreeMap<String, String>,
    pub key: InstructionKey,
    /// The line as written, for logs and errors.
    pub source: String,
    pub line: usize,
    pub copy_from: Option<TaskSource>,
    /// Aligned with the RUN's mounts.
    pub mount_from: Vec<Option<TaskSource>>,
    /// For a `--from` read keyed on content: source path (as
    /// [`crate::keys::content_path`] spells it) → the digest the key covers. The executor
    /// checks what it reads against it, so a stage image replaced meanwhile (a concurrent
    /// `--no-cache` rebuild of a stage that is not reproducible) fails the step instead of
    /// storing other files under this key.
    #[serde(default)]
    pub from_contents: BTreeMap<String, String>,
}

/// One stage to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTask {
    pub build_id: crate::ids::BuildId,
    pub stage: usize,
    pub name: Option<String>,
    pub key: StageKey,
    pub base: TaskBase,
    /// `os/arch[/variant]`.
    pub platform: String,
    pub instructions: Vec<TaskInstruction>,
    /// The Dockerfile's escape character (for ONBUILD triggers of the base image).
    pub escape: char,
    /// Skip the per-instruction reuse of committed images.
    pub no_cache: bool,
    /// The build's `--build-arg` values, so the executor can resolve an ARG whose default
    /// reads the base image's ENV exactly as Docker does.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Paths (absolute, as [`crate::keys::content_path`] spells them) that later stages
    /// read with `COPY --from` / `mount from=`: the executor reports their content digests
    /// in [`StageResult::contents`], which key those consumers.
    #[serde(default)]
    pub digest_paths: Vec<String>,
    /// The build's `--network` for RUN without its own (`None`: the daemon's default).
    #[serde(default)]
    pub network: Option<String>,
    /// The build reads this stage only through plain `COPY --from` paths (it is not the
    /// target, no stage is built FROM it, nothing mounts it, no wildcard reads it): the
    /// executor may keep its images off the daemon until something asks for them there.
    #[serde(default)]
    pub park: bool,
    /// What this build's consumers need the stage to leave behind (a farm: the image
    /// and/or copied paths in the blob store; one daemon: nothing beyond its image). A
    /// cache record is a hit only when it holds this.
    #[serde(default)]
    pub export: Export,
    /// The first `reuse` instructions may be reused from their committed images even
    /// under `no_cache`: this build has just built them, as the stage's first segment.
    #[serde(default)]
    pub reuse: usize,
    /// The key of this stage's first segment when this build ran it ahead (its images
    /// are where it ran: a farm prefers that worker).
    #[serde(default)]
    pub after: Option<StageKey>,
}

impl StageTask {
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.stage))
    }
}

/// What a finished stage left behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: usize,
    pub key: StageKey,
    /// The image id on the executor's daemon, also tagged [`stage_image_tag`].
    pub image_id: String,
    /// Instructions run, and instructions reused from an already committed image.
    pub executed: usize,
    pub reused: usize,
    pub duration: Duration,
    /// Wall time spent inside RUN commands (for the per-instruction overhead benchmark).
    pub command_time: Duration,
    /// Size of the stage image on the executor's daemon (bytes, base layers included).
    #[serde(default)]
    pub size: u64,
    /// Content digest of each of the task's `digest_paths` that exists in the result.
    #[serde(default)]
    pub contents: BTreeMap<String, String>,
}

/// The context of a build that reads no file from it (every open is `NotFound`).
pub struct EmptyContext;

impl ContextFiles for EmptyContext {
    fn open(&self, path: &str) -> std::io::Result<Box<dyn Read + Send>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            path.to_string(),
        ))
    }
}

/// Reads the build context's files for an executor.
pub trait ContextFiles: Send + Sync {
    /// Opens the context file at `path` (relative, `/`-separated, as in the manifest).
    fn open(&self, path: &str) -> std::io::Result<Box<dyn Read + Send>>;
}

/// The context as a local directory (one-machine builds).
pub struct LocalContext {
    pub root: PathBuf,
}

impl ContextFiles for LocalContext {
    fn open(&self, path: &str) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(self.root.join(path))?))
    }
}

/// The context as blobs named by the manifest (a coordinator's store, a worker's cache).
pub struct BlobContext {
    pub blobs: crate::blobs::BlobStore,
    pub manifest: Arc<ContextManifest>,
}

impl ContextFiles for BlobContext {
    fn open(&self, path: &str) -> std::io::Result<Box<dyn Read + Send>> {
        let digest = self
            .manifest
            .get(path)
            .and_then(|e| e.digest())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, path.to_string()))?;
        // Read whole and verified: a blob is never handed out unchecked.
        let bytes = self
            .blobs
            .read(&digest)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Box::new(std::io::Cursor::new(bytes)))
    }
}

/// What a finished stage must leave in the blob store for the stages that consume it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The whole image (FROM consumers, the target).
    pub image: bool,
    /// Paths of its filesystem (COPY --from / RUN --mount from= consumers).
    pub paths: BTreeSet<String>,
}

/// An artifact of a stage in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub stage_key: StageKey,
    /// Empty for the image.
    pub path: String,
    pub digest: String,
    pub size: u64,
}

/// Everything about a build that is not plain data: its files and secrets.
#[derive(Clone)]
pub struct BuildInputs {
    pub manifest: Arc<ContextManifest>,
    pub context: Arc<dyn ContextFiles>,
    /// `--secret id=..,src=..`: id → file contents.
    pub secrets: Arc<BTreeMap<String, Vec<u8>>>,
}

/// A line of output from a stage, or a note from the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLog {
    pub stage: usize,
    pub line: String,
    /// Set once, by an executor that places stages on workers, when it has chosen one:
    /// progress then names that worker.
    #[serde(default)]
    pub placed_on: Option<String>,
}

/// Why a stage failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct StageError {
    pub message: String,
    /// The Dockerfile line of the failing instruction, if one is to blame.
    pub line: Option<usize>,
    /// The last lines of the failing command's output.
    pub log_tail: Vec<String>,
    pub cancelled: bool,
}

impl StageError {
    pub fn new(message: impl Into<String>) -> Self {
        StageError {
            message: message.into(),
            line: None,
            log_tail: Vec::new(),
            cancelled: false,
        }
    }

    pub fn cancelled() -> Self {
        StageError {
            cancelled: true,
            ..StageError::new("cancelled")
        }
    }
}

/// Runs stage tasks: the Docker executor (`worker` crate), or the farm's worker pool
/// (`coordinator::pool`), which places each on a remote worker.
///
/// **Cancel safety**: `run_stage` is not cancel safe. Dropping its future can leave a
/// container behind; cancel through `cancel` and keep awaiting the future, which then
/// removes what it made and returns [`StageError::cancelled`].
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// A short name for progress events (the worker's name).
    fn name(&self) -> &str;

    /// True for an executor that places each stage on one of several workers: it sends a
    /// [`StageLog`] with `placed_on` once it has chosen, and progress names that worker.
    fn places_stages(&self) -> bool {
        false
    }

    /// Pins an external image reference to an immutable id, pulling it when it is missing
    /// (always when `pull`). The error says which image is missing and how to provide it.
    async fn resolve_image(&self, reference: &str, pull: bool) -> Result<String, StageError>;

    /// Pins every reference (as [`Executor::resolve_image`]), all or nothing: reference →
    /// id. An executor that can pin many at once (a farm's resolve job) overrides it.
    async fn pin_images(
        &self,
        references: &[String],
        pull: bool,
    ) -> Result<BTreeMap<String, String>, StageError> {
        let mut pinned = BTreeMap::new();
        for reference in references {
            let id = self.resolve_image(reference, pull).await?;
            pinned.insert(reference.clone(), id);
        }
        Ok(pinned)
    }

    /// The image id of the stage result with this key, if the executor still holds it.
    async fn stage_image(&self, key: &StageKey) -> Option<String>;

    /// The image that stands in for a cache record's stage here, if any. By default the
    /// executor's own image under the key, which may be another image than the record's
    /// (rebuilt by another process); `None` when it holds none.
    async fn held_image(&self, task: &StageTask, _record_image_id: &str) -> Option<String> {
        self.stage_image(&task.key).await
    }

    /// Content digests of `paths` of the stage result `image_id`, for a stage found in the
    /// cache whose record lacks them. Paths the executor cannot read are left out (their
    /// consumers are then keyed by the stage's key).
    async fn contents(&self, _image_id: &str, _paths: &[String]) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// Waits until the stage image `image_id` that `run_stage` reported is durably where
    /// the executor keeps it (an executor may write it after reporting, so that the
    /// stage's consumers start sooner). The scheduler holds the stage's single-flight
    /// claim until then, so another build waiting for the key finds the image.
    async fn written(&self, _image_id: &str) -> Result<(), StageError> {
        Ok(())
    }

    /// Builds one stage. Log lines go to `logs` as they come.
    async fn run_stage(
        &self,
        task: StageTask,
        inputs: BuildInputs,
        logs: tokio::sync::mpsc::UnboundedSender<StageLog>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<StageResult, StageError>;
}
