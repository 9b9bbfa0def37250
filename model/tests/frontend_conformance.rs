//! Runs the parser over BuildKit's own parser fixtures in `shared/conformance`
//! (see its README). Set `DBUILD_CONFORMANCE_DIR` to run another set of cases laid out the
//! same way (for example the held-out half). Without the corpus (a fresh clone has no
//! `../shared` beside it) the tests are skipped, and fail under `CI=true`.
//!
//! A case is a directory holding a `Dockerfile` and
//! - `result`: it must parse, and the dump must equal `result` byte for byte;
//! - `lines`: it must parse, and each instruction must span the `start end` lines given;
//! - neither, inside a directory whose name contains `negative`: parsing must fail.

use model::frontend::dump::dump;
use model::frontend::parser::parse;
use std::fs;
use std::path::{Path, PathBuf};

fn conformance_dir() -> PathBuf {
    match std::env::var_os("DBUILD_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    }
}

#[derive(Debug, PartialEq)]
enum Kind {
    Positive,
    Lines,
    Negative,
}

/// Every case directory below `dir`, sorted by path.
fn collect_cases(dir: &Path, out: &mut Vec<(PathBuf, Kind)>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for case in entries {
        if case.join("Dockerfile").is_file() {
            let kind = if case.join("result").is_file() {
                Kind::Positive
            } else if case.join("lines").is_file() {
                Kind::Lines
            } else if case.to_string_lossy().contains("negative") {
                Kind::Negative
            } else {
                panic!(
                    "{}: Dockerfile without result/lines outside a negative dir",
                    case.display()
                );
            };
            out.push((case, kind));
        } else {
            collect_cases(&case, out);
        }
    }
}

/// Every case, or `None` (the test skipped) when the corpus is not there.
fn cases() -> Option<Vec<(PathBuf, Kind)>> {
    let dir = conformance_dir();
    if !dir.is_dir() {
        testkit::ci::skip(format!(
            "conformance directory {} is missing (set DBUILD_CONFORMANCE_DIR?)",
            dir.display()
        ));
        return None;
    }
    let mut out = Vec::new();
    collect_cases(&dir, &mut out);
    assert!(
        !out.is_empty(),
        "no conformance cases found under {}",
        dir.display()
    );
    if std::env::var_os("DBUILD_CONFORMANCE_DIR").is_none() {
        for sub in [
            "buildkit-parser",
            "buildkit-parser-lines",
            "buildkit-parser-negative",
        ] {
            assert!(
                dir.join(sub).is_dir(),
                "{} is missing",
                dir.join(sub).display()
            );
        }
    }
    Some(out)
}

fn check_positive(case: &Path) -> Result<(), String> {
    let input = fs::read(case.join("Dockerfile")).map_err(|e| e.to_string())?;
    let expected = fs::read(case.join("result")).map_err(|e| e.to_string())?;
    let df = parse(&input).map_err(|e| format!("parse failed: {e}"))?;
    let actual = dump(&df);
    if actual.as_bytes() == expected {
        return Ok(());
    }
    let expected = String::from_utf8_lossy(&expected);
    let mut msg = format!("dump differs\n--- expected\n{expected}--- actual\n{actual}");
    for (i, (e, a)) in expected.lines().zip(actual.lines()).enumerate() {
        if e != a {
            msg += &format!(
                "first difference in line {}:\n  expected {e}\n  actual   {a}\n",
                i + 1
            );
            break;
        }
    }
    Err(msg)
}

fn check_lines(case: &Path) -> Result<(), String> {
    let input = fs::read(case.join("Dockerfile")).map_err(|e| e.to_string())?;
    let spec = fs::read_to_string(case.join("lines")).map_err(|e| e.to_string())?;
    let expected: Vec<(usize, usize)> = spec
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Vec<usize> = l
                .split_whitespace()
                .map(|n| n.parse().expect("number"))
                .collect();
            assert_eq!(v.len(), 2, "bad lines entry {l:?}");
            (v[0], v[1])
        })
        .collect();
    let df = parse(&input).map_err(|e| format!("parse failed: {e}"))?;
    let actual: Vec<(usize, usize)> = df
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "line ranges differ\n  expected {expected:?}\n  actual   {actual:?}"
        ))
    }
}

fn check_negative(case: &Path) -> Result<(), String> {
    let input = fs::read(case.join("Dockerfile")).map_err(|e| e.to_string())?;
    match parse(&input) {
        Err(_) => Ok(()),
        Ok(df) => Err(format!("parsed although it must fail:\n{}", dump(&df))),
    }
}

#[test]
fn buildkit_parser_conformance() {
    let Some(all) = cases() else { return };
    let mut failures = Vec::new();
    let mut counts = [0usize; 3];
    for (case, kind) in &all {
        let res = match kind {
            Kind::Positive => check_positive(case),
            Kind::Lines => check_lines(case),
            Kind::Negative => check_negative(case),
        };
        match kind {
            Kind::Positive => counts[0] += 1,
            Kind::Lines => counts[1] += 1,
            Kind::Negative => counts[2] += 1,
        }
        if let Err(msg) = res {
            failures.push(format!("=== {} ({kind:?})\n{msg}", case.display()));
        }
    }
    println!(
        "{} cases: {} positive, {} line-range, {} negative; {} failed",
        all.len(),
        counts[0],
        counts[1],
        counts[2],
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_cases_are_all_present() {
    if std::env::var_os("DBUILD_CONFORMANCE_DIR").is_some() {
        return;
    }
    let Some(all) = cases() else { return };
    let count = |k: Kind| all.iter().filter(|(_, kind)| *kind == k).count();
    assert_eq!(count(Kind::Positive), 17);
    assert_eq!(count(Kind::Lines), 1);
    assert_eq!(count(Kind::Negative), 2);
}
