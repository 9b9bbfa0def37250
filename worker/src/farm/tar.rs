//! Tar helpers of the import: an exported path's archive moved to its place in the
//! image made of a stage's exported paths.
/// The parent of `path`, relative (`/go/src/app` → `go/src`).
pub(super) fn parent_of(path: &str) -> String {
    let p = path.trim_end_matches('/');
    match p.rsplit_once('/') {
        Some((parent, _)) => parent.trim_start_matches('/').to_string(),
        None => String::new(),
    }
}

/// The last component of a path (`/a/b` → `b`).
pub(super) fn base_of(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// Copies an archive of one path (its root entry first) into `out` below `prefix`, with
/// the root named `root` (an exported symlink's target arrives under its own name).
pub(super) fn reprefix<W: std::io::Write>(
    out: &mut tar::Builder<W>,
    archive: impl std::io::Read,
    prefix: String,
    root: &str,
) -> std::io::Result<()> {
    let mut first: Option<String> = None;
    let rename = |name: &str, first: &str| -> String {
        if root.is_empty() || first.is_empty() {
            return name.to_string();
        }
        match name.strip_prefix(first) {
            Some("") => root.to_string(),
            Some(rest) if rest.starts_with('/') => format!("{root}{rest}"),
            _ => name.to_string(),
        }
    };
    let mut made = String::new();
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        made = if made.is_empty() {
            part.to_string()
        } else {
            format!("{made}/{part}")
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        out.append_data(&mut h, format!("{made}/"), std::io::empty())?;
    }
    let mut a = tar::Archive::new(archive);
    for entry in a.entries()? {
        let mut e = entry?;
        let name = e.path()?.to_string_lossy().into_owned();
        let first = first
            .get_or_insert_with(|| name.trim_end_matches('/').to_string())
            .clone();
        let name = rename(&name, &first);
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let mut h = e.header().clone();
        let link = e.link_name()?.map(|l| l.into_owned());
        match (h.entry_type(), link) {
            // Hard links name another entry of the same archive: move them along.
            (tar::EntryType::Link, Some(target)) => {
                let t = rename(&target.to_string_lossy(), &first);
                let t = if prefix.is_empty() {
                    t
                } else {
                    format!("{prefix}/{t}")
                };
                out.append_link(&mut h, &full, t)?;
            }
            (_, Some(target)) => {
                let target = target.to_path_buf();
                out.append_link(&mut h, &full, target)?;
            }
            (_, None) => out.append_data(&mut h, &full, &mut e)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        assert_eq!(parent_of("/go/src/app"), "go/src");
        assert_eq!(parent_of("/app"), "");
        assert_eq!(parent_of("/out/"), "");
    }

    /// An exported symlink's target arrives under its own name and is named back.
    #[test]
    fn reprefix_names_the_root_after_the_exported_path() {
        let mut src = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        src.append_data(&mut h, "real/", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(2);
        src.append_data(&mut h, "real/f", &b"hi"[..]).unwrap();
        let archive = src.into_inner().unwrap();
        let mut out = tar::Builder::new(Vec::new());
        reprefix(
            &mut out,
            archive.as_slice(),
            "opt".into(),
            base_of("/opt/dir"),
        )
        .unwrap();
        let bytes = out.into_inner().unwrap();
        let names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["opt/", "opt/dir/", "opt/dir/f"]);
    }
}
