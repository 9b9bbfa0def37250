//! Ports of Go's `path/filepath` `Match` and `Clean` (Unix flavour, `/` separator), which
//! Docker's pattern handling builds on.
use super::error::ContextError;

/// Go's `filepath.Match` on `/`-separated paths: the whole `name` must match; `*` matches any
/// run of non-`/` characters, `?` one non-`/` character, `[...]`/`[^...]` a character class
/// (ranges `a-z`, `\` escapes), `\x` the literal `x`. A malformed pattern is an error even
/// when the match fails early (as in Go >= 1.16).
pub fn path_match(pattern: &str, name: &str) -> Result<bool, ContextError> {
    go_match(pattern.as_bytes(), name.as_bytes())
        .map_err(|()| ContextError::bad_pattern(pattern, "syntax error in pattern"))
}

/// Go's `filepath.Clean` for `/`-separated paths: collapses `//`, drops `.` elements, resolves
/// `..` against preceding elements (dropping it at the root), strips a trailing `/`;
/// returns `.` for an empty result.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => match out.last() {
                Some(last) if *last != ".." => {
                    out.pop();
                }
                _ if rooted => {}
                _ => out.push(".."),
            },
            c => out.push(c),
        }
    }
    let joined = out.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

const RUNE_ERROR: u32 = 0xFFFD;

/// Go's `utf8.DecodeRune`: (rune, width), `(RuneError, 1)` on invalid input. `s` non-empty.
fn decode_rune(s: &[u8]) -> (u32, usize) {
    let want = match s[0] {
        0x00..=0x7F => return (s[0] as u32, 1),
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => return (RUNE_ERROR, 1),
    };
    match s.get(..want).map(std::str::from_utf8) {
        Some(Ok(st)) => (st.chars().next().expect("non-empty") as u32, want),
        _ => (RUNE_ERROR, 1),
    }
}

/// Go's `filepath.Match` on bytes; `Err(())` is `ErrBadPattern`.
fn go_match(mut pattern: &[u8], mut name: &[u8]) -> Result<bool, ()> {
    'outer: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            return Ok(!name.contains(&b'/'));
        }
        match match_chunk(chunk, name) {
            Ok(Some(t)) if t.is_empty() || !pattern.is_empty() => {
                name = t;
                continue;
            }
            Err(()) => return Err(()),
            _ => {}
        }
        if star {
            let mut i = 0;
            while i < name.len() && name[i] != b'/' {
                // On the last chunk the rest of the name must be used up.
                if let Some(t) = match_chunk(chunk, &name[i + 1..])? {
                    if !pattern.is_empty() || t.is_empty() {
                        name = t;
                        continue 'outer;
                    }
                }
                i += 1;
            }
        }
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, b"")?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

fn scan_chunk(mut p: &[u8]) -> (bool, &[u8], &[u8]) {
    let mut star = false;
    while p.first() == Some(&b'*') {
        p = &p[1..];
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' if i + 1 < p.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &p[..i], &p[i..])
}

/// Matches `chunk` (no `*`) against the start of `s`: `Ok(Some(rest))` on match, `Ok(None)` on
/// mismatch (the chunk is still fully validated), `Err(())` on a malformed chunk.
fn match_chunk<'a>(mut chunk: &[u8], mut s: &'a [u8]) -> Result<Option<&'a [u8]>, ()> {
    let mut failed = false;
    while !chunk.is_empty() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match chunk[0] {
            b'[' => {
                let mut r = 0;
                if !failed {
                    let (c, n) = decode_rune(s);
                    r = c;
                    s = &s[n..];
                }
                chunk = &chunk[1..];
                let negated = chunk.first() == Some(&b'^');
                if negated {
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut nrange = 0;
                loop {
                    if chunk.first() == Some(&b']') && nrange > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk[0] == b'-' {
                        let (h, rest) = get_esc(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    nrange += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            b'?' => {
                if !failed {
                    if s[0] == b'/' {
                        failed = true;
                    }
                    s = &s[decode_rune(s).1..];
                }
                chunk = &chunk[1..];
            }
            c => {
                if c == b'\\' {
                    chunk = &chunk[1..];
                    if chunk.is_empty() {
                        return Err(());
                    }
                }
                if !failed {
                    if chunk[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    Ok(if failed { None } else { Some(s) })
}

/// Go's `getEsc`: a possibly escaped character of a bracket expression; the remainder must be
/// non-empty.
pub(super) fn get_esc(chunk: &[u8]) -> Result<(u32, &[u8]), ()> {
    if chunk.is_empty() || chunk[0] == b'-' || chunk[0] == b']' {
        return Err(());
    }
    let mut c = chunk;
    if c[0] == b'\\' {
        c = &c[1..];
        if c.is_empty() {
            return Err(());
        }
    }
    let (r, n) = decode_rune(c);
    if r == RUNE_ERROR && n == 1 {
        return Err(());
    }
    let rest = &c[n..];
    if rest.is_empty() {
        return Err(());
    }
    Ok((r, rest))
}
