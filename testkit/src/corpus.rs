//! The Dockerfile corpus: `tests/corpus/<case>/` holds a `Dockerfile`, the context files it
//! uses, and optionally
//! - `args`: extra flags for both builders, whitespace-separated, `#` starts a comment
//!   line (`--target builder`, `--build-arg V=2`, `--secret id=s,src=secret.txt`; a
//!   relative `src=` is taken from the case folder);
//! - `Dockerfile.buildkit`: what the reference BuildKit build uses instead of `Dockerfile`,
//!   for cases whose syntax this daemon's BuildKit (20.10, dockerfile frontend 1.2) does
//!   not know (`COPY --link/--parents/--exclude`, `RUN --network`): the same image, written
//!   with what it does know.

use std::path::{Path, PathBuf};

use crate::build::BuildSpec;

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus")
}

/// Every case folder's name, sorted.
pub fn names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(corpus_dir())
        .expect("reading tests/corpus")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type()
                .ok()?
                .is_dir()
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub flags: Vec<String>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = corpus_dir().join(name);
        assert!(
            dir.join("Dockerfile").is_file(),
            "corpus case {name}: {} has no Dockerfile",
            dir.display()
        );
        let flags = match std::fs::read_to_string(dir.join("args")) {
            Ok(text) => parse_args(&text, &dir),
            Err(_) => Vec::new(),
        };
        Case {
            name: name.to_string(),
            dir,
            flags,
        }
    }

    pub fn dockerfile(&self) -> String {
        std::fs::read_to_string(self.dir.join("Dockerfile")).unwrap()
    }

    /// What dbuild builds: the case folder as context, its `Dockerfile`, its `args`.
    pub fn spec(&self) -> BuildSpec {
        BuildSpec::new(&self.dir).flags(&self.flags)
    }

    /// What BuildKit builds instead, when the case has a `Dockerfile.buildkit`.
    pub fn reference_spec(&self) -> Option<BuildSpec> {
        let f = self.dir.join("Dockerfile.buildkit");
        f.is_file().then(|| self.spec().file(f))
    }
}

/// `args` file → flags; `src=relative` in `--secret` values becomes absolute.
pub fn parse_args(text: &str, dir: &Path) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(str::split_whitespace)
        .map(|w| {
            if w.contains("src=") && w.contains("id=") {
                w.split(',')
                    .map(|f| match f.strip_prefix("src=") {
                        Some(p) if !p.starts_with('/') => {
                            format!("src={}", dir.join(p).display())
                        }
                        _ => f.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                w.to_string()
            }
        })
        .collect()
}
