//! The stage cache on a real sled index and blob store: pruning removes a record with the
//! blobs only it names, and sweeps blobs no record names (build contexts) once they are
//! past the grace period, except those a running build pinned.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use coordinator::cache::{Artifact, Built, PruneOptions, StageCache};
use coordinator::store::BlobStore;
use model::keys::StageKey;

fn age(blobs_dir: &std::path::Path, hex: &str, by: Duration) {
    let path = blobs_dir.join(&hex[..2]).join(hex);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(SystemTime::now() - by)
        .unwrap();
}

#[test]
fn prune_removes_records_with_their_blobs_and_sweeps_old_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(StageCache::open(dir.path(), true).unwrap());
    let blobs: BlobStore = cache.blobs().unwrap().clone();
    let blobs_dir = dir.path().join("blobs");
    let key = StageKey([1; 32]);
    let artifact = blobs.put(b"artifact of stage one").unwrap();
    cache
        .add_artifacts(
            &[Artifact {
                stage_key: key,
                path: "/out".into(),
                digest: artifact.to_hex(),
                size: 21,
            }],
            "w1",
        )
        .unwrap();
    cache
        .stage_built(&Built {
            key: &key,
            name: "one",
            image_id: "sha256:one",
            image_size: 0,
            duration: Duration::from_millis(5),
            worker: "w1",
            tags: &[],
            contents: &Default::default(),
        })
        .unwrap();
    // Three context blobs: fresh, old, and old but read by a running build.
    let fresh = blobs.put(b"context: fresh").unwrap();
    let old = blobs.put(b"context: old").unwrap();
    let pinned = blobs.put(b"context: old, pinned").unwrap();
    for d in [&old, &pinned, &artifact] {
        age(&blobs_dir, &d.to_hex(), Duration::from_secs(2 * 3600));
    }
    let pins = cache.pin_blobs([pinned.to_hex()]);

    let report = cache.prune(&PruneOptions::default()).unwrap();
    assert!(report.removed.is_empty());
    assert_eq!(report.unreferenced_removed, 1);
    assert!(!blobs.contains(&old), "an old unreferenced blob is swept");
    assert!(
        blobs.contains(&fresh),
        "a fresh one may be about to be named"
    );
    assert!(blobs.contains(&pinned), "a running build's blob stays");
    assert!(blobs.contains(&artifact), "a record's blob stays");

    // The build ends: its blobs are ordinary unreferenced blobs again. --all removes
    // the record, its blob and every unreferenced blob at once.
    drop(pins);
    let report = cache
        .prune(&PruneOptions {
            all: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.removed.len(), 1);
    for d in [&artifact, &pinned, &fresh] {
        assert!(!blobs.contains(d));
    }
    assert!(cache.get(&key).unwrap().is_none());
}

#[test]
fn a_rebuild_to_another_image_drops_the_old_contents() {
    let dir = tempfile::tempdir().unwrap();
    let cache = StageCache::open(dir.path(), false).unwrap();
    let key = StageKey([2; 32]);
    let built = |image: &str, contents: &[(&str, &str)]| {
        let contents = contents
            .iter()
            .map(|(p, d)| (p.to_string(), d.to_string()))
            .collect();
        cache
            .stage_built(&Built {
                key: &key,
                name: "s",
                image_id: image,
                image_size: 10,
                duration: Duration::ZERO,
                worker: "local",
                tags: &[],
                contents: &contents,
            })
            .unwrap();
    };
    built("sha256:a", &[("/x", "1"), ("/y", "2")]);
    built("sha256:a", &[("/x", "1")]);
    assert_eq!(cache.get(&key).unwrap().unwrap().contents.len(), 2);
    built("sha256:b", &[("/x", "3")]);
    let r = cache.get(&key).unwrap().unwrap();
    assert_eq!(
        r.contents.into_iter().collect::<Vec<_>>(),
        [("/x".to_string(), "3".to_string())]
    );
    // Contents computed from the old image are not added to the new image's record.
    cache
        .add_contents(
            &key,
            "sha256:a",
            &[("/y".to_string(), "2".to_string())].into(),
        )
        .unwrap();
    assert_eq!(cache.get(&key).unwrap().unwrap().contents.len(), 1);
}

/// A blob several records name (a base layer of several stage images) counts once, and is
/// freed only with the last record naming it: the cap evicts no more than it must.
#[test]
fn shared_blobs_count_once_in_sizes_and_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(StageCache::open(dir.path(), true).unwrap());
    let blobs: BlobStore = cache.blobs().unwrap().clone();
    let shared = blobs.put(&[7u8; 100]).unwrap();
    let only_a = blobs.put(&[1u8; 10]).unwrap();
    let only_b = blobs.put(&[2u8; 20]).unwrap();
    let record = |key: StageKey, own: &model::digest::BlobDigest, size: u64| {
        let art = |path: &str, d: &model::digest::BlobDigest, size: u64| Artifact {
            stage_key: key,
            path: path.into(),
            digest: d.to_hex(),
            size,
        };
        cache
            .add_artifacts(&[art("/shared", &shared, 100), art("/own", own, size)], "w")
            .unwrap();
        cache
            .stage_built(&Built {
                key: &key,
                name: "s",
                image_id: "sha256:x",
                image_size: 0,
                duration: Duration::ZERO,
                worker: "w",
                tags: &[],
                contents: &Default::default(),
            })
            .unwrap();
    };
    let (a, b) = (StageKey([3; 32]), StageKey([4; 32]));
    record(a, &only_a, 10);
    std::thread::sleep(Duration::from_millis(5));
    record(b, &only_b, 20);
    assert_eq!(cache.stats().unwrap().bytes, 130);
    let report = cache
        .prune(&PruneOptions {
            keep_bytes: Some(125),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.removed.len(), 1, "only the least recently used goes");
    assert_eq!(report.bytes_freed, 10);
    assert!(cache.get(&a).unwrap().is_none() && cache.get(&b).unwrap().is_some());
    assert!(blobs.contains(&shared) && !blobs.contains(&only_a));
    assert_eq!(cache.stats().unwrap().bytes, 120);
}

/// The size cap holds after every write in one process (it lists every record only once
/// an upper bound of the size passes the cap, not after each write, so the bound must
/// grow with each record and be reset by the full pass).
#[test]
fn the_size_cap_holds_write_after_write() {
    let dir = tempfile::tempdir().unwrap();
    let cache = StageCache::open(dir.path(), true)
        .unwrap()
        .with_max_bytes(Some(250));
    let blobs: BlobStore = cache.blobs().unwrap().clone();
    let mut keys = Vec::new();
    for i in 0..8u8 {
        let key = StageKey([10 + i; 32]);
        let d = blobs.put(&[i; 100]).unwrap();
        cache
            .add_artifacts(
                &[Artifact {
                    stage_key: key,
                    path: "/out".into(),
                    digest: d.to_hex(),
                    size: 100,
                }],
                "w",
            )
            .unwrap();
        keys.push(key);
        std::thread::sleep(Duration::from_millis(3));
        let bytes = cache.stats().unwrap().bytes;
        assert!(
            bytes <= 250,
            "after record {i}: {bytes} bytes over the 250 cap"
        );
    }
    // The two most recent stay; the rest went with their blobs.
    let kept: Vec<bool> = keys
        .iter()
        .map(|k| cache.get(k).unwrap().is_some())
        .collect();
    assert_eq!(kept, [false, false, false, false, false, false, true, true]);
}
