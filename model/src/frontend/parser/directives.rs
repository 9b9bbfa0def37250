//! Parser directives (`# syntax=`, `# escape=`, `# check=`): only at the top of the file,
//! each at most once.
use super::gostr::{go_lossy, go_lower, is_re_space, trim_left_ws};
use super::Directives;

pub(super) struct DirectiveState {
    pub(super) done: bool,
    pub(super) seen: Vec<String>,
    pub(super) directives: Directives,
}

impl DirectiveState {
    /// Looks at a (trimmed) line while still inside the directive section.
    pub(super) fn feed(&mut self, token: &[u8]) -> Result<(), String> {
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
