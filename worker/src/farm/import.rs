//! Imports before a stage: the pinned base images and the stage images the task reads
//! that this daemon lacks (by `docker load`, only the layers it lacks fetched), and
//! copied-path artifacts as a small image of just those paths.
use std::collections::BTreeMap;
use std::io::{Read, Write};

use model::digest::BlobDigest;
use model::keys::StageKey;
use model::task::{stage_image_tag, Artifact, StageError, StageTask, TaskBase, TaskSource};
use proto::v1::{BaseImage, TaskAssignment};
use wire::blob::artifact;

use super::tar::{base_of, parent_of, reprefix};
use super::task::TaskCtx;
use super::{paths_image_tag, PATHS_IN_MEMORY};

impl TaskCtx {
    /// Loads the pinned external images this daemon lacks from the store.
    pub(super) async fn load_base_images(
        &mut self,
        images: &[BaseImage],
    ) -> Result<(), StageError> {
        for img in images {
            if self.has_image(&img.id).await {
                continue;
            }
            let digest = img
                .digest
                .as_ref()
                .map(|d| d.hex.clone())
                .unwrap_or_default();
            let file = self.fetch_blob_file(&digest).await?;
            self.docker_load(file)
                .await
                .map_err(|e| StageError::new(format!("image {}: {}", img.id, e.message)))?;
            if !self.has_image(&img.id).await {
                return Err(StageError::new(format!(
                    "the store's copy of image {} loaded as another image",
                    img.id
                )));
            }
        }
        Ok(())
    }

    /// Loads the stage images the task needs and lacks; turns copied-path artifacts into a
    /// small image the COPY --from reads instead of the stage's image.
    pub(super) async fn import(
        &mut self,
        task: &mut StageTask,
        a: &TaskAssignment,
    ) -> Result<(), StageError> {
        let mut by_key: BTreeMap<StageKey, Vec<Artifact>> = BTreeMap::new();
        for pb in &a.imports {
            let art = artifact(pb).map_err(|e| StageError::new(e.message().to_string()))?;
            by_key.entry(art.stage_key).or_default().push(art);
        }
        // Images whose layers an imported stage image may start with: the task's pinned
        // external images (loaded before) and the stage images it reads that are here.
        let mut have: Vec<String> = a.base_images.iter().map(|b| b.id.clone()).collect();
        if let TaskBase::Image { id, .. } = &task.base {
            have.push(id.clone());
        }
        for k in by_key.keys() {
            have.push(stage_image_tag(k));
        }
        // Each stage's artifacts are imported at the same time (a docker load or import
        // each); then the task reads the path-only ones from the images made of them.
        let imports = by_key.into_iter().map(|(key, arts)| {
            // The image this build read the stage as, when the task names it: a daemon
            // holding another image under the stage's tag must import this one.
            let expected = task
                .instructions
                .iter()
                .flat_map(|ti| ti.copy_from.iter().chain(ti.mount_from.iter().flatten()))
                .find_map(|s| match s {
                    TaskSource::Stage {
                        key: k,
                        image_id: Some(id),
                        ..
                    } if *k == key => Some(id.clone()),
                    _ => None,
                });
            let this = self.clone_for_import();
            let have = have.clone();
            let platform = task.platform.clone();
            async move {
                let made = this
                    .import_stage(key, &arts, expected, have, &platform)
                    .await?;
                Ok::<_, StageError>((key, made))
            }
        });
        for r in futures::future::join_all(imports).await {
            let (key, made) = r?;
            let Some((reference, id)) = made else {
                continue;
            };
            for ti in &mut task.instructions {
                for s in ti
                    .copy_from
                    .iter_mut()
                    .chain(ti.mount_from.iter_mut().flatten())
                {
                    if matches!(s, TaskSource::Stage { key: k, .. } if *k == key) {
                        *s = TaskSource::Image {
                            reference: reference.clone(),
                            id: id.clone(),
                        };
                    }
                }
            }
        }
        if let TaskBase::Stage { key, .. } = &task.base {
            if !self.has_image(&stage_image_tag(key)).await {
                return Err(StageError::new(format!(
                    "the image of stage {key} is neither on this worker nor in the store"
                )));
            }
        }
        Ok(())
    }

    /// Imports one stage's artifacts unless the daemon holds its image (`expected`, else
    /// its tag): the image by `docker load`, or an image of just its exported paths,
    /// whose reference and id are returned (the task then reads those paths there).
    async fn import_stage(
        mut self,
        key: StageKey,
        arts: &[Artifact],
        expected: Option<String>,
        have: Vec<String>,
        platform: &str,
    ) -> Result<Option<(String, String)>, StageError> {
        let held = match &expected {
            Some(id) => self.has_image(id).await,
            None => self.has_image(&stage_image_tag(&key)).await,
        };
        if held {
            return Ok(None);
        }
        if let Some(img) = arts.iter().find(|a| a.path.is_empty()) {
            self.load_image_artifact(&img.digest, &have)
                .await
                .map_err(|e| StageError::new(format!("stage {key}: {}", e.message)))?;
            return Ok(None);
        }
        // Only paths: build an image holding just them, and read COPY --from there.
        let reference = paths_image_tag(&key, arts);
        let small = arts.iter().map(|a| a.size).sum::<u64>() <= PATHS_IN_MEMORY;
        if small && !self.has_image(&reference).await {
            // Written in the background under an id known at once, its paths read ahead
            // into the tree cache: the consumer starts without waiting for the daemon.
            let mut paths = Vec::with_capacity(arts.len());
            for art in arts {
                paths.push((art.path.clone(), self.fetch_blob(&art.digest).await?));
            }
            let (layer, paths) = tokio::task::spawn_blocking(move || {
                let mut out = tar::Builder::new(Vec::new());
                for (path, data) in &paths {
                    reprefix(&mut out, &data[..], parent_of(path), base_of(path))
                        .map_err(|e| std::io::Error::other(format!("artifact {path}: {e}")))?;
                }
                Ok::<_, std::io::Error>((out.into_inner()?, paths))
            })
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(e.to_string()))?;
            let id = self
                .executor
                .load_paths_image(&reference, platform, layer, &paths)?;
            return Ok(Some((reference, id)));
        }
        if !self.has_image(&reference).await {
            // Streamed through files: an artifact may be larger than memory.
            let mut parts = Vec::with_capacity(arts.len());
            for art in arts {
                parts.push((self.fetch_blob_file(&art.digest).await?, art.path.clone()));
            }
            let scratch = self.scratch.clone();
            let rootfs = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&scratch)?;
                let tmp = tempfile::NamedTempFile::new_in(&scratch)?;
                let mut out = tar::Builder::new(std::io::BufWriter::new(tmp.reopen()?));
                for (file, path) in parts {
                    reprefix(
                        &mut out,
                        std::io::BufReader::new(file),
                        parent_of(&path),
                        base_of(&path),
                    )
                    .map_err(|e| std::io::Error::other(format!("artifact {path}: {e}")))?;
                }
                out.into_inner()?.flush()?;
                Ok::<_, std::io::Error>(tmp)
            })
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(e.to_string()))?;
            let file = rootfs
                .reopen()
                .map_err(|e| StageError::new(e.to_string()))?;
            self.executor
                .daemon()
                .import_rootfs(&reference, file)
                .await
                .map_err(|e| StageError::new(format!("importing artifacts of {key}: {e}")))?;
        }
        let id = self
            .executor
            .daemon()
            .image_id(&reference)
            .await
            .unwrap_or_else(|| reference.clone());
        Ok(Some((reference, id)))
    }

    /// Loads an image artifact: a whole `docker save` archive, or an index of parts, of
    /// which only the layers this daemon lacks are fetched (`have`: images whose layers
    /// it holds, to find the longest layer chain it has).
    async fn load_image_artifact(
        &mut self,
        digest: &str,
        have: &[String],
    ) -> Result<(), StageError> {
        let index_size = BlobDigest::from_hex(digest)
            .and_then(|d| self.blobs.size(&d))
            .unwrap_or(0);
        // An index is small; anything larger is a whole archive, streamed to the daemon.
        let parts = if index_size > 4 << 20 {
            None
        } else {
            let bytes = self.fetch_blob(digest).await?;
            model::image_parts::ImageParts::parse(&bytes)
        };
        let Some(parts) = parts else {
            let file = self.fetch_blob_file(digest).await?;
            return self.docker_load(file).await;
        };
        let wanted = parts.diff_ids();
        let mut present = 0;
        for image in have {
            let layers = self.executor.daemon().image_layers(image).await;
            let common = layers
                .iter()
                .zip(&wanted)
                .take_while(|(a, b)| a == b)
                .count();
            present = present.max(common);
        }
        // First without the layers the daemon should have; if it lacks one after all,
        // once more with every layer.
        for skip in [present, 0] {
            // Layers are read from the local blob cache as files, never held in memory.
            let mut files = Vec::new();
            for l in &parts.layers[skip..] {
                files.push(self.fetch_blob_file(&l.digest).await?);
            }
            let mut files = files.into_iter();
            let archive = tempfile::tempfile_in(&self.scratch)
                .or_else(|_| tempfile::tempfile())
                .map_err(|e| StageError::new(e.to_string()))?;
            let mut layer = |i: usize| -> std::io::Result<Option<Box<dyn Read>>> {
                Ok(if i >= skip {
                    files.next().map(|f| Box::new(f) as Box<dyn Read>)
                } else {
                    None
                })
            };
            let mut w = std::io::BufWriter::new(&archive);
            model::image_parts::assemble(&parts, &mut layer, &mut w)
                .map_err(|e| StageError::new(format!("assembling image {digest}: {e}")))?;
            drop(w);
            use std::io::Seek;
            let mut archive = archive;
            archive
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| StageError::new(e.to_string()))?;
            match self.docker_load(archive).await {
                Ok(()) => return Ok(()),
                Err(e) if skip == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e.message, "load without the layers the daemon should have failed; sending all")
                }
            }
        }
        Ok(())
    }

    /// `docker load` of an archive file, streamed.
    async fn docker_load(&self, archive: std::fs::File) -> Result<(), StageError> {
        self.executor
            .daemon()
            .load_file(archive)
            .await
            .map_err(StageError::from)
    }
}
