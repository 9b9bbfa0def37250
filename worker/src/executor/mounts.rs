//! RUN's `--mount`s as Docker mounts: cache mounts are named volumes, tmpfs mounts are
//! tmpfs, and what a bind or secret mount shows is written into a temporary volume first.
//!
//! A mount that shows a directory mounts its volume at the target. A mount that shows a
//! single file (a secret, a bind of one file) cannot: a volume is a directory, and Docker
//! 20.10 (API 1.41) has no volume subpath, so mounting it over the target's parent would
//! hide the parent's other files (and a parent of `/` is refused). Instead the file is
//! written into a temporary volume and that one file is bind-mounted at the target, by its
//! path under the volume's mount point on the daemon's host. The daemon resolves that
//! path itself, so this works for a remote daemon as well as a local one, and the worker
//! never writes secrets to its own disk. The volume (and the secret in it) is removed with
//! the stage's other resources. A cache mount given uid/gid/mode uses the same device for
//! the same reason (a volume's own root cannot be given an owner): see the Cache arm.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bollard::models::{
    ContainerCreateBody, HostConfig, Mount as DockerMount, MountType as DockerMountType,
    MountVolumeOptions,
};
use model::digest::BlobDigest;
use model::frontend::instructions::{CacheSharing, MountType, Run};
use model::task::StageError;

use super::config::clean_abs;
use super::run::CacheLocks;
use super::tree::{Content, Kind, Node};
use crate::daemon::{Daemon, Resources};

/// A volume to fill with these nodes (paths relative to the volume root) before the
/// container starts.
pub struct MountPrep {
    pub volume: String,
    pub nodes: BTreeMap<String, Node>,
}

/// What a bind mount shows.
pub enum BindSource {
    /// A directory: its entries, relative to the mount.
    Dir(BTreeMap<String, Node>),
    /// A single file.
    File(Node),
}

/// The Docker side of a RUN's mounts.
pub struct MountPlan {
    pub mounts: Vec<DockerMount>,
    pub tmpfs: HashMap<String, String>,
    pub prep: Vec<MountPrep>,
    /// Locks held while the command runs (`sharing=locked`).
    pub locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Absolute targets of the mounts that show a single file. Where such a target did not
    /// exist, the runtime creates an empty file for it in the container, which BuildKit
    /// does not leave in the image: the caller removes it.
    pub file_targets: Vec<String>,
}

fn volume_mount(target: &str, volume: &str, read_only: bool) -> DockerMount {
    DockerMount {
        target: Some(target.to_string()),
        source: Some(volume.to_string()),
        typ: Some(DockerMountType::VOLUME),
        read_only: Some(read_only),
        volume_options: Some(MountVolumeOptions {
            no_copy: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The temporary volume that holds the single files of one RUN's file mounts.
struct FileVolume {
    name: String,
    mountpoint: String,
    nodes: BTreeMap<String, Node>,
}

impl FileVolume {
    /// Adds `node` as a new file of the volume; returns the bind mount showing it at
    /// `target`.
    async fn mount(
        this: &mut Option<FileVolume>,
        daemon: &Daemon,
        res: &Resources,
        node: Node,
        target: &str,
        read_only: bool,
    ) -> Result<DockerMount, StageError> {
        if this.is_none() {
            let (name, mountpoint) = daemon.temp_volume(res).await?;
            host_path(&name, &mountpoint, "")?;
            *this = Some(FileVolume {
                name,
                mountpoint,
                nodes: BTreeMap::new(),
            });
        }
        let fv = this.as_mut().expect("just made");
        let file = format!("f{}", fv.nodes.len());
        fv.nodes.insert(format!("/{file}"), node);
        Ok(DockerMount {
            target: Some(target.to_string()),
            source: Some(host_path(&fv.name, &fv.mountpoint, &file)?),
            typ: Some(DockerMountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        })
    }
}

/// Plans the Docker side of every mount. `binds[i]` is what bind mount `i` shows (`None`
/// for other kinds); `secrets` are the build's secrets; `script` is a `#!` heredoc to
/// show at `/dev/pipes/<name>`.
#[allow(clippy::too_many_arguments)]
pub async fn plan_mounts(
    daemon: &Daemon,
    res: &Resources,
    locks: &CacheLocks,
    run: &Run,
    workdir: &str,
    mut binds: Vec<Option<BindSource>>,
    secrets: &BTreeMap<String, Vec<u8>>,
    script: Option<(String, Vec<u8>)>,
) -> Result<MountPlan, StageError> {
    let mut plan = MountPlan {
        mounts: Vec::new(),
        tmpfs: HashMap::new(),
        prep: Vec::new(),
        locks: Vec::new(),
        file_targets: Vec::new(),
    };
    let mut files: Option<FileVolume> = None;
    let abs = |t: &str| {
        if t.starts_with('/') {
            clean_abs(t)
        } else {
            clean_abs(&format!(
                "{}/{t}",
                if workdir.is_empty() { "/" } else { workdir }
            ))
        }
    };
    for (i, m) in run.mounts.iter().enumerate() {
        let target = m.target.as_deref().map(abs);
        match m.kind {
            MountType::Cache => {
                let target = target.ok_or_else(|| StageError::new("cache mount needs a target"))?;
                let id = m.id.clone().unwrap_or_else(|| target.clone());
                // uid/gid/mode describe the cache's root. BuildKit keys a cache by that
                // base too, so other values mean another cache (and the name without
                // them stays what it always was).
                let root = (m.uid.is_some() || m.gid.is_some() || m.mode.is_some()).then(|| Node {
                    kind: Kind::Dir,
                    mode: m.mode.unwrap_or(0o755),
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                });
                let mut key = format!("{}\0{id}", daemon.prefix);
                if let Some(r) = &root {
                    key.push_str(&format!("\0{}:{}:{:o}", r.uid, r.gid, r.mode));
                }
                let hash = BlobDigest::of(key.as_bytes());
                let (volume, mountpoint) = match m.sharing {
                    CacheSharing::Private => daemon.temp_volume(res).await?,
                    _ => {
                        let name = format!("dbuild-cache-{}", &hash.to_hex()[..32]);
                        let mountpoint = daemon.ensure_volume(&name).await?;
                        (name, mountpoint)
                    }
                };
                if m.sharing == CacheSharing::Locked {
                    let lock = locks.lock().entry(volume.clone()).or_default().clone();
                    plan.locks.push(lock);
                }
                let Some(root) = root else {
                    plan.mounts.push(volume_mount(&target, &volume, m.readonly));
                    continue;
                };
                // The daemon never sets the metadata of the directory it extracts into,
                // so a volume's own root cannot be given an owner and mode: the cache is
                // its subdirectory `c`, made (or its metadata reasserted, which also
                // covers a RUN racing this one) by the fill, and bind-mounted by its host
                // path. The fill's helper container keeps the volume in use meanwhile.
                let source = host_path(&volume, &mountpoint, "c")?;
                plan.prep.push(MountPrep {
                    volume,
                    nodes: BTreeMap::from([("/c".to_string(), root)]),
                });
                plan.mounts.push(DockerMount {
                    target: Some(target),
                    source: Some(source),
                    typ: Some(DockerMountType::BIND),
                    read_only: Some(m.readonly),
                    ..Default::default()
                });
            }
            MountType::Tmpfs => {
                let target = target.ok_or_else(|| StageError::new("tmpfs mount needs a target"))?;
                let opts = m
                    .size
                    .as_ref()
                    .map(|s| format!("size={s}"))
                    .unwrap_or_default();
                plan.tmpfs.insert(target, opts);
            }
            MountType::Secret => {
                let id =
                    m.id.clone()
                        .or_else(|| m.source.clone())
                        .unwrap_or_default();
                let Some(data) = secrets.get(&id) else {
                    if m.required {
                        return Err(StageError::new(format!(
                            "secret {id} is required but was not provided (pass --secret id={id},src=<file>)"
                        )));
                    }
                    continue;
                };
                if m.env.is_some() && m.target.is_none() {
                    return Err(StageError::new(format!(
                        "secret {id}: env= secrets are not supported by this executor yet"
                    )));
                }
                let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
                // BuildKit's defaults: 0400, owned by root.
                let node = Node {
                    kind: Kind::File(Content::Bytes(Arc::new(data.clone()))),
                    mode: m.mode.unwrap_or(0o400),
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                };
                let mount = FileVolume::mount(&mut files, daemon, res, node, &target, true).await?;
                plan.mounts.push(mount);
                plan.file_targets.push(target);
            }
            MountType::Bind => {
                let target = target.unwrap_or_else(|| abs("."));
                let src = binds
                    .get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| StageError::new(format!("bind mount at {target}: no source")))?;
                match src {
                    BindSource::Dir(nodes) => {
                        let (volume, _) = daemon.temp_volume(res).await?;
                        plan.prep.push(MountPrep {
                            volume: volume.clone(),
                            nodes,
                        });
                        plan.mounts.push(volume_mount(&target, &volume, m.readonly));
                    }
                    BindSource::File(node) => {
                        // Writes to an `rw` bind land in the temporary copy, and are
                        // discarded with it, as BuildKit discards them.
                        let mount =
                            FileVolume::mount(&mut files, daemon, res, node, &target, m.readonly)
                                .await?;
                        plan.mounts.push(mount);
                        plan.file_targets.push(target);
                    }
                }
            }
            MountType::Ssh => {
                if m.required {
                    return Err(StageError::new(
                        "ssh mounts are not supported by this executor yet",
                    ));
                }
            }
        }
    }
    if let Some(fv) = files {
        plan.prep.push(MountPrep {
            volume: fv.name,
            nodes: fv.nodes,
        });
    }
    if let Some((name, data)) = script {
        let (volume, _) = daemon.temp_volume(res).await?;
        let mut nodes = BTreeMap::new();
        nodes.insert(
            format!("/{name}"),
            Node {
                kind: Kind::File(Content::Bytes(Arc::new(data))),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        );
        plan.prep.push(MountPrep {
            volume: volume.clone(),
            nodes,
        });
        plan.mounts.push(volume_mount("/dev/pipes", &volume, true));
    }
    Ok(plan)
}

/// The host path of `sub` in a volume, for a bind mount the daemon resolves itself.
fn host_path(volume: &str, mountpoint: &str, sub: &str) -> Result<String, StageError> {
    if !mountpoint.starts_with('/') {
        return Err(StageError::new(format!(
            "volume {volume} has no host path (mount point {mountpoint:?}): mounts of a single file, and cache mounts with uid/gid/mode, need the `local` volume driver"
        )));
    }
    Ok(format!("{}/{sub}", mountpoint.trim_end_matches('/')))
}

/// Fills the volumes a RUN's mounts show, through a helper container (never started)
/// that mounts them read-write.
pub async fn fill_volumes(
    daemon: &Daemon,
    res: &Resources,
    helper_image: &str,
    prep: Vec<MountPrep>,
    ctx: Arc<dyn model::task::ContextFiles>,
) -> Result<(), StageError> {
    if prep.is_empty() {
        return Ok(());
    }
    let mounts = prep
        .iter()
        .enumerate()
        .map(|(i, p)| volume_mount(&format!("/v{i}"), &p.volume, false))
        .collect();
    let helper = daemon
        .create(
            ContainerCreateBody {
                image: Some(helper_image.to_string()),
                host_config: Some(HostConfig {
                    mounts: Some(mounts),
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            res,
        )
        .await?;
    for (i, p) in prep.into_iter().enumerate() {
        let at = format!("/v{i}");
        let ctx = ctx.clone();
        let nodes = p.nodes;
        let tar = tokio::task::spawn_blocking(move || {
            super::tree::write_tar(Vec::new(), &nodes, ctx.as_ref())
        })
        .await
        .map_err(|e| StageError::new(format!("build mount archive: {e}")))?
        .map_err(|e| StageError::new(format!("build mount archive: {e}")))?;
        daemon.upload(&helper, &at, tar).await?;
    }
    Ok(())
}
