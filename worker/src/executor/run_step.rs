//! The RUN step: what its bind mounts show, its mounts, the container, the commit, and
//! removing the mount points of single-file mounts that the runtime had to create.
use std::collections::{BTreeMap, BTreeSet};

use model::frontend::instructions::{MountType, Run};
use model::task::{StageError, TaskInstruction};

use super::config::clean_abs;
use super::copy as cp;
use super::diff_layer;
use super::layers::direct_ok;
use super::mounts::{self, BindSource};
use super::run::{self, RunOutcome, RunSpec};
use super::steps::{from_image, FromImage};
use super::tree::{Kind, Node, SourceTree};
use super::{DockerExecutor, StageRun};

impl DockerExecutor {
    /// RUN.
    pub(super) async fn step_run(
        &self,
        st: &mut StageRun<'_>,
        r: &Run,
        ti: Option<&TaskInstruction>,
    ) -> Result<(), StageError> {
        let config = st.state.config.clone();
        let (argv, script) = run::run_argv(r, &config);
        let binds = self.bind_sources(st, r, ti).await?;
        let plan = mounts::plan_mounts(
            &self.daemon,
            st.res,
            &self.locks,
            r,
            &config.working_dir,
            binds,
            &st.inputs.secrets,
            script,
        )
        .await?;
        if !plan.prep.is_empty() {
            let helper = self.empty_bare(st).await?;
            mounts::fill_volumes(
                &self.daemon,
                st.res,
                &helper,
                plan.prep,
                st.inputs.context.clone(),
            )
            .await?;
        }
        let env = st.vars.to_env();
        let targets: Vec<String> = plan
            .mounts
            .iter()
            .filter_map(|m| m.target.clone())
            .chain(plan.tmpfs.keys().cloned())
            .map(|t| clean_abs(&t))
            .collect();
        // The state's own image when creating a container of it adds nothing: no volume,
        // no health check, no variable the RUN does not set anyway (the entrypoint is
        // always reset).
        let image = match &st.id {
            Some(id)
                if direct_ok(&st.state.config)
                    && st.state.config.env.iter().all(|kv| {
                        let k = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
                        env.iter()
                            .any(|e| e.split_once('=').map(|(n, _)| n) == Some(k))
                    }) =>
            {
                id.clone()
            }
            _ => {
                self.daemon
                    .bare_image(&st.state, st.res, &mut st.new_layers)
                    .await?
            }
        };
        let created = self.missing_paths(st, &image, &plan.file_targets).await?;
        let mut guards = Vec::new();
        for l in &plan.locks {
            guards.push(l.clone().lock_owned().await);
        }
        let spec = RunSpec {
            image,
            argv: argv.clone(),
            env,
            user: config.user.clone(),
            workdir: config.working_dir.clone(),
            network: match r.network.as_deref() {
                Some("none") => Some("none".into()),
                Some("host") => Some("host".into()),
                _ => st.task.network.clone().or_else(|| self.run_network.clone()),
            },
            mounts: plan.mounts,
            tmpfs: plan.tmpfs,
        };
        let outcome = run::run_container(
            &self.daemon,
            st.res,
            spec,
            st.task.stage,
            st.logs,
            st.cancel,
        )
        .await?;
        drop(guards);
        match outcome {
            RunOutcome::Cancelled => Err(StageError::cancelled()),
            RunOutcome::Failed { code, tail } => Err(StageError {
                message: format!(
                    "process \"{}\" did not complete successfully: exit code: {code}",
                    argv.join(" ")
                ),
                line: ti.map(|t| t.line),
                log_tail: tail,
                cancelled: false,
            }),
            RunOutcome::Exited { container, elapsed } => {
                st.command_time += elapsed;
                // A RUN with mounts is committed: what the archive API shows at and
                // below mount targets is not the container's own layer.
                let changes = if targets.is_empty() && created.is_empty() {
                    diff_layer::layer_from_changes(&self.daemon, &container, &created, &targets)
                        .await?
                } else {
                    None
                };
                match changes {
                    Some(None) => Ok(()),
                    Some(Some(layer)) => {
                        let diff = format!("sha256:{}", super::sha256::hex(&layer.tar));
                        st.size += layer.tar.len() as u64;
                        st.new_layers
                            .insert(diff.clone(), std::sync::Arc::new(layer.tar));
                        st.whole_paths
                            .insert(diff.clone(), std::sync::Arc::new(layer.whole));
                        st.state.layers.push(diff);
                        st.mirror = None;
                        Ok(())
                    }
                    None => {
                        self.commit(st, &container).await?;
                        self.remove_mount_points(st, &container, &created).await
                    }
                }
            }
        }
    }

    /// What each bind mount of `r` shows (`None` for the other mounts).
    async fn bind_sources(
        &self,
        st: &mut StageRun<'_>,
        r: &Run,
        ti: Option<&TaskInstruction>,
    ) -> Result<Vec<Option<BindSource>>, StageError> {
        let mut binds = Vec::new();
        for (i, m) in r.mounts.iter().enumerate() {
            if m.kind != MountType::Bind {
                binds.push(None);
                continue;
            }
            let src = m.source.clone().unwrap_or_else(|| ".".into());
            let from = from_image(
                ti.and_then(|t| t.mount_from.get(i))
                    .and_then(Option::as_ref),
                m.from.as_deref(),
            );
            binds.push(Some(match from {
                Some(FromImage::Scratch) => BindSource::Dir(BTreeMap::new()),
                Some(FromImage::Reference(reference)) => {
                    let c = self
                        .read_container(st, &reference, "RUN --mount from")
                        .await?;
                    let trees = self.image_sources(&c, &src).await?;
                    super::steps::check_from_contents(ti, &reference, &src, &trees)?;
                    let t = trees.into_iter().next().ok_or_else(|| {
                        StageError::new(format!(
                            "RUN --mount source {src}: not found in {reference}"
                        ))
                    })?;
                    bind_source(&t)?
                }
                None => bind_source(&cp::context_source(&st.inputs.manifest, &src)?)?,
            }));
        }
        Ok(binds)
    }

    /// The paths among `targets` that do not exist in `image`, each with every symlink on
    /// its way resolved (the runtime creates the mount point at that resolved path).
    async fn missing_paths(
        &self,
        st: &StageRun<'_>,
        image: &str,
        targets: &[String],
    ) -> Result<Vec<String>, StageError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        // A container without the RUN's mounts: the archive API mounts a container's
        // mounts while it looks, which would create the very mount points in question.
        let c = self.plain_container(st, image).await?;
        let mut out = Vec::new();
        for t in targets {
            if let Some(p) = self.resolve_missing(&c, t).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// `None` if `path` exists in the container (after symlinks); else the path where it
    /// would be created: its existing prefix with symlinks resolved, then the rest.
    async fn resolve_missing(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<String>, StageError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut cur = "/".to_string();
        for (depth, part) in parts.iter().enumerate() {
            let next = cp::join(&cur, part);
            let mut hops = 0;
            let mut at = next.clone();
            loop {
                match self.daemon.stat(container, &at).await? {
                    None => {
                        let rest = parts[depth + 1..].join("/");
                        return Ok(Some(clean_abs(&format!("{at}/{rest}"))));
                    }
                    // Docker reports a link's target already resolved inside the
                    // container; the loop only guards against a target that is a link.
                    Some(s) if s.is_symlink && hops < 16 => {
                        at = s.link_target;
                        hops += 1;
                    }
                    Some(_) => break,
                }
            }
            cur = at;
        }
        Ok(None)
    }

    /// Removes the empty files the runtime made as mount points for single-file mounts
    /// (`created`, from [`Self::missing_paths`]), which BuildKit never leaves in an image;
    /// directories it made on the way stay, as they do with BuildKit.
    ///
    /// Docker cannot delete a file from a container through its API, and a committed
    /// layer cannot be rewritten without exporting every layer of the image, so one small
    /// layer of whiteouts goes on top of the RUN's layer instead. It also carries each
    /// parent directory with its current mode and owner, since a layer that names a
    /// directory only through a child would get it created with default metadata.
    async fn remove_mount_points(
        &self,
        st: &mut StageRun<'_>,
        container: &str,
        created: &[String],
    ) -> Result<(), StageError> {
        if created.is_empty() {
            return Ok(());
        }
        let mut dirs = BTreeSet::new();
        for p in created {
            let mut d = cp::parent(p);
            while d != "/" {
                dirs.insert(d.to_string());
                d = cp::parent(d);
            }
        }
        let mut tar = tar::Builder::new(Vec::new());
        let fail = |e: std::io::Error| StageError::new(format!("build whiteout layer: {e}"));
        for d in &dirs {
            let (mode, uid, gid) = self.daemon.owner_and_mode(container, d).await?;
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_uid(uid.into());
            h.set_gid(gid.into());
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(
                &mut h,
                format!("{}/", d.trim_start_matches('/')),
                std::io::empty(),
            )
            .map_err(fail)?;
        }
        for p in created {
            diff_layer::append_whiteout(&mut tar, p).map_err(fail)?;
        }
        let layer = tar.into_inner().map_err(fail)?;
        st.size += layer.len() as u64;
        st.state = self.daemon.add_layer(&st.state, layer, st.res).await?;
        Ok(())
    }
}

/// What a bind mount of tree `t` shows. A single file is mounted as itself, never through
/// a link: the daemon would follow a link on its own host.
fn bind_source(t: &SourceTree) -> Result<BindSource, StageError> {
    let owner = |uid, gid| if t.keep_owner { (uid, gid) } else { (0, 0) };
    let root = t.root();
    if !t.is_dir() {
        if !matches!(root.kind, Kind::File(_)) {
            return Err(StageError::new(format!(
                "RUN --mount source {:?} is neither a file nor a directory",
                t.path
            )));
        }
        let (uid, gid) = owner(root.uid, root.gid);
        return Ok(BindSource::File(Node {
            kind: root.kind.clone(),
            mode: root.mode,
            uid,
            gid,
        }));
    }
    Ok(BindSource::Dir(
        t.entries
            .iter()
            .filter(|e| !e.rel.is_empty())
            .map(|e| {
                let kind = match &e.kind {
                    Kind::Hardlink(h) => Kind::Hardlink(format!("/{h}")),
                    k => k.clone(),
                };
                let (uid, gid) = owner(e.uid, e.gid);
                (
                    format!("/{}", e.rel),
                    Node {
                        kind,
                        mode: e.mode,
                        uid,
                        gid,
                    },
                )
            })
            .collect(),
    ))
}
