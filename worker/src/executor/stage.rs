//! The stage loop: where a stage starts (its base), each instruction reused from the
//! instruction cache or executed, and the stage's images written (loaded in the
//! background or parked), with the contents its consumers copy.
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::frontend::instructions::{parse_instruction, Instruction};
use model::frontend::parser;
use model::task::{
    instruction_image_tag, stage_image_tag, BuildInputs, StageError, StageLog, StageResult,
    StageTask, TaskBase,
};
use tokio_util::sync::CancellationToken;

use super::{config, copy, layer_read, layers, prefetch, tree};
use super::{DockerExecutor, ImageState, StageVars, DEFAULT_PATH};
use crate::daemon::Resources;

/// Parses a base image's ONBUILD triggers as instructions.
fn parse_triggers(triggers: &[String], escape: char) -> Result<Vec<Instruction>, StageError> {
    let mut out = Vec::new();
    for t in triggers {
        let text = if escape == '\\' {
            t.clone()
        } else {
            format!("# escape={escape}\n{t}")
        };
        let df = parser::parse(text.as_bytes())
            .map_err(|e| StageError::new(format!("ONBUILD trigger {t:?}: {}", e.message)))?;
        for node in &df.nodes {
            out.push(
                parse_instruction(node).map_err(|e| {
                    StageError::new(format!("ONBUILD trigger {t:?}: {}", e.message))
                })?,
            );
        }
    }
    Ok(out)
}

/// Where a stage starts ([`DockerExecutor::base_state`]).
struct Base {
    state: ImageState,
    /// An image with exactly `state` (the base's config is used as it is).
    id: Option<String>,
    /// The base image's ONBUILD triggers, to run first.
    triggers: Vec<String>,
    size: u64,
    /// The base image (none for scratch): it holds `state`'s layers.
    image: Option<String>,
}

/// The most layer bytes a stage parks (written to disk before the stage reports; more
/// goes to the daemon in the background).
const PARK_MAX: usize = 64 << 20;

/// The state of a stage being built.
pub(crate) struct StageRun<'a> {
    pub task: &'a StageTask,
    pub inputs: &'a BuildInputs,
    pub logs: &'a tokio::sync::mpsc::UnboundedSender<StageLog>,
    pub cancel: &'a CancellationToken,
    pub res: &'a Resources,
    pub state: ImageState,
    /// The environment instructions are expanded against and RUN gets (not the config's
    /// ENV alone: ARGs write into it too).
    pub vars: StageVars,
    /// The id of an image with exactly `state`, if one exists.
    pub id: Option<String>,
    pub flags: config::StageFlags,
    /// Images to write with the next `docker load`, with their tags.
    pub pending: Vec<(ImageState, Vec<String>)>,
    pub command_time: Duration,
    /// A bare image with no layers (helper containers), made on first use.
    pub empty_bare: Option<String>,
    /// A container following `state`'s filesystem, for planning (see `layers.rs`).
    pub mirror: Option<layers::Mirror>,
    /// Layers of `state` (and pending images) written by hand, not on the daemon yet.
    pub new_layers: crate::daemon::NewLayers,
    /// Paths a RUN layer holds whole (see `layer_read.rs`), by diff id.
    pub whole_paths: std::collections::HashMap<String, Arc<Vec<String>>>,
    /// Never-started containers of other images (COPY --from, bind mounts), by reference.
    pub read_containers: std::collections::HashMap<String, String>,
    /// COPY --from sources read ahead (`prefetch.rs`), and whether that happened.
    pub prefetched: prefetch::Prefetched,
    pub prefetch_done: bool,
    /// The stage image's size: that of the image `state` was last read from on the
    /// daemon (the base, a reused step, a commit) plus the layers written on it since.
    pub size: u64,
    /// How many of `state`'s bottom layers an image this stage does not remove holds
    /// (the base image, a reused step's image), and that image: a parked archive
    /// leaves those layers out.
    pub durable: (usize, Option<String>),
}

impl DockerExecutor {
    async fn base_state(&self, task: &StageTask) -> Result<Base, StageError> {
        match &task.base {
            TaskBase::Scratch => {
                let mut s = ImageState::empty(&task.platform);
                s.config.env = vec![format!("PATH={DEFAULT_PATH}")];
                s.config.working_dir = "/".into();
                Ok(Base {
                    state: s,
                    id: None,
                    triggers: Vec::new(),
                    size: 0,
                    image: None,
                })
            }
            TaskBase::Image { reference, id } => {
                let (id, mut s, size) = self.daemon.inspect_sized(id).await?.ok_or_else(|| {
                    StageError::new(format!(
                        "base image {reference} ({id}) is not on the Docker daemon of worker {}",
                        self.name
                    ))
                })?;
                let mut changed = false;
                if s.config.env_get("PATH").is_none() {
                    s.config.env.push(format!("PATH={DEFAULT_PATH}"));
                    changed = true;
                }
                let triggers = std::mem::take(&mut s.config.on_build);
                changed |= !triggers.is_empty();
                Ok(Base {
                    state: s,
                    id: (!changed).then_some(id.clone()),
                    triggers,
                    size,
                    image: Some(id),
                })
            }
            TaskBase::Stage { index, key } => {
                let tag = stage_image_tag(key);
                let (id, mut s, size) = self.daemon.inspect_sized(&tag).await?.ok_or_else(|| {
                    StageError::new(format!(
                        "the result of stage {index} ({tag}) is not on the Docker daemon of worker {}",
                        self.name
                    ))
                })?;
                // The plan already put the parent stage's triggers into this stage.
                let had = !s.config.on_build.is_empty();
                s.config.on_build.clear();
                Ok(Base {
                    state: s,
                    id: (!had).then_some(id.clone()),
                    triggers: Vec::new(),
                    size,
                    image: Some(id),
                })
            }
        }
    }

    /// Content digests ([`tree::trees_digest`]) of `paths` of `image`, read as `COPY --from`
    /// reads them. A path that cannot be read is left out.
    pub(super) async fn image_contents(
        &self,
        res: &Resources,
        image: &str,
        paths: &[String],
    ) -> std::collections::BTreeMap<String, String> {
        match self.daemon.inspect(image).await {
            Ok(Some((id, _))) => self.id_contents(res, &id, paths).await,
            _ => Default::default(),
        }
    }

    /// [`Self::image_contents`] of an image by its full id, known to be on the daemon.
    async fn id_contents(
        &self,
        res: &Resources,
        id: &str,
        paths: &[String],
    ) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let cached: Vec<(String, Arc<Vec<tree::SourceTree>>)> = {
            let trees = self.trees.lock();
            paths
                .iter()
                .filter_map(|p| Some((p.clone(), trees.get(id, &config::clean_abs(p))?)))
                .collect()
        };
        for (p, t) in &cached {
            out.insert(p.clone(), tree::trees_digest(t));
        }
        let paths: Vec<&String> = paths.iter().filter(|p| !out.contains_key(*p)).collect();
        if paths.is_empty() {
            return out;
        }
        let container = match self.new_read_container(res, id, "contents").await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(image = id, error = %e, "cannot read the stage's contents");
                return out;
            }
        };
        let reads = paths.iter().map(|p| {
            let container = &container;
            async move { (p, self.image_sources(container, p).await) }
        });
        for (p, r) in futures::future::join_all(reads).await {
            match r {
                Ok(trees) => {
                    out.insert(p.to_string(), tree::trees_digest(&trees));
                    self.trees.lock().put(id, &config::clean_abs(p), trees);
                }
                Err(e) => tracing::debug!(path = %p, error = %e, "no contents for path"),
            }
        }
        out
    }

    pub(super) async fn stage(
        &self,
        task: &StageTask,
        inputs: &BuildInputs,
        logs: &tokio::sync::mpsc::UnboundedSender<StageLog>,
        cancel: &CancellationToken,
        res: &Resources,
    ) -> Result<StageResult, StageError> {
        let started = Instant::now();
        let Base {
            state,
            id,
            triggers,
            size,
            image,
        } = self.base_state(task).await?;
        let durable = (state.layers.len(), image);
        let mut triggers = parse_triggers(&triggers, task.escape)?;
        let mut vars = StageVars::from_config(&state.config);
        // A stage built FROM a stage keeps the ARG values in scope at that stage's end (as
        // BuildKit does); the plan hands them over as the first instruction's ARGs.
        if let (TaskBase::Stage { .. }, Some(first)) = (&task.base, task.instructions.first()) {
            for (k, v) in &first.args {
                vars.set(k, v);
            }
        }
        let mut st = StageRun {
            task,
            inputs,
            logs,
            cancel,
            res,
            vars,
            state,
            id,
            flags: Default::default(),
            pending: Vec::new(),
            command_time: Duration::ZERO,
            empty_bare: None,
            mirror: None,
            new_layers: Default::default(),
            whole_paths: Default::default(),
            read_containers: Default::default(),
            prefetched: Default::default(),
            prefetch_done: false,
            size,
            durable,
        };
        let (mut executed, mut reused) = (0, 0);
        for (n, ti) in task.instructions.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(StageError::cancelled());
            }
            let tag = instruction_image_tag(&ti.key);
            if !task.no_cache || n < task.reuse {
                if let Some((id, s, size)) = self.daemon.inspect_sized(&tag).await? {
                    self.flush(&mut st).await?;
                    st.durable = (s.layers.len(), Some(id.clone()));
                    st.state = s;
                    st.size = size;
                    st.id = Some(id);
                    st.mirror = None;
                    // The committed image holds what the instruction (and any pending
                    // ONBUILD trigger) did; the environment is not in it, so replay that.
                    for trigger in std::mem::take(&mut triggers) {
                        let ins = st.vars.expand(&trigger, task.escape)?;
                        st.vars.track(&ins, None, &task.build_args, task.escape)?;
                    }
                    let ins = st.vars.expand(&ti.raw, task.escape)?;
                    st.vars
                        .track(&ins, Some(&ti.instruction), &task.build_args, task.escape)?;
                    if matches!(ti.instruction, Instruction::Cmd(_)) {
                        st.flags.cmd_set = true;
                    }
                    reused += 1;
                    continue;
                }
            }
            for trigger in std::mem::take(&mut triggers) {
                let _ = logs.send(StageLog {
                    stage: task.stage,
                    line: format!("# ONBUILD {}", trigger.keyword()),
                    placed_on: None,
                });
                self.execute(&mut st, &trigger, None).await?;
            }
            let _ = logs.send(StageLog {
                stage: task.stage,
                line: format!("# {}", ti.source),
                placed_on: None,
            });
            self.execute(&mut st, &ti.raw, Some(ti))
                .await
                .map_err(|mut e| {
                    e.line = e.line.or(Some(ti.line));
                    e
                })?;
            st.pending.push((st.state.clone(), vec![tag]));
            st.id = None;
            executed += 1;
        }
        for trigger in std::mem::take(&mut triggers) {
            self.execute(&mut st, &trigger, None).await?;
        }
        let stage_tag = stage_image_tag(&task.key);
        match (st.pending.last_mut(), &st.id) {
            (Some((s, tags)), _) if *s == st.state => tags.push(stage_tag.clone()),
            (_, Some(id)) => {
                let id = id.clone();
                self.flush(&mut st).await?;
                self.daemon.tag(&id, &stage_tag).await?;
            }
            _ => st.pending.push((st.state.clone(), vec![stage_tag.clone()])),
        }
        let from_layers = self.trees_from_layers(&st, &task.digest_paths).await;
        let (image_id, size, same_layers) = if st.pending.is_empty() {
            // Every step reused: the stage tag went on an image the daemon has.
            let (id, s, size) = self
                .daemon
                .inspect_sized(&stage_tag)
                .await?
                .ok_or_else(|| {
                    StageError::new(format!("the stage image {stage_tag} is not on the daemon"))
                })?;
            (id, size, s.layers == st.state.layers)
        } else {
            // The images are written in the background, so the stage's consumers start
            // now: they read what they copy from the trees, and whatever names one of the
            // images (a later stage, an export, the output) waits for the load. The ids
            // are known already: an image's id is the digest of its config.
            let pending = std::mem::take(&mut st.pending);
            let images: Vec<_> = pending
                .iter()
                .map(|(s, tags)| (s, tags.clone(), None))
                .collect();
            let ids = match self.parkable(&st, &images, from_layers.len()) {
                Some(layers) => {
                    let base = (st.durable.0, st.durable.1.as_deref());
                    self.daemon
                        .park(&images, &layers, base, &st.whole_paths)
                        .await?
                }
                None => {
                    let (ids, load) = self.daemon.load_later(&images, &mut st.new_layers)?;
                    res.set_load(load);
                    ids
                }
            };
            let at = pending
                .iter()
                .position(|(_, tags)| tags.contains(&stage_tag))
                .ok_or_else(|| StageError::new("the stage image has no tag"))?;
            (ids[at].clone(), st.size, true)
        };
        // The trees describe this stage's layers, so they are kept for the image with
        // exactly those: the one written now (its id is its content), or the one the tag
        // names if it has them (a concurrent build of the same key may have retagged it).
        if same_layers {
            let mut trees = self.trees.lock();
            for (path, t) in from_layers {
                trees.put(&image_id, &path, vec![t]);
            }
        }
        let contents = if task.digest_paths.is_empty() {
            Default::default()
        } else {
            crate::daemon::timed(
                "contents",
                self.id_contents(res, &image_id, &task.digest_paths),
            )
            .await
        };
        Ok(StageResult {
            contents,
            size,
            stage: task.stage,
            key: task.key,
            image_id,
            executed,
            reused,
            duration: started.elapsed(),
            command_time: st.command_time,
        })
    }

    /// The trees of those `paths` (as `COPY --from` reads them) that the layers the stage
    /// wrote itself settle, by clean absolute path: no container, no archive read.
    async fn trees_from_layers(
        &self,
        st: &StageRun<'_>,
        paths: &[String],
    ) -> Vec<(String, tree::SourceTree)> {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| config::clean_abs(&format!("/{p}")))
            .filter(|p| !copy::has_wildcard(p))
            .collect();
        if paths.is_empty() || st.new_layers.is_empty() {
            return Vec::new();
        }
        let layers: Vec<layer_read::LayerView> = st
            .state
            .layers
            .iter()
            .rev()
            .map(|d| layer_read::LayerView {
                tar: st.new_layers.get(d).cloned(),
                whole: st.whole_paths.get(d).cloned().unwrap_or_default(),
            })
            .collect();
        let wanted = paths.len();
        let settled: Vec<_> = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .filter_map(|p| Some((p.clone(), layer_read::tree_from_layers(&layers, &p)?)))
                .collect()
        })
        .await
        .unwrap_or_default();
        tracing::debug!(
            wanted,
            settled = settled.len(),
            "contents from the stage's layers"
        );
        settled
    }

    /// The layers a parked archive of `images` must hold, if the stage is parked: the
    /// build needs its images only through the paths it copies (`task.park`), its own
    /// layers settle every one of those (`settled` of them did: reading one from the
    /// image would load it at once), and every layer above the durable base is one the
    /// daemon has not seen (a stage that loaded some already, for a RUN container, has
    /// paid for registering them: its images go to the daemon as before), [`PARK_MAX`]
    /// bytes in all at most.
    fn parkable(
        &self,
        st: &StageRun<'_>,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        settled: usize,
    ) -> Option<crate::daemon::NewLayers> {
        if !st.task.park || self.daemon.parked.is_none() || settled < st.task.digest_paths.len() {
            return None;
        }
        let (durable, _) = &st.durable;
        let mut layers = crate::daemon::NewLayers::new();
        for (state, _, _) in images {
            for diff in state.layers.iter().skip(*durable) {
                layers.insert(diff.clone(), st.new_layers.get(diff)?.clone());
            }
        }
        let bytes: usize = layers.values().map(|l| l.len()).sum();
        (bytes <= PARK_MAX).then_some(layers)
    }

    /// Writes the pending images (one `docker load`).
    async fn flush(&self, st: &mut StageRun<'_>) -> Result<(), StageError> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut st.pending);
        let images: Vec<_> = pending
            .iter()
            .map(|(s, tags)| (s, tags.clone(), None))
            .collect();
        self.daemon.load(&images, &mut st.new_layers).await
    }

    /// Runs one instruction (expanded here, against the stage's environment) on the stage
    /// state, then records what it wrote into the environment.
    async fn execute(
        &self,
        st: &mut StageRun<'_>,
        raw: &Instruction,
        ti: Option<&model::task::TaskInstruction>,
    ) -> Result<(), StageError> {
        let ins = st.vars.expand(raw, st.task.escape)?;
        crate::daemon::timed(ins.keyword(), self.dispatch(st, &ins, ti)).await?;
        let planned = ti.map(|t| &t.instruction);
        st.vars
            .track(&ins, planned, &st.task.build_args, st.task.escape)
    }

    async fn dispatch(
        &self,
        st: &mut StageRun<'_>,
        ins: &Instruction,
        ti: Option<&model::task::TaskInstruction>,
    ) -> Result<(), StageError> {
        match ins {
            Instruction::From(_) => Err(StageError::new("FROM inside a stage task")),
            Instruction::Run(r) => self.step_run(st, r, ti).await,
            Instruction::Copy(c) => self.step_copy(st, c, false, ti).await,
            Instruction::Add(c) => self.step_copy(st, c, true, ti).await,
            Instruction::Workdir(_) => {
                let mut author = None;
                config::apply(&mut st.state.config, &mut st.flags, &mut author, ins)?;
                let wd = st.state.config.working_dir.clone();
                if wd != "/" {
                    self.step_mkdir(st, &wd).await?;
                }
                Ok(())
            }
            other => {
                let mut author = st.state.author.clone();
                config::apply(&mut st.state.config, &mut st.flags, &mut author, other)?;
                st.state.author = author;
                Ok(())
            }
        }
    }
}
