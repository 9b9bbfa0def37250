//! Reading the sources of a stage's COPY --from steps at once. What a `--from` source
//! selects depends only on an immutable image and the source path, so when the first such
//! step runs, the sources of every later one whose path needs no expansion are read too,
//! concurrently (each read is a daemon round trip of tens of milliseconds). A failed read
//! is kept and reported by the step it belongs to, only if that step runs.
use std::collections::HashMap;

use futures::future::join_all;
use model::frontend::instructions::Instruction;
use model::task::StageError;

use super::steps::{from_image, FromImage};
use super::tree::SourceTree;
use super::{DockerExecutor, StageRun};

/// Sources read ahead, by (image reference, source path).
pub(crate) type Prefetched = HashMap<(String, String), Result<Vec<SourceTree>, StageError>>;

/// Whether expanding `src` cannot change it and it reads an image path.
fn literal(src: &str, escape: char) -> bool {
    !src.contains(['$', '"', '\'', escape])
        && !src.starts_with("<<")
        && !src.contains("://")
        && !src.starts_with("git@")
}

impl DockerExecutor {
    /// The trees `src` selects in image `reference` (through `container`), read ahead
    /// for this and the stage's later COPY --from steps when `from_index` is the index of
    /// the running step.
    pub(super) async fn copy_from_sources(
        &self,
        st: &mut StageRun<'_>,
        reference: &str,
        container: &str,
        src: &str,
        from_index: Option<usize>,
    ) -> Result<Vec<SourceTree>, StageError> {
        let key = (reference.to_string(), src.to_string());
        if let Some(r) = st.prefetched.remove(&key) {
            return r;
        }
        let Some(index) = from_index.filter(|_| !st.prefetch_done) else {
            return self.image_sources(container, src).await;
        };
        st.prefetch_done = true;
        let escape = st.task.escape;
        let mut wanted: Vec<(String, String)> = Vec::new();
        for ti in &st.task.instructions[index..] {
            let (Instruction::Copy(c) | Instruction::Add(c)) = &ti.raw else {
                continue;
            };
            let Some(FromImage::Reference(r)) = from_image(ti.copy_from.as_ref(), None) else {
                continue;
            };
            for s in c.sources.iter().filter(|s| literal(s, escape)) {
                let k = (r.clone(), s.clone());
                if k != key && !wanted.contains(&k) {
                    wanted.push(k);
                }
            }
        }
        let mut refs: Vec<&String> = wanted.iter().map(|(r, _)| r).collect();
        refs.sort();
        refs.dedup();
        let mut containers = HashMap::new();
        containers.insert(reference.to_string(), container.to_string());
        let res = st.res;
        let made = refs
            .into_iter()
            .filter(|r| !st.read_containers.contains_key(*r) && r.as_str() != reference)
            .map(|r| async move { (r, self.new_read_container(res, r, "COPY --from").await) });
        for (r, c) in join_all(made).await {
            // A missing image is reported by its own step.
            if let Ok(c) = c {
                st.read_containers.insert(r.clone(), c);
            }
        }
        for (r, c) in &st.read_containers {
            containers.entry(r.clone()).or_insert_with(|| c.clone());
        }
        let reads = wanted
            .iter()
            .filter_map(|(r, s)| Some((r, s, containers.get(r)?)))
            .map(
                |(r, s, c)| async move { ((r.clone(), s.clone()), self.image_sources(c, s).await) },
            );
        let own = self.image_sources(container, src);
        let (own, others) = futures::join!(own, join_all(reads));
        st.prefetched.extend(others);
        own
    }
}
