//! Typing one AST node: its flags checked, its arguments counted, `--mount` parsed.
use super::flags::Flags;
use super::mount::parse_mount;
use super::{ArgDecl, CommandLine, Copy, From, Healthcheck, HeredocBody, Instruction};
use super::{InstructionError, Run};
use crate::frontend::parser::Node;

fn err(node: &Node, message: impl Into<String>) -> InstructionError {
    InstructionError {
        line: node.start_line,
        message: message.into(),
    }
}

fn command_line(node: &Node) -> CommandLine {
    CommandLine {
        args: node.args.clone(),
        json: node.json,
    }
}

fn single(node: &Node) -> Result<String, InstructionError> {
    match node.args.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(err(
            node,
            format!(
                "{} requires exactly one argument",
                node.keyword.to_uppercase()
            ),
        )),
        _ => Ok(node.args.join(" ")),
    }
}

/// Stage names as BuildKit accepts them: a letter first, then `[a-z0-9-_.]`.
pub fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// Types one AST node.
pub fn parse_instruction(node: &Node) -> Result<Instruction, InstructionError> {
    let kw = node.keyword.as_str();
    let none: &[&str] = &[];
    Ok(match kw {
        "from" => {
            let flags = Flags::new(node, &["platform"])?;
            let (image, name) = match node.args.as_slice() {
                [image] => (image.clone(), None),
                [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    let lower = name.to_lowercase();
                    if !valid_stage_name(&lower) {
                        return Err(err(node, format!("invalid name for build stage: {name:?}, name can't start with a number or contain symbols")));
                    }
                    (image.clone(), Some(lower))
                }
                _ => {
                    return Err(err(
                        node,
                        "FROM requires either one or three arguments: FROM <image> [AS <name>]",
                    ))
                }
            };
            Instruction::From(From {
                image,
                platform: flags.string("platform")?,
                name,
            })
        }
        "run" => {
            let flags = Flags::new(node, &["mount", "network", "security", "device"])?;
            let mounts = flags
                .all("mount")?
                .iter()
                .map(|m| parse_mount(m).map_err(|e| err(node, e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let network = flags.string("network")?;
            if let Some(n) = &network {
                if !matches!(n.as_str(), "default" | "none" | "host") {
                    return Err(err(
                        node,
                        format!("unsupported network mode {n:?}: use default, none or host"),
                    ));
                }
            }
            let security = flags.string("security")?;
            if let Some(s) = &security {
                if !matches!(s.as_str(), "sandbox" | "insecure") {
                    return Err(err(
                        node,
                        format!("unsupported security mode {s:?}: use sandbox or insecure"),
                    ));
                }
            }
            if node.args.is_empty() && node.heredocs.is_empty() {
                return Err(err(node, "RUN requires at least one argument"));
            }
            Instruction::Run(Run {
                command: command_line(node),
                mounts,
                network,
                security,
                heredocs: node.heredocs.iter().map(HeredocBody::from).collect(),
            })
        }
        "cmd" | "entrypoint" => {
            Flags::new(node, none)?;
            if kw == "cmd" {
                Instruction::Cmd(command_line(node))
            } else {
                Instruction::Entrypoint(command_line(node))
            }
        }
        "shell" => {
            Flags::new(node, none)?;
            if !node.json || node.args.is_empty() {
                return Err(err(
                    node,
                    "SHELL requires the arguments to be in JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]",
                ));
            }
            Instruction::Shell(node.args.clone())
        }
        "copy" | "add" => parse_copy(node, kw == "add")?,
        "env" | "label" => {
            Flags::new(node, none)?;
            let pairs: Vec<(String, String)> = node
                .args
                .chunks(3)
                .map(|t| (t[0].clone(), t.get(1).cloned().unwrap_or_default()))
                .collect();
            if pairs.is_empty() {
                return Err(err(
                    node,
                    format!("{} requires at least one argument", kw.to_uppercase()),
                ));
            }
            if kw == "env" {
                Instruction::Env(pairs)
            } else {
                Instruction::Label(pairs)
            }
        }
        "arg" => {
            Flags::new(node, none)?;
            if node.args.is_empty() {
                return Err(err(node, "ARG requires at least one argument"));
            }
            Instruction::Arg(
                node.args
                    .iter()
                    .map(|a| match a.split_once('=') {
                        Some((n, v)) => ArgDecl {
                            name: n.to_string(),
                            default: Some(v.to_string()),
                        },
                        None => ArgDecl {
                            name: a.clone(),
                            default: None,
                        },
                    })
                    .collect(),
            )
        }
        "workdir" => {
            Flags::new(node, none)?;
            Instruction::Workdir(single(node)?)
        }
        "user" => {
            Flags::new(node, none)?;
            Instruction::User(single(node)?)
        }
        "stopsignal" => {
            Flags::new(node, none)?;
            Instruction::StopSignal(single(node)?)
        }
        "maintainer" => {
            Flags::new(node, none)?;
            Instruction::Maintainer(single(node)?)
        }
        "expose" => {
            Flags::new(node, none)?;
            if node.args.is_empty() {
                return Err(err(node, "EXPOSE requires at least one argument"));
            }
            Instruction::Expose(node.args.clone())
        }
        "volume" => {
            Flags::new(node, none)?;
            if node.args.is_empty() || node.args.iter().any(|a| a.trim().is_empty()) {
                return Err(err(node, "VOLUME specified can not be an empty string"));
            }
            Instruction::Volume(node.args.clone())
        }
        "healthcheck" => parse_healthcheck(node)?,
        "onbuild" => {
            Flags::new(node, none)?;
            let inner = node
                .next
                .as_deref()
                .ok_or_else(|| err(node, "ONBUILD requires at least one argument"))?;
            match inner.keyword.as_str() {
                "onbuild" => {
                    return Err(err(
                        node,
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ))
                }
                "from" | "maintainer" => {
                    return Err(err(
                        node,
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            inner.keyword.to_uppercase()
                        ),
                    ))
                }
                _ => {}
            }
            // Type-check the trigger now so a typo fails here, not in a child build.
            parse_instruction(inner)?;
            let trigger = node
                .original
                .trim_start()
                .get(node.keyword.len()..)
                .unwrap_or_default()
                .trim()
                .to_string();
            Instruction::Onbuild(trigger)
        }
        other => {
            return Err(err(
                node,
                format!(
                    "unknown instruction: {}",
                    node.original
                        .split_whitespace()
                        .next()
                        .unwrap_or(other)
                        .to_uppercase()
                ),
            ))
        }
    })
}

fn parse_copy(node: &Node, add: bool) -> Result<Instruction, InstructionError> {
    let allowed: &[&str] = if add {
        &[
            "chown",
            "chmod",
            "link",
            "exclude",
            "keep-git-dir",
            "checksum",
            "unpack",
        ]
    } else {
        &["from", "chown", "chmod", "link", "parents", "exclude"]
    };
    let flags = Flags::new(node, allowed)?;
    if node.args.len() < 2 {
        return Err(err(
            node,
            format!(
                "{} requires at least two arguments, but only {} provided",
                node.keyword.to_uppercase(),
                node.args.len()
            ),
        ));
    }
    let (dest, sources) = node.args.split_last().expect("two args");
    let copy = Copy {
        sources: sources.to_vec(),
        dest: dest.clone(),
        from: if add { None } else { flags.string("from")? },
        chown: flags.string("chown")?,
        chmod: flags.string("chmod")?,
        link: flags.bool("link")?.unwrap_or(false),
        parents: if add {
            false
        } else {
            flags.bool("parents")?.unwrap_or(false)
        },
        excludes: flags.all("exclude")?,
        heredocs: node.heredocs.iter().map(HeredocBody::from).collect(),
        checksum: if add { flags.string("checksum")? } else { None },
        keep_git_dir: add && flags.bool("keep-git-dir")?.unwrap_or(false),
        unpack: if add { flags.bool("unpack")? } else { None },
    };
    if copy.from.as_deref() == Some("") {
        return Err(err(node, "--from requires a stage name, index or image"));
    }
    Ok(if add {
        Instruction::Add(copy)
    } else {
        Instruction::Copy(copy)
    })
}

fn parse_healthcheck(node: &Node) -> Result<Instruction, InstructionError> {
    let flags = Flags::new(
        node,
        &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
    )?;
    let Some(kind) = node.args.first() else {
        return Err(err(
            node,
            "HEALTHCHECK requires an argument: CMD ... or NONE",
        ));
    };
    match kind.to_uppercase().as_str() {
        "NONE" => {
            if node.args.len() > 1 {
                return Err(err(node, "HEALTHCHECK NONE takes no arguments"));
            }
            if !node.flags.is_empty() {
                return Err(err(node, "HEALTHCHECK NONE takes no options"));
            }
            Ok(Instruction::Healthcheck(Healthcheck::None))
        }
        "CMD" => {
            let test = CommandLine {
                args: node.args[1..].to_vec(),
                json: node.json,
            };
            if test.args.is_empty() {
                return Err(err(node, "HEALTHCHECK CMD requires a command"));
            }
            let retries = flags
                .string("retries")?
                .map(|r| {
                    r.parse::<u32>().map_err(|_| {
                        err(
                            node,
                            format!("invalid --retries value {r:?}: a whole number"),
                        )
                    })
                })
                .transpose()?;
            Ok(Instruction::Healthcheck(Healthcheck::Check {
                test,
                interval: flags.string("interval")?,
                timeout: flags.string("timeout")?,
                start_period: flags.string("start-period")?,
                start_interval: flags.string("start-interval")?,
                retries,
            }))
        }
        other => Err(err(
            node,
            format!("unknown type {other:?} in HEALTHCHECK (try CMD or NONE)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names() {
        assert!(valid_stage_name("builder"));
        assert!(valid_stage_name("build-env_1.2"));
        assert!(!valid_stage_name("1st"));
        assert!(!valid_stage_name("a/b"));
        assert!(!valid_stage_name(""));
    }
}
