//! Why a stage missed the cache: its key's inputs compared with those of the most recent
//! recorded build of the same stage (same Dockerfile, same stage name), named plainly —
//! "file app.go changed", "build arg VERSION 1 → 2", "depends on stage builder, which
//! changed". Every key lists the inputs it was hashed over, so the answer is exact.
//!
//! [`explain`] walks the stages a build needs as the scheduler would (re-keying each on
//! the contents of the stages it copies from) and asks a [`StageLookup`] whether each key
//! is served: the daemon's images for the embedded build, the stage cache on a farm
//! ([`CacheLookup`]).
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cache::{Export, StageCache};
use crate::store::{Store, StoreError, Tree};
use model::context::ContextManifest;
use model::frontend::plan::{Plan, StageRef};
use model::keys::{
    content_paths, rekey_stage, BaseResolver, ChainLink, KeyInput, StageKey, StageKeys,
};

/// Where a stage's history lives: the Dockerfile (canonical path) and the stage's name
/// (`stage-N` when it has none).
pub fn history_key(dockerfile_id: &str, stage: &str) -> Vec<u8> {
    format!("{dockerfile_id}\0{stage}").into_bytes()
}

/// Remembers `history` as the most recent build of the stage.
pub fn record(
    store: &dyn Store,
    dockerfile_id: &str,
    stage: &str,
    history: &StageHistory,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(history).expect("history serializes");
    store.put(Tree::History, &history_key(dockerfile_id, stage), &json)
}

/// The most recent recorded build of the stage, if any (an unreadable record is none).
pub fn latest(
    store: &dyn Store,
    dockerfile_id: &str,
    stage: &str,
) -> Result<Option<StageHistory>, StoreError> {
    Ok(store
        .get(Tree::History, &history_key(dockerfile_id, stage))?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

/// Why each stage the target needs differs from its last recorded build (an empty list:
/// same key as last time). `keys` are the static keys (as [`remember`] records them).
pub fn why_rebuilt(
    store: &dyn Store,
    dockerfile_id: &str,
    plan: &Plan,
    keys: &[StageKeys],
) -> BTreeMap<usize, Vec<String>> {
    plan.stages
        .iter()
        .filter(|s| plan.built[s.index])
        .map(|s| {
            let why = match latest(store, dockerfile_id, &s.display_name()) {
                Ok(Some(h)) => reasons(&h, &keys[s.index]),
                Ok(None) => vec![NO_HISTORY.into()],
                Err(e) => vec![format!("history unreadable: {e}")],
            };
            (s.index, why)
        })
        .collect()
}

/// The reason given for a stage no build of which is recorded.
pub const NO_HISTORY: &str = "no earlier build of this stage is recorded";

/// Records the static keys of `stages` (those a build made or found cached) as the most
/// recent build of each. History only adds explanations: a failed write is a warning.
pub fn remember(
    store: &dyn Store,
    dockerfile_id: &str,
    plan: &Plan,
    keys: &[StageKeys],
    stages: impl Iterator<Item = usize>,
) {
    let now = crate::cache::now_ms();
    for i in stages {
        let h = StageHistory::of(&keys[i], now);
        if let Err(e) = record(store, dockerfile_id, &plan.stages[i].display_name(), &h) {
            tracing::warn!(error = %e, "could not record build history");
        }
    }
    if let Err(e) = store.flush() {
        tracing::warn!(error = %e, "could not flush build history");
    }
}

/// `Explanation/1`: for every stage the target needs, in build order, whether it would be
/// served from the cache, and for a miss why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub stages: Vec<StageExplanation>,
}

impl wire::Doc for Explanation {
    const KIND: &'static str = "Explanation/1";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageExplanation {
    pub index: usize,
    /// The stage's name (`stage-N` when it has none).
    pub name: String,
    pub hit: bool,
    /// The stage key as the build would look it up (hex).
    pub key: String,
    /// For a miss: what differs from the last recorded build of the stage.
    pub reasons: Vec<String>,
    /// For a miss: missed stages this one only copies files from. If they make the same
    /// files again, this stage's key (on their content) may be one already built.
    pub copies_from_missed: Vec<String>,
}

impl Explanation {
    /// The lines `dbuild explain` prints.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.stages {
            let label = format!("#{} {}", s.index, s.name);
            let short = &s.key[..12.min(s.key.len())];
            if s.hit {
                out.push(format!("{label}: hit ({short})"));
                continue;
            }
            if s.copies_from_missed.is_empty() {
                out.push(format!("{label}: miss ({short})"));
            } else {
                out.push(format!(
                    "{label}: miss ({short}), unless stage {} rebuilds the files copied from it unchanged",
                    s.copies_from_missed.join(", ")
                ));
            }
            out.extend(s.reasons.iter().map(|r| format!("  - {r}")));
        }
        out
    }
}

/// What a lookup of one stage key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A result the build would reuse, with the content digests it knows of the paths its
    /// consumers read (a path left out: its consumers are keyed on the stage's key).
    Hit(BTreeMap<String, String>),
    Miss,
    /// A result for the key that cannot serve this build, and why.
    Unusable(String),
}

/// Whether a stage key is served where the build would run.
#[async_trait::async_trait]
pub trait StageLookup: Send + Sync {
    /// Looks up stage `stage` under `key`; `paths` are the paths its consumers read with
    /// `COPY --from` (their content digests key those consumers).
    async fn lookup(&self, stage: usize, key: &StageKey, paths: &[String]) -> Lookup;
}

/// A farm's lookup: a hit is a stage record whose blobs cover what this build's
/// consumers need ([`crate::pool::exports`]), exactly as the scheduler looks it up on
/// the worker pool. Nothing is counted as a hit.
pub struct CacheLookup<'a> {
    pub cache: &'a StageCache,
    pub exports: BTreeMap<usize, Export>,
}

#[async_trait::async_trait]
impl StageLookup for CacheLookup<'_> {
    async fn lookup(&self, stage: usize, key: &StageKey, _paths: &[String]) -> Lookup {
        let need = self.exports.get(&stage).cloned().unwrap_or_default();
        match self.cache.find(key, &need) {
            Ok(Some(r)) => return Lookup::Hit(r.contents),
            Ok(None) => {}
            Err(e) => return Lookup::Unusable(format!("the stage cache is unreadable: {e}")),
        }
        match self.cache.get(key) {
            Ok(Some(r)) if !r.image_id.is_empty() => {
                let mut lacks = Vec::new();
                if need.image && r.image.is_none() {
                    lacks.push("the image".to_string());
                }
                lacks.extend(
                    need.paths
                        .iter()
                        .filter(|p| !r.paths.contains_key(*p))
                        .cloned(),
                );
                Lookup::Unusable(format!(
                    "its cached result lacks what this build needs from it: {}",
                    lacks.join(", ")
                ))
            }
            _ => Lookup::Miss,
        }
    }
}

/// Explains a build: every stage the target needs, in order, re-keyed as the scheduler
/// re-keys it (on the contents hits report for the paths read from them), looked up
/// with `lookup`; a miss is explained against the history of `dockerfile_id` in `history`
/// by its static key (`keys`, as computed before the build, which is what is recorded).
#[allow(clippy::too_many_arguments)]
pub async fn explain(
    plan: &Plan,
    manifest: &ContextManifest,
    resolver: &(dyn BaseResolver + Sync),
    keys: &[StageKeys],
    history: &dyn Store,
    dockerfile_id: &str,
    lookup: &dyn StageLookup,
) -> Explanation {
    let why = why_rebuilt(history, dockerfile_id, plan, keys);
    let paths = content_paths(plan);
    let mut keys = keys.to_vec();
    let mut contents: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
    let mut missed: BTreeSet<usize> = BTreeSet::new();
    let mut out = Explanation::default();
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        let i = s.index;
        keys[i] = rekey_stage(plan, i, &keys, manifest, resolver, &contents);
        let key = keys[i].key;
        let want: Vec<String> = paths.get(&i).into_iter().flatten().cloned().collect();
        let mut reasons = Vec::new();
        match lookup.lookup(i, &key, &want).await {
            Lookup::Hit(have) => {
                contents.insert(i, have);
                out.stages.push(StageExplanation {
                    index: i,
                    name: s.display_name(),
                    hit: true,
                    key: key.to_hex(),
                    reasons,
                    copies_from_missed: Vec::new(),
                });
                continue;
            }
            Lookup::Miss => {}
            Lookup::Unusable(why) => reasons.push(why),
        }
        missed.insert(i);
        // Stages this one only copies from, which will be rebuilt: if they make the same
        // files again, this stage's key (on their content) is one already built.
        let copies_from_missed = s
            .depends_on
            .iter()
            .filter(|d| missed.contains(d) && s.base != StageRef::Stage(**d))
            .filter(|d| paths.contains_key(d))
            .map(|d| plan.stages[*d].display_name())
            .collect();
        reasons.extend(why.get(&i).cloned().unwrap_or_default());
        out.stages.push(StageExplanation {
            index: i,
            name: s.display_name(),
            hit: false,
            key: key.to_hex(),
            reasons,
            copies_from_missed,
        });
    }
    out
}

/// What a recorded build of a stage left in the index for later explanations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageHistory {
    pub key: String,
    /// The chain as it was keyed: each link's source line and inputs.
    pub chain: Vec<HistoryLink>,
    pub unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryLink {
    pub source: String,
    pub inputs: Vec<KeyInput>,
}

impl StageHistory {
    pub fn of(keys: &StageKeys, unix_ms: u64) -> Self {
        StageHistory {
            key: keys.key.to_hex(),
            chain: keys
                .chain
                .iter()
                .map(|l| HistoryLink {
                    source: l.source.clone(),
                    inputs: l.inputs.clone(),
                })
                .collect(),
            unix_ms,
        }
    }
}

/// Plain-language reasons why `now` differs from `before` (empty when they are equal).
pub fn reasons(before: &StageHistory, now: &StageKeys) -> Vec<String> {
    if before.key == now.key.to_hex() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let old = flatten(before.chain.iter().map(|l| (&l.source, &l.inputs)));
    let new = flatten(now.chain.iter().map(|l: &ChainLink| (&l.source, &l.inputs)));
    for (name, value) in &new {
        match old.get(name) {
            Some(was) if was == value => {}
            Some(was) => out.push(changed(name, was, value)),
            None => out.push(added(name, value)),
        }
    }
    for (name, was) in &old {
        if !new.contains_key(name) {
            out.push(removed(name, was));
        }
    }
    // Instructions are compared by position: an edit shows as the line that changed.
    let (a, b) = (&before.chain, &now.chain);
    for (i, link) in b.iter().enumerate().skip(1) {
        match a.get(i) {
            Some(o) if o.source == link.source && same_instruction(&o.inputs, &link.inputs) => {}
            Some(o) if o.source != link.source => out.push(format!(
                "instruction changed: `{}` → `{}`",
                o.source, link.source
            )),
            Some(_) => {}
            None => out.push(format!("instruction added: `{}`", link.source)),
        }
    }
    for o in a.iter().skip(b.len()) {
        out.push(format!("instruction removed: `{}`", o.source));
    }
    if out.is_empty() {
        out.push("an instruction's expanded form changed".into());
    }
    out.dedup();
    out
}

fn same_instruction(a: &[KeyInput], b: &[KeyInput]) -> bool {
    let get = |v: &[KeyInput]| {
        v.iter()
            .find(|i| i.name == "instruction")
            .map(|i| i.value.clone())
    };
    get(a) == get(b)
}

/// Every input except the chaining ones (`previous`, `instruction`), by name.
fn flatten<'a>(
    links: impl Iterator<Item = (&'a String, &'a Vec<KeyInput>)>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (_, inputs) in links {
        for i in inputs {
            if i.name != "previous" && i.name != "instruction" {
                m.insert(i.name.clone(), i.value.clone());
            }
        }
    }
    m
}

fn subject(name: &str) -> (&str, &str) {
    name.split_once(' ').unwrap_or((name, ""))
}

fn changed(name: &str, was: &str, now: &str) -> String {
    match subject(name) {
        ("file", path) => format!("file {path} changed"),
        ("symlink", path) => format!("symlink {path} changed ({was} → {now})"),
        ("dir", path) => format!("directory {path} changed mode ({was} → {now})"),
        ("build", rest) if rest.starts_with("arg ") => {
            format!("build arg {} {was} → {now}", &rest[4..])
        }
        ("base", rest) if rest.starts_with("image ") => {
            format!("base image {} now resolves to {now}", &rest[6..])
        }
        ("base", rest) if rest.starts_with("stage ") => {
            format!("depends on stage {}, which changed", &rest[6..])
        }
        ("from", rest) if rest.starts_with("stage ") => {
            format!("depends on stage {}, which changed", &rest[6..])
        }
        ("mount", rest) if rest.starts_with("from stage ") => {
            format!("depends on stage {}, which changed", &rest[11..])
        }
        ("from", rest) if rest.starts_with("image ") => {
            format!("image {} now resolves to {now}", &rest[6..])
        }
        ("platform", _) => format!("platform {was} → {now}"),
        _ => format!("{name}: {was} → {now}"),
    }
}

fn added(name: &str, value: &str) -> String {
    match subject(name) {
        ("file", path) => format!("file {path} added"),
        ("build", rest) if rest.starts_with("arg ") => {
            format!("build arg {} now set ({value})", &rest[4..])
        }
        ("missing", _) => format!("source {value} is missing from the context"),
        _ => format!("new input {name}"),
    }
}

fn removed(name: &str, was: &str) -> String {
    match subject(name) {
        ("file", path) => format!("file {path} removed"),
        ("build", rest) if rest.starts_with("arg ") => {
            format!("build arg {} no longer set (was {was})", &rest[4..])
        }
        ("missing", _) => format!("source {was} is now in the context"),
        _ => format!("input {name} gone"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::keys::{InstructionKey, StageKey};

    fn link(source: &str, inputs: &[(&str, &str)]) -> ChainLink {
        ChainLink {
            key: InstructionKey([0; 32]),
            source: source.into(),
            line: 1,
            inputs: inputs
                .iter()
                .map(|(n, v)| KeyInput {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    fn keys(key: u8, chain: Vec<ChainLink>) -> StageKeys {
        StageKeys {
            index: 0,
            chain,
            key: StageKey([key; 32]),
            context_files: vec![],
            missing: vec![],
        }
    }

    #[test]
    fn names_what_changed() {
        let before = keys(
            1,
            vec![
                link(
                    "FROM golang:1.7.3",
                    &[("base image golang:1.7.3", "sha256:aaa")],
                ),
                link("ARG VERSION", &[("instruction", "a")]),
                link(
                    "COPY app.go .",
                    &[
                        ("instruction", "c"),
                        ("file app.go", "0644 x"),
                        ("file old.go", "0644 o"),
                    ],
                ),
                link(
                    "RUN make",
                    &[("instruction", "r"), ("build arg VERSION", "1")],
                ),
            ],
        );
        let now = keys(
            2,
            vec![
                link(
                    "FROM golang:1.7.3",
                    &[("base image golang:1.7.3", "sha256:bbb")],
                ),
                link("ARG VERSION", &[("instruction", "a")]),
                link(
                    "COPY app.go .",
                    &[
                        ("instruction", "c"),
                        ("file app.go", "0644 y"),
                        ("file new.go", "0644 n"),
                    ],
                ),
                link(
                    "RUN make all",
                    &[("instruction", "r2"), ("build arg VERSION", "2")],
                ),
            ],
        );
        let r = reasons(&StageHistory::of(&before, 0), &now);
        for expected in [
            "base image golang:1.7.3 now resolves to sha256:bbb",
            "file app.go changed",
            "file new.go added",
            "file old.go removed",
            "build arg VERSION 1 → 2",
            "instruction changed: `RUN make` → `RUN make all`",
        ] {
            assert!(
                r.iter().any(|x| x == expected),
                "missing {expected:?} in {r:#?}"
            );
        }
        assert!(reasons(&StageHistory::of(&now, 0), &now).is_empty());
    }

    #[test]
    fn upstream_stage_changes_are_named() {
        let before = keys(
            1,
            vec![
                link("FROM alpine", &[]),
                link(
                    "COPY --from=builder /app .",
                    &[("from stage builder", "k1")],
                ),
            ],
        );
        let now = keys(
            2,
            vec![
                link("FROM alpine", &[]),
                link(
                    "COPY --from=builder /app .",
                    &[("from stage builder", "k2")],
                ),
            ],
        );
        assert_eq!(
            reasons(&StageHistory::of(&before, 0), &now),
            vec!["depends on stage builder, which changed"]
        );
    }
}
