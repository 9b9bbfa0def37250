//! One logical line (continuations joined) → [`Node`]: keyword, flags, and the arguments
//! split by that instruction's rules (JSON form, name=value pairs, words, one string).
use super::gostr::{
    go_chars, go_lossy, go_lower, go_trim_space, is_latin1_space, split_ws, split_ws_once,
};
use super::json::{parse_json, Json};
use super::Node;

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

pub(super) fn node_from_line(line: &[u8], esc: u8) -> Result<Node, String> {
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
                crate::frontend::dump::go_quote(word.as_bytes())
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
