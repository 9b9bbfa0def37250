//! Shell patterns of `${V#p}`, `${V%p}` and `${V/p/r}`: `*`, `?` and `\` escapes (no
//! bracket classes), matched through the regex crate.

/// Converts a shell pattern (`*`, `?`, `\` escapes; no bracket classes) to regex syntax.
pub(super) fn pattern_regex(pattern: &str, greedy: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut it = pattern.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '*' => out.push_str(if greedy { ".*" } else { ".*?" }),
            '?' => out.push('.'),
            '\\' => match it.peek().copied() {
                Some('}' | '/') => {}
                Some(n @ ('*' | '?' | '\\')) => {
                    it.next();
                    out.push('\\');
                    out.push(n);
                }
                other => {
                    return Err(format!(
                        "invalid pattern ({pattern}) in substitution: invalid escape '\\{}'",
                        other.map(String::from).unwrap_or_default()
                    ))
                }
            },
            _ => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    Ok(out)
}

/// `${V#p}` / `${V##p}` (prefix) and `${V%p}` / `${V%%p}` (suffix): removes the shortest
/// (or with `greedy` the longest) match of `pattern` at that end of `value`.
pub(super) fn trim(
    pattern: &str,
    value: &str,
    greedy: bool,
    prefix: bool,
) -> Result<String, String> {
    let re = regex::Regex::new(&format!("^(?s:{})$", pattern_regex(pattern, true)?))
        .map_err(|e| e.to_string())?;
    let cuts: Vec<usize> = value
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(value.len()))
        .collect();
    if prefix {
        let mut ends: Box<dyn Iterator<Item = &usize>> = if greedy {
            Box::new(cuts.iter().rev())
        } else {
            Box::new(cuts.iter())
        };
        Ok(match ends.find(|&&e| re.is_match(&value[..e])) {
            Some(&e) => value[e..].to_string(),
            None => value.to_string(),
        })
    } else {
        let mut starts: Box<dyn Iterator<Item = &usize>> = if greedy {
            Box::new(cuts.iter())
        } else {
            Box::new(cuts.iter().rev())
        };
        Ok(match starts.find(|&&s| re.is_match(&value[s..])) {
            Some(&s) => value[..s].to_string(),
            None => value.to_string(),
        })
    }
}
