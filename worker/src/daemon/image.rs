//! Images as the executor sees them (layers and config), and the image calls: inspect,
//! `docker load` of exact configs, tags, saves, streamed loads and imports, pulls, removal.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bollard::query_parameters::{ImportImageOptionsBuilder, RemoveImageOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;
use model::task::StageError;
use serde_json::json;

use super::{derr, is_not_found, timed, Daemon, DaemonError, Resources};
use crate::executor::ImageConfig;

/// An image as the executor sees it: its layer chain and its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageState {
    /// Uncompressed layer digests (`RootFS.Layers`), bottom first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub author: Option<String>,
}

impl ImageState {
    /// An empty image (no layers) for `os/arch[/variant]`, with an empty config.
    pub fn empty(platform: &str) -> Self {
        let mut parts = platform.split('/');
        ImageState {
            layers: Vec::new(),
            config: ImageConfig::default(),
            os: parts.next().unwrap_or("linux").to_string(),
            architecture: parts.next().unwrap_or("amd64").to_string(),
            variant: parts.next().map(str::to_string),
            author: None,
        }
    }

    /// The image config JSON `docker load` stores (the image id is its sha256).
    pub(crate) fn to_json(&self, comment: Option<&str>) -> Vec<u8> {
        let mut v = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": self.config,
            "rootfs": { "type": "layers", "diff_ids": self.layers },
        });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        if let Some(a) = &self.author {
            v["author"] = json!(a);
        }
        if let Some(c) = comment {
            v["comment"] = json!(c);
        }
        serde_json::to_vec(&v).expect("config serializes")
    }
}

/// Layers written by the executor that the daemon does not have yet: diff id → tar.
pub type NewLayers = HashMap<String, Arc<Vec<u8>>>;

impl Daemon {
    /// `(id, state)` of an image, or `None` if the daemon has no such image.
    pub async fn inspect(
        &self,
        reference: &str,
    ) -> Result<Option<(String, ImageState)>, StageError> {
        Ok(self
            .inspect_sized(reference)
            .await?
            .map(|(id, s, _)| (id, s)))
    }

    /// [`Self::inspect`] with the image's `Size` (bytes, all layers).
    pub async fn inspect_sized(
        &self,
        reference: &str,
    ) -> Result<Option<(String, ImageState, u64)>, StageError> {
        self.settle(reference).await?;
        match timed("inspect_image", self.docker.inspect_image(reference)).await {
            Ok(i) => {
                let size = i.size.unwrap_or(0).max(0) as u64;
                let state = ImageState {
                    layers: i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                    config: ImageConfig::from_inspect(i.config),
                    os: i.os.unwrap_or_else(|| "linux".into()),
                    architecture: i.architecture.unwrap_or_else(|| "amd64".into()),
                    variant: i.variant.filter(|v| !v.is_empty()),
                    author: i.author.filter(|a| !a.is_empty()),
                };
                Ok(Some((i.id.unwrap_or_default(), state, size)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(derr(format!("inspect image {reference}"), e)),
        }
    }

    /// Writes images with `docker load`: each `(state, tags)` becomes one image tagged
    /// with every tag. Each layer must exist on the daemon or be in `new_layers` (diff id →
    /// layer tar): those are sent with the images, and removed from `new_layers` once the
    /// daemon has them.
    pub(super) fn archive(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        new_layers: &NewLayers,
    ) -> Result<LoadArchive, StageError> {
        let fail = |e: std::io::Error| StageError::new(format!("build image archive: {e}"));
        let mut tar = tar::Builder::new(Vec::new());
        let mut manifest = Vec::new();
        // Chains already sent in this archive (the daemon then finds them by chain id).
        let mut sent: HashSet<&[String]> = HashSet::new();
        let mut used = Vec::new();
        let mut files = HashMap::new();
        for (i, (state, tags, comment)) in images.iter().enumerate() {
            let name = format!("config-{i}.json");
            let config = state.to_json(*comment);
            append_bytes(&mut tar, &name, &config).map_err(fail)?;
            let mut layers = Vec::new();
            for (l, diff) in state.layers.iter().enumerate() {
                let file = format!("layer-{i}-{l}/layer.tar");
                if let Some(data) = new_layers.get(diff) {
                    if sent.insert(&state.layers[..=l]) {
                        append_bytes(&mut tar, &file, data).map_err(fail)?;
                        files.entry(diff.clone()).or_insert_with(|| file.clone());
                        used.push(diff.clone());
                    }
                }
                layers.push(file);
            }
            manifest.push(json!({ "Config": name, "RepoTags": tags, "Layers": layers }));
        }
        let manifest = serde_json::to_vec(&manifest).expect("manifest serializes");
        append_bytes(&mut tar, "manifest.json", &manifest)
            .map_err(|e| StageError::new(format!("build image archive: {e}")))?;
        let bytes = tar
            .into_inner()
            .map_err(|e| StageError::new(format!("build image archive: {e}")))?;
        Ok(LoadArchive { bytes, used, files })
    }

    /// Writes images with `docker load`: each `(state, tags)` becomes one image tagged
    /// with every tag. Each layer must exist on the daemon or be in `new_layers` (diff id →
    /// layer tar): those are sent with the images, and removed from `new_layers` once the
    /// daemon has them.
    pub async fn load(
        &self,
        images: &[(&ImageState, Vec<String>, Option<&str>)],
        new_layers: &mut NewLayers,
    ) -> Result<(), StageError> {
        let a = self.archive(images, new_layers)?;
        send_load(&self.docker, a.bytes).await?;
        for d in a.used {
            new_layers.remove(&d);
        }
        let tags: Vec<String> = images.iter().flat_map(|(_, t, _)| t.clone()).collect();
        self.unpark_names(&tags);
        Ok(())
    }

    /// Puts one more layer (an uncompressed layer tar: files, directories, `.wh.`
    /// whiteouts) on top of `state`: loads a bare image whose last layer is `layer` under a
    /// fresh tag (noted in `res`, so the layer lives until the stage's images use it) and
    /// returns `state` with that layer's diff id appended.
    pub async fn add_layer(
        &self,
        state: &ImageState,
        layer: Vec<u8>,
        res: &Resources,
    ) -> Result<ImageState, StageError> {
        let mut next = ImageState {
            config: ImageConfig::default(),
            author: None,
            ..state.clone()
        };
        next.layers
            .push(format!("sha256:{}", crate::executor::sha256::hex(&layer)));
        let tag = format!("dbuild-bare:{}", self.unique("l").replace('/', "-"));
        res.image(&tag);
        let mut tar = tar::Builder::new(Vec::new());
        let fail = |e: std::io::Error| StageError::new(format!("build layer archive: {e}"));
        append_bytes(&mut tar, "config.json", &next.to_json(Some(&tag))).map_err(fail)?;
        // Layers the daemon already has are found by chain id; only the new one is sent.
        let layers: Vec<String> = (0..next.layers.len())
            .map(|l| format!("layer-{l}/layer.tar"))
            .collect();
        append_bytes(&mut tar, layers.last().expect("one layer at least"), &layer).map_err(fail)?;
        let manifest = json!([{ "Config": "config.json", "RepoTags": [tag], "Layers": layers }]);
        append_bytes(&mut tar, "manifest.json", manifest.to_string().as_bytes()).map_err(fail)?;
        send_load(&self.docker, tar.into_inner().map_err(fail)?).await?;
        Ok(ImageState {
            layers: next.layers,
            ..state.clone()
        })
    }

    /// Loads an image with `state`'s layers and an empty config under a fresh tag (noted
    /// in `res`), so containers made from it see exactly the config they are given.
    pub async fn bare_image(
        &self,
        state: &ImageState,
        res: &Resources,
        new_layers: &mut NewLayers,
    ) -> Result<String, StageError> {
        let bare = ImageState {
            config: ImageConfig::default(),
            author: None,
            ..state.clone()
        };
        let tag = format!("dbuild-bare:{}", self.unique("b").replace('/', "-"));
        let comment = tag.clone();
        res.image(&tag);
        self.load(
            &[(&bare, vec![tag.clone()], Some(comment.as_str()))],
            new_layers,
        )
        .await?;
        Ok(tag)
    }

    /// Tags an existing image.
    pub async fn tag(&self, image: &str, tag: &str) -> Result<(), StageError> {
        self.settle(image).await?;
        let (repo, t) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(t)
            .build();
        timed("tag", self.docker.tag_image(image, Some(opts)))
            .await
            .map_err(|e| derr(format!("tag {image} as {tag}"), e))?;
        self.unpark_names(&[tag.to_string()]);
        Ok(())
    }
}

/// The id a loaded image gets: the digest of its config.
pub(super) fn config_id(config: &[u8]) -> String {
    format!("sha256:{}", crate::executor::sha256::hex(config))
}

/// A `docker load` archive and the new layers it sends.
pub(super) struct LoadArchive {
    pub(super) bytes: Vec<u8>,
    pub(super) used: Vec<String>,
    /// The file each sent layer is in, by diff id.
    pub(super) files: HashMap<String, String>,
}

/// Sends a `docker load` archive and waits for the daemon to take it.
pub(super) async fn send_load(docker: &Docker, bytes: Vec<u8>) -> Result<(), StageError> {
    let opts = ImportImageOptionsBuilder::default().quiet(true).build();
    let mut stream = docker.import_image(opts, bollard::body_full(bytes.into()), None);
    timed("load", async {
        while let Some(item) = stream.next().await {
            item.map_err(|e| derr("docker load", e))?;
        }
        Ok::<(), StageError>(())
    })
    .await
}

/// Appends a regular file (0644, root) to a tar archive.
pub fn append_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    tar.append_data(&mut h, name, data)
}

/// Where a daemon error's target goes in its message (nothing when there is none).
pub(super) fn at(target: &str) -> String {
    if target.is_empty() {
        String::new()
    } else {
        format!(" {target}")
    }
}

/// A file as a stream of 1 MiB chunks, for a request body that is never held in memory.
fn file_chunks(
    file: std::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let file = tokio::fs::File::from_std(file);
    futures::stream::unfold(Some(file), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Image calls of the farm agent and the CLI: whole archives in and out, streamed
/// through files (an image may be larger than memory).
impl Daemon {
    /// `docker load` of an archive file, streamed in 1 MiB chunks.
    pub async fn load_file(&self, archive: std::fs::File) -> Result<(), DaemonError> {
        let opts = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut s =
            self.docker
                .import_image(opts, bollard::body_try_stream(file_chunks(archive)), None);
        timed("load_file", async {
            while let Some(r) = s.next().await {
                r.map_err(DaemonError::docker("docker load", ""))?;
            }
            Ok(())
        })
        .await
    }

    /// `docker save` of `image` into the file at `path` (created or truncated).
    pub async fn save_to_file(
        &self,
        image: &str,
        path: &std::path::Path,
    ) -> Result<(), DaemonError> {
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::File::create(path)
            .await
            .map_err(DaemonError::io(path))?;
        let mut stream = self.docker.export_image(image);
        timed("save", async {
            while let Some(chunk) = stream.next().await {
                let c = chunk.map_err(DaemonError::docker("save image", image))?;
                f.write_all(&c).await.map_err(DaemonError::io(path))?;
            }
            f.flush().await.map_err(DaemonError::io(path))
        })
        .await
    }

    /// `docker import` of a root filesystem tar file as the image `reference`
    /// (`repo:tag`), streamed.
    pub async fn import_rootfs(
        &self,
        reference: &str,
        rootfs: std::fs::File,
    ) -> Result<(), DaemonError> {
        let (repo, tag) = reference.split_once(':').unwrap_or((reference, "latest"));
        let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .build();
        let mut s = self.docker.create_image(
            Some(opts),
            Some(bollard::body_try_stream(file_chunks(rootfs))),
            None,
        );
        timed("import", async {
            while let Some(r) = s.next().await {
                r.map_err(DaemonError::docker("import", reference))?;
            }
            Ok(())
        })
        .await
    }

    /// Pulls `reference` from its registry; the registry's error as the daemon gave it.
    pub async fn pull(&self, reference: &str) -> Result<(), bollard::errors::Error> {
        let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
            .from_image(reference)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        timed("pull", async {
            while let Some(item) = stream.next().await {
                item?;
            }
            Ok(())
        })
        .await
    }

    /// Tags `image` as `repo:tag`, as it is (nothing waited for; see [`Self::tag`]).
    pub async fn tag_as(&self, image: &str, repo: &str, tag: &str) -> Result<(), DaemonError> {
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        timed("tag", self.docker.tag_image(image, Some(opts)))
            .await
            .map_err(DaemonError::docker(
                "tag",
                format!("{image} as {repo}:{tag}"),
            ))
    }

    /// Removes the image `reference` (a tag removes only the tag while others name the
    /// image); without force, so an image a container uses stays. `prune`: its untagged
    /// parents go too.
    pub async fn remove_image(&self, reference: &str, prune: bool) -> Result<(), DaemonError> {
        let opts = RemoveImageOptionsBuilder::default().noprune(!prune).build();
        timed(
            "rm_image",
            self.docker.remove_image(reference, Some(opts), None),
        )
        .await
        .map(drop)
        .map_err(DaemonError::docker("remove image", reference))
    }

    /// Every tag of the images whose reference matches `filter` (`dbuild-stage`, ...).
    pub async fn list_tags(&self, filter: &str) -> Result<Vec<String>, DaemonError> {
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .filters(&HashMap::from([("reference", vec![filter])]))
            .build();
        Ok(timed("list_images", self.docker.list_images(Some(opts)))
            .await
            .map_err(DaemonError::docker("list images", filter))?
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect())
    }

    /// An image's layer diff ids, in order (none when the daemon lacks it).
    pub async fn image_layers(&self, image: &str) -> Vec<String> {
        timed("inspect_image", self.docker.inspect_image(image))
            .await
            .ok()
            .and_then(|i| i.root_fs)
            .and_then(|r| r.layers)
            .unwrap_or_default()
    }

    /// Every top-level image on the daemon (`docker images`: ids, tags, sizes, creation
    /// times).
    pub async fn list_images(
        &self,
    ) -> Result<Vec<bollard::models::ImageSummary>, bollard::errors::Error> {
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .all(false)
            .build();
        timed("list_images", self.docker.list_images(Some(opts))).await
    }
}

impl Daemon {
    /// The id of the image the daemon holds under `reference`, if it can tell (nothing
    /// waited for, nothing loaded).
    pub async fn image_id(&self, reference: &str) -> Option<String> {
        timed("inspect_image", self.docker.inspect_image(reference))
            .await
            .ok()
            .and_then(|i| i.id)
    }
}
