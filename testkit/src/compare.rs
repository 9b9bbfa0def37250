//! Side-by-side differences between two [`Snapshot`]s: one line per differing path or
//! config field, expected (BuildKit) on the left, actual (dbuild) on the right.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::snapshot::{Snapshot, CONFIG_FIELDS};

/// One differing path or config field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// `/etc/passwd`, `config.Env PATH`, `config.Labels["a"]` ...
    pub what: String,
    pub expected: String,
    pub actual: String,
}

const ABSENT: &str = "(absent)";

fn render_value(v: Option<&Value>) -> String {
    match v {
        None => ABSENT.to_string(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

fn env_map(v: Option<&Value>) -> Vec<(String, String)> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.to_string(), String::new()),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn diff_config(expected: &Snapshot, actual: &Snapshot, out: &mut Vec<Difference>) {
    for field in CONFIG_FIELDS {
        let (e, a) = (expected.config.get(*field), actual.config.get(*field));
        if e == a {
            continue;
        }
        match *field {
            "Env" => {
                let (em, am) = (env_map(e), env_map(a));
                let (eh, ah): (BTreeMap<_, _>, BTreeMap<_, _>) =
                    (em.iter().cloned().collect(), am.iter().cloned().collect());
                if eh == ah {
                    out.push(Difference {
                        what: "config.Env (order)".into(),
                        expected: render_value(e),
                        actual: render_value(a),
                    });
                    continue;
                }
                let keys: BTreeSet<&String> = eh.keys().chain(ah.keys()).collect();
                for k in keys {
                    if eh.get(k) != ah.get(k) {
                        let show = |m: &BTreeMap<String, String>| {
                            m.get(k)
                                .map(|v| format!("{k}={v}"))
                                .unwrap_or_else(|| ABSENT.to_string())
                        };
                        out.push(Difference {
                            what: format!("config.Env {k}"),
                            expected: show(&eh),
                            actual: show(&ah),
                        });
                    }
                }
            }
            "Labels" | "ExposedPorts" | "Volumes" => {
                let empty = serde_json::Map::new();
                let eo = e.and_then(Value::as_object).unwrap_or(&empty);
                let ao = a.and_then(Value::as_object).unwrap_or(&empty);
                let keys: BTreeSet<&String> = eo.keys().chain(ao.keys()).collect();
                for k in keys {
                    if eo.get(k) != ao.get(k) {
                        let show = |v: Option<&Value>| match (*field, v) {
                            (_, None) => ABSENT.to_string(),
                            ("Labels", v) => render_value(v),
                            _ => "(present)".to_string(),
                        };
                        out.push(Difference {
                            what: format!("config.{field}[{k:?}]"),
                            expected: show(eo.get(k)),
                            actual: show(ao.get(k)),
                        });
                    }
                }
            }
            _ => out.push(Difference {
                what: format!("config.{field}"),
                expected: render_value(e),
                actual: render_value(a),
            }),
        }
    }
}

/// Every difference, filesystem first (in path order), then config fields.
pub fn differences(expected: &Snapshot, actual: &Snapshot) -> Vec<Difference> {
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = expected.fs.keys().chain(actual.fs.keys()).collect();
    for p in paths {
        let (e, a) = (expected.fs.get(p), actual.fs.get(p));
        if e != a {
            out.push(Difference {
                what: p.clone(),
                expected: expected.describe(p),
                actual: actual.describe(p),
            });
        }
    }
    diff_config(expected, actual, &mut out);
    out
}

/// The table a failing comparison prints.
pub fn render(diffs: &[Difference], expected_label: &str, actual_label: &str) -> String {
    let w_what = diffs
        .iter()
        .map(|d| d.what.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4)
        .min(60);
    let w_exp = diffs
        .iter()
        .map(|d| d.expected.chars().count())
        .chain([expected_label.chars().count()])
        .max()
        .unwrap_or(8)
        .min(80);
    let mut s = format!(
        "{:<w_what$}  {:<w_exp$}  | {}\n",
        "path/field", expected_label, actual_label
    );
    s.push_str(&format!(
        "{}  {}  | {}\n",
        "-".repeat(w_what),
        "-".repeat(w_exp),
        "-".repeat(actual_label.chars().count().max(8))
    ));
    for d in diffs {
        s.push_str(&format!(
            "{:<w_what$}  {:<w_exp$}  | {}\n",
            d.what, d.expected, d.actual
        ));
    }
    s
}

/// A unified-style line diff of two small texts (`-` expected, `+` actual, ` ` both).
pub fn text_diff(expected: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    // Longest common subsequence table, from the ends.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("   {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!(" - {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!(" + {}\n", b[j]));
            j += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str(" (the two differ in a final newline)\n");
    }
    out
}

/// For each path that is a small text file on both sides with different content, its line
/// diff: what the one-line summary cannot show.
pub fn content_diffs(expected: &Snapshot, actual: &Snapshot, diffs: &[Difference]) -> String {
    let mut out = String::new();
    for d in diffs {
        let (Some(e), Some(a)) = (expected.contents.get(&d.what), actual.contents.get(&d.what))
        else {
            continue;
        };
        if e == a || e.len() > 8192 || a.len() > 8192 {
            continue;
        }
        let (Ok(et), Ok(at)) = (std::str::from_utf8(e), std::str::from_utf8(a)) else {
            continue;
        };
        out.push_str(&format!(
            "--- {} (- expected, BuildKit / + actual, dbuild)\n{}",
            d.what,
            text_diff(et, at)
        ));
    }
    out
}

/// Panics with the side-by-side table (and line diffs of differing small text files)
/// unless the two images are the same.
pub fn assert_same_image(expected: &Snapshot, actual: &Snapshot) {
    let diffs = differences(expected, actual);
    if !diffs.is_empty() {
        panic!(
            "images differ in {} path(s)/field(s): expected {} ({}) vs actual {} ({})\n{}{}",
            diffs.len(),
            expected.image,
            expected.id,
            actual.image,
            actual.id,
            render(&diffs, "expected (BuildKit)", "actual (dbuild)"),
            content_diffs(expected, actual, &diffs)
        );
    }
}
