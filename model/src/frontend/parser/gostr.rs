//! Byte and rune helpers with Go semantics: BuildKit's parser works on Go strings, so
//! invalid UTF-8, whitespace classes and case folding must behave as Go's do.
use regex::Regex;
use std::sync::OnceLock;

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

pub(super) fn go_chars(mut b: &[u8]) -> Vec<char> {
    let mut out = Vec::with_capacity(b.len());
    while !b.is_empty() {
        let (c, n) = decode_rune(b);
        out.push(c);
        b = &b[n..];
    }
    out
}

/// `bytes.TrimLeftFunc(b, unicode.IsSpace)`; Rust's White_Space set equals Go's.
pub(super) fn trim_left_ws(mut b: &[u8]) -> &[u8] {
    loop {
        let (c, n) = decode_rune(b);
        if n == 0 || !c.is_whitespace() {
            return b;
        }
        b = &b[n..];
    }
}

pub(super) fn trim_right_ws(mut b: &[u8]) -> &[u8] {
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
pub(super) fn go_trim_space(b: &[u8]) -> &[u8] {
    trim_right_ws(trim_left_ws(b))
}

/// `strings.ToLower` (invalid bytes become U+FFFD).
pub(super) fn go_lower(b: &[u8]) -> String {
    go_chars(b)
        .into_iter()
        .map(|c| c.to_lowercase().next().unwrap_or(c))
        .collect()
}

/// `[\t\v\f\r ]`, the class BuildKit splits commands and whitespace-delimited args on.
pub(super) fn is_token_ws(b: u8) -> bool {
    matches!(b, b'\t' | 0x0b | 0x0c | b'\r' | b' ')
}

/// `unicode.IsSpace(rune(byte))`: flag and HEALTHCHECK parsing look at single bytes.
pub(super) fn is_latin1_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xA0)
}

/// Whitespace as in Go's regexp `\s` (ASCII, without `\v`).
pub(super) fn is_re_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0c | b'\r' | b' ')
}

pub(super) fn trim_newline(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n'] = b {
        b = rest;
    }
    b
}

pub(super) fn is_comment(line: &[u8]) -> bool {
    trim_left_ws(line).first() == Some(&b'#')
}

pub(super) fn unicode_class(c: char, cell: &'static OnceLock<Regex>, pattern: &str) -> bool {
    let re = cell.get_or_init(|| Regex::new(pattern).expect("valid unicode class regex"));
    re.is_match(c.encode_utf8(&mut [0u8; 4]))
}

pub(super) fn is_letter(c: char) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        unicode_class(c, &RE, r"^\p{L}$")
    }
}

pub(super) fn is_digit(c: char) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        unicode_class(c, &RE, r"^\p{Nd}$")
    }
}

/// Splits on runs of `[\t\v\f\r ]` like Go's `regexp.Split(s, -1)`; empty input gives none.
pub(super) fn split_ws(s: &[u8]) -> Vec<Vec<u8>> {
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
pub(super) fn split_ws_once(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| is_token_ws(b))?;
    let j = i + s[i..].iter().take_while(|&&b| is_token_ws(b)).count();
    Some((&s[..i], &s[j..]))
}
