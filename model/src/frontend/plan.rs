//! From the AST to a [`Plan`]: stages, ARG scoping and expansion, the stage DAG, the target
//! and which stages it reaches. The scheduler only ever sees a `Plan`, never the Dockerfile.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::expand::{Lexer, VarLookup};
use super::instructions::{parse_instruction, Instruction};
use super::parser::{self, Dockerfile, Node};

mod instruction;

use instruction::StageCtx;

/// The platform a build targets (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in OCI names.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Stage to build; the last stage when `None`.
    pub target: Option<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    pub platform: Platform,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            target: None,
            build_args: BTreeMap::new(),
            platform: Platform::host(),
        }
    }
}

/// Where a stage starts, or where a `--from` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageRef {
    /// An earlier stage, by index.
    Stage(usize),
    /// An external image reference, as written (expanded).
    Image(String),
    /// `FROM scratch`: an empty filesystem.
    Scratch,
}

/// One instruction of a stage, expanded as far as the plan can.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedInstruction {
    pub instruction: Instruction,
    /// The instruction as typed, before any expansion (the executor expands it again once
    /// the base image's ENV is known).
    pub raw: Instruction,
    /// The ARG values in scope when the instruction runs.
    pub args: BTreeMap<String, String>,
    /// The line as written (continuations joined).
    pub source: String,
    pub start_line: usize,
    pub end_line: usize,
    /// For COPY/ADD `--from`: what it reads.
    pub copy_from: Option<StageRef>,
    /// For RUN: what each `--mount` with `from=` reads, aligned with `Run::mounts`.
    pub mount_from: Vec<Option<StageRef>>,
    /// Build args this instruction can see and that can change its output: for RUN every
    /// ARG in scope (they are in its environment), otherwise the ARGs its expansion used.
    pub build_args: BTreeMap<String, String>,
    /// True when the instruction came from a base stage's ONBUILD trigger.
    pub from_onbuild: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub index: usize,
    /// The name after `AS`, lowercased.
    pub name: Option<String>,
    pub base: StageRef,
    /// The `--platform` of the FROM line, expanded.
    pub platform: Option<String>,
    pub instructions: Vec<PlannedInstruction>,
    /// Every stage this one needs: FROM, COPY --from, RUN --mount from=.
    pub depends_on: BTreeSet<usize>,
    /// Global build args the FROM line used, with their values.
    pub from_args: BTreeMap<String, String>,
    pub line: usize,
    /// Whether variables the plan cannot resolve (the base image's ENV) may remain.
    pub external_root: bool,
}

impl Stage {
    /// `name` or `stage-N`, for messages.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub stages: Vec<Stage>,
    /// The Dockerfile's escape character (ONBUILD triggers are parsed with it).
    pub escape: char,
    pub target: usize,
    /// `built[i]`: stage `i` is reachable from the target.
    pub built: Vec<bool>,
    pub syntax: Option<String>,
    pub platform: Platform,
    /// The `--build-arg` values the plan was made with.
    pub build_args: BTreeMap<String, String>,
}

impl Plan {
    /// The stages `names` designate (`--no-cache-filter`): a stage name (as after `AS`,
    /// any case; the last of duplicates, as `--target` resolves) or an index. Each item
    /// may hold several, comma-separated.
    pub fn stage_indices(&self, names: &[String]) -> Result<BTreeSet<usize>, NoSuchStage> {
        let mut out = BTreeSet::new();
        for n in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
            if n.is_empty() {
                continue;
            }
            let lower = n.to_ascii_lowercase();
            let found = self
                .stages
                .iter()
                .rev()
                .find(|s| s.name.as_deref() == Some(lower.as_str()))
                .map(|s| s.index)
                .or_else(|| n.parse::<usize>().ok().filter(|i| *i < self.stages.len()));
            match found {
                Some(i) => {
                    out.insert(i);
                }
                None => {
                    return Err(NoSuchStage {
                        name: n.to_string(),
                        stages: self.stages.iter().map(|s| s.display_name()).collect(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// A `--no-cache-filter` item that names no stage of the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--no-cache-filter: no stage named {name:?} (stages: {})", stages.join(", "))]
pub struct NoSuchStage {
    /// The item as given.
    pub name: String,
    /// Every stage's display name, in order.
    pub stages: Vec<String>,
}

/// A `# syntax=` directive naming a frontend other than the standard Dockerfile one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`# syntax={syntax}` names another frontend; dbuild implements only the standard Dockerfile syntax (docker/dockerfile): remove the directive, or build this file with docker buildx")]
pub struct UnsupportedSyntax {
    pub syntax: String,
}

/// A planning error; `line` is the 1-based Dockerfile line when one is to blame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct PlanError {
    pub line: Option<usize>,
    pub message: String,
}

fn at(line: usize, message: impl Into<String>) -> PlanError {
    PlanError {
        line: Some(line),
        message: message.into(),
    }
}

/// The variables visible at one point: ENV shadows ARG, as in Docker.
#[derive(Default, Clone)]
struct Scope {
    env: BTreeMap<String, String>,
    args: BTreeMap<String, String>,
}

impl VarLookup for Scope {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.env
            .get(name)
            .or_else(|| self.args.get(name))
            .map(String::as_str)
    }
}

/// The args BuildKit defines before any ARG: platforms and the target stage.
fn default_args(platform: &Platform, target: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for prefix in ["BUILD", "TARGET"] {
        m.insert(format!("{prefix}PLATFORM"), platform.to_string());
        m.insert(format!("{prefix}OS"), platform.os.clone());
        m.insert(format!("{prefix}ARCH"), platform.arch.clone());
        m.insert(
            format!("{prefix}VARIANT"),
            platform.variant.clone().unwrap_or_default(),
        );
    }
    m.insert("TARGETSTAGE".into(), target.to_string());
    m
}

/// `# syntax=` may only name the standard Dockerfile frontend, which dbuild implements
/// itself (any tag or digest of `docker/dockerfile` or `docker/dockerfile-upstream`).
pub fn check_syntax(syntax: &str) -> Result<(), UnsupportedSyntax> {
    let name = syntax.split('@').next().unwrap_or(syntax);
    let repo = match name.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => name,
    };
    let repo = repo
        .trim_start_matches("docker.io/")
        .trim_start_matches("index.docker.io/");
    if matches!(repo, "docker/dockerfile" | "docker/dockerfile-upstream") {
        return Ok(());
    }
    Err(UnsupportedSyntax {
        syntax: syntax.to_string(),
    })
}

/// Plans a parsed Dockerfile.
pub fn plan(df: &Dockerfile, opts: &PlanOptions) -> Result<Plan, PlanError> {
    if let Some(s) = &df.directives.syntax {
        check_syntax(s).map_err(|e| at(1, e.to_string()))?;
    }
    let lexer = Lexer::new(df.directives.escape);
    // Split into meta ARGs and stages.
    let mut meta: Vec<&Node> = Vec::new();
    let mut stage_nodes: Vec<(&Node, Vec<&Node>)> = Vec::new();
    for node in &df.nodes {
        match (node.keyword.as_str(), stage_nodes.last_mut()) {
            ("from", _) => stage_nodes.push((node, Vec::new())),
            (_, Some((_, body))) => body.push(node),
            ("arg", None) => meta.push(node),
            (kw, None) => {
                return Err(at(
                    node.start_line,
                    format!(
                        "{} before the first FROM: only ARG may come before FROM (no build stage in current context)",
                        kw.to_uppercase()
                    ),
                ))
            }
        }
    }
    if stage_nodes.is_empty() {
        return Err(PlanError {
            line: None,
            message: "the Dockerfile has no FROM: it contains no stages to build".into(),
        });
    }
    // Names first: the target's name feeds TARGETSTAGE.
    let mut froms = Vec::new();
    for (node, _) in &stage_nodes {
        match parse_instruction(node).map_err(|e| at(e.line, e.message))? {
            Instruction::From(f) => froms.push(f),
            _ => unreachable!("stage nodes start with FROM"),
        }
    }
    let target = match &opts.target {
        None => froms.len() - 1,
        Some(t) => {
            let lower = t.to_lowercase();
            froms
                .iter()
                .rposition(|f| f.name.as_deref() == Some(lower.as_str()))
                .ok_or_else(|| {
                    let names: Vec<&str> = froms.iter().filter_map(|f| f.name.as_deref()).collect();
                    PlanError {
                        line: None,
                        message: format!(
                            "target stage {t:?} could not be found; the stages are: {}",
                            if names.is_empty() {
                                "(none is named: add `AS <name>` to a FROM line)".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    }
                })?
        }
    };
    let target_name = froms[target]
        .name
        .clone()
        .unwrap_or_else(|| "default".into());

    // Global scope: defaults, then each meta ARG (a --build-arg overrides its default).
    let mut global = Scope {
        env: BTreeMap::new(),
        args: default_args(&opts.platform, &target_name),
    };
    for node in &meta {
        let Instruction::Arg(decls) = parse_instruction(node).map_err(|e| at(e.line, e.message))?
        else {
            unreachable!("meta nodes are ARG")
        };
        for d in decls {
            let value = match (opts.build_args.get(&d.name), &d.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(def)) => Some(
                    lexer
                        .expand(def, &global)
                        .map_err(|e| at(node.start_line, e.to_string()))?
                        .value,
                ),
                (None, None) => None,
            };
            match value {
                Some(v) => global.args.insert(d.name, v),
                None => global.args.remove(&d.name),
            };
        }
    }

    let mut stages: Vec<Stage> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    // What each finished stage leaves to a stage built FROM it: its ENV, and (as BuildKit
    // does) the ARG values in scope at its end.
    let mut stage_scope: Vec<Scope> = Vec::new();
    for (index, ((node, body), from)) in stage_nodes.iter().zip(froms).enumerate() {
        let line = node.start_line;
        let base_exp = lexer
            .expand(&from.image, &global)
            .map_err(|e| at(line, e.to_string()))?;
        if base_exp.value.is_empty() {
            return Err(at(
                line,
                format!("base name ({}) should not be blank", from.image),
            ));
        }
        let mut from_args: BTreeMap<String, String> = base_exp
            .matched
            .iter()
            .map(|k| (k.clone(), global.args[k].clone()))
            .collect();
        let platform = match &from.platform {
            None => None,
            Some(p) => {
                let e = lexer
                    .expand(p, &global)
                    .map_err(|e| at(line, e.to_string()))?;
                if e.value.is_empty() {
                    return Err(at(
                        line,
                        format!("empty platform value from expression {p}"),
                    ));
                }
                from_args.extend(
                    e.matched
                        .iter()
                        .map(|k| (k.clone(), global.args[k].clone())),
                );
                Some(e.value)
            }
        };
        let base_lower = base_exp.value.to_lowercase();
        let base = if let Some(&i) = names.get(&base_lower) {
            StageRef::Stage(i)
        } else if base_lower == "scratch" {
            StageRef::Scratch
        } else if let Some(later) = stage_nodes[index..]
            .iter()
            .zip(index..)
            .find(|((n, _), _)| stage_name_of(n).as_deref() == Some(base_lower.as_str()))
        {
            return Err(at(
                line,
                format!(
                    "FROM {} refers to stage {:?} defined at line {}, which is this stage or a later one; a stage can only build on stages defined before it",
                    base_exp.value,
                    base_lower,
                    later.0 .0.start_line
                ),
            ));
        } else {
            StageRef::Image(base_exp.value.clone())
        };
        let (mut scope, external_root, mut pending_triggers) = match &base {
            StageRef::Stage(p) => (
                stage_scope[*p].clone(),
                stages[*p].external_root,
                onbuild_triggers(&stages[*p], df.directives.escape)?,
            ),
            StageRef::Scratch => (Scope::default(), false, Vec::new()),
            StageRef::Image(_) => (Scope::default(), true, Vec::new()),
        };
        let mut stage = Stage {
            index,
            name: from.name.clone(),
            base: base.clone(),
            platform,
            instructions: Vec::new(),
            depends_on: BTreeSet::new(),
            from_args,
            line,
            external_root,
        };
        if let StageRef::Stage(p) = base {
            stage.depends_on.insert(p);
        }
        let mut lexer = lexer;
        lexer.skip_unset = external_root;
        let ctx = StageCtx {
            lexer,
            names: &names,
            stage_nodes: &stage_nodes,
            index,
            global: &global,
            build_args: &opts.build_args,
        };
        let mut queue: VecDeque<(Node, bool)> =
            pending_triggers.drain(..).map(|n| (n, true)).collect();
        queue.extend(body.iter().map(|n| ((*n).clone(), false)));
        for (node, from_onbuild) in queue {
            let planned = ctx.plan_instruction(&node, &mut scope, from_onbuild)?;
            if let Some(StageRef::Stage(s)) = &planned.copy_from {
                stage.depends_on.insert(*s);
            }
            for s in planned.mount_from.iter().flatten() {
                if let StageRef::Stage(s) = s {
                    stage.depends_on.insert(*s);
                }
            }
            stage.instructions.push(planned);
        }
        if let Some(n) = &stage.name {
            names.insert(n.clone(), index);
        }
        stage_scope.push(scope);
        stages.push(stage);
    }

    let mut built = vec![false; stages.len()];
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if !std::mem::replace(&mut built[i], true) {
            todo.extend(stages[i].depends_on.iter().copied());
        }
    }
    Ok(Plan {
        stages,
        escape: df.directives.escape,
        target,
        built,
        syntax: df.directives.syntax.clone(),
        platform: opts.platform.clone(),
        build_args: opts.build_args.clone(),
    })
}

fn stage_name_of(node: &Node) -> Option<String> {
    match node.args.as_slice() {
        [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_lowercase()),
        _ => None,
    }
}

/// The ONBUILD triggers recorded by a base stage, parsed as instructions of the child.
fn onbuild_triggers(base: &Stage, escape: char) -> Result<Vec<Node>, PlanError> {
    let mut out = Vec::new();
    for pi in &base.instructions {
        if let Instruction::Onbuild(trigger) = &pi.instruction {
            let text = if escape == '\\' {
                trigger.clone()
            } else {
                format!("# escape={escape}\n{trigger}")
            };
            let df = parser::parse(text.as_bytes()).map_err(|e| at(pi.start_line, e.message))?;
            for mut n in df.nodes {
                n.start_line = pi.start_line;
                n.end_line = pi.end_line;
                out.push(n);
            }
        }
    }
    Ok(out)
}
