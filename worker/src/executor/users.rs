//! `--chown` and `USER` specs to numeric ids, with the image's `/etc/passwd` and
//! `/etc/group` (BuildKit's rules: a user name takes its uid and primary gid from passwd,
//! a bare numeric uid is also the gid, a group overrides the gid).

/// A `user[:group]` spec split into its parts.
fn split(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    }
}

/// Whether resolving `spec` needs the image's passwd/group files.
pub fn needs_files(spec: &str) -> bool {
    let (u, g) = split(spec);
    u.parse::<u32>().is_err() || g.is_some_and(|g| g.parse::<u32>().is_err())
}

/// A user or group name the image's files do not hold (BuildKit's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
}

impl From<UserError> for model::task::StageError {
    fn from(e: UserError) -> Self {
        model::task::StageError::new(e.to_string())
    }
}

/// Resolves `user[:group]` to `(uid, gid)`. `passwd` and `group` are the files' contents
/// (empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32), UserError> {
    let (u, g) = split(spec);
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => lookup(passwd, u, 2)
            .and_then(|f| Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?)))
            .ok_or_else(|| UserError::NoUser(u.to_string()))?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(group, g, 2)
                .and_then(|f| f.first()?.parse().ok())
                .ok_or_else(|| UserError::NoGroup(g.to_string()))?,
        };
    }
    Ok((uid, gid))
}

/// The fields after `name:x:` of the line for `name`.
fn lookup<'a>(file: &'a str, name: &str, skip: usize) -> Option<Vec<&'a str>> {
    file.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name)).then(|| fields.into_iter().skip(skip).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:\n";

    #[test]
    fn specs() {
        assert_eq!(resolve("10", "", ""), Ok((10, 10)));
        assert_eq!(resolve("10:11", "", ""), Ok((10, 11)));
        assert_eq!(resolve("app", PASSWD, GROUP), Ok((1000, 1000)));
        assert_eq!(resolve("app:staff", PASSWD, GROUP), Ok((1000, 50)));
        assert_eq!(resolve("0:app", PASSWD, GROUP), Ok((0, 1000)));
        assert!(resolve("nobody", PASSWD, GROUP).is_err());
        assert!(!needs_files("1:2"));
        assert!(needs_files("app"));
    }
}
