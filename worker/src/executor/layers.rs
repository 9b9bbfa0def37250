//! COPY/ADD and WORKDIR without a commit. Committing a container on a daemon whose storage
//! driver diffs naively (fuse-overlayfs, vfs) costs up to a second: the daemon sleeps until
//! the next whole second after every diff. When a step only writes plain files,
//! directories and symlinks under real directories, the layer it makes is exactly the tar
//! that would be uploaded, plus the directories above it with their current metadata, so
//! the executor writes that layer itself. It reaches the daemon with the next `docker
//! load` (the stage's result configs, or the bare image of the next container).
//!
//! The stage's *mirror* is a never-started container whose filesystem follows the stage's
//! state: the plan of each step stats it, and the layers written since it was made are
//! uploaded into it lazily, only before a stat that could see them.
use std::collections::BTreeMap;
use std::sync::Arc;

use bollard::models::{ContainerCreateBody, HostConfig};
use model::task::StageError;

use super::config::ImageConfig;
use super::copy::{self as cp, CopyPlanner};
use super::tree::{self, Kind, Node};
use super::{DockerExecutor, StageRun};
use crate::daemon::Daemon;

/// A container following the stage's filesystem state (see the module docs).
pub(crate) struct Mirror {
    pub container: String,
    /// What the layers applied since the container was made wrote (absolute paths).
    written: BTreeMap<String, Node>,
    /// Layers not uploaded into the container yet, oldest first.
    unsent: Vec<Arc<Vec<u8>>>,
}

impl Mirror {
    fn new(container: String) -> Self {
        Mirror {
            container,
            written: BTreeMap::new(),
            unsent: Vec::new(),
        }
    }

    /// Whether `path` is a directory, if a layer applied since the mirror was made says.
    pub fn known_dir(&self, path: &str) -> Option<bool> {
        match &self.written.get(path)?.kind {
            Kind::Dir => Some(true),
            Kind::File(_) => Some(false),
            _ => None,
        }
    }

    fn written_dir(&self, path: &str) -> bool {
        matches!(self.written.get(path), Some(n) if matches!(n.kind, Kind::Dir))
    }

    /// Uploads the pending layers if `path` or a directory above it was written by one.
    pub async fn sync_for(&mut self, daemon: &Daemon, path: &str) -> Result<(), StageError> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let mut cur = cp::parent(path);
        let mut hit = self.written.contains_key(path);
        while !hit && cur != "/" {
            hit = self.written.contains_key(cur);
            cur = cp::parent(cur);
        }
        if hit {
            self.sync(daemon).await?;
        }
        Ok(())
    }

    /// Uploads every pending layer.
    pub async fn sync(&mut self, daemon: &Daemon) -> Result<(), StageError> {
        for layer in std::mem::take(&mut self.unsent) {
            daemon.upload(&self.container, "/", layer.to_vec()).await?;
        }
        Ok(())
    }
}

/// Whether a container can be made from an image with `config` itself instead of a bare
/// image: creating one would make no anonymous volume and start no health check.
pub(crate) fn direct_ok(config: &ImageConfig) -> bool {
    config.volumes.is_empty() && config.healthcheck.is_none()
}

/// A never-started container of `image`, without network or mounts.
pub(crate) fn plain_body(image: &str) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(image.to_string()),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl DockerExecutor {
    /// The image to make a container of the current state from: the state's own image
    /// when it has one that can be used as is, else a bare image.
    pub(super) async fn state_image(&self, st: &mut StageRun<'_>) -> Result<String, StageError> {
        if let Some(id) = &st.id {
            if direct_ok(&st.state.config) {
                return Ok(id.clone());
            }
        }
        self.daemon
            .bare_image(&st.state, st.res, &mut st.new_layers)
            .await
    }

    /// A never-started container of an image, without network or mounts.
    pub(super) async fn plain_container(
        &self,
        st: &StageRun<'_>,
        image: &str,
    ) -> Result<String, StageError> {
        self.daemon.create(plain_body(image), st.res).await
    }

    /// The stage's mirror, made from the current state if there is none.
    pub(super) async fn take_mirror(&self, st: &mut StageRun<'_>) -> Result<Mirror, StageError> {
        if let Some(m) = st.mirror.take() {
            return Ok(m);
        }
        let image = self.state_image(st).await?;
        Ok(Mirror::new(self.plain_container(st, &image).await?))
    }

    /// Writes the planned nodes as the step's layer, without a container, if that layer
    /// is exactly what uploading them and committing would give; returns whether it did.
    /// The mirror (which `planner` planned against) is kept for the next step.
    pub(super) async fn try_write_layer(
        &self,
        st: &mut StageRun<'_>,
        mut planner: CopyPlanner<'_>,
    ) -> Result<Option<BTreeMap<String, Node>>, StageError> {
        let nodes = std::mem::take(&mut planner.nodes);
        let Some(above) = dirs_above(&planner, &nodes) else {
            return Ok(Some(nodes));
        };
        let mirror = planner.mirror.take().expect("planned against the mirror");
        let mut all = nodes;
        for d in above {
            let node = match mirror.written.get(&d) {
                Some(n) => n.clone(),
                None => {
                    mirror.sync_for(&self.daemon, &d).await?;
                    let (mode, uid, gid) =
                        self.daemon.owner_and_mode(&mirror.container, &d).await?;
                    Node {
                        kind: Kind::Dir,
                        mode,
                        uid,
                        gid,
                    }
                }
            };
            all.insert(d, node);
        }
        let ctx = st.inputs.context.clone();
        let (all, layer, diff) = tokio::task::spawn_blocking(move || {
            let layer = tree::write_tar(Vec::new(), &all, ctx.as_ref())?;
            let diff = format!("sha256:{}", super::sha256::hex(&layer));
            Ok::<_, std::io::Error>((all, layer, diff))
        })
        .await
        .map_err(|e| StageError::new(format!("build layer: {e}")))?
        .map_err(|e| StageError::new(format!("build layer: {e}")))?;
        let layer = Arc::new(layer);
        mirror.unsent.push(layer.clone());
        mirror.written.extend(all);
        st.size += layer.len() as u64;
        st.new_layers.insert(diff.clone(), layer);
        st.state.layers.push(diff);
        Ok(None)
    }
}

/// The existing directories above the planned nodes (each must go into a layer written
/// by hand with its metadata, or the daemon would create it 0600), or `None` if the
/// nodes cannot form such a layer: hard links, whiteout names, or a path whose
/// directories are not all known to be real directories (a symlink on the way, a
/// directory the plan never looked at).
fn dirs_above(planner: &CopyPlanner<'_>, nodes: &BTreeMap<String, Node>) -> Option<Vec<String>> {
    if nodes.is_empty() {
        return None;
    }
    let mirror = planner.mirror.as_deref()?;
    let mut above = std::collections::BTreeSet::new();
    for (path, n) in nodes {
        let name = path.rsplit('/').next().unwrap_or("");
        if matches!(n.kind, Kind::Hardlink(_)) || name.starts_with(".wh.") || path == "/" {
            return None;
        }
        let mut d = cp::parent(path);
        while d != "/" {
            match nodes.get(d) {
                Some(p) if matches!(p.kind, Kind::Dir) => {}
                Some(_) => return None,
                None => {
                    let real = mirror.written_dir(d)
                        || (planner.seen.get(d) == Some(&Some(true))
                            && !planner.linked.contains(d)
                            && !mirror.written.contains_key(d));
                    if !real {
                        return None;
                    }
                    above.insert(d.to_string());
                }
            }
            d = cp::parent(d);
        }
    }
    Some(above.into_iter().collect())
}
