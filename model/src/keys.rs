//! Cache keys: blake3, domain-separated, chained over a stage's instructions.
//!
//! Every key is the hash of an ordered list of named inputs ([`KeyInput`]), and that list is
//! kept beside the key, so a key can always say what it covers (and `explain` can say what
//! changed). A key covers exactly what can change a stage's output:
//! - the instruction after ARG expansion;
//! - the base: the external image reference (or its pinned id, once resolved), the parent
//!   stage's key, or scratch; and the platform;
//! - for COPY/ADD and bind mounts from the context: path, mode bits and content digest of
//!   exactly the files the sources match (never mtimes, owners or absolute paths);
//! - for `--from` and `RUN --mount from=`: the image reference (pinned id), or for a
//!   stage either the content digest of exactly the paths read from it, once the stage is
//!   built and has reported them ([`Contents`]), or else the source stage's key;
//! - the build args the instruction can see (every ARG in scope for RUN).
use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::context::ignore::{path_match, IgnoreMatcher};
use crate::context::{ContextManifest, EntryKind, ManifestEntry};
use crate::digest::{hex, parse_hex32};
use crate::frontend::instructions::{Instruction, MountType};
use crate::frontend::plan::{Plan, PlannedInstruction, Stage, StageRef};

/// Bumped whenever the encoding below or the executor's semantics change, so results
/// built under the old rules stop matching (the executor is part of what makes the output).
const KEY_CONTEXT: &str = "dbuild 2026-11 instruction key v3";

/// The key of one instruction of a stage's chain.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct InstructionKey(pub [u8; 32]);

/// The key of a stage: the last key of its instruction chain.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct StageKey(pub [u8; 32]);

/// A string that is not a key's 64 hex digits (what a key reads from JSON).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 64-digit hex key: {value:?}")]
pub struct NotAKey {
    pub value: String,
}

macro_rules! hex_key {
    ($t:ident) => {
        impl $t {
            pub fn to_hex(&self) -> String {
                hex(&self.0)
            }
            pub fn from_hex(s: &str) -> Option<Self> {
                parse_hex32(s).map($t)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), self.to_hex())
            }
        }
        impl From<$t> for String {
            fn from(k: $t) -> String {
                k.to_hex()
            }
        }
        impl TryFrom<String> for $t {
            type Error = NotAKey;
            fn try_from(s: String) -> Result<Self, NotAKey> {
                $t::from_hex(&s).ok_or(NotAKey { value: s })
            }
        }
    };
}
hex_key!(InstructionKey);
hex_key!(StageKey);

/// One named input of a key, e.g. `file src/app.go` = `0644 <blake3>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInput {
    pub name: String,
    pub value: String,
}

/// One link of a stage's chain: its key and everything the key was computed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainLink {
    pub key: InstructionKey,
    /// The instruction as written (`FROM ...` for the first link).
    pub source: String,
    pub line: usize,
    pub inputs: Vec<KeyInput>,
}

/// The keys of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageKeys {
    pub index: usize,
    /// `chain[0]` is the FROM link, then one link per instruction.
    pub chain: Vec<ChainLink>,
    pub key: StageKey,
    /// Context files (and symlinks) the stage's instructions read, sorted.
    pub context_files: Vec<String>,
    /// Context sources that matched nothing (building this stage would fail).
    pub missing: Vec<String>,
}

/// Resolves an external image reference to an immutable id, when one is known.
pub trait BaseResolver {
    fn resolve(&self, reference: &str) -> Option<String>;
}

/// Resolves nothing: keys cover the reference as written (what `plan` shows).
pub struct Unresolved;

impl BaseResolver for Unresolved {
    fn resolve(&self, _: &str) -> Option<String> {
        None
    }
}

/// Content digests of paths of built stages: `(stage, absolute source path)` → digest of
/// what a `COPY --from` of that path copies (types, modes, owners, content; no mtimes),
/// as the executor reported it. A consumer whose every `--from` path has one is keyed on
/// that content instead of the source stage's key, so a rebuilt stage that produced the
/// same files leaves its consumers cached (as BuildKit's content-based cache does).
pub trait Contents {
    fn digest(&self, stage: usize, path: &str) -> Option<String>;
}

/// No stage has reported contents: `--from` stages are covered by their keys.
pub struct NoContents;

impl Contents for NoContents {
    fn digest(&self, _: usize, _: &str) -> Option<String> {
        None
    }
}

impl Contents for std::collections::BTreeMap<usize, std::collections::BTreeMap<String, String>> {
    fn digest(&self, stage: usize, path: &str) -> Option<String> {
        self.get(&stage)?.get(path).cloned()
    }
}

fn hash_inputs(inputs: &[KeyInput]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(KEY_CONTEXT);
    for i in inputs {
        for part in [&i.name, &i.value] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    *h.finalize().as_bytes()
}

fn input(name: impl Into<String>, value: impl Into<String>) -> KeyInput {
    KeyInput {
        name: name.into(),
        value: value.into(),
    }
}

/// Computes every stage's keys, in stage order (a stage only refers to earlier ones).
pub fn compute_keys(
    plan: &Plan,
    manifest: &ContextManifest,
    resolver: &dyn BaseResolver,
) -> Vec<StageKeys> {
    let mut out: Vec<StageKeys> = Vec::with_capacity(plan.stages.len());
    for stage in &plan.stages {
        let keys = stage_keys(plan, stage, &out, manifest, resolver, &NoContents);
        out.push(keys);
    }
    out
}

/// Re-keys stage `index` once the stages it reads are done: `done` holds their final keys
/// (indices below `index`), `contents` what they reported. Same rules as [`compute_keys`].
pub fn rekey_stage(
    plan: &Plan,
    index: usize,
    done: &[StageKeys],
    manifest: &ContextManifest,
    resolver: &dyn BaseResolver,
    contents: &dyn Contents,
) -> StageKeys {
    stage_keys(
        plan,
        &plan.stages[index],
        &done[..index],
        manifest,
        resolver,
        contents,
    )
}

/// The source path a `--from` read is keyed and reported under (absolute, cleaned), or
/// `None` when the executor must still expand it against the image's ENV.
pub fn content_path(src: &str) -> Option<String> {
    if src.contains('$') || src.starts_with("<<") || is_remote(src) {
        return None;
    }
    Some(format!("/{}", clean_source(src)))
}

/// For every built stage read by `COPY --from` or `RUN --mount from=` (a source other
/// than `/`): the paths its consumers read, which its executor reports the contents of.
pub fn content_paths(plan: &Plan) -> std::collections::BTreeMap<usize, BTreeSet<String>> {
    let mut out: std::collections::BTreeMap<usize, BTreeSet<String>> = Default::default();
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        for pi in &s.instructions {
            for (src, paths) in from_reads(pi) {
                out.entry(src)
                    .or_default()
                    .extend(paths.into_iter().flatten());
            }
        }
    }
    out
}

/// The stages an instruction reads with `--from` / `mount from=`, each with its content
/// paths (`None` for one that cannot be content-keyed).
pub fn from_reads(pi: &PlannedInstruction) -> Vec<(usize, Vec<Option<String>>)> {
    let mut out = Vec::new();
    match &pi.instruction {
        Instruction::Copy(c) | Instruction::Add(c) => {
            if let Some(StageRef::Stage(i)) = &pi.copy_from {
                out.push((*i, c.sources.iter().map(|s| content_path(s)).collect()));
            }
        }
        Instruction::Run(r) => {
            for (m, from) in r.mounts.iter().zip(&pi.mount_from) {
                if let (MountType::Bind, Some(StageRef::Stage(i))) = (&m.kind, from) {
                    // A whole filesystem is not worth reading back: keyed by the stage.
                    let p = m
                        .source
                        .as_deref()
                        .and_then(content_path)
                        .filter(|p| p != "/");
                    out.push((*i, vec![p]));
                }
            }
        }
        _ => {}
    }
    out
}

/// The inputs covering what an instruction reads from stage `i`: one `content` input per
/// path when every path's content is known, else the stage's key.
fn from_stage_inputs(
    what: &str,
    done: &[StageKeys],
    plan: &Plan,
    i: usize,
    paths: &[Option<String>],
    contents: &dyn Contents,
) -> Vec<KeyInput> {
    let name = plan.stages[i].display_name();
    let known: Option<Vec<(String, String)>> = paths
        .iter()
        .map(|p| {
            let p = p.as_ref()?;
            Some((p.clone(), contents.digest(i, p)?))
        })
        .collect();
    match known {
        Some(known) if !known.is_empty() => known
            .into_iter()
            .map(|(p, d)| input(format!("{what} {name} {p}"), format!("content {d}")))
            .collect(),
        _ => vec![stage_input(what, done, plan, i)],
    }
}

fn image_input(what: &str, reference: &str, resolver: &dyn BaseResolver) -> KeyInput {
    match resolver.resolve(reference) {
        Some(id) => input(format!("{what} {reference}"), id),
        None => input(format!("{what} {reference}"), reference),
    }
}

fn stage_input(what: &str, done: &[StageKeys], plan: &Plan, i: usize) -> KeyInput {
    input(
        format!("{what} {}", plan.stages[i].display_name()),
        done[i].key.to_hex(),
    )
}

fn stage_keys(
    plan: &Plan,
    stage: &Stage,
    done: &[StageKeys],
    manifest: &ContextManifest,
    resolver: &dyn BaseResolver,
    contents: &dyn Contents,
) -> StageKeys {
    let platform = stage
        .platform
        .clone()
        .unwrap_or_else(|| plan.platform.to_string());
    let mut inputs = vec![match &stage.base {
        StageRef::Scratch => input("base", "scratch"),
        StageRef::Image(r) => image_input("base image", r, resolver),
        StageRef::Stage(i) => stage_input("base stage", done, plan, *i),
    }];
    inputs.push(input("platform", platform));
    inputs.extend(
        stage
            .from_args
            .iter()
            .map(|(k, v)| input(format!("build arg {k}"), v.clone())),
    );
    let mut prev = InstructionKey(hash_inputs(&inputs));
    let mut chain = vec![ChainLink {
        key: prev,
        source: format!("FROM {}", base_text(plan, &stage.base)),
        line: stage.line,
        inputs,
    }];
    let mut files: BTreeSet<String> = BTreeSet::new();
    let mut missing: Vec<String> = Vec::new();
    for pi in &stage.instructions {
        let mut inputs = vec![input("previous", prev.to_hex())];
        inputs.push(input("instruction", canonical(&pi.instruction)));
        inputs.extend(
            pi.build_args
                .iter()
                .map(|(k, v)| input(format!("build arg {k}"), v.clone())),
        );
        instruction_inputs(
            plan,
            pi,
            done,
            manifest,
            resolver,
            contents,
            &mut inputs,
            &mut files,
            &mut missing,
        );
        prev = InstructionKey(hash_inputs(&inputs));
        chain.push(ChainLink {
            key: prev,
            source: pi.source.clone(),
            line: pi.start_line,
            inputs,
        });
    }
    StageKeys {
        index: stage.index,
        key: StageKey(prev.0),
        chain,
        context_files: files.into_iter().collect(),
        missing,
    }
}

fn base_text(plan: &Plan, base: &StageRef) -> String {
    match base {
        StageRef::Scratch => "scratch".into(),
        StageRef::Image(r) => r.clone(),
        StageRef::Stage(i) => plan.stages[*i].display_name(),
    }
}

/// The instruction's canonical encoding: its expanded, typed form as JSON (field order is
/// fixed by the type), so spelling (`copy` vs `COPY`, spacing, continuations) never counts.
/// ARG values are left out: an ARG changes nothing by itself, and each instruction that can
/// see a value lists it as a `build arg` input.
fn canonical(i: &Instruction) -> String {
    match i {
        Instruction::Arg(decls) => {
            let names: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
            serde_json::to_string(&serde_json::json!({ "Arg": names }))
        }
        other => serde_json::to_string(other),
    }
    .expect("instructions serialize")
}

#[allow(clippy::too_many_arguments)]
fn instruction_inputs(
    plan: &Plan,
    pi: &PlannedInstruction,
    done: &[StageKeys],
    manifest: &ContextManifest,
    resolver: &dyn BaseResolver,
    contents: &dyn Contents,
    inputs: &mut Vec<KeyInput>,
    files: &mut BTreeSet<String>,
    missing: &mut Vec<String>,
) {
    match &pi.instruction {
        Instruction::Copy(c) | Instruction::Add(c) => {
            match &pi.copy_from {
                Some(StageRef::Stage(i)) => {
                    let reads = from_reads(pi);
                    let paths = reads.first().map(|(_, p)| p.as_slice()).unwrap_or(&[]);
                    inputs.extend(from_stage_inputs(
                        "from stage",
                        done,
                        plan,
                        *i,
                        paths,
                        contents,
                    ))
                }
                Some(StageRef::Image(r)) => inputs.push(image_input("from image", r, resolver)),
                Some(StageRef::Scratch) => inputs.push(input("from", "scratch")),
                None => {
                    let heredocs: BTreeSet<String> =
                        c.heredocs.iter().map(|h| h.name.clone()).collect();
                    let sources: Vec<&str> = c
                        .sources
                        .iter()
                        .map(String::as_str)
                        .filter(|s| !is_heredoc_source(s, &heredocs))
                        .filter(|s| !is_remote(s))
                        .collect();
                    let (entries, miss) = match_sources(manifest, &sources, &c.excludes);
                    push_entries(&entries, inputs, files);
                    for m in miss {
                        inputs.push(input("missing", m.clone()));
                        missing.push(m);
                    }
                }
            }
            for s in c.sources.iter().filter(|s| is_remote(s)) {
                inputs.push(input("url", s.clone()));
            }
        }
        Instruction::Run(r) => {
            let mut reads = from_reads(pi).into_iter();
            for (m, from) in r.mounts.iter().zip(&pi.mount_from) {
                if m.kind != MountType::Bind {
                    continue;
                }
                match from {
                    Some(StageRef::Stage(i)) => {
                        let paths = reads.next().map(|(_, p)| p).unwrap_or_default();
                        inputs.extend(from_stage_inputs(
                            "mount from stage",
                            done,
                            plan,
                            *i,
                            &paths,
                            contents,
                        ))
                    }
                    Some(StageRef::Image(r)) => {
                        inputs.push(image_input("mount from image", r, resolver))
                    }
                    Some(StageRef::Scratch) => {}
                    None => {
                        let src = m.source.as_deref().unwrap_or(".");
                        let (entries, miss) = match_sources(manifest, &[src], &[]);
                        push_entries(&entries, inputs, files);
                        for m in miss {
                            inputs.push(input("missing", m.clone()));
                            missing.push(m);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

fn push_entries(
    entries: &[&ManifestEntry],
    inputs: &mut Vec<KeyInput>,
    files: &mut BTreeSet<String>,
) {
    for e in entries {
        let (what, value) = match &e.kind {
            EntryKind::File { digest, .. } => {
                files.insert(e.path.clone());
                ("file", format!("{:04o} {}", e.mode, digest))
            }
            EntryKind::Dir => ("dir", format!("{:04o}", e.mode)),
            EntryKind::Symlink { target } => {
                files.insert(e.path.clone());
                ("symlink", format!("{:04o} -> {target}", e.mode))
            }
        };
        inputs.push(input(format!("{what} {}", e.path), value));
    }
}

fn is_remote(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("git@")
}

fn is_heredoc_source(s: &str, names: &BTreeSet<String>) -> bool {
    s.strip_prefix("<<")
        .map(|rest| {
            let rest = rest
                .trim_start_matches('-')
                .trim_matches(|c| c == '"' || c == '\'');
            names.contains(rest)
        })
        .unwrap_or(false)
}

/// Cleans a COPY source to a context-relative path: no leading `/` or `./`, no `..`
/// escaping the root, `""` for the whole context.
pub fn clean_source(src: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in src.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The manifest entries that COPY sources select (a directory brings everything under it),
/// minus `--exclude` matches; and the sources that selected nothing.
pub fn match_sources<'m>(
    manifest: &'m ContextManifest,
    sources: &[&str],
    excludes: &[String],
) -> (Vec<&'m ManifestEntry>, Vec<String>) {
    let mut selected: BTreeSet<&str> = BTreeSet::new();
    let mut missing = Vec::new();
    for src in sources {
        let clean = clean_source(src);
        let roots: Vec<&ManifestEntry> = if clean.is_empty() {
            manifest.iter().collect()
        } else if has_wildcard(&clean) {
            manifest
                .iter()
                .filter(|e| path_match(&clean, &e.path).unwrap_or(false))
                .collect()
        } else {
            manifest.get(&clean).into_iter().collect()
        };
        let found = clean.is_empty() || !roots.is_empty();
        for root in roots {
            selected.insert(&root.path);
            match &root.kind {
                EntryKind::Dir => {
                    let prefix = format!("{}/", root.path);
                    for e in manifest.iter().filter(|e| e.path.starts_with(&prefix)) {
                        selected.insert(&e.path);
                    }
                }
                EntryKind::Symlink { target } => {
                    // COPY follows a symlink named as a source; keep its target in the key.
                    let base = root.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let resolved = if target.starts_with('/') {
                        clean_source(target)
                    } else {
                        clean_source(&format!("{base}/{target}"))
                    };
                    if let Some(t) = manifest.get(&resolved) {
                        selected.insert(&t.path);
                        let prefix = format!("{}/", t.path);
                        for e in manifest.iter().filter(|e| e.path.starts_with(&prefix)) {
                            selected.insert(&e.path);
                        }
                    }
                }
                EntryKind::File { .. } => {}
            }
        }
        if !found {
            missing.push(src.to_string());
        }
    }
    let mut entries: Vec<&ManifestEntry> = selected
        .into_iter()
        .filter_map(|p| manifest.get(p))
        .collect();
    if !excludes.is_empty() {
        // `--exclude` takes .dockerignore patterns; a bad one excludes nothing here and is
        // reported when the instruction runs.
        if let Ok(m) = IgnoreMatcher::new(excludes) {
            entries.retain(|e| !m.matches(&e.path));
        }
    }
    (entries, missing)
}
