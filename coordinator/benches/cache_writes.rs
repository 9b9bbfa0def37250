//! Cost of recording a stage in a capped cache as the index grows (harness = false):
//! `cargo bench -p dbuild-coordinator --bench cache_writes`.
//!
//! Every write of a coordinator with `--cache-max-size` goes through the size cap. Fills a
//! real sled index and blob store with N records under a cap they never reach, and prints
//! a Markdown table: the mean time of the last 100 writes at each size. The cap should
//! cost nothing that grows with N while the cache is under it.
use std::time::{Duration, Instant};

use coordinator::cache::{Artifact, StageCache};
use model::keys::StageKey;

fn main() {
    println!("| records in the index | mean write (last 100) |");
    println!("| ---: | ---: |");
    for n in [1_000u32, 10_000, 50_000] {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = StageCache::open(dir.path(), true)
            .expect("open cache")
            .with_max_bytes(Some(u64::MAX / 2));
        let blob = cache
            .blobs()
            .expect("blob store")
            .put(b"x")
            .expect("put blob");
        let mut last = Duration::ZERO;
        for i in 0..n {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let art = Artifact {
                stage_key: StageKey(key),
                path: "/out".into(),
                digest: blob.to_hex(),
                size: 1,
            };
            let t = Instant::now();
            cache.add_artifacts(&[art], "w").expect("record");
            if i >= n - 100 {
                last += t.elapsed();
            }
        }
        println!("| {n} | {:.1} µs |", last.as_secs_f64() * 1e6 / 100.0);
    }
}
