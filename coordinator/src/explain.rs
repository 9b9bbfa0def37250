//! Why a stage missed the cache: its key's inputs compared with those of the most recent
//! recorded build of the same stage (same Dockerfile, same stage name), named plainly —
//! "file app.go changed", "build arg VERSION 1 → 2", "depends on stage builder, which
//! changed". Every key lists the inputs it was hashed over, so the answer is exact.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::{ChainLink, KeyInput, StageKeys};
use crate::store::{Store, StoreError, Tree};

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
    use crate::keys::{InstructionKey, StageKey};

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
