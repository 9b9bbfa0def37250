//! Containers: the containers, volumes and images a stage makes ([`Resources`], removed
//! whatever happens), file operations inside a container (stat, archive read and
//! write, commit), and a RUN container's life (start, logs, wait, kill, its change list,
//! its storage driver's directories).
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, DriverData, FilesystemChange};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, ContainerArchiveInfoOptionsBuilder,
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    KillContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use model::task::StageError;
use parking_lot::Mutex;

use super::{derr, is_not_found, timed, Daemon, DaemonError, LoadDone};

/// A file's stat inside a container (`HEAD /containers/{id}/archive`).
#[derive(Debug, Clone)]
pub struct PathStat {
    pub is_dir: bool,
    pub is_symlink: bool,
    /// For a symlink: the target fully resolved inside the container, absolute.
    pub link_target: String,
}

/// Go's `os.ModeDir` and `os.ModeSymlink` bits as Docker sends them.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// Containers, volumes and images made for one stage; `cleanup` removes them all.
#[derive(Default)]
pub struct Resources {
    containers: Mutex<Vec<String>>,
    volumes: Mutex<Vec<String>>,
    images: Mutex<Vec<String>>,
    /// Host directories a container bind-mounts (kept until it is removed: the archive
    /// API mounts them again on every read of the container).
    dirs: Mutex<Vec<tempfile::TempDir>>,
    /// The stage's background image write, if one was started.
    load: Mutex<Option<LoadDone>>,
}

impl Resources {
    pub fn container(&self, id: &str) {
        self.containers.lock().push(id.to_string());
    }
    pub fn volume(&self, name: &str) {
        self.volumes.lock().push(name.to_string());
    }
    pub fn image(&self, reference: &str) {
        self.images.lock().push(reference.to_string());
    }
    /// Keeps `dir` until the containers are removed.
    pub fn keep_dir(&self, dir: tempfile::TempDir) {
        self.dirs.lock().push(dir);
    }
    /// Notes the stage's background image write.
    pub fn set_load(&self, load: LoadDone) {
        *self.load.lock() = Some(load);
    }
    pub fn take_load(&self) -> Option<LoadDone> {
        self.load.lock().take()
    }

    /// Hands the registered images over (to be removed after a background load that
    /// may refer to their layers).
    pub fn take_images(&self) -> Vec<String> {
        std::mem::take(&mut *self.images.lock())
    }

    /// Removes everything registered, containers first (they pin volumes and images),
    /// newest image first (a committed image is the child of the bare one it came from).
    pub async fn cleanup(&self, daemon: &Daemon) {
        let docker = &daemon.docker;
        let containers = std::mem::take(&mut *self.containers.lock());
        for c in containers.iter().rev() {
            let opts = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            if let Err(e) = timed("rm_container", docker.remove_container(c, Some(opts))).await {
                if !is_not_found(&e) {
                    tracing::warn!(container = %c, error = %e, "could not remove container");
                }
            }
        }
        self.dirs.lock().clear();
        let volumes = std::mem::take(&mut *self.volumes.lock());
        for v in volumes.iter().rev() {
            let opts = RemoveVolumeOptionsBuilder::default().force(true).build();
            if let Err(e) = timed("rm_volume", docker.remove_volume(v, Some(opts))).await {
                if !is_not_found(&e) {
                    tracing::warn!(volume = %v, error = %e, "could not remove volume");
                }
            }
        }
        let images = std::mem::take(&mut *self.images.lock());
        for i in images.iter().rev() {
            // Never prune: a committed image's parent can be the state's own image (a RUN
            // or COPY container made from it directly), which is not ours to remove. Every
            // image made here is registered and removed explicitly.
            let opts = RemoveImageOptionsBuilder::default().noprune(true).build();
            if let Err(e) = timed("rm_image", docker.remove_image(i, Some(opts), None)).await {
                if !is_not_found(&e) {
                    tracing::debug!(image = %i, error = %e, "could not remove image");
                }
            }
        }
    }
}

impl Daemon {
    /// Mode bits, uid and gid of `path` in a container (what `stat` cannot tell), from the
    /// first header of its archive; the rest of the archive is never read.
    pub async fn owner_and_mode(
        &self,
        container: &str,
        path: &str,
    ) -> Result<(u32, u32, u32), StageError> {
        // A header, plus room for a PAX header before it.
        let buf = self
            .download_while(container, path, |buf| buf.len() < 4096)
            .await?;
        let mut ar = tar::Archive::new(buf.as_slice());
        let first = ar
            .entries()
            .ok()
            .and_then(|mut e| e.next())
            .and_then(Result::ok)
            .ok_or_else(|| StageError::new(format!("read {path} from container: no entry")))?;
        let h = first.header();
        let num = |v: std::io::Result<u64>| v.map(|n| n as u32).unwrap_or(0);
        Ok((
            h.mode().unwrap_or(0o755) & 0o7777,
            num(h.uid()),
            num(h.gid()),
        ))
    }

    /// Creates (never starts) a container named by this executor, noted in `res`.
    pub async fn create(
        &self,
        mut body: ContainerCreateBody,
        res: &Resources,
    ) -> Result<String, StageError> {
        if let Some(image) = &body.image {
            self.settle(image).await?;
        }
        if body.cmd.is_none() && body.entrypoint.is_none() {
            // The daemon refuses a container without a command, even one never started.
            body.cmd = Some(vec!["/dbuild-never-started".into()]);
        }
        let name = self.unique("c");
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let r = timed(
            "create_container",
            self.docker.create_container(Some(opts), body),
        )
        .await
        .map_err(|e| derr("create container", e))?;
        res.container(&r.id);
        Ok(r.id)
    }

    /// Stats `path` in a container without following a final symlink.
    pub async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>, StageError> {
        let opts = ContainerArchiveInfoOptionsBuilder::default()
            .path(path)
            .build();
        match timed(
            "stat",
            self.docker
                .get_container_archive_info(container, Some(opts)),
        )
        .await
        {
            Ok(s) => Ok(Some(PathStat {
                is_dir: s.file_mode & GO_MODE_DIR != 0,
                is_symlink: s.file_mode & GO_MODE_SYMLINK != 0,
                link_target: s.link_target,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            // HEAD answers carry no body: a missing path can come back as another error
            // whose message the daemon could not send.
            Err(bollard::errors::Error::HttpHeaderNotFoundError(_)) => Ok(None),
            Err(e) => Err(derr(format!("stat {path}"), e)),
        }
    }

    /// Stats `path`, following symlinks (`os.Stat` semantics), up to 16 links deep.
    pub async fn stat_follow(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<PathStat>, StageError> {
        let mut p = path.to_string();
        for _ in 0..16 {
            match self.stat(container, &p).await? {
                Some(s) if s.is_symlink => p = s.link_target.clone(),
                other => return Ok(other),
            }
        }
        Err(StageError::new(format!(
            "too many levels of symbolic links: {path}"
        )))
    }

    /// The tar archive of `path` in a container (Docker names the root entry by its base
    /// name).
    pub async fn download(&self, container: &str, path: &str) -> Result<Vec<u8>, StageError> {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(container, Some(opts));
        timed("download", async {
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| derr(format!("read {path} from container"), e))?;
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        })
        .await
    }

    /// Extracts a tar archive (plain or compressed) at `path` in a container.
    pub async fn upload(
        &self,
        container: &str,
        path: &str,
        tar: Vec<u8>,
    ) -> Result<(), StageError> {
        let opts = UploadToContainerOptionsBuilder::default()
            .path(path)
            .build();
        timed(
            "upload",
            self.docker
                .upload_to_container(container, Some(opts), bollard::body_full(tar.into())),
        )
        .await
        .map_err(|e| derr(format!("write files into container at {path}"), e))
    }

    /// Commits a container's changes as a new (temporary, noted in `res`) image and
    /// returns its layer chain and size.
    pub async fn commit_layers(
        &self,
        container: &str,
        res: &Resources,
    ) -> Result<(Vec<String>, u64), StageError> {
        let opts = CommitContainerOptionsBuilder::default()
            .container(container)
            .pause(false)
            .build();
        let r = timed(
            "commit",
            self.docker
                .commit_container(opts, bollard::models::ContainerConfig::default()),
        )
        .await
        .map_err(|e| derr("commit container", e))?;
        let id = r.id;
        res.image(&id);
        match self.inspect_sized(&id).await? {
            Some((_, s, size)) => Ok((s.layers, size)),
            None => Err(StageError::new(format!("committed image {id} vanished"))),
        }
    }
}

/// Container calls of the farm agent: a container to read a stage's files from.
impl Daemon {
    /// Creates (never starts) the container `name` of `image`; the caller removes it
    /// ([`Self::remove_container`]).
    pub async fn create_named(&self, name: &str, image: &str) -> Result<(), DaemonError> {
        let opts = CreateContainerOptionsBuilder::default().name(name).build();
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec!["/".into()]),
            ..Default::default()
        };
        timed(
            "create_container",
            self.docker.create_container(Some(opts), body),
        )
        .await
        .map(drop)
        .map_err(DaemonError::docker("create container of", image))
    }

    /// Removes a container, running or not (its anonymous volumes are kept).
    pub async fn remove_container(&self, name: &str) -> Result<(), DaemonError> {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        timed(
            "rm_container",
            self.docker.remove_container(name, Some(opts)),
        )
        .await
        .map_err(DaemonError::docker("remove container", name))
    }

    /// The tar archive of `path` in a container, as a stream of chunks (never held whole).
    pub fn download_stream(
        &self,
        container: &str,
        path: &str,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, DaemonError>> + Unpin + '_ {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let path = path.to_string();
        self.docker
            .download_from_container(container, Some(opts))
            .map(move |c| c.map_err(DaemonError::docker("read from container", path.clone())))
    }
}

/// A RUN container's life: start, output, exit, kill; and what it changed.
impl Daemon {
    /// Starts a RUN container made by [`Self::create`].
    pub async fn start(&self, container: &str) -> Result<(), StageError> {
        timed("start", self.docker.start_container(container, None))
            .await
            .map_err(|e| derr("start RUN container", e))
    }

    /// Follows a started container's stdout and stderr until it exits (or the stream
    /// fails), handing each chunk to `each` as it comes.
    pub async fn follow_logs(&self, container: &str, mut each: impl FnMut(LogOutput)) {
        let opts = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut stream = self.docker.logs(container, Some(opts));
        timed("logs", async {
            while let Some(Ok(out)) = stream.next().await {
                each(out);
            }
        })
        .await
    }

    /// Waits for a RUN container to exit; returns its exit code.
    ///
    /// Cancel safe: dropping the future only stops waiting (the container runs on).
    pub async fn wait(&self, container: &str) -> Result<i64, StageError> {
        let mut wait = self.docker.wait_container(container, None);
        timed("wait", async {
            match wait.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                // A non-zero exit comes as this error.
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(derr("wait for RUN container", e)),
                None => Err(StageError::new("wait for RUN container: no answer")),
            }
        })
        .await
    }

    /// Kills a container with `SIGKILL` (removing it is left to [`Resources::cleanup`]).
    pub async fn kill(&self, container: &str) -> Result<(), DaemonError> {
        let opts = KillContainerOptionsBuilder::default()
            .signal("SIGKILL")
            .build();
        timed("kill", self.docker.kill_container(container, Some(opts)))
            .await
            .map_err(DaemonError::docker("kill container", container))
    }

    /// The container's change list against its image (`GET /containers/{id}/changes`,
    /// the diff a commit makes); empty when the daemon sends none.
    pub async fn changes(&self, container: &str) -> Result<Vec<FilesystemChange>, StageError> {
        timed("changes", self.docker.container_changes(container))
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| derr("list the container's changes", e))
    }

    /// The storage driver's data of a container (its name, and for an overlay its
    /// `UpperDir` and `LowerDir`), `None` when the daemon cannot tell.
    pub async fn graph_driver(&self, container: &str) -> Option<DriverData> {
        timed(
            "inspect_container",
            self.docker.inspect_container(container, None),
        )
        .await
        .ok()?
        .graph_driver
    }

    /// The first part of the tar archive of `path` in a container: chunks are read while
    /// `more` says the bytes so far call for more (or until the archive ends); the rest
    /// is never read.
    pub async fn download_while(
        &self,
        container: &str,
        path: &str,
        mut more: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<u8>, StageError> {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(container, Some(opts));
        timed("download_part", async {
            let mut buf = Vec::new();
            while more(&buf) {
                match stream.next().await {
                    Some(chunk) => buf.extend_from_slice(
                        &chunk.map_err(|e| derr(format!("read {path} from container"), e))?,
                    ),
                    None => break,
                }
            }
            Ok(buf)
        })
        .await
    }
}
