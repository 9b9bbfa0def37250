//! The filesystem steps of a stage: WORKDIR's mkdir and COPY/ADD (RUN: `run_step.rs`),
//! and the helpers they share with RUN. Each works in a
//! container made from a bare image of the current state and ends with a commit whose
//! layers become the state's layers (the config is written later, by `docker load`).
use std::collections::BTreeMap;

use bollard::models::ContainerCreateBody;
use model::context::IgnoreMatcher;
use model::frontend::instructions::Copy;
use model::frontend::parser::chomp_heredoc_content;
use model::task::{stage_image_tag, StageError, TaskInstruction, TaskSource};

use super::copy::{self as cp, CopyPlanner};
use super::fetch;
use super::layers::{direct_ok, plain_body};
use super::tree::{self, Content, Kind, Node, SourceTree};
use super::users;
use super::{DockerExecutor, StageRun};
use crate::daemon::ImageState;
use crate::daemon::Resources;

/// Where a COPY --from or a bind mount reads.
pub(super) enum FromImage {
    Reference(String),
    Scratch,
}

pub(super) fn from_image(src: Option<&TaskSource>, written: Option<&str>) -> Option<FromImage> {
    match (src, written) {
        (Some(TaskSource::Scratch), _) => Some(FromImage::Scratch),
        (Some(TaskSource::Image { id, .. }), _) => Some(FromImage::Reference(id.clone())),
        (
            Some(TaskSource::Stage {
                image_id: Some(id), ..
            }),
            _,
        ) => Some(FromImage::Reference(id.clone())),
        (Some(TaskSource::Stage { key, .. }), _) => {
            Some(FromImage::Reference(stage_image_tag(key)))
        }
        (None, Some(name)) => Some(FromImage::Reference(name.to_string())),
        (None, None) => None,
    }
}

impl DockerExecutor {
    /// A never-started container of the current state, whose changes a commit takes.
    async fn work_container(&self, st: &mut StageRun<'_>) -> Result<String, StageError> {
        let image = self.state_image(st).await?;
        self.plain_container(st, &image).await
    }

    /// A never-started container of an image on the daemon, to read from (one per image
    /// and stage: nothing writes into it).
    pub(super) async fn read_container(
        &self,
        st: &mut StageRun<'_>,
        reference: &str,
        what: &str,
    ) -> Result<String, StageError> {
        if let Some(c) = st.read_containers.get(reference) {
            return Ok(c.clone());
        }
        let c = self.new_read_container(st.res, reference, what).await?;
        st.read_containers.insert(reference.to_string(), c.clone());
        Ok(c)
    }

    /// A new never-started container of an image on the daemon, to read from.
    pub(super) async fn new_read_container(
        &self,
        res: &Resources,
        reference: &str,
        what: &str,
    ) -> Result<String, StageError> {
        let (id, state) = self.daemon.inspect(reference).await?.ok_or_else(|| {
            StageError::new(format!("{what}: image {reference} is not on this daemon"))
        })?;
        let image = if direct_ok(&state.config) {
            id
        } else {
            self.daemon
                .bare_image(&state, res, &mut Default::default())
                .await?
        };
        self.daemon.create(plain_body(&image), res).await
    }

    pub(super) async fn empty_bare(&self, st: &mut StageRun<'_>) -> Result<String, StageError> {
        if let Some(b) = &st.empty_bare {
            return Ok(b.clone());
        }
        let b = self
            .daemon
            .bare_image(
                &ImageState::empty(&st.task.platform),
                st.res,
                &mut Default::default(),
            )
            .await?;
        st.empty_bare = Some(b.clone());
        Ok(b)
    }

    pub(super) async fn commit(
        &self,
        st: &mut StageRun<'_>,
        container: &str,
    ) -> Result<(), StageError> {
        let (layers, size) = self.daemon.commit_layers(container, st.res).await?;
        st.state.layers = layers;
        st.size = size;
        st.mirror = None;
        Ok(())
    }

    /// The text of a file in a container, `""` if it does not exist.
    async fn read_text(&self, container: &str, path: &str) -> Result<String, StageError> {
        if self.daemon.stat_follow(container, path).await?.is_none() {
            return Ok(String::new());
        }
        let tar = self.daemon.download(container, path).await?;
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut out = String::new();
        if let Some(Ok(mut e)) = ar
            .entries()
            .map_err(|e| StageError::new(e.to_string()))?
            .next()
        {
            use std::io::Read;
            let _ = e.read_to_string(&mut out);
        }
        Ok(out)
    }

    /// `user[:group]` → ids, reading the image's passwd/group only when names are used.
    async fn owner(&self, container: &str, spec: &str) -> Result<(u32, u32), StageError> {
        let (passwd, group) = if users::needs_files(spec) {
            (
                self.read_text(container, "/etc/passwd").await?,
                self.read_text(container, "/etc/group").await?,
            )
        } else {
            Default::default()
        };
        Ok(users::resolve(spec, &passwd, &group)?)
    }

    async fn upload_nodes(
        &self,
        st: &StageRun<'_>,
        container: &str,
        at: &str,
        nodes: BTreeMap<String, Node>,
    ) -> Result<(), StageError> {
        let ctx = st.inputs.context.clone();
        let tar =
            tokio::task::spawn_blocking(move || tree::write_tar(Vec::new(), &nodes, ctx.as_ref()))
                .await
                .map_err(|e| StageError::new(format!("build archive: {e}")))?
                .map_err(|e| StageError::new(format!("build archive: {e}")))?;
        self.daemon.upload(container, at, tar).await
    }

    /// WORKDIR: `mkdir -p` owned by the current USER, as BuildKit does.
    pub(super) async fn step_mkdir(
        &self,
        st: &mut StageRun<'_>,
        wd: &str,
    ) -> Result<(), StageError> {
        let mut mirror = self.take_mirror(st).await?;
        let user = st.state.config.user.clone();
        let owner = if user.is_empty() {
            None
        } else {
            self.sync_user_files(&mut mirror, &user).await?;
            Some(self.owner(&mirror.container, &user).await?)
        };
        let mut planner = CopyPlanner::new(&self.daemon, &mirror.container, owner, None);
        planner.mirror = Some(&mut mirror);
        planner.mkdir_all(wd).await?;
        let keep =
            planner.nodes.is_empty() || self.finish_step(st, planner, Vec::new(), "/").await?;
        if keep {
            st.mirror = Some(mirror);
        }
        Ok(())
    }

    /// The source trees a `--from` source path selects (wildcards resolved).
    pub(super) async fn image_sources(
        &self,
        container: &str,
        src: &str,
    ) -> Result<Vec<SourceTree>, StageError> {
        let abs = super::config::clean_abs(&format!("/{src}"));
        if !cp::has_wildcard(&abs) {
            if self.daemon.stat_follow(container, &abs).await?.is_none() {
                return Err(StageError::new(format!(
                    "failed to compute cache key: \"{abs}\": not found"
                )));
            }
            // COPY follows a source that is a symlink; the archive API would not.
            let real = self.resolve_link(container, &abs).await?;
            let data = self.daemon.download(container, &real).await?;
            let mut t = tree::tar_tree(&data, &real)?;
            t.name = abs.rsplit('/').next().unwrap_or("").to_string();
            t.path = abs.trim_start_matches('/').to_string();
            return Ok(vec![t]);
        }
        let parts: Vec<&str> = abs.split('/').filter(|p| !p.is_empty()).collect();
        let first = parts.iter().position(|p| cp::has_wildcard(p)).unwrap_or(0);
        let base = format!("/{}", parts[..first].join("/"));
        let pattern = parts[first..].join("/");
        if self.daemon.stat_follow(container, &base).await?.is_none() {
            return Ok(Vec::new());
        }
        let data = self.daemon.download(container, &base).await?;
        let all = tree::tar_tree(&data, &base)?;
        let mut out: Vec<SourceTree> = Vec::new();
        for e in &all.entries {
            if e.rel.is_empty()
                || out
                    .iter()
                    .any(|t| e.rel.starts_with(&format!("{}/", t.path)))
                || !model::context::path_match(&pattern, &e.rel).unwrap_or(false)
            {
                continue;
            }
            let prefix = format!("{}/", e.rel);
            let entries = all
                .entries
                .iter()
                .filter(|x| x.rel == e.rel || x.rel.starts_with(&prefix))
                .map(|x| tree::SrcEntry {
                    rel: x.rel.strip_prefix(&prefix).unwrap_or("").to_string(),
                    ..x.clone()
                })
                .collect();
            out.push(SourceTree {
                name: e.rel.rsplit('/').next().unwrap_or("").to_string(),
                path: e.rel.clone(),
                entries,
                keep_owner: true,
            });
        }
        Ok(out)
    }

    pub(super) async fn resolve_link(
        &self,
        container: &str,
        path: &str,
    ) -> Result<String, StageError> {
        let mut p = path.to_string();
        for _ in 0..16 {
            match self.daemon.stat(container, &p).await? {
                Some(s) if s.is_symlink => p = s.link_target,
                _ => return Ok(p),
            }
        }
        Err(StageError::new(format!(
            "too many levels of symbolic links: {path}"
        )))
    }

    /// COPY and ADD.
    pub(super) async fn step_copy(
        &self,
        st: &mut StageRun<'_>,
        c: &Copy,
        add: bool,
        ti: Option<&TaskInstruction>,
    ) -> Result<(), StageError> {
        let kw = if add { "ADD" } else { "COPY" };
        if c.checksum.is_some() || c.keep_git_dir {
            return Err(StageError::new(format!(
                "{kw} --checksum and --keep-git-dir are not supported by this executor yet"
            )));
        }
        let (dest, dest_dir) = cp::destination(&c.dest, &st.state.config.working_dir);
        if c.sources.len() > 1 && !dest_dir {
            return Err(StageError::new(format!(
                "When using {kw} with more than one source file, the destination must be a directory and end with a /"
            )));
        }
        let mut mirror = self.take_mirror(st).await?;
        let owner = match &c.chown {
            Some(spec) if !spec.is_empty() => {
                self.sync_user_files(&mut mirror, spec).await?;
                Some(self.owner(&mirror.container, spec).await?)
            }
            _ => None,
        };
        let chmod = c.chmod.as_deref().map(cp::parse_chmod).transpose()?;
        let excludes = if c.excludes.is_empty() {
            None
        } else {
            Some(IgnoreMatcher::new(&c.excludes).map_err(|e| StageError::new(e.to_string()))?)
        };
        let from = from_image(ti.and_then(|t| t.copy_from.as_ref()), c.from.as_deref());
        // The image's id, when its sources may have been read already (TreeCache); a
        // container to read from is made only when one is not.
        let from_id = match &from {
            // A stage is named by its full id already: no daemon call, so a consumer of
            // a stage whose image is still being written reads the cached trees at once.
            Some(FromImage::Reference(r)) if is_image_id(r) => Some(r.clone()),
            Some(FromImage::Reference(r)) => self.daemon.inspect(r).await?.map(|(id, _)| id),
            _ => None,
        };
        let mut from_container: Option<String> = None;
        let mut trees: Vec<SourceTree> = Vec::new();
        // For `--parents`: the context directory each tree's kept path starts below
        // (BuildKit's pivot, `/./` in the source; "" is the context root).
        let mut pivots: Vec<String> = Vec::new();
        let mut archives: Vec<Vec<u8>> = Vec::new();
        for src in &c.sources {
            if let Some(h) = heredoc_source(src, c) {
                let data = if h.chomp {
                    chomp_heredoc_content(&h.content)
                } else {
                    h.content.clone()
                };
                pivots.push(String::new());
                trees.push(tree::bytes_tree(&h.name, data.into_bytes(), 0o644));
                continue;
            }
            if src.starts_with("http://") || src.starts_with("https://") {
                if !add {
                    return Err(StageError::new("source can't be a URL for COPY"));
                }
                let url = src.clone();
                let data = tokio::task::spawn_blocking(move || fetch::http_get(&url))
                    .await
                    .map_err(|e| StageError::new(e.to_string()))??;
                pivots.push(String::new());
                trees.push(tree::bytes_tree(&fetch::url_file_name(src), data, 0o600));
                continue;
            }
            if src.starts_with("git@") || src.ends_with(".git") && src.contains("://") {
                return Err(StageError::new(format!(
                    "{kw} of a git repository is not supported by this executor yet"
                )));
            }
            match &from {
                Some(FromImage::Scratch) => {
                    return Err(StageError::new(format!(
                    "failed to compute cache key: \"{src}\": not found (--from=scratch is empty)"
                )))
                }
                Some(FromImage::Reference(r)) => {
                    let abs = super::config::clean_abs(&format!("/{src}"));
                    let mut cached = from_id
                        .as_ref()
                        .and_then(|id| self.trees.lock().get(id, &abs));
                    // A parked stage (see `park.rs`) is read from its archive if it can be.
                    if let (None, Some(id), false) = (&cached, &from_id, cp::has_wildcard(src)) {
                        if let Some(t) = self.parked_tree(id, &abs).await {
                            tracing::debug!(path = %abs, "read from a parked image");
                            self.trees.lock().put(id, &abs, vec![t]);
                            cached = self.trees.lock().get(id, &abs);
                        }
                    }
                    let found = match cached {
                        Some(t) => t.as_ref().clone(),
                        None => {
                            let fc = match &from_container {
                                Some(c) => c.clone(),
                                None => {
                                    let c =
                                        self.read_container(st, r, &format!("{kw} --from")).await?;
                                    from_container = Some(c.clone());
                                    c
                                }
                            };
                            let index = ti.and_then(|t| {
                                st.task.instructions.iter().position(|x| std::ptr::eq(x, t))
                            });
                            self.copy_from_sources(st, r, &fc, src, index).await?
                        }
                    };
                    check_from_contents(ti, r, src, &found)?;
                    if found.is_empty() {
                        return Err(StageError::new(format!(
                            "failed to compute cache key: \"{src}\": not found"
                        )));
                    }
                    pivots.extend(found.iter().map(|_| String::new()));
                    trees.extend(found);
                }
                None => {
                    let manifest = &st.inputs.manifest;
                    let (pivot, below) = if c.parents {
                        cp::split_pivot(src)?
                    } else {
                        (String::new(), src.clone())
                    };
                    let path = format!("{pivot}/{below}");
                    let matches = cp::context_matches(manifest, &path);
                    if matches.is_empty() {
                        return Err(StageError::new(format!(
                            "failed to compute cache key: \"/{}\": not found",
                            model::keys::clean_source(&path)
                        )));
                    }
                    for m in matches {
                        let t = cp::context_source(manifest, &m)?;
                        if add && c.unpack != Some(false) {
                            if let Some(data) = self.archive_bytes(st, &t).await? {
                                archives.push(data);
                                continue;
                            }
                        }
                        pivots.push(pivot.clone());
                        trees.push(t);
                    }
                }
            }
        }
        let mut planner = CopyPlanner::new(&self.daemon, &mirror.container, owner, chmod);
        planner.mirror = Some(&mut mirror);
        for (t, pivot) in trees.iter().zip(&pivots) {
            if c.parents && from.is_none() {
                let kept = cp::below_pivot(&t.path, pivot);
                // A directory source keeps its own name too: its contents go inside it.
                let d = if t.is_dir() {
                    cp::join(&dest, kept)
                } else {
                    cp::parents_dest(&dest, kept)
                };
                for (dir, mode) in cp::parent_dirs(&st.inputs.manifest, pivot, kept, t.is_dir()) {
                    let at = cp::join(&dest, &dir);
                    planner.mkdir_all(cp::parent(&at)).await?;
                    let (uid, gid) = owner.unwrap_or((0, 0));
                    planner.nodes.entry(at).or_insert(Node {
                        kind: Kind::Dir,
                        mode: chmod.unwrap_or(mode),
                        uid,
                        gid,
                    });
                }
                planner.add_tree(t, &d, true, excludes.as_ref()).await?;
            } else {
                planner
                    .add_tree(t, &dest, dest_dir, excludes.as_ref())
                    .await?;
            }
        }
        if !archives.is_empty() {
            planner.mkdir_all(&dest).await?;
        }
        if self.finish_step(st, planner, archives, &dest).await? {
            st.mirror = Some(mirror);
        }
        Ok(())
    }

    /// Ends a COPY/ADD/WORKDIR planned against the mirror: a layer written by hand when it
    /// can be (see `layers.rs`), else the nodes (and archives, extracted at `dest`)
    /// uploaded into a fresh container of the current state, and a commit. Returns
    /// whether the mirror still follows the state.
    async fn finish_step(
        &self,
        st: &mut StageRun<'_>,
        mut planner: CopyPlanner<'_>,
        archives: Vec<Vec<u8>>,
        dest: &str,
    ) -> Result<bool, StageError> {
        let nodes = if archives.is_empty() {
            match self.try_write_layer(st, planner).await? {
                None => return Ok(true),
                Some(nodes) => nodes,
            }
        } else {
            std::mem::take(&mut planner.nodes)
        };
        // The state's new layers reach the daemon with the work container's bare image.
        let work = self.work_container(st).await?;
        if !nodes.is_empty() {
            self.upload_nodes(st, &work, "/", nodes).await?;
        }
        for a in archives {
            self.daemon.upload(&work, dest, a).await?;
        }
        self.commit(st, &work).await?;
        Ok(false)
    }

    /// Makes the mirror's `/etc/passwd` and `/etc/group` current, if `spec` names users.
    async fn sync_user_files(
        &self,
        mirror: &mut super::layers::Mirror,
        spec: &str,
    ) -> Result<(), StageError> {
        if users::needs_files(spec) {
            mirror.sync_for(&self.daemon, "/etc/passwd").await?;
            mirror.sync_for(&self.daemon, "/etc/group").await?;
        }
        Ok(())
    }

    /// For ADD: the bytes of a context file that is a tar archive (plain or compressed
    /// in a way the daemon can decompress), checked by extracting it once into a
    /// throwaway container; `None` for anything else.
    async fn archive_bytes(
        &self,
        st: &mut StageRun<'_>,
        t: &SourceTree,
    ) -> Result<Option<Vec<u8>>, StageError> {
        let Kind::File(Content::Context(path, _)) = &t.root().kind else {
            return Ok(None);
        };
        let ctx = st.inputs.context.clone();
        let p = path.clone();
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut ctx.open(&p)?, &mut v)?;
            Ok(v)
        })
        .await
        .map_err(|e| StageError::new(e.to_string()))?
        .map_err(|e| StageError::new(format!("read context file {path}: {e}")))?;
        let Some(kind) = cp::archive_kind(&data) else {
            return Ok(None);
        };
        if kind != "tar" {
            let bare = self.empty_bare(st).await?;
            let probe = self
                .daemon
                .create(
                    ContainerCreateBody {
                        image: Some(bare),
                        ..Default::default()
                    },
                    st.res,
                )
                .await?;
            if self.daemon.upload(&probe, "/", data.clone()).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(data))
    }
}

/// The heredoc a COPY source names (`<<EOF`, `<<-EOF`, `<<"EOF"`), if any.
fn heredoc_source<'c>(
    src: &str,
    c: &'c Copy,
) -> Option<&'c model::frontend::instructions::HeredocBody> {
    let rest = src.strip_prefix("<<")?;
    let name = rest
        .trim_start_matches('-')
        .trim_matches(|ch| ch == '"' || ch == '\'');
    c.heredocs.iter().find(|h| h.name == name)
}

/// A `--from` read the step's key covers by content must read exactly that content: the
/// stage image may have been replaced since (a concurrent `--no-cache` rebuild of a stage
/// that is not reproducible), and its files must not be stored under this key.
pub(super) fn check_from_contents(
    ti: Option<&TaskInstruction>,
    reference: &str,
    src: &str,
    trees: &[SourceTree],
) -> Result<(), StageError> {
    let Some(expected) = ti.and_then(|t| {
        let p = model::keys::content_path(src)?;
        t.from_contents.get(&p)
    }) else {
        return Ok(());
    };
    let actual = super::tree::trees_digest(trees);
    if &actual == expected {
        return Ok(());
    }
    Err(StageError::new(format!(
        "{src} in {reference} is not what this build keyed it on (content {} expected, {} found): the stage image changed while the build ran, e.g. a concurrent --no-cache rebuild; run the build again",
        &expected[..12.min(expected.len())],
        &actual[..12]
    )))
}

/// Whether `r` is a full image id (`sha256:` and 64 hex digits), which names one image.
fn is_image_id(r: &str) -> bool {
    r.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
