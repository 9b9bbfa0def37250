//! Typed instructions on top of the AST. Values are as written (not yet expanded); the
//! planner expands the fields Docker expands (see [`Instruction::expand`]).
use serde::{Deserialize, Serialize};

use super::parser::Heredoc;

mod flags;
mod mount;
mod typecheck;

pub use mount::{parse_mount, MountError};
pub use typecheck::{parse_instruction, valid_stage_name};

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
