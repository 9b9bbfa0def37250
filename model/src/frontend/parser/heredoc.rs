//! Heredocs: finding `<<WORD` markers on an instruction line (BuildKit's `ParseHeredoc`).
use super::gostr::{is_digit, is_letter, is_re_space};
use super::Heredoc;

/// A heredoc word the shell lexer cannot read (an unterminated quote, a bad `${...}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeredocError {
    #[error("failed to process {word:?}: {reason}")]
    Lex { word: String, reason: String },
    /// The lexer split the delimiter differently with and without its quotes.
    #[error("internal lexing of heredoc produced inconsistent results: {word}")]
    Inconsistent { word: String },
}

pub(super) fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, HeredocError> {
    // BuildKit ignores lexing errors here: such a line simply has no heredocs.
    let words = shlex::process_words(line, true, true).unwrap_or_default();
    let mut docs = Vec::new();
    for word in &words {
        if let Some(doc) = parse_heredoc(word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Recognises one heredoc word (`<<EOF`, `<<-EOF`, `<<"EOF"`, `2<<EOF`, `<< EOF`), as BuildKit's
/// `ParseHeredoc`. The returned heredoc has no body.
pub fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, HeredocError> {
    let digits = word.bytes().take_while(u8::is_ascii_digit).count();
    let Some(after) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    let rest = &rest[rest.bytes().take_while(|&b| is_re_space(b)).count()..];
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let words = shlex::process_words(rest, false, false)?;
    if words.len() != 1 {
        return Ok(None);
    }
    let raw = shlex::process_words(rest, true, false)?;
    if raw.len() != words.len() {
        return Err(HeredocError::Inconsistent {
            word: rest.to_string(),
        });
    }
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    Ok(Some(Heredoc {
        expand: quotes(&words[0]) == quotes(&raw[0]),
        name: words.into_iter().next().unwrap_or_default(),
        chomp,
        fd: word[..digits].parse().ok(),
        ..Heredoc::default()
    }))
}

/// The subset of BuildKit's shell lexer used to find heredoc words: word splitting with
/// quotes and escapes (`\` only), `<<` markers, and `$` references kept as text (no
/// variables are set).
mod shlex {
    use super::{is_digit, is_letter, HeredocError};

    const ESC: char = '\\';

    #[derive(Default)]
    struct Words {
        word: String,
        words: Vec<String>,
        in_word: bool,
    }

    impl Words {
        fn add_char(&mut self, c: char) {
            if !c.is_whitespace() {
                self.add_raw_char(c);
            } else if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        }
        fn add_raw_char(&mut self, c: char) {
            self.word.push(c);
            self.in_word = true;
        }
        fn add_string(&mut self, s: &str) {
            s.chars().for_each(|c| self.add_char(c));
        }
        fn add_raw_string(&mut self, s: &str) {
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

    struct Lexer {
        chars: Vec<char>,
        pos: usize,
        raw_quotes: bool,
        raw_escapes: bool,
    }

    pub(super) fn process_words(
        src: &str,
        raw_quotes: bool,
        raw_escapes: bool,
    ) -> Result<Vec<String>, HeredocError> {
        let mut chars: Vec<char> = src.chars().collect();
        if chars.first() == Some(&'\u{FEFF}') {
            chars.remove(0); // text/scanner skips a leading BOM
        }
        let mut lx = Lexer {
            chars,
            pos: 0,
            raw_quotes,
            raw_escapes,
        };
        lx.stop_on(None, raw_escapes)
            .map(|(_, words)| words)
            .map_err(|reason| HeredocError::Lex {
                word: src.to_string(),
                reason,
            })
    }

    impl Lexer {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.pos).copied()
        }

        fn next(&mut self) -> Option<char> {
            let c = self.peek();
            self.pos += usize::from(c.is_some());
            c
        }

        fn stop_on(
            &mut self,
            stop: Option<char>,
            raw: bool,
        ) -> Result<(String, Vec<String>), String> {
            let saved = std::mem::replace(&mut self.raw_escapes, raw);
            let r = self.stop_on_inner(stop);
            self.raw_escapes = saved;
            r
        }

        fn stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), String> {
            let mut result = String::new();
            let mut words = Words::default();
            while let Some(ch) = self.peek() {
                if stop == Some(ch) {
                    self.next();
                    return Ok((result, words.finish()));
                }
                match ch {
                    '\'' | '"' => {
                        let t = if ch == '\'' {
                            self.single_quote()?
                        } else {
                            self.double_quote()?
                        };
                        result.push_str(&t);
                        words.add_raw_string(&t);
                    }
                    '$' => {
                        let t = self.dollar()?;
                        result.push_str(&t);
                        words.add_string(&t);
                    }
                    '<' => {
                        // `<<` keeps the blanks after it, so `<< EOF` stays one word.
                        self.next();
                        let mut t = String::from("<");
                        if self.peek() == Some('<') {
                            self.next();
                            t.push('<');
                            while let Some(c) =
                                self.peek().filter(|c| matches!(c, ' ' | '\t' | '\r'))
                            {
                                self.next();
                                t.push(c);
                            }
                        }
                        result.push_str(&t);
                        words.add_raw_string(&t);
                    }
                    _ => {
                        self.next();
                        if ch == ESC {
                            if self.raw_escapes {
                                words.add_raw_char(ch);
                                result.push(ch);
                            }
                            let Some(c) = self.next() else { break };
                            words.add_raw_char(c);
                            result.push(c);
                        } else {
                            words.add_char(ch);
                            result.push(ch);
                        }
                    }
                }
            }
            match stop {
                Some(s) => Err(format!(
                    "unexpected end of statement while looking for matching {s}"
                )),
                None => Ok((result, words.finish())),
            }
        }

        fn single_quote(&mut self) -> Result<String, String> {
            let mut r = String::new();
            self.next();
            if self.raw_quotes {
                r.push('\'');
            }
            loop {
                match self.next() {
                    None => {
                        return Err(
                            "unexpected end of statement while looking for matching single-quote"
                                .into(),
                        )
                    }
                    Some('\'') => {
                        if self.raw_quotes {
                            r.push('\'');
                        }
                        return Ok(r);
                    }
                    Some(c) => r.push(c),
                }
            }
        }

        fn double_quote(&mut self) -> Result<String, String> {
            let mut r = String::new();
            self.next();
            if self.raw_quotes {
                r.push('"');
            }
            loop {
                match self.peek() {
                    None => {
                        return Err(
                            "unexpected end of statement while looking for matching double-quote"
                                .into(),
                        )
                    }
                    Some('"') => {
                        self.next();
                        if self.raw_quotes {
                            r.push('"');
                        }
                        return Ok(r);
                    }
                    Some('$') => r.push_str(&self.dollar()?),
                    Some(_) => {
                        let mut ch = self.next().unwrap_or(ESC);
                        if ch == ESC {
                            if self.raw_escapes {
                                r.push(ch);
                            }
                            match self.peek() {
                                None => continue,
                                Some(c @ ('"' | '$' | ESC)) => {
                                    self.next();
                                    ch = c;
                                }
                                Some(_) => {}
                            }
                        }
                        r.push(ch);
                    }
                }
            }
        }

        /// `$name` / `${...}`; nothing is set, so the reference is returned as text.
        fn dollar(&mut self) -> Result<String, String> {
            self.next();
            if self.peek() != Some('{') {
                return Ok(format!("${}", self.name()));
            }
            self.next();
            match self.peek() {
                None => return Err("syntax error: missing '}'".into()),
                Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
                Some(_) => {}
            }
            let name = self.name();
            let ch = self.next();
            let mut chs: String = ch.unwrap_or('\u{FFFD}').to_string();
            let mut modifier = ch;
            let mut null_is_unset = false;
            match ch {
                Some('}') => return Ok(format!("${{{name}}}")),
                Some(':') => {
                    null_is_unset = true;
                    modifier = self.next();
                    chs.push(modifier.unwrap_or('\u{FFFD}'));
                }
                Some('+' | '-' | '?' | '#' | '%') => {}
                Some('/') => {
                    if self.peek() == Some('/') {
                        self.next();
                    }
                    let missing = |lx: &Self, e: String, what: &str| {
                        if lx.peek().is_none() {
                            format!("syntax error: missing {what}")
                        } else {
                            e
                        }
                    };
                    let pattern = self
                        .stop_on(Some('/'), true)
                        .map_err(|e| missing(self, e, "'/' in ${}"))?
                        .0;
                    let repl = self
                        .stop_on(Some('}'), true)
                        .map_err(|e| missing(self, e, "'}'"))?
                        .0;
                    return Ok(format!("${{{name}/{pattern}/{repl}}}"));
                }
                _ => return Err(format!("unsupported modifier ({chs}) in substitution")),
            }
            let raw = matches!(modifier, Some('#' | '%'));
            if null_is_unset && raw {
                return Err(format!("unsupported modifier ({chs}) in substitution"));
            }
            let word = match self.stop_on(Some('}'), raw) {
                Ok((w, _)) => w,
                Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
                Err(e) => return Err(e),
            };
            Ok(format!("${{{name}{chs}{word}}}"))
        }

        fn name(&mut self) -> String {
            let mut name = String::new();
            while let Some(ch) = self.peek() {
                if name.is_empty() && is_digit(ch) {
                    while let Some(c) = self.peek().filter(|&c| is_digit(c)) {
                        self.next();
                        name.push(c);
                    }
                    return name;
                }
                if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                    self.next();
                    return ch.to_string();
                }
                if !is_letter(ch) && !is_digit(ch) && ch != '_' {
                    break;
                }
                self.next();
                name.push(ch);
            }
            name
        }
    }
}
