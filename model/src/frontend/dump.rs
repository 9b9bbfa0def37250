//! Renders a parsed Dockerfile in the format of BuildKit's parser test fixtures
//! (`testfiles/*/result`): one `(keyword ["flags"] "arg" ...)` line per instruction, with
//! every value quoted like Go's `strconv.Quote`.

use super::parser::{decode_rune, go_lossy, Dockerfile, Node};
use regex::Regex;
use std::fmt::Write;
use std::sync::OnceLock;

/// Go's `strconv.Quote`: printable runes stay as they are, everything else is escaped;
/// bytes that are not valid UTF-8 become `\xHH`.
pub fn go_quote(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut rest = s;
    while !rest.is_empty() {
        let (c, n) = decode_rune(rest);
        if n == 1 && c == '\u{FFFD}' {
            let _ = write!(out, "\\x{:02x}", rest[0]);
        } else {
            push_escaped(&mut out, c);
        }
        rest = &rest[n..];
    }
    out.push('"');
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '"' | '\\' => {
            out.push('\\');
            out.push(c);
        }
        _ if is_print(c) => out.push(c),
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        _ if c < ' ' || c == '\u{7f}' => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        _ if (c as u32) < 0x10000 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        _ => {
            let _ = write!(out, "\\U{:08x}", c as u32);
        }
    }
}

/// Go's `strconv.IsPrint`: letters, marks, numbers, punctuation, symbols and ASCII space.
fn is_print(c: char) -> bool {
    let u = c as u32;
    if u <= 0xFF {
        return (0x20..=0x7E).contains(&u) || ((0xA1..=0xFF).contains(&u) && u != 0xAD);
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[\p{L}\p{M}\p{N}\p{P}\p{S}]$").expect("valid regex"))
        .is_match(c.encode_utf8(&mut [0u8; 4]))
}

/// One instruction without the surrounding parentheses and newline, e.g.
/// `copy ["--from=a"] "x" "/y"` or `onbuild (run "echo")`.
pub fn dump_node(n: &Node) -> String {
    let mut s = n.keyword.clone();
    if !n.flags.is_empty() {
        let flags: Vec<String> = n.flags.iter().map(|f| go_quote(f.as_bytes())).collect();
        let _ = write!(s, " [{}]", flags.join(" "));
    }
    for (i, arg) in n.args.iter().enumerate() {
        // Prefer the byte-exact form, unless `args` was changed after parsing.
        let bytes = match n.raw_args.get(i) {
            Some(raw) if n.raw_args.len() == n.args.len() && go_lossy(raw) == *arg => &raw[..],
            _ => arg.as_bytes(),
        };
        s.push(' ');
        s.push_str(&go_quote(bytes));
    }
    if let Some(next) = &n.next {
        let _ = write!(s, " ({})", dump_node(next));
    }
    s.trim().to_owned()
}

/// The whole file: `(node)\n` per instruction, exactly like BuildKit's `result` files.
pub fn dump(df: &Dockerfile) -> String {
    df.nodes
        .iter()
        .map(|n| format!("({})\n", dump_node(n)))
        .collect()
}
