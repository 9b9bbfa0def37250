//! Where the final image goes: tagged on the local daemon, written as a `docker load` tar,
//! or nowhere. Only the CLI talks to the local daemon for this; the coordinator never does.
use std::path::PathBuf;

use anyhow::{bail, Context};
use worker::daemon::Daemon;

/// A parsed `--output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Keep the image on the daemon, tagged with every `-t`.
    Docker,
    /// `docker save` format at this path.
    Tar(PathBuf),
    None,
}

impl Output {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut kind = None;
        let mut dest = None;
        for field in spec.split(',') {
            match field.split_once('=') {
                Some(("type", v)) => kind = Some(v.to_string()),
                Some(("dest", v)) => dest = Some(PathBuf::from(v)),
                _ => bail!(
                    "--output {spec:?}: expected type=docker, type=tar,dest=PATH or type=none"
                ),
            }
        }
        match (kind.as_deref(), dest) {
            (Some("docker") | None, None) => Ok(Output::Docker),
            (Some("tar"), Some(d)) => Ok(Output::Tar(d)),
            (Some("tar"), None) => bail!("--output type=tar needs dest=PATH"),
            (Some("none"), None) => Ok(Output::None),
            (Some(other), _) if !matches!(other, "docker" | "tar" | "none") => {
                bail!("--output type={other} is not supported: use docker, tar or none")
            }
            _ => bail!("--output {spec:?}: dest= only goes with type=tar"),
        }
    }
}

/// Connects to `host` (or the local defaults) at a version the daemon speaks: the
/// worker's daemon handle, so the CLI talks to Docker the way the executor does.
pub async fn connect(host: Option<&str>) -> anyhow::Result<Daemon> {
    Daemon::connect(host)
        .await
        .context("connecting to the Docker daemon (is the daemon running?)")
}

/// `docker load` of an image archive in a file, streamed.
pub async fn load_file(daemon: &Daemon, archive: std::fs::File) -> anyhow::Result<()> {
    daemon
        .load_file(archive)
        .await
        .context("loading the image into the local daemon")
}

/// Splits `name[:tag]` (a `:` inside the registry host is not a tag).
fn split_tag(reference: &str) -> (&str, &str) {
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    }
}

/// Delivers the final image as `output` asks.
pub async fn deliver(
    host: Option<&str>,
    output: &Output,
    image_id: &str,
    tags: &[String],
) -> anyhow::Result<()> {
    match output {
        Output::None => Ok(()),
        Output::Docker => {
            if tags.is_empty() {
                return Ok(());
            }
            let daemon = connect(host).await?;
            for t in tags {
                let (repo, tag) = split_tag(t);
                daemon
                    .tag_as(image_id, repo, tag)
                    .await
                    .with_context(|| format!("tagging the image as {t}"))?;
            }
            Ok(())
        }
        Output::Tar(dest) => {
            let daemon = connect(host).await?;
            let tmp = dest.with_extension("partial");
            daemon
                .save_to_file(image_id, &tmp)
                .await
                .context("exporting the image")?;
            tokio::fs::rename(&tmp, dest)
                .await
                .with_context(|| format!("writing {}", dest.display()))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outputs() {
        assert_eq!(Output::parse("type=docker").unwrap(), Output::Docker);
        assert_eq!(Output::parse("type=none").unwrap(), Output::None);
        assert_eq!(
            Output::parse("type=tar,dest=/tmp/x.tar").unwrap(),
            Output::Tar("/tmp/x.tar".into())
        );
        assert!(Output::parse("type=tar").is_err());
        assert!(Output::parse("type=registry").is_err());
        assert!(Output::parse("bogus").is_err());
    }

    #[test]
    fn splits_tags() {
        assert_eq!(split_tag("app"), ("app", "latest"));
        assert_eq!(split_tag("app:1"), ("app", "1"));
        assert_eq!(split_tag("reg:5000/app"), ("reg:5000/app", "latest"));
        assert_eq!(split_tag("reg:5000/app:2"), ("reg:5000/app", "2"));
    }
}
