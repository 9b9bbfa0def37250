//! Dockerfile parser that reproduces BuildKit's `frontend/dockerfile/parser` byte for byte:
//! parser directives, comments, line continuation, flags, per-instruction argument
//! splitting, JSON (exec) form and heredocs. The rules are described in
//! `shared/conformance/README.md`; `dump` renders the AST in BuildKit's test format.
//!
//! The input is handled as raw bytes. Arguments are kept byte-exact in [`Node::raw_args`]
//! (a Dockerfile may contain invalid UTF-8, which BuildKit's dump prints as `\xHH`) and
//! as (lossily decoded) strings in [`Node::args`].

use regex::Regex;
use std::sync::OnceLock;

mod heredoc;
mod json;

use heredoc::heredocs_from_line;
pub use heredoc::parse_heredoc;
use json::{parse_json, Json};

/// Longest physical line BuildKit's line scanner accepts (excluding the `\n`).
pub const MAX_LINE_LEN: usize = 65535;

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

/// Parser directives found at the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    pub syntax: Option<String>,
    /// `\` (default) or `` ` ``.
    pub escape: char,
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            syntax: None,
            escape: '\\',
            check: None,
        }
    }
}

/// A heredoc attached to a RUN/COPY/ADD instruction (or to ONBUILD wrapping one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed (`<<"EOF"` -> `EOF`).
    pub name: String,
    /// The body, every line with its line ending. For `<<-` leading tabs are already
    /// stripped from each line (stripping again is a no-op).
    pub content: String,
    /// True when no part of the delimiter was quoted: variables in the body expand.
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from body lines (and from the terminator line).
    pub chomp: bool,
    /// `N<<EOF` gives `Some(N)`.
    pub fd: Option<u32>,
    /// The body exactly as read (not chomped, not UTF-8 decoded).
    pub raw_content: Vec<u8>,
}

/// One instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Lowercased instruction word.
    pub keyword: String,
    /// Leading `--flags`, quotes removed, e.g. `--from=builder`.
    pub flags: Vec<String>,
    /// Arguments exactly as the dump prints them (lossy UTF-8 view of `raw_args`).
    pub args: Vec<String>,
    /// True when the arguments came from a JSON array (exec form).
    pub json: bool,
    /// ONBUILD's inner instruction.
    pub next: Option<Box<Node>>,
    /// Heredoc bodies, in the order of their `<<WORD`.
    pub heredocs: Vec<Heredoc>,
    /// The joined logical line (keyword included, continuations joined).
    pub original: String,
    /// 1-based, inclusive.
    pub start_line: usize,
    /// 1-based, inclusive (covers continuation lines and heredoc bodies).
    pub end_line: usize,
    /// Byte-exact arguments; `args[i]` is their decoded form.
    pub raw_args: Vec<Vec<u8>>,
}

/// A non-fatal problem, e.g. an empty continuation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub line: usize,
    pub message: String,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub directives: Directives,
    pub nodes: Vec<Node>,
    pub warnings: Vec<Warning>,
}

/// A parse failure; `line` is the 1-based line where the problem is (1 for whole-file
/// problems such as an empty file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(at(line)(message.into()))
}

/// Attaches a line number to an error message (for `map_err`).
fn at(line: usize) -> impl FnOnce(String) -> ParseError {
    move |message| ParseError { line, message }
}

// ---------------------------------------------------------------------------------------
// Byte and rune helpers with Go semantics.

/// Go's `utf8.DecodeRune`: an invalid or truncated sequence is U+FFFD of width 1.
pub(crate) fn decode_rune(b: &[u8]) -> (char, usize) {
    let Some(&b0) = b.first() else {
        return ('\u{FFFD}', 0);
    };
    let n = match b0 {
        0x00..=0x7F => return (b0 as char, 1),
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return ('\u{FFFD}', 1),
    };
    match b.get(..n).map(std::str::from_utf8) {
        Some(Ok(s)) => (s.chars().next().unwrap_or('\u{FFFD}'), n),
        _ => ('\u{FFFD}', 1),
    }
}

/// Decodes like Go does when it converts bytes rune by rune (one U+FFFD per bad byte).
pub(crate) fn go_lossy(b: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(b) {
        return s.to_owned();
    }
    go_chars(b).into_iter().collect()
}

fn go_chars(mut b: &[u8]) -> Vec<char> {
    let mut out = Vec::with_capacity(b.len());
    while !b.is_empty() {
        let (c, n) = decode_rune(b);
        out.push(c);
        b = &b[n..];
    }
    out
}

/// `bytes.TrimLeftFunc(b, unicode.IsSpace)`; Rust's White_Space set equals Go's.
fn trim_left_ws(mut b: &[u8]) -> &[u8] {
    loop {
        let (c, n) = decode_rune(b);
        if n == 0 || !c.is_whitespace() {
            return b;
        }
        b = &b[n..];
    }
}

fn trim_right_ws(mut b: &[u8]) -> &[u8] {
    'outer: loop {
        for k in 1..=3 {
            if let Some(Ok(s)) = b.get(b.len().wrapping_sub(k)..).map(std::str::from_utf8) {
                let mut it = s.chars();
                if let (Some(c), None) = (it.next(), it.next()) {
                    if c.is_whitespace() {
                        b = &b[..b.len() - k];
                        continue 'outer;
                    }
                }
            }
        }
        return b;
    }
}

/// `strings.TrimSpace`.
fn go_trim_space(b: &[u8]) -> &[u8] {
    trim_right_ws(trim_left_ws(b))
}

/// `strings.ToLower` (invalid bytes become U+FFFD).
fn go_lower(b: &[u8]) -> String {
    go_chars(b)
        .into_iter()
        .map(|c| c.to_lowercase().next().unwrap_or(c))
        .collect()
}

/// `[\t\v\f\r ]`, the class BuildKit splits commands and whitespace-delimited args on.
fn is_token_ws(b: u8) -> bool {
    matches!(b, b'\t' | 0x0b | 0x0c | b'\r' | b' ')
}

/// `unicode.IsSpace(rune(byte))`: flag and HEALTHCHECK parsing look at single bytes.
fn is_latin1_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xA0)
}

/// Whitespace as in Go's regexp `\s` (ASCII, without `\v`).
fn is_re_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0c | b'\r' | b' ')
}

fn trim_newline(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n'] = b {
        b = rest;
    }
    b
}

fn is_comment(line: &[u8]) -> bool {
    trim_left_ws(line).first() == Some(&b'#')
}

fn unicode_class(c: char, cell: &'static OnceLock<Regex>, pattern: &str) -> bool {
    let re = cell.get_or_init(|| Regex::new(pattern).expect("valid unicode class regex"));
    re.is_match(c.encode_utf8(&mut [0u8; 4]))
}

fn is_letter(c: char) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        unicode_class(c, &RE, r"^\p{L}$")
    }
}

fn is_digit(c: char) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        unicode_class(c, &RE, r"^\p{Nd}$")
    }
}

/// Splits on runs of `[\t\v\f\r ]` like Go's `regexp.Split(s, -1)`; empty input gives none.
fn split_ws(s: &[u8]) -> Vec<Vec<u8>> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut out = vec![Vec::new()];
    let mut prev_ws = false;
    for &b in s {
        if is_token_ws(b) {
            if !prev_ws {
                out.push(Vec::new());
            }
            prev_ws = true;
        } else {
            out.last_mut().expect("non-empty").push(b);
            prev_ws = false;
        }
    }
    out
}

/// Cuts once at the first run of `[\t\v\f\r ]` (`regexp.Split(s, 2)`).
fn split_ws_once(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| is_token_ws(b))?;
    let j = i + s[i..].iter().take_while(|&&b| is_token_ws(b)).count();
    Some((&s[..i], &s[j..]))
}

// ---------------------------------------------------------------------------------------
// Directives and continuation.

struct DirectiveState {
    done: bool,
    seen: Vec<String>,
    directives: Directives,
}

impl DirectiveState {
    /// Looks at a (trimmed) line while still inside the directive section.
    fn feed(&mut self, token: &[u8]) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        let Some((key, value)) = match_directive(token) else {
            self.done = true;
            return Ok(());
        };
        let key = go_lower(key);
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(());
        }
        if self.seen.contains(&key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        self.seen.push(key.clone());
        let value = go_lossy(value);
        match key.as_str() {
            "escape" => match value.as_str() {
                "\\" => self.directives.escape = '\\',
                "`" => self.directives.escape = '`',
                _ => {
                    return Err(format!(
                        "unknown escape directive value '{value}': must be \\ or `"
                    ))
                }
            },
            "syntax" => self.directives.syntax = Some(value),
            _ => self.directives.check = Some(value),
        }
        Ok(())
    }
}

/// `#` + `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` after trimming leading whitespace.
fn match_directive(token: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = trim_left_ws(token.strip_prefix(b"#")?);
    if !rest.first()?.is_ascii_alphabetic() {
        return None;
    }
    let klen = 1 + rest[1..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    let (key, r) = rest.split_at(klen);
    let r = &r[r.iter().take_while(|&&b| is_re_space(b)).count()..];
    let r = r.strip_prefix(b"=")?;
    if r.is_empty() {
        return None;
    }
    let lead = r.iter().take_while(|&&b| is_re_space(b)).count();
    if lead == r.len() {
        // Only whitespace: the lazy value still has to take one character.
        return Some((key, &r[r.len() - 1..]));
    }
    let trail = r.iter().rev().take_while(|&&b| is_re_space(b)).count();
    Some((key, &r[lead..r.len() - trail]))
}

/// Removes a trailing continuation (escape char followed only by spaces/tabs, not itself
/// escaped). Returns the line and whether the instruction ends here.
fn trim_continuation(line: &[u8], esc: u8) -> (&[u8], bool) {
    let end = line.len()
        - line
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    if end == 0 || line[end - 1] != esc {
        return (line, true);
    }
    let before = end - 1;
    if before > 0 && line[before - 1] == esc {
        return (line, true);
    }
    (&line[..before], false)
}

// ---------------------------------------------------------------------------------------
// The main loop.

/// Parses a Dockerfile given as raw bytes.
pub fn parse(input: &[u8]) -> Result<Dockerfile, ParseError> {
    let mut lines: Vec<&[u8]> = input.split_inclusive(|&b| b == b'\n').collect();
    if let Some(first) = lines.first_mut() {
        *first = first.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(first);
    }
    for (i, l) in input.split_inclusive(|&b| b == b'\n').enumerate() {
        if l.strip_suffix(b"\n").unwrap_or(l).len() > MAX_LINE_LEN {
            return err(
                i + 1,
                format!("dockerfile line greater than max allowed size of {MAX_LINE_LEN}"),
            );
        }
    }

    let mut d = DirectiveState {
        done: false,
        seen: Vec::new(),
        directives: Directives::default(),
    };
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    let mut cur = 0; // number of physical lines consumed
    while cur < lines.len() {
        let token = trim_left_ws(trim_newline(lines[cur]));
        d.feed(token).map_err(at(cur + 1))?;
        let token: &[u8] = if is_comment(token) { b"" } else { token };
        cur += 1;
        let start = cur;
        let esc = d.directives.escape as u8;
        let (first, mut eol) = trim_continuation(token, esc);
        if eol && first.is_empty() {
            continue;
        }
        let mut buf = first.to_vec();
        let mut empty_continuation = false;
        while !eol && cur < lines.len() {
            let raw = lines[cur];
            let token = trim_newline(raw);
            d.feed(token).map_err(at(cur + 1))?;
            cur += 1;
            if is_comment(raw) {
                continue;
            }
            if trim_left_ws(token).is_empty() {
                empty_continuation = true;
                continue;
            }
            let (part, end) = trim_continuation(token, esc);
            eol = end;
            buf.extend_from_slice(part);
        }
        if empty_continuation {
            warnings.push(Warning {
                line: cur,
                message: format!("Empty continuation line found in: {}", go_lossy(&buf)),
            });
        }

        let mut node = node_from_line(&buf, esc).map_err(at(start))?;
        if can_contain_heredoc(&node) && buf.windows(2).any(|w| w == b"<<") {
            let docs = heredocs_from_line(&go_lossy(&buf)).map_err(at(start))?;
            for mut doc in docs {
                let mut terminated = false;
                while cur < lines.len() {
                    let raw = lines[cur];
                    cur += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate =
                            &candidate[candidate.iter().take_while(|&&b| b == b'\t').count()..];
                    }
                    if candidate == doc.name.as_bytes() {
                        terminated = true;
                        break;
                    }
                    doc.raw_content.extend_from_slice(raw);
                }
                if !terminated {
                    return err(start, format!("heredoc {} has no terminator", doc.name));
                }
                doc.content = go_lossy(&doc.raw_content);
                if doc.chomp {
                    doc.content = chomp_heredoc_content(&doc.content);
                }
                node.heredocs.push(doc);
            }
        }
        set_lines(&mut node, start, cur);
        nodes.push(node);
    }
    if nodes.is_empty() {
        return err(1, "file with no instructions");
    }
    Ok(Dockerfile {
        directives: d.directives,
        nodes,
        warnings,
    })
}

fn set_lines(node: &mut Node, start: usize, end: usize) {
    node.start_line = start;
    node.end_line = end;
    if let Some(next) = node.next.as_deref_mut() {
        set_lines(next, start, end);
    }
}

fn can_contain_heredoc(node: &Node) -> bool {
    let inner = match (&node.keyword[..], node.next.as_deref()) {
        ("onbuild", Some(inner)) => inner,
        _ => node,
    };
    matches!(inner.keyword.as_str(), "run" | "copy" | "add") && !inner.json
}

/// Removes leading tabs from every line (what `<<-` means).
pub fn chomp_heredoc_content(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at_start = true;
    for c in s.chars() {
        if at_start && c == '\t' {
            continue;
        }
        at_start = c == '\n';
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// One logical line -> Node.

fn node_from_line(line: &[u8], esc: u8) -> Result<Node, String> {
    let (keyword, flags, rest) = split_command(line);
    let mut node = Node {
        keyword,
        flags,
        original: go_lossy(line),
        ..Node::default()
    };
    let mut raw: Vec<Vec<u8>> = Vec::new();
    match node.keyword.as_str() {
        "add" | "copy" | "volume" => match parse_json(rest) {
            Json::Strings(v) => {
                raw = v;
                node.json = true;
            }
            Json::NonString => return Err(NOT_STRING_ARRAY.into()),
            Json::Invalid => raw = split_ws(rest),
        },
        "run" | "cmd" | "entrypoint" | "shell" => (raw, node.json) = maybe_json(rest)?,
        "from" | "expose" => raw = split_ws(rest),
        "env" => raw = parse_name_val(rest, esc, "ENV")?,
        "label" => raw = parse_name_val(rest, esc, "LABEL")?,
        "arg" => {
            raw = parse_words(rest, esc)
                .into_iter()
                .map(String::into_bytes)
                .collect()
        }
        "user" | "workdir" | "maintainer" | "stopsignal" => {
            if !rest.is_empty() {
                raw.push(rest.to_vec());
            }
        }
        "healthcheck" => {
            let sep = rest
                .iter()
                .position(|&b| is_latin1_space(b))
                .unwrap_or(rest.len());
            if sep > 0 {
                let next = sep
                    + rest[sep..]
                        .iter()
                        .take_while(|&&b| is_latin1_space(b))
                        .count();
                let (cmd, json) = maybe_json(&rest[next..])?;
                raw.push(rest[..sep].to_vec());
                raw.extend(cmd);
                node.json = json;
            }
        }
        "onbuild" => {
            if !rest.is_empty() {
                node.next = Some(Box::new(node_from_line(rest, esc)?));
            }
        }
        _ => raw.push(Vec::new()),
    }
    node.args = raw.iter().map(|a| go_lossy(a)).collect();
    node.raw_args = raw;
    Ok(node)
}

/// Keyword (lowercased), flags, and the trimmed remainder.
fn split_command(line: &[u8]) -> (String, Vec<String>, &[u8]) {
    let line = go_trim_space(line);
    match split_ws_once(line) {
        None => (go_lower(line), Vec::new(), &[]),
        Some((cmd, rest)) => {
            let (rest, flags) = extract_builder_flags(rest);
            (go_lower(cmd), flags, go_trim_space(rest))
        }
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Phase {
    Spaces,
    Word,
    Quote,
}

/// Leading `--flag` words. Works on single bytes like BuildKit (a byte >= 0x80 becomes
/// the code point of the same value); `\` escapes the next byte, quotes are removed.
fn extract_builder_flags(line: &[u8]) -> (&[u8], Vec<String>) {
    let n = line.len();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= n {
        let ch = if pos < n { line[pos] } else { 0 };
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if is_latin1_space(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == n || line[pos + 1] != b'-' {
                return (&line[pos..], words);
            }
            phase = Phase::Word;
        }
        if pos == n {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        let mut c = ch;
        if phase == Phase::Word {
            if is_latin1_space(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (&line[pos..], words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
        } else if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        if c == b'\\' {
            if pos + 1 == n {
                if phase == Phase::Quote {
                    phase = Phase::Word;
                }
                pos += 1;
                continue;
            }
            pos += 1;
            c = line[pos];
        }
        word.push(c as char);
        pos += 1;
    }
    (&[], words)
}

/// Whitespace-separated words; quotes and escapes are kept as written.
fn parse_words(rest: &[u8], esc: u8) -> Vec<String> {
    let chars = go_chars(rest);
    let n = chars.len();
    let esc = esc as char;
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut word = String::new();
    let mut pos = 0;
    while pos <= n {
        let ch = if pos < n { chars[pos] } else { '\0' };
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if pos == n {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        let mut c = ch;
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if c == esc {
                if pos + 1 == n {
                    pos += 1;
                    continue;
                }
                word.push(c);
                pos += 1;
                c = chars[pos];
            }
        } else {
            if ch == quote {
                phase = Phase::Word;
            }
            if c == esc && quote != '\'' {
                if pos + 1 == n {
                    phase = Phase::Word;
                    pos += 1;
                    continue;
                }
                word.push(c);
                pos += 1;
                c = chars[pos];
            }
        }
        word.push(c);
        pos += 1;
    }
    words
}

/// ENV and LABEL: legacy `KEY value` or `k=v ...`, as (key, value, sep) triples.
fn parse_name_val(rest: &[u8], esc: u8, name: &str) -> Result<Vec<Vec<u8>>, String> {
    let words = parse_words(rest, esc);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let Some((key, value)) = split_ws_once(rest) else {
            return Err(format!("{name} must have two arguments"));
        };
        return Ok(vec![key.to_vec(), value.to_vec(), Vec::new()]);
    }
    let mut out = Vec::new();
    for word in &words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                super::dump::go_quote(word.as_bytes())
            ));
        };
        out.extend([k.as_bytes().to_vec(), v.as_bytes().to_vec(), b"=".to_vec()]);
    }
    Ok(out)
}

/// RUN/CMD/ENTRYPOINT/SHELL: a JSON string array, else the whole rest as one arg.
fn maybe_json(rest: &[u8]) -> Result<(Vec<Vec<u8>>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest) {
        Json::Strings(v) => Ok((v, true)),
        Json::NonString => Err(NOT_STRING_ARRAY.into()),
        Json::Invalid => Ok((vec![rest.to_vec()], false)),
    }
}
