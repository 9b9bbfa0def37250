//! Variable expansion with BuildKit's shell-word rules (`shell/lex.go` semantics).
//!
//! Supported: `$V`, `${V}`, `${V:-w}`, `${V-w}`, `${V:+w}`, `${V+w}`, `${V:?w}`, `${V?w}`,
//! `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`, `${V/p/r}`, `${V//p/r}`; single quotes (literal),
//! double quotes (only `$`, `"` and the escape character are special inside), and the escape
//! character outside quotes. Unset variables expand to the empty string. Every lookup is
//! recorded, so a caller knows exactly which variables (build args) a word used.
use std::collections::{BTreeMap, BTreeSet, HashMap};

mod pattern;

use pattern::{pattern_regex, trim};

/// Where the expander reads variables from.
pub trait VarLookup {
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl VarLookup for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl VarLookup for HashMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// No variables at all (used to detect whether a word contains any expansion).
pub struct NoVars;

impl VarLookup for NoVars {
    fn lookup(&self, _: &str) -> Option<&str> {
        None
    }
}

/// The result of expanding one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded text, quotes removed.
    pub value: String,
    /// The text split into words after expansion (quoted spaces do not split).
    pub words: Vec<String>,
    /// Variables that were looked up and found.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and not set.
    pub unmatched: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {word:?}: {reason}")]
pub struct ExpandError {
    pub word: String,
    pub reason: String,
}

/// The shell-word lexer; `escape` is the Dockerfile's escape character.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    pub escape: char,
    /// Keep references to unset variables as written (`$X`, `${X:-d}`) instead of expanding
    /// them to "" — for planning before the base image's environment is known.
    pub skip_unset: bool,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer::new('\\')
    }
}

impl Lexer {
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            skip_unset: false,
        }
    }

    /// Expands `word` against `vars`.
    pub fn expand(&self, word: &str, vars: &dyn VarLookup) -> Result<Expansion, ExpandError> {
        let mut st = State {
            chars: word.chars().collect(),
            pos: 0,
            escape: self.escape,
            skip_unset: self.skip_unset,
            vars,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        let (value, words) = st
            .process_until(None, false)
            .map_err(|reason| ExpandError {
                word: word.to_string(),
                reason,
            })?;
        Ok(Expansion {
            value,
            words,
            matched: st.matched,
            unmatched: st.unmatched,
        })
    }

    /// Whether `word` would change under expansion with no variables set, i.e. it contains
    /// quotes, escapes or a variable reference.
    pub fn has_expansion(&self, word: &str) -> bool {
        match Lexer::new(self.escape).expand(word, &NoVars) {
            Ok(e) => e.value != word,
            Err(_) => true,
        }
    }
}

struct State<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    skip_unset: bool,
    vars: &'a dyn VarLookup,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

/// Accumulates words the way BuildKit does: unquoted whitespace separates words, text from
/// quotes is kept whole, text from a variable is split on its whitespace.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }
    fn add_str(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }
    fn add_raw_str(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

impl State<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to `stop` (consumed) or the end. `raw_escapes` keeps escape characters
    /// (pattern operands of `#`, `%`, `/`, where the pattern code interprets them).
    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        let mut out = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((out, words.finish()));
            }
            match ch {
                '$' => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                    words.add_str(&v);
                }
                '\'' => {
                    let v = self.single_quote()?;
                    out.push_str(&v);
                    words.add_raw_str(&v);
                }
                '"' => {
                    let v = self.double_quote(raw_escapes)?;
                    out.push_str(&v);
                    words.add_raw_str(&v);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        if raw_escapes {
                            words.add_raw_char(ch);
                            out.push(ch);
                        }
                        match self.next() {
                            None => break,
                            Some(c) => {
                                words.add_raw_char(c);
                                out.push(c);
                            }
                        }
                    } else {
                        words.add_char(ch);
                        out.push(ch);
                    }
                }
            }
        }
        if let Some(s) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {s}"
            ));
        }
        Ok((out, words.finish()))
    }

    fn single_quote(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    )
                }
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self, raw_escapes: bool) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    )
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                }
                Some(mut c) => {
                    self.pos += 1;
                    if c == self.escape {
                        if raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn get(&mut self, name: &str) -> Option<String> {
        match self.vars.lookup(name) {
            Some(v) => {
                self.matched.insert(name.to_string());
                Some(v.to_string())
            }
            None => {
                self.unmatched.insert(name.to_string());
                None
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return c.to_string();
            }
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get(&name) {
                Some(v) => v,
                None if self.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            _ => {}
        }
        let name = self.name();
        let mut op = match self.next() {
            None => return Err("syntax error: missing '}'".into()),
            Some(c) => c,
        };
        if op == '}' {
            return Ok(match self.get(&name) {
                Some(v) => v,
                None if self.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            });
        }
        if op == '/' {
            return self.replace(&name);
        }
        let null_is_unset = op == ':';
        if null_is_unset {
            op = self.next().ok_or("syntax error: missing '}'")?;
        }
        if !matches!(op, '+' | '-' | '?' | '#' | '%') {
            let shown = if null_is_unset {
                format!(":{op}")
            } else {
                op.to_string()
            };
            return Err(format!("unsupported modifier ({shown}) in substitution"));
        }
        let (word, _) = self.process_until(Some('}'), matches!(op, '#' | '%'))?;
        let value = self.get(&name);
        if value.is_none() && self.skip_unset {
            let colon = if null_is_unset { ":" } else { "" };
            return Ok(format!("${{{name}{colon}{op}{word}}}"));
        }
        let unset = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match op {
            '-' => Ok(if unset {
                word
            } else {
                value.unwrap_or_default()
            }),
            '+' => Ok(if unset { String::new() } else { word }),
            '?' => match value {
                None => Err(format!(
                    "{name}: {}",
                    non_empty_or(word, "is not allowed to be unset")
                )),
                Some(v) if null_is_unset && v.is_empty() => Err(format!(
                    "{name}: {}",
                    non_empty_or(word, "is not allowed to be empty")
                )),
                Some(v) => Ok(v),
            },
            _ => {
                let (greedy, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest.to_string()),
                    None => (false, word),
                };
                trim(&pattern, &value.unwrap_or_default(), greedy, op == '#')
            }
        }
    }

    fn replace(&mut self, name: &str) -> Result<String, String> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let (pattern, _) = self
            .process_until(Some('/'), true)
            .map_err(|_| "syntax error: missing '/' in ${}".to_string())?;
        let (replacement, _) = self
            .process_until(Some('}'), true)
            .map_err(|_| "syntax error: missing '}'".to_string())?;
        let value = match self.get(name) {
            Some(v) => v,
            None if self.skip_unset => {
                let slash = if all { "//" } else { "/" };
                return Ok(format!("${{{name}{slash}{pattern}/{replacement}}}"));
            }
            None => String::new(),
        };
        let re = pattern_regex(&pattern, true)?;
        let re = regex::Regex::new(&re).map_err(|e| e.to_string())?;
        Ok(if all {
            re.replace_all(&value, regex::NoExpand(&replacement))
                .into_owned()
        } else {
            re.replace(&value, regex::NoExpand(&replacement))
                .into_owned()
        })
    }
}

fn non_empty_or(word: String, default: &str) -> String {
    if word.is_empty() {
        default.to_string()
    } else {
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [
            ("A", "a"),
            ("E", ""),
            ("SP", "x y"),
            ("P", "foo/bar/baz.tar.gz"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn check(word: &str, expected: &str) {
        let got = Lexer::default().expand(word, &vars()).unwrap();
        assert_eq!(got.value, expected, "expanding {word:?}");
    }

    #[test]
    fn table() {
        for (w, e) in [
            ("$A", "a"),
            ("${A}", "a"),
            ("pre${A}post", "preapost"),
            ("$A$A", "aa"),
            ("$UNSET", ""),
            ("${UNSET:-d}", "d"),
            ("${E:-d}", "d"),
            ("${E-d}", ""),
            ("${UNSET-d}", "d"),
            ("${A:+x}", "x"),
            ("${E:+x}", ""),
            ("${E+x}", "x"),
            ("${UNSET+x}", ""),
            ("'$A'", "$A"),
            ("\"$A\"", "a"),
            ("\\$A", "$A"),
            ("\"\\$A\"", "$A"),
            ("\"a\\b\"", "a\\b"),
            ("a\\ b", "a b"),
            ("$", "$"),
            ("$1", ""),
            ("${UNSET:-${A}}", "a"),
            ("${UNSET:-'q'}", "q"),
            ("${P#*/}", "bar/baz.tar.gz"),
            ("${P##*/}", "baz.tar.gz"),
            ("${P%.*}", "foo/bar/baz.tar"),
            ("${P%%.*}", "foo/bar/baz"),
            ("${P/bar/X}", "foo/X/baz.tar.gz"),
            ("${P//a/_}", "foo/b_r/b_z.t_r.gz"),
        ] {
            check(w, e);
        }
    }

    #[test]
    fn words_split_on_variables_not_quotes() {
        let l = Lexer::default();
        let e = l.expand("$SP \"q r\" z", &vars()).unwrap();
        assert_eq!(e.words, vec!["x", "y", "q r", "z"]);
    }

    #[test]
    fn errors() {
        let l = Lexer::default();
        for w in [
            "${A",
            "${}",
            "${:x}",
            "'abc",
            "\"abc",
            "${UNSET?}",
            "${E:?nope}",
            "${A!x}",
        ] {
            assert!(l.expand(w, &vars()).is_err(), "{w:?} should fail");
        }
        let e = l.expand("${E:?must be set}", &vars()).unwrap_err();
        assert!(e.reason.contains("E: must be set"), "{e}");
    }

    #[test]
    fn records_matched_and_unmatched() {
        let e = Lexer::default()
            .expand("$A ${UNSET:-x} '$NOPE'", &vars())
            .unwrap();
        assert_eq!(e.matched.into_iter().collect::<Vec<_>>(), vec!["A"]);
        assert_eq!(e.unmatched.into_iter().collect::<Vec<_>>(), vec!["UNSET"]);
    }

    #[test]
    fn backtick_escape() {
        let e = Lexer::new('`').expand("a`$b\\c", &vars()).unwrap();
        assert_eq!(e.value, "a$b\\c");
    }

    #[test]
    fn skip_unset_keeps_references() {
        let l = Lexer {
            skip_unset: true,
            ..Lexer::default()
        };
        let e = l.expand("$A:$PATH:${HOME}:${X:-d}", &vars()).unwrap();
        assert_eq!(e.value, "a:$PATH:${HOME}:${X:-d}");
    }

    #[test]
    fn has_expansion() {
        let l = Lexer::default();
        assert!(l.has_expansion("$X"));
        assert!(l.has_expansion("${X:-a}"));
        assert!(!l.has_expansion("builder"));
        assert!(!l.has_expansion("nginx:latest"));
    }
}
