//! Typed instructions on top of the AST. Values are as written (not yet expanded); the
//! planner expands the fields Docker expands (see [`Instruction::expand`]).
use serde::{Deserialize, Serialize};

use super::parser::{Heredoc, Node};

/// An instruction that failed to type-check, with the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct InstructionError {
    pub line: usize,
    pub message: String,
}

/// Exec form (`["a","b"]`, `json = true`) or shell form (one string run by the SHELL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    pub args: Vec<String>,
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeredocBody {
    pub name: String,
    pub content: String,
    pub expand: bool,
    pub chomp: bool,
}

impl std::convert::From<&Heredoc> for HeredocBody {
    fn from(h: &Heredoc) -> Self {
        HeredocBody {
            name: h.name.clone(),
            content: h.content.clone(),
            expand: h.expand,
            chomp: h.chomp,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct From {
    pub image: String,
    pub platform: Option<String>,
    /// The stage name after `AS`, lowercased.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSharing {
    Shared,
    Private,
    Locked,
}

/// One `RUN --mount=...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub kind: MountType,
    pub target: Option<String>,
    pub source: Option<String>,
    /// A stage name or index, or an external image.
    pub from: Option<String>,
    pub readonly: bool,
    pub id: Option<String>,
    pub sharing: CacheSharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    pub size: Option<String>,
    pub env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub command: CommandLine,
    pub mounts: Vec<Mount>,
    /// `default`, `none` or `host`.
    pub network: Option<String>,
    /// `sandbox` or `insecure`.
    pub security: Option<String>,
    pub heredocs: Vec<HeredocBody>,
}

/// COPY and ADD (ADD-only options are `None`/false for COPY).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub excludes: Vec<String>,
    pub heredocs: Vec<HeredocBody>,
    pub checksum: Option<String>,
    pub keep_git_dir: bool,
    pub unpack: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Healthcheck {
    None,
    Check {
        test: CommandLine,
        interval: Option<String>,
        timeout: Option<String>,
        start_period: Option<String>,
        start_interval: Option<String>,
        retries: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Instruction {
    From(From),
    Run(Run),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Shell(Vec<String>),
    Copy(Copy),
    Add(Copy),
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Arg(Vec<ArgDecl>),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Volume(Vec<String>),
    StopSignal(String),
    Healthcheck(Healthcheck),
    /// The trigger, as written after `ONBUILD`.
    Onbuild(String),
    Maintainer(String),
}

impl Instruction {
    /// The Dockerfile keyword, upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::From(_) => "FROM",
            Instruction::Run(_) => "RUN",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Shell(_) => "SHELL",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Label(_) => "LABEL",
            Instruction::Arg(_) => "ARG",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::Maintainer(_) => "MAINTAINER",
        }
    }

    /// Expands, in place, every field that Docker expands with the stage's variables
    /// (`f` is called once per word). RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK and ONBUILD
    /// are left alone: the shell or the child image expands those. ARG defaults and the
    /// FROM line are expanded by the planner, which owns their scoping rules.
    pub fn expand<E>(&mut self, f: &mut dyn FnMut(&str) -> Result<String, E>) -> Result<(), E> {
        let mut one = |s: &mut String| -> Result<(), E> {
            *s = f(s)?;
            Ok(())
        };
        match self {
            Instruction::Copy(c) | Instruction::Add(c) => {
                for s in c.sources.iter_mut().chain(c.excludes.iter_mut()) {
                    one(s)?;
                }
                one(&mut c.dest)?;
                for s in [&mut c.chown, &mut c.chmod, &mut c.checksum]
                    .into_iter()
                    .flatten()
                {
                    one(s)?;
                }
                for h in c.heredocs.iter_mut().filter(|h| h.expand) {
                    one(&mut h.content)?;
                }
            }
            Instruction::Run(r) => {
                for m in &mut r.mounts {
                    for s in [&mut m.target, &mut m.source, &mut m.id, &mut m.size]
                        .into_iter()
                        .flatten()
                    {
                        one(s)?;
                    }
                }
            }
            Instruction::Env(kv) | Instruction::Label(kv) => {
                for (k, v) in kv.iter_mut() {
                    one(k)?;
                    one(v)?;
                }
            }
            Instruction::Workdir(s) | Instruction::User(s) | Instruction::StopSignal(s) => one(s)?,
            Instruction::Expose(v) | Instruction::Volume(v) => {
                for s in v.iter_mut() {
                    one(s)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Parsed `--name[=value]` flags of one instruction, checked against what it accepts.
struct Flags {
    values: Vec<(String, Option<String>)>,
    line: usize,
}

impl Flags {
    fn new(node: &Node, allowed: &[&str]) -> Result<Self, InstructionError> {
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

    fn string(&self, name: &str) -> Result<Option<String>, InstructionError> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) => Ok(Some(v.clone())),
            Some((_, None)) => Err(self.err(format!("missing a value on flag: --{name}"))),
        }
    }

    fn all(&self, name: &str) -> Result<Vec<String>, InstructionError> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| {
                v.clone()
                    .ok_or_else(|| self.err(format!("missing a value on flag: --{name}")))
            })
            .collect()
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, InstructionError> {
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

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}

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
                .map(|m| parse_mount(m).map_err(|e| err(node, e)))
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

/// Parses the value of one `--mount` flag (`type=cache,target=/root/.cache,sharing=locked`).
pub fn parse_mount(spec: &str) -> Result<Mount, String> {
    let mut m = Mount {
        kind: MountType::Bind,
        target: None,
        source: None,
        from: None,
        readonly: false,
        id: None,
        sharing: CacheSharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        required: false,
        size: None,
        env: None,
    };
    let fields: Vec<(String, Option<String>)> = split_csv(spec)
        .into_iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.trim().to_lowercase(), Some(v.to_string())),
            None => (f.trim().to_lowercase(), None),
        })
        .collect();
    let mut readonly: Option<bool> = None;
    for (key, value) in &fields {
        if key == "type" {
            m.kind = match value.as_deref() {
                Some("bind") => MountType::Bind,
                Some("cache") => MountType::Cache,
                Some("tmpfs") => MountType::Tmpfs,
                Some("secret") => MountType::Secret,
                Some("ssh") => MountType::Ssh,
                other => {
                    return Err(format!(
                        "unsupported mount type {:?}: use bind, cache, tmpfs, secret or ssh",
                        other.unwrap_or("")
                    ))
                }
            };
        }
    }
    for (key, value) in fields {
        let need = |v: Option<String>| v.ok_or_else(|| format!("mount option {key} needs a value"));
        let num = |v: Option<String>, radix: u32| -> Result<u32, String> {
            let s = v.ok_or_else(|| format!("mount option {key} needs a value"))?;
            u32::from_str_radix(&s, radix)
                .map_err(|_| format!("invalid value {s:?} for mount option {key}"))
        };
        match key.as_str() {
            "type" => {}
            "target" | "dst" | "destination" => m.target = Some(need(value)?),
            "source" | "src" => m.source = Some(need(value)?),
            "from" => m.from = Some(need(value)?),
            "id" => m.id = Some(need(value)?),
            "readonly" | "ro" => {
                readonly = Some(match value {
                    None => true,
                    Some(v) => parse_bool(&v).ok_or(format!("invalid value {v:?} for {key}"))?,
                })
            }
            "readwrite" | "rw" => {
                readonly = Some(match value {
                    None => false,
                    Some(v) => !parse_bool(&v).ok_or(format!("invalid value {v:?} for {key}"))?,
                })
            }
            "required" => {
                m.required = match value {
                    None => true,
                    Some(v) => parse_bool(&v).ok_or(format!("invalid value {v:?} for {key}"))?,
                }
            }
            "sharing" => {
                m.sharing = match value.as_deref() {
                    Some("shared") => CacheSharing::Shared,
                    Some("private") => CacheSharing::Private,
                    Some("locked") => CacheSharing::Locked,
                    other => {
                        return Err(format!(
                            "unsupported sharing value {:?}: use shared, private or locked",
                            other.unwrap_or("")
                        ))
                    }
                }
            }
            "mode" => m.mode = Some(num(value, 8)?),
            "uid" => m.uid = Some(num(value, 10)?),
            "gid" => m.gid = Some(num(value, 10)?),
            "size" => m.size = Some(need(value)?),
            "env" => m.env = Some(need(value)?),
            other => return Err(format!("unexpected key '{other}' in '{spec}'")),
        }
    }
    m.readonly = readonly.unwrap_or(m.kind == MountType::Bind);
    if m.target.is_none() {
        match m.kind {
            MountType::Secret => {
                if m.env.is_none() {
                    let id =
                        m.id.clone()
                            .or_else(|| m.source.clone())
                            .unwrap_or_default();
                    m.target = Some(format!("/run/secrets/{id}"));
                }
            }
            MountType::Ssh => m.target = Some("/run/buildkit/ssh_agent.0".into()),
            // BuildKit mounts a bind without a target at the working directory.
            MountType::Bind => m.target = Some(".".into()),
            _ => return Err(format!("mount {spec:?} has no target: add target=<path>")),
        }
    }
    if m.kind == MountType::Secret && m.id.is_none() && m.source.is_none() {
        if let Some(t) = &m.target {
            m.id = t.rsplit('/').next().map(str::to_string);
        }
    }
    if m.kind == MountType::Cache && m.id.is_none() {
        m.id = m.target.clone();
    }
    Ok(m)
}

/// Splits on commas outside double quotes (the mount spec is CSV), removing the quotes.
fn split_csv(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|f| !f.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_defaults() {
        let m = parse_mount("type=cache,target=/root/.cache,sharing=locked").unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert_eq!(m.id.as_deref(), Some("/root/.cache"));
        assert_eq!(m.sharing, CacheSharing::Locked);
        assert!(!m.readonly);
        let b = parse_mount("target=.,from=builder,source=/out").unwrap();
        assert_eq!(b.kind, MountType::Bind);
        assert!(b.readonly);
        assert_eq!(b.from.as_deref(), Some("builder"));
        let s = parse_mount("type=secret,id=npmrc").unwrap();
        assert_eq!(s.target.as_deref(), Some("/run/secrets/npmrc"));
        let t = parse_mount("type=tmpfs,target=/tmp,size=64m").unwrap();
        assert_eq!(t.size.as_deref(), Some("64m"));
        assert_eq!(
            parse_mount("type=cache,target=/x,mode=0755,uid=1000")
                .unwrap()
                .mode,
            Some(0o755)
        );
    }

    #[test]
    fn mount_errors() {
        assert!(parse_mount("type=nfs,target=/x").is_err());
        assert!(parse_mount("type=cache").is_err());
        assert!(parse_mount("type=cache,target=/x,bogus=1").is_err());
        assert!(parse_mount("type=cache,target=/x,sharing=maybe").is_err());
    }

    #[test]
    fn stage_names() {
        assert!(valid_stage_name("builder"));
        assert!(valid_stage_name("build-env_1.2"));
        assert!(!valid_stage_name("1st"));
        assert!(!valid_stage_name("a/b"));
        assert!(!valid_stage_name(""));
    }
}
