//! The image config as BuildKit writes it, and the config-only instructions applied to it.
//!
//! Field names and shapes follow the Docker image config JSON (`config` of an image), so
//! a [`ImageConfig`] serializes to exactly what `docker load` stores; empty fields are
//! left out, as BuildKit leaves them out.
use std::collections::BTreeMap;

use model::frontend::instructions::{CommandLine, Healthcheck, Instruction};
use serde::{Deserialize, Serialize};

/// The PATH BuildKit puts into every stage whose base does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `{}` in Docker's JSON maps (`ExposedPorts`, `Volumes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub test: Vec<String>,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub interval: i64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub timeout: i64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub start_period: i64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub start_interval: i64,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// The runtime config of an image (the fields a Dockerfile can change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub user: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub volumes: BTreeMap<String, Empty>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub working_dir: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub stop_signal: String,
    #[serde(skip_serializing_if = "is_false", default)]
    pub args_escaped: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub healthcheck: Option<HealthConfig>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub on_build: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub shell: Vec<String>,
}

impl ImageConfig {
    /// Converts what `inspect_image` returns; empty lists count as unset.
    pub fn from_inspect(c: Option<bollard::models::ImageConfig>) -> Self {
        let Some(c) = c else {
            return ImageConfig::default();
        };
        let nonempty = |v: Option<Vec<String>>| v.filter(|v| !v.is_empty());
        ImageConfig {
            user: c.user.unwrap_or_default(),
            exposed_ports: c
                .exposed_ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p, Empty {}))
                .collect(),
            env: c.env.unwrap_or_default(),
            entrypoint: nonempty(c.entrypoint),
            cmd: nonempty(c.cmd),
            volumes: c
                .volumes
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p, Empty {}))
                .collect(),
            working_dir: c.working_dir.unwrap_or_default(),
            labels: c.labels.unwrap_or_default().into_iter().collect(),
            stop_signal: c.stop_signal.unwrap_or_default(),
            args_escaped: c.args_escaped.unwrap_or(false),
            healthcheck: c.healthcheck.map(|h| HealthConfig {
                test: h.test.unwrap_or_default(),
                interval: h.interval.unwrap_or(0),
                timeout: h.timeout.unwrap_or(0),
                start_period: h.start_period.unwrap_or(0),
                start_interval: h.start_interval.unwrap_or(0),
                retries: h.retries.unwrap_or(0),
            }),
            on_build: c.on_build.unwrap_or_default(),
            shell: c.shell.unwrap_or_default(),
        }
    }

    /// The value of an environment variable of the config.
    pub fn env_get(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })
    }

    /// Sets a variable in place (keeping its position) or appends it, as BuildKit does.
    pub fn env_set(&mut self, name: &str, value: &str) {
        let entry = format!("{name}={value}");
        match self
            .env
            .iter_mut()
            .find(|kv| kv.split_once('=').map(|(k, _)| k).unwrap_or(kv) == name)
        {
            Some(slot) => *slot = entry,
            None => self.env.push(entry),
        }
    }

    /// The environment as a map (later duplicates win), for expansion.
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    }

    /// The SHELL in force (BuildKit's default is `/bin/sh -c`).
    pub fn shell_or_default(&self) -> Vec<String> {
        if self.shell.is_empty() {
            vec!["/bin/sh".into(), "-c".into()]
        } else {
            self.shell.clone()
        }
    }

    /// A command line as the argv Docker stores: exec form as is, shell form wrapped in
    /// the current SHELL.
    pub fn argv(&self, cmd: &CommandLine) -> Vec<String> {
        if cmd.json {
            cmd.args.clone()
        } else {
            let mut v = self.shell_or_default();
            v.push(cmd.args.join(" "));
            v
        }
    }
}

/// Why a config-only instruction could not be applied (BuildKit's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An EXPOSE port spec.
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    /// A HEALTHCHECK duration flag (`interval`, `timeout`, ...).
    #[error("--{flag}: {source}")]
    Healthcheck {
        flag: &'static str,
        source: DurationError,
    },
}

/// A Go duration that does not parse (Go's `time.ParseDuration` messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("time: invalid duration {0:?}")]
    Invalid(String),
    #[error("time: missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("time: unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit { unit: String, input: String },
}

/// An EXPOSE port spec that does not parse (the container part, as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("invalid containerPort: {0}")]
    Invalid(String),
    #[error("invalid range specified for containerPort: {0}")]
    Range(String),
}

impl From<ConfigError> for model::task::StageError {
    fn from(e: ConfigError) -> Self {
        model::task::StageError::new(e.to_string())
    }
}

/// Per-stage state BuildKit keeps beside the config.
#[derive(Debug, Clone, Default)]
pub struct StageFlags {
    /// A CMD was set in this stage (ENTRYPOINT then keeps it).
    pub cmd_set: bool,
}

/// Applies an (already expanded) config-only instruction. Returns `Ok(false)` if the
/// instruction is not config-only. WORKDIR updates only the config here; the caller
/// creates the directory. `author` receives MAINTAINER.
pub fn apply(
    config: &mut ImageConfig,
    flags: &mut StageFlags,
    author: &mut Option<String>,
    ins: &Instruction,
) -> Result<bool, ConfigError> {
    match ins {
        Instruction::Env(pairs) => {
            for (k, v) in pairs {
                config.env_set(k, v);
            }
        }
        Instruction::Label(pairs) => {
            for (k, v) in pairs {
                config.labels.insert(k.clone(), v.clone());
            }
        }
        Instruction::Arg(_) => {}
        Instruction::Workdir(wd) => config.working_dir = join_workdir(&config.working_dir, wd),
        Instruction::User(u) => config.user = u.clone(),
        Instruction::Expose(ports) => {
            for p in ports.iter().flat_map(|p| p.split_whitespace()) {
                for port in expand_port(p)? {
                    config.exposed_ports.insert(port, Empty {});
                }
            }
        }
        Instruction::Volume(vols) => {
            for v in vols {
                if v.trim().is_empty() {
                    return Err(ConfigError::EmptyVolume);
                }
                config.volumes.insert(v.clone(), Empty {});
            }
        }
        Instruction::StopSignal(s) => config.stop_signal = s.clone(),
        Instruction::Cmd(c) => {
            config.cmd = Some(config.argv(c));
            config.args_escaped = true;
            flags.cmd_set = true;
        }
        Instruction::Entrypoint(c) => {
            config.entrypoint = Some(config.argv(c));
            if !flags.cmd_set {
                config.cmd = None;
            }
        }
        Instruction::Shell(s) => config.shell = s.clone(),
        Instruction::Healthcheck(h) => config.healthcheck = Some(health(config, h)?),
        Instruction::Onbuild(t) => config.on_build.push(t.clone()),
        Instruction::Maintainer(m) => *author = Some(m.clone()),
        _ => return Ok(false),
    }
    Ok(true)
}

/// WORKDIR: an absolute path is kept as written (BuildKit stores `/e/` as is); a
/// relative one joins the previous WORKDIR and is cleaned (`path.Join`).
pub fn join_workdir(current: &str, wd: &str) -> String {
    if wd.starts_with('/') {
        return wd.to_string();
    }
    clean_abs(&format!(
        "{}/{wd}",
        if current.is_empty() { "/" } else { current }
    ))
}

/// Cleans an absolute path like Go's `path.Clean` (`..` never climbs above `/`).
pub fn clean_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

fn health(config: &ImageConfig, h: &Healthcheck) -> Result<HealthConfig, ConfigError> {
    Ok(match h {
        Healthcheck::None => HealthConfig {
            test: vec!["NONE".into()],
            ..Default::default()
        },
        Healthcheck::Check {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => {
            let _ = config;
            let test = if test.json {
                std::iter::once("CMD".to_string())
                    .chain(test.args.iter().cloned())
                    .collect()
            } else {
                vec!["CMD-SHELL".into(), test.args.join(" ")]
            };
            let d = |v: &Option<String>, flag: &'static str| -> Result<i64, ConfigError> {
                match v {
                    None => Ok(0),
                    Some(s) => parse_duration(s)
                        .map_err(|source| ConfigError::Healthcheck { flag, source }),
                }
            };
            HealthConfig {
                test,
                interval: d(interval, "interval")?,
                timeout: d(timeout, "timeout")?,
                start_period: d(start_period, "start-period")?,
                start_interval: d(start_interval, "start-interval")?,
                retries: retries.map(i64::from).unwrap_or(0),
            }
        }
    })
}

/// Parses a Go duration (`1m30s`, `500ms`, `1.5h`) into nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, DurationError> {
    let bad = || DurationError::Invalid(s.to_string());
    if s == "0" {
        return Ok(0);
    }
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| DurationError::MissingUnit(s.to_string()))?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            u => {
                return Err(DurationError::UnknownUnit {
                    unit: u.to_string(),
                    input: s.to_string(),
                })
            }
        };
        total += value * unit;
        rest = &rest[unit_len..];
    }
    let ns = total.round() as i64;
    Ok(if neg { -ns } else { ns })
}

/// `80`, `80/tcp`, `53/UDP`, `8000-8002` → `["80/tcp"]`, ... (BuildKit's port specs).
pub fn expand_port(spec: &str) -> Result<Vec<String>, PortError> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    // `ip:host:container` specs keep only the container part, as nat.ParsePortSpecs does.
    let ports = ports.rsplit(':').next().unwrap_or(ports);
    let bad = || PortError::Invalid(ports.to_string());
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = ports.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(PortError::Range(ports.to_string()));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration("5s"), Ok(5_000_000_000));
        assert_eq!(parse_duration("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(expand_port("80"), Ok(vec!["80/tcp".to_string()]));
        assert_eq!(expand_port("53/UDP"), Ok(vec!["53/udp".to_string()]));
        assert_eq!(expand_port("8000-8001/tcp").unwrap().len(), 2);
        assert!(expand_port("abc").is_err());
    }

    #[test]
    fn workdirs() {
        assert_eq!(join_workdir("", "a"), "/a");
        assert_eq!(join_workdir("/a/b", "c/../d/"), "/a/b/d");
        assert_eq!(join_workdir("/a", "/x/"), "/x/");
    }

    #[test]
    fn env_in_place() {
        let mut c = ImageConfig::default();
        c.env_set("A", "1");
        c.env_set("B", "2");
        c.env_set("A", "3");
        assert_eq!(c.env, vec!["A=3", "B=2"]);
        assert_eq!(c.env_get("B"), Some("2"));
    }
}
