//! Dockerfile parser that reproduces BuildKit's `frontend/dockerfile/parser` byte for byte:
//! parser directives, comments, line continuation, flags, per-instruction argument
//! splitting, JSON (exec) form and heredocs. The rules are described in
//! `shared/conformance/README.md`; `dump` renders the AST in BuildKit's test format.
//!
//! The input is handled as raw bytes. Arguments are kept byte-exact in [`Node::raw_args`]
//! (a Dockerfile may contain invalid UTF-8, which BuildKit's dump prints as `\xHH`) and
//! as (lossily decoded) strings in [`Node::args`].

mod directives;
mod gostr;
mod heredoc;
mod json;
mod node;

use directives::DirectiveState;
pub(crate) use gostr::{decode_rune, go_lossy};
use gostr::{is_comment, trim_left_ws, trim_newline};
use heredoc::heredocs_from_line;
pub use heredoc::{parse_heredoc, HeredocError};
use node::node_from_line;

/// Longest physical line BuildKit's line scanner accepts (excluding the `\n`).
pub const MAX_LINE_LEN: usize = 65535;

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
// Continuation.

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
            let docs = heredocs_from_line(&go_lossy(&buf)).map_err(|e| at(start)(e.to_string()))?;
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
