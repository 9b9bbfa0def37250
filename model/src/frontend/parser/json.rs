//! JSON arrays in exec-form instructions, decoded with the rules of Go's encoding/json.
use super::gostr::{decode_rune, trim_left_ws};
pub(super) enum Json {
    Strings(Vec<Vec<u8>>),
    /// Valid JSON, but an element is not a string: an error for the instruction.
    NonString,
    /// Not (valid) JSON: the instruction falls back to its shell form.
    Invalid,
}

const MAX_JSON_DEPTH: usize = 10000;

pub(super) fn parse_json(rest: &[u8]) -> Json {
    let s = trim_left_ws(rest);
    if s.first() != Some(&b'[') {
        return Json::Invalid;
    }
    let mut p = JsonParser {
        s,
        i: 1,
        overflow: false,
    };
    match p.top_array() {
        Ok(_) if p.overflow => Json::Invalid,
        Ok(elems) => match elems.into_iter().collect::<Option<Vec<_>>>() {
            Some(v) => Json::Strings(v.into_iter().map(String::into_bytes).collect()),
            None => Json::NonString,
        },
        Err(()) => Json::Invalid,
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
    overflow: bool,
}

type JResult<T> = Result<T, ()>;

impl JsonParser<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> JResult<()> {
        self.ws();
        if self.peek() != Some(b) {
            return Err(());
        }
        self.i += 1;
        Ok(())
    }

    /// After the opening `[`: elements (`None` for non-strings) up to the end of input.
    fn top_array(&mut self) -> JResult<Vec<Option<String>>> {
        let mut out = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                if self.peek() == Some(b'"') {
                    out.push(Some(self.string()?));
                } else {
                    self.value()?;
                    out.push(None);
                }
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        break;
                    }
                    _ => return Err(()),
                }
            }
        }
        self.ws();
        if self.i == self.s.len() {
            Ok(out)
        } else {
            Err(())
        }
    }

    /// Validates any value, iteratively (nesting is limited like Go's scanner).
    fn value(&mut self) -> JResult<()> {
        let mut stack: Vec<u8> = Vec::new();
        loop {
            self.ws();
            match self.peek().ok_or(())? {
                open @ (b'[' | b'{') => {
                    self.i += 1;
                    if stack.len() + 2 > MAX_JSON_DEPTH {
                        return Err(());
                    }
                    let close = if open == b'[' { b']' } else { b'}' };
                    self.ws();
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        if close == b'}' {
                            self.key()?;
                        }
                        stack.push(close);
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b'-' | b'0'..=b'9' => self.number()?,
                _ => self.literal()?,
            }
            loop {
                let Some(&close) = stack.last() else {
                    return Ok(());
                };
                self.ws();
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if close == b'}' {
                            self.key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        self.i += 1;
                        stack.pop();
                    }
                    _ => return Err(()),
                }
            }
        }
    }

    fn key(&mut self) -> JResult<()> {
        self.ws();
        if self.peek() != Some(b'"') {
            return Err(());
        }
        self.string()?;
        self.expect(b':')
    }

    fn literal(&mut self) -> JResult<()> {
        for lit in [&b"true"[..], b"false", b"null"] {
            if self.s[self.i..].starts_with(lit) {
                self.i += lit.len();
                return Ok(());
            }
        }
        Err(())
    }

    fn digits(&mut self) -> usize {
        let n = self.s[self.i..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.i += n;
        n
    }

    fn number(&mut self) -> JResult<()> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(()),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(());
            }
        }
        // Go decodes numbers into float64 and fails (softly) when they overflow.
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| ())?;
        if text.parse::<f64>().map_or(true, f64::is_infinite) {
            self.overflow = true;
        }
        Ok(())
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let h = self.s.get(at..at + 4)?;
        let h = std::str::from_utf8(h).ok()?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(h, 16).ok()
    }

    fn string(&mut self) -> JResult<String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let b = self.peek().ok_or(())?;
            match b {
                b'"' => {
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => {
                    let e = *self.s.get(self.i + 1).ok_or(())?;
                    self.i += 2;
                    let c = match e {
                        b'"' | b'\\' | b'/' => e as char,
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let r = self.hex4(self.i).ok_or(())?;
                            self.i += 4;
                            if (0xD800..0xE000).contains(&r) {
                                let pair = (r < 0xDC00 && self.s[self.i..].starts_with(b"\\u"))
                                    .then(|| self.hex4(self.i + 2))
                                    .flatten()
                                    .filter(|r2| (0xDC00..0xE000).contains(r2));
                                match pair {
                                    Some(r2) => {
                                        self.i += 6;
                                        let cp = 0x10000 + ((r - 0xD800) << 10) + (r2 - 0xDC00);
                                        char::from_u32(cp).unwrap_or('\u{FFFD}')
                                    }
                                    None => '\u{FFFD}',
                                }
                            } else {
                                char::from_u32(r).unwrap_or('\u{FFFD}')
                            }
                        }
                        _ => return Err(()),
                    };
                    out.push(c);
                }
                0..=0x1f => return Err(()),
                _ => {
                    let (c, n) = decode_rune(&self.s[self.i..]);
                    out.push(c);
                    self.i += n;
                }
            }
        }
    }
}
