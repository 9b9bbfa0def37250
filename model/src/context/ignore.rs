//! `.dockerignore` handling with Docker's exact semantics.
//!
//! This is a port of what Docker/BuildKit do, piece by piece:
//! * [`parse_dockerignore`] is moby's `ignorefile.ReadAll`;
//! * [`IgnoreMatcher`] is `moby/patternmatcher` (`New`, `MatchesOrParentMatches`,
//!   `MatchesUsingParentResults`, pattern compilation with its exact/prefix/suffix/regexp
//!   match kinds and their quirks, e.g. `**foo` matches `xfoo`);
//! * [`IgnoreMatcher::should_descend_excluded`] is the directory-skipping rule of BuildKit's
//!   context walker (`tonistiigi/fsutil` `filterFS.Walk`);
//! * [`path_match`] is Go's `filepath.Match` and [`clean_path`] Go's `filepath.Clean`.
//!
//! Known deviation: patternmatcher pastes bracket expressions verbatim into an RE2 regexp,
//! so a few nonsensical patterns behave differently there (`[*]`, `[?]`, `[[:alpha:]]`, `\d`,
//! a bare `^` outside brackets). Here bracket expressions and `\x` escapes follow
//! `filepath.Match`, which is what Docker documents.
use super::error::ContextError;
use super::gomatch::get_esc;
pub use super::gomatch::{clean_path, path_match};
use regex::Regex;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Parses `.dockerignore` content exactly like moby's `ReadAll`: a UTF-8 BOM is dropped;
/// lines *starting* with `#` are comments (checked before trimming, so `  #x` is a pattern);
/// lines are then whitespace-trimmed and blank ones skipped; a leading `!` (with spaces after
/// it trimmed) marks an exception; the rest is `filepath.Clean`ed and one leading `/` dropped.
/// A lone `!` is kept (and rejected later by [`IgnoreMatcher::new`]).
pub fn parse_dockerignore(content: &str) -> Vec<String> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut out = Vec::new();
    for line in content.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = clean_path(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push(if invert {
            format!("!{cleaned}")
        } else {
            cleaned
        });
    }
    out
}

/// Reads the ignore patterns for a build: `<dockerfile>.dockerignore` (the Dockerfile's path
/// with `.dockerignore` appended, e.g. `build/app.Dockerfile.dockerignore`) wins if it exists;
/// otherwise `<context_dir>/.dockerignore`; otherwise no patterns. `dockerfile` defaults to
/// `<context_dir>/Dockerfile` (so `Dockerfile.dockerignore` is honoured, as in BuildKit); a
/// relative `dockerfile` is used as given, i.e. relative to the current directory, like
/// `docker build -f`. An ignore file that exists but cannot be read is an error.
pub fn read_ignore_patterns(
    context_dir: &Path,
    dockerfile: Option<&Path>,
) -> Result<Vec<String>, ContextError> {
    let dockerfile = match dockerfile {
        Some(p) => p.to_path_buf(),
        None => context_dir.join("Dockerfile"),
    };
    let mut specific = dockerfile.into_os_string();
    specific.push(".dockerignore");
    for candidate in [PathBuf::from(specific), context_dir.join(".dockerignore")] {
        match fs::read(&candidate) {
            Ok(bytes) => return Ok(parse_dockerignore(&String::from_utf8_lossy(&bytes))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => return Err(ContextError::io(candidate, e)),
        }
    }
    Ok(Vec::new())
}

/// Per-pattern "this directory (or an ancestor) matched" results, passed from a directory to
/// its children during a walk (patternmatcher's `MatchInfo`). The default value means
/// "unknown": parents are then checked by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchInfo(Vec<bool>);

/// A compiled list of `.dockerignore` patterns. Last matching pattern wins; a pattern that
/// matches a directory also matches everything below it.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
    exceptions: bool,
    only_prefix_exceptions: bool,
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Exact,
    Prefix(String),
    Suffix(String),
    Regex(Regex),
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.cleaned,
            Kind::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Kind::Suffix(suffix) => {
                path.ends_with(suffix.as_str()) || (suffix.starts_with('/') && path == &suffix[1..])
            }
            Kind::Regex(re) => re.is_match(path),
        }
    }

    /// fsutil's `patternWithoutTrailingGlob`.
    fn without_trailing_glob(&self) -> &str {
        let p = self.cleaned.as_str();
        let p = p.strip_suffix("/**").unwrap_or(p);
        p.strip_suffix("/*").unwrap_or(p)
    }
}

impl IgnoreMatcher {
    /// Compiles patterns as patternmatcher's `New` does: each is trimmed (blank ones skipped)
    /// and `filepath.Clean`ed; a leading `!` makes it an exception (a lone `!` is an error);
    /// syntax is validated with `filepath.Match`. Feed it [`parse_dockerignore`]'s output.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, ContextError> {
        let mut out = IgnoreMatcher {
            only_prefix_exceptions: true,
            ..Default::default()
        };
        for raw in patterns {
            let raw = raw.as_ref();
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let mut p = clean_path(trimmed);
            let exclusion = p.starts_with('!');
            if exclusion {
                if p.len() == 1 {
                    return Err(ContextError::bad_pattern(
                        raw,
                        "illegal exclusion pattern: \"!\"",
                    ));
                }
                p.remove(0);
            }
            path_match(&p, ".").map_err(|_| ContextError::bad_pattern(raw, "syntax error"))?;
            let kind = compile(&p).map_err(|reason| ContextError::bad_pattern(raw, reason))?;
            let pattern = Pattern {
                cleaned: p,
                exclusion,
                kind,
            };
            if exclusion {
                out.exceptions = true;
                if pattern
                    .without_trailing_glob()
                    .contains(['*', '[', ']', '?', '^', '\\'])
                {
                    out.only_prefix_exceptions = false;
                }
            }
            out.patterns.push(pattern);
        }
        Ok(out)
    }

    /// True when there are no patterns (nothing is ever excluded).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// True when some pattern is a `!` exception.
    pub fn has_exceptions(&self) -> bool {
        self.exceptions
    }

    /// Whether the clean relative `/`-separated `path` is excluded: the last pattern that
    /// matches `path` or one of its parent directories decides (patternmatcher's
    /// `MatchesOrParentMatches`). `.` is never excluded.
    pub fn matches(&self, path: &str) -> bool {
        if path == "." {
            return false;
        }
        let parent = path.rfind('/').map(|i| &path[..i]);
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            let mut m = pattern.matches(path);
            if let (false, Some(parent)) = (m, parent) {
                m = parent
                    .match_indices('/')
                    .map(|(i, _)| &parent[..i])
                    .chain(std::iter::once(parent))
                    .any(|prefix| pattern.matches(prefix));
            }
            if m {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Walk-time variant of [`matches`](Self::matches) (patternmatcher's
    /// `MatchesUsingParentResults`, the one BuildKit uses): `parent` is the [`MatchInfo`]
    /// returned for the parent directory (default for top-level entries). Returns whether
    /// `path` is excluded and the info to pass to its children.
    pub fn matches_using_parent(&self, path: &str, parent: &MatchInfo) -> (bool, MatchInfo) {
        let parent_known = parent.0.len() == self.patterns.len() && !parent.0.is_empty();
        let mut info = vec![false; self.patterns.len()];
        let mut matched = false;
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut m = parent_known && parent.0[i];
            if !m {
                if pattern.exclusion != matched {
                    continue;
                }
                m = pattern.matches(path);
                if !m && !parent_known {
                    if let Some(idx) = path.rfind('/') {
                        let parent = &path[..idx];
                        m = parent
                            .match_indices('/')
                            .map(|(j, _)| &parent[..j])
                            .chain(std::iter::once(parent))
                            .any(|prefix| pattern.matches(prefix));
                    }
                }
            }
            info[i] = m;
            if m {
                matched = !pattern.exclusion;
            }
        }
        (matched, MatchInfo(info))
    }

    /// Whether the walker must still look inside the *excluded* directory `dir` because an
    /// exception could re-include something below it (BuildKit's rule): never without
    /// exceptions; always if some exception contains wildcards (beyond a trailing `/*` or
    /// `/**`); otherwise only if some exception names a path under `dir`.
    pub fn should_descend_excluded(&self, dir: &str) -> bool {
        if !self.exceptions {
            return false;
        }
        if !self.only_prefix_exceptions {
            return true;
        }
        let dir_slash = format!("{dir}/");
        self.patterns
            .iter()
            .filter(|p| p.exclusion)
            .any(|p| format!("{}/", p.without_trailing_glob()).starts_with(&dir_slash))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Detected {
    Exact,
    Prefix,
    Suffix,
    Regex,
}

/// patternmatcher's `Pattern.compile`, including its choice of match kind.
fn compile(pat: &str) -> Result<Kind, String> {
    let b = pat.as_bytes();
    let mut re = String::from("^");
    let mut detected = Detected::Exact;
    let mut i = 0;
    let mut token = 0;
    while i < b.len() {
        let ch = pat[i..].chars().next().expect("in bounds");
        i += ch.len_utf8();
        match ch {
            '*' if b.get(i) == Some(&b'*') => {
                i += 1;
                if b.get(i) == Some(&b'/') {
                    i += 1;
                }
                if i == b.len() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        re.push_str(".*");
                        detected = Detected::Regex;
                    }
                } else {
                    re.push_str("(?:.*/)?");
                    detected = Detected::Regex;
                }
                if token == 0 {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                detected = Detected::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                detected = Detected::Regex;
            }
            '\\' => {
                if let Some(next) = pat[i..].chars().next() {
                    i += next.len_utf8();
                    re.push_str(&regex::escape(next.encode_utf8(&mut [0; 4])));
                    detected = Detected::Regex;
                } else {
                    re.push_str(r"\\");
                }
            }
            '[' => {
                let (class, used) = class_regex(&b[i..])?;
                i += used;
                re.push_str(&class);
                detected = Detected::Regex;
            }
            ']' => {
                re.push_str(r"\]");
                detected = Detected::Regex;
            }
            c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
        token += 1;
    }
    Ok(match detected {
        Detected::Exact => Kind::Exact,
        Detected::Prefix => Kind::Prefix(pat[..pat.len() - 2].to_string()),
        Detected::Suffix => Kind::Suffix(pat[2..].to_string()),
        Detected::Regex => {
            re.push('$');
            Kind::Regex(Regex::new(&re).map_err(|e| e.to_string())?)
        }
    })
}

/// Translates a `filepath.Match` bracket expression (input starts after the `[`) into a regex
/// class; returns it and the number of bytes consumed.
fn class_regex(b: &[u8]) -> Result<(String, usize), String> {
    let mut c = b;
    let mut out = String::from("[");
    if c.first() == Some(&b'^') {
        out.push('^');
        c = &c[1..];
    }
    let mut n = 0;
    loop {
        if c.first() == Some(&b']') && n > 0 {
            c = &c[1..];
            break;
        }
        let bad = |()| "syntax error in character class".to_string();
        let (lo, rest) = get_esc(c).map_err(bad)?;
        c = rest;
        let mut hi = lo;
        if c[0] == b'-' {
            let (h, rest) = get_esc(&c[1..]).map_err(bad)?;
            hi = h;
            c = rest;
        }
        if lo > hi {
            return Err("invalid character class range".to_string());
        }
        push_class_char(&mut out, lo);
        if hi != lo {
            out.push('-');
            push_class_char(&mut out, hi);
        }
        n += 1;
    }
    out.push(']');
    Ok((out, b.len() - c.len()))
}

fn push_class_char(out: &mut String, r: u32) {
    let ch = char::from_u32(r).unwrap_or(char::REPLACEMENT_CHARACTER);
    out.push_str(&regex::escape(ch.encode_utf8(&mut [0; 4])));
}
