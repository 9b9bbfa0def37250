//! One build as the scheduler sees it, and the stage tasks it turns into.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use model::frontend::plan::{Plan, StageRef};
use model::keys::{content_paths, BaseResolver, StageKeys};
use model::task::{StageTask, TaskBase, TaskInstruction, TaskSource};

/// External image references pinned to immutable ids for one build.
#[derive(Debug, Clone, Default)]
pub struct PinnedImages(pub BTreeMap<String, String>);

impl BaseResolver for PinnedImages {
    fn resolve(&self, reference: &str) -> Option<String> {
        self.0.get(reference).cloned()
    }
}

/// Every external image the stages the target needs read: FROM, COPY --from, mount from.
pub fn external_images(plan: &Plan) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        if let StageRef::Image(r) = &s.base {
            out.insert(r.clone());
        }
        for pi in &s.instructions {
            for r in pi.copy_from.iter().chain(pi.mount_from.iter().flatten()) {
                if let StageRef::Image(r) = r {
                    out.insert(r.clone());
                }
            }
        }
    }
    out
}

/// One build as the scheduler sees it.
pub struct BuildRequest {
    pub build_id: model::ids::BuildId,
    pub plan: Arc<Plan>,
    /// Keys computed with `pinned` as the resolver.
    pub keys: Arc<Vec<StageKeys>>,
    pub pinned: PinnedImages,
    /// Ignore results already on the executor (every stage runs).
    pub no_cache: bool,
    /// Stages that look nothing up (`--no-cache-filter`); their results are still stored.
    pub no_cache_stages: BTreeSet<usize>,
    /// `--network` for RUN (`none`, `host`; `None`: the daemon's default). Not in keys:
    /// like BuildKit, the network a command ran with does not make another result.
    pub network: Option<String>,
    /// What each stage must leave behind for this build's consumers (empty on one
    /// daemon, which needs nothing beyond the images it holds; see `pool::exports`).
    pub exports: BTreeMap<usize, model::task::Export>,
}

impl BuildRequest {
    /// Whether stage `i` is built without looking anything up.
    pub fn skips_cache(&self, i: usize) -> bool {
        self.no_cache || self.no_cache_stages.contains(&i)
    }
}

/// Builds the task for stage `index` of a keyed plan.
pub fn stage_task(req: &BuildRequest, index: usize) -> StageTask {
    let reads = content_paths(&req.plan);
    stage_task_keyed(
        req,
        &req.keys,
        &model::keys::NoContents,
        &BTreeMap::new(),
        reads.get(&index),
        index,
    )
}

/// Builds the task for stage `index` with `all_keys` (the build's current keys), the
/// contents the stages it reads reported (what its `--from` reads are keyed on), the
/// images found or built so far, and the paths later stages read from it.
pub(super) fn stage_task_keyed(
    req: &BuildRequest,
    all_keys: &[StageKeys],
    contents: &dyn model::keys::Contents,
    done: &BTreeMap<usize, String>,
    read_paths: Option<&BTreeSet<String>>,
    index: usize,
) -> StageTask {
    let plan = &req.plan;
    let stage = &plan.stages[index];
    let keys = &all_keys[index];
    let source = |r: &StageRef| match r {
        StageRef::Scratch => TaskSource::Scratch,
        StageRef::Image(reference) => TaskSource::Image {
            reference: reference.clone(),
            id: req
                .pinned
                .resolve(reference)
                .unwrap_or_else(|| reference.clone()),
        },
        StageRef::Stage(i) => TaskSource::Stage {
            index: *i,
            key: all_keys[*i].key,
            image_id: done.get(i).cloned(),
        },
    };
    let base = match source(&stage.base) {
        TaskSource::Scratch => TaskBase::Scratch,
        TaskSource::Image { reference, id } => TaskBase::Image { reference, id },
        TaskSource::Stage { index, key, .. } => TaskBase::Stage { index, key },
    };
    let instructions = stage
        .instructions
        .iter()
        .zip(&keys.chain[1..])
        .map(|(pi, link)| TaskInstruction {
            instruction: pi.instruction.clone(),
            raw: pi.raw.clone(),
            args: pi.args.clone(),
            key: link.key,
            source: pi.source.clone(),
            line: pi.start_line,
            copy_from: pi.copy_from.as_ref().map(source),
            from_contents: from_contents(pi, link, contents),
            mount_from: pi
                .mount_from
                .iter()
                .map(|m| m.as_ref().map(source))
                .collect(),
        })
        .collect();
    StageTask {
        build_id: req.build_id.clone(),
        stage: index,
        name: stage.name.clone(),
        key: keys.key,
        base,
        platform: stage
            .platform
            .clone()
            .unwrap_or_else(|| plan.platform.to_string()),
        instructions,
        escape: req.plan.escape,
        no_cache: req.skips_cache(index),
        build_args: plan.build_args.clone(),
        network: req.network.clone(),
        digest_paths: read_paths.into_iter().flatten().cloned().collect(),
        park: parkable(plan, index),
        export: req.exports.get(&index).cloned().unwrap_or_default(),
        reuse: 0,
        after: None,
    }
}

/// Where stage `index` splits into segments: the first instruction that reads another
/// stage (`COPY --from`, `RUN --mount from=`), when a `RUN` comes before it. What comes
/// before needs only the base, so it can run while the stages read are still building.
/// A stage with `ONBUILD` is never split (its triggers belong to its consumers).
pub(super) fn split_point(plan: &Plan, index: usize) -> Option<usize> {
    use model::frontend::instructions::Instruction;
    let stage = &plan.stages[index];
    if stage
        .instructions
        .iter()
        .any(|pi| matches!(pi.instruction, Instruction::Onbuild(_)))
    {
        return None;
    }
    let reads_stage = |pi: &model::frontend::plan::PlannedInstruction| {
        pi.copy_from
            .iter()
            .chain(pi.mount_from.iter().flatten())
            .any(|r| matches!(r, StageRef::Stage(_)))
    };
    let k = stage.instructions.iter().position(reads_stage)?;
    stage.instructions[..k]
        .iter()
        .any(|pi| matches!(pi.instruction, Instruction::Run(_)))
        .then_some(k)
}

/// Whether the build reads stage `index` only through plain `COPY --from` paths (see
/// [`StageTask::park`]).
fn parkable(plan: &model::frontend::plan::Plan, index: usize) -> bool {
    use model::frontend::plan::StageRef;
    if index == plan.target {
        return false;
    }
    let exports = crate::pool::exports(plan, false);
    let mounted = plan
        .stages
        .iter()
        .filter(|s| plan.built[s.index])
        .flat_map(|s| &s.instructions)
        .flat_map(|pi| &pi.mount_from)
        .any(|from| matches!(from, Some(StageRef::Stage(i)) if *i == index));
    matches!(exports.get(&index), Some(e) if !e.image && !e.paths.is_empty()) && !mounted
}

/// The digests an instruction's `--from` reads were keyed on (those its key link names as
/// `content`), by path.
fn from_contents(
    pi: &model::frontend::plan::PlannedInstruction,
    link: &model::keys::ChainLink,
    contents: &dyn model::keys::Contents,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (stage, paths) in model::keys::from_reads(pi) {
        for p in paths.into_iter().flatten() {
            if let Some(d) = contents.digest(stage, &p) {
                if link
                    .inputs
                    .iter()
                    .any(|i| i.value == format!("content {d}"))
                {
                    out.insert(p, d);
                }
            }
        }
    }
    out
}

/// The longest chain of stages from each stage to the target (itself included): what is
/// on the critical path goes first.
pub(super) fn critical_path(plan: &Plan) -> Vec<usize> {
    let n = plan.stages.len();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for s in &plan.stages {
        for d in &s.depends_on {
            dependents[*d].push(s.index);
        }
    }
    let mut len = vec![1usize; n];
    // Stages only depend on earlier ones, so reverse index order is a topological order.
    for i in (0..n).rev() {
        len[i] = 1 + dependents[i]
            .iter()
            .filter(|d| plan.built[**d])
            .map(|d| len[*d])
            .max()
            .unwrap_or(0);
    }
    len
}
