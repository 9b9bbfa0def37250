//! The value of one `RUN --mount=...` flag, as BuildKit reads it (CSV of `key[=value]`).
use super::flags::parse_bool;
use super::{CacheSharing, Mount, MountType};

/// A `--mount` value that cannot be read; each variant names the bad key or value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("unsupported mount type {value:?}: use bind, cache, tmpfs, secret or ssh")]
    UnsupportedType { value: String },
    #[error("mount option {key} needs a value")]
    MissingValue { key: String },
    #[error("invalid value {value:?} for mount option {key}")]
    InvalidNumber { key: String, value: String },
    #[error("invalid value {value:?} for {key}")]
    InvalidBool { key: String, value: String },
    #[error("unsupported sharing value {value:?}: use shared, private or locked")]
    UnsupportedSharing { value: String },
    #[error("unexpected key '{key}' in '{spec}'")]
    UnknownKey { key: String, spec: String },
    #[error("mount {spec:?} has no target: add target=<path>")]
    NoTarget { spec: String },
}

/// Parses the value of one `--mount` flag (`type=cache,target=/root/.cache,sharing=locked`).
pub fn parse_mount(spec: &str) -> Result<Mount, MountError> {
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
                    return Err(MountError::UnsupportedType {
                        value: other.unwrap_or("").to_string(),
                    })
                }
            };
        }
    }
    for (key, value) in fields {
        let need =
            |v: Option<String>| v.ok_or_else(|| MountError::MissingValue { key: key.clone() });
        let num = |v: Option<String>, radix: u32| -> Result<u32, MountError> {
            let s = need(v)?;
            u32::from_str_radix(&s, radix).map_err(|_| MountError::InvalidNumber {
                key: key.clone(),
                value: s,
            })
        };
        let flag = |v: String| {
            parse_bool(&v).ok_or_else(|| MountError::InvalidBool {
                key: key.clone(),
                value: v,
            })
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
                    Some(v) => flag(v)?,
                })
            }
            "readwrite" | "rw" => {
                readonly = Some(match value {
                    None => false,
                    Some(v) => !flag(v)?,
                })
            }
            "required" => {
                m.required = match value {
                    None => true,
                    Some(v) => flag(v)?,
                }
            }
            "sharing" => {
                m.sharing = match value.as_deref() {
                    Some("shared") => CacheSharing::Shared,
                    Some("private") => CacheSharing::Private,
                    Some("locked") => CacheSharing::Locked,
                    other => {
                        return Err(MountError::UnsupportedSharing {
                            value: other.unwrap_or("").to_string(),
                        })
                    }
                }
            }
            "mode" => m.mode = Some(num(value, 8)?),
            "uid" => m.uid = Some(num(value, 10)?),
            "gid" => m.gid = Some(num(value, 10)?),
            "size" => m.size = Some(need(value)?),
            "env" => m.env = Some(need(value)?),
            other => {
                return Err(MountError::UnknownKey {
                    key: other.to_string(),
                    spec: spec.to_string(),
                })
            }
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
            _ => {
                return Err(MountError::NoTarget {
                    spec: spec.to_string(),
                })
            }
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
}
