//! Instruction flags (`--name[=value]`): unknown and repeated flags are errors, booleans
//! read as Go's `strconv.ParseBool` reads them.
use super::InstructionError;
use crate::frontend::parser::Node;

/// Parsed `--name[=value]` flags of one instruction, checked against what it accepts.
pub(super) struct Flags {
    values: Vec<(String, Option<String>)>,
    line: usize,
}

impl Flags {
    pub(super) fn new(node: &Node, allowed: &[&str]) -> Result<Self, InstructionError> {
        let mut values: Vec<(String, Option<String>)> = Vec::new();
        for raw in &node.flags {
            let body = raw.strip_prefix("--").unwrap_or(raw);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !allowed.contains(&name.as_str()) {
                return Err(InstructionError {
                    line: node.start_line,
                    message: format!(
                        "unknown flag: --{name} for {} (accepted: {})",
                        node.keyword.to_uppercase(),
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed
                                .iter()
                                .map(|a| format!("--{a}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                });
            }
            let repeatable = matches!(name.as_str(), "mount" | "exclude" | "device");
            if !repeatable && values.iter().any(|(n, _)| *n == name) {
                return Err(InstructionError {
                    line: node.start_line,
                    message: format!("duplicate flag specified: --{name}"),
                });
            }
            values.push((name, value));
        }
        Ok(Flags {
            values,
            line: node.start_line,
        })
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<String>, InstructionError> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) => Ok(Some(v.clone())),
            Some((_, None)) => Err(self.err(format!("missing a value on flag: --{name}"))),
        }
    }

    pub(super) fn all(&self, name: &str) -> Result<Vec<String>, InstructionError> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| {
                v.clone()
                    .ok_or_else(|| self.err(format!("missing a value on flag: --{name}")))
            })
            .collect()
    }

    pub(super) fn bool(&self, name: &str) -> Result<Option<bool>, InstructionError> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, None)) => Ok(Some(true)),
            Some((_, Some(v))) => parse_bool(v).map(Some).ok_or_else(|| {
                self.err(format!(
                    "expecting boolean value for flag --{name}, not: {v}"
                ))
            }),
        }
    }

    fn err(&self, message: String) -> InstructionError {
        InstructionError {
            line: self.line,
            message,
        }
    }
}

pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}
