//! The store on a real disk: blobs verified on read, sled index durable across reopen.
use std::io::Write;

use coordinator::store::{BlobError, BlobStore, SledStore, Store, Tree};
use model::digest::BlobDigest;

#[test]
fn blobs_are_named_by_content_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let d = blobs.put(b"hello").unwrap();
    assert_eq!(d, BlobDigest::of(b"hello"));
    assert!(blobs.contains(&d));
    assert_eq!(blobs.size(&d), Some(5));
    assert_eq!(blobs.read(&d).unwrap(), b"hello");
    assert_eq!(blobs.put(b"hello").unwrap(), d, "same content, same blob");
    assert_eq!(blobs.list().unwrap(), vec![(d, 5)]);

    // Corrupt it on disk: the read fails, names both digests, and the blob is gone.
    let hex = d.to_hex();
    std::fs::write(dir.path().join(&hex[..2]).join(&hex), b"hellO").unwrap();
    match blobs.read(&d) {
        Err(BlobError::Corrupt { expected, actual }) => {
            assert_eq!(expected, hex);
            assert_eq!(actual, BlobDigest::of(b"hellO").to_hex());
        }
        other => panic!("{other:?}"),
    }
    assert!(!blobs.contains(&d));
    assert!(matches!(blobs.read(&d), Err(BlobError::Missing(_))));
}

#[test]
fn a_writer_keeps_nothing_unless_the_digest_matches() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let mut w = blobs.writer(Some(BlobDigest::of(b"expected"))).unwrap();
    w.write_all(b"something else").unwrap();
    assert!(matches!(w.commit(), Err(BlobError::Corrupt { .. })));
    assert!(blobs.list().unwrap().is_empty());
    let mut w = blobs.writer(Some(BlobDigest::of(b"expected"))).unwrap();
    w.write_all(b"expected").unwrap();
    let (d, size, new) = w.commit().unwrap();
    assert_eq!((d, size, new), (BlobDigest::of(b"expected"), 8, true));
    // Dropped writers leave no temporary files behind.
    drop(blobs.writer(None).unwrap());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn index_survives_reopen_and_supports_cas_and_prefix_scans() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    {
        let s = SledStore::open(&path).unwrap();
        s.put(Tree::Stages, b"k1", b"v1").unwrap();
        s.put(Tree::Stages, b"k2", b"v2").unwrap();
        s.put(Tree::Blobs, b"k1", b"blob").unwrap();
        assert_eq!(
            s.compare_and_swap(Tree::Stages, b"k3", None, Some(b"v3"))
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            s.compare_and_swap(Tree::Stages, b"k3", None, Some(b"other"))
                .unwrap(),
            Err(Some(b"v3".to_vec()))
        );
        assert_eq!(s.remove(Tree::Stages, b"k2").unwrap(), Some(b"v2".to_vec()));
        s.flush().unwrap();
    }
    let s = SledStore::open(&path).unwrap();
    assert_eq!(s.get(Tree::Stages, b"k1").unwrap(), Some(b"v1".to_vec()));
    assert_eq!(s.get(Tree::Stages, b"k2").unwrap(), None);
    assert_eq!(s.get(Tree::Blobs, b"k1").unwrap(), Some(b"blob".to_vec()));
    let keys: Vec<_> = s
        .scan_prefix(Tree::Stages, b"k")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![b"k1".to_vec(), b"k3".to_vec()]);
}

#[test]
fn an_index_that_will_not_open_is_rebuilt_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    std::fs::write(&path, b"this is not a sled database").unwrap();
    let s = SledStore::open(&path).unwrap();
    s.put(Tree::Stages, b"k", b"v").unwrap();
    assert_eq!(s.get(Tree::Stages, b"k").unwrap(), Some(b"v".to_vec()));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("broken"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the unusable index is kept aside for inspection"
    );
}

/// sled allows one process per index: a second opener must fail and leave the index, and
/// everything in it, where it is (it once moved a running coordinator's index aside).
#[test]
fn an_index_in_use_is_an_error_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    let first = SledStore::open(&path).unwrap();
    first.put(Tree::Stages, b"k", b"v").unwrap();
    first.flush().unwrap();
    // flock conflicts between two open files even within one process.
    let err = SledStore::open(&path)
        .err()
        .expect("a second open must fail");
    assert!(
        matches!(err, coordinator::store::StoreError::Busy { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, ["index"], "nothing moved aside");
    assert_eq!(first.get(Tree::Stages, b"k").unwrap(), Some(b"v".to_vec()));
    drop(first);
    let again = SledStore::open(&path).unwrap();
    assert_eq!(again.get(Tree::Stages, b"k").unwrap(), Some(b"v".to_vec()));
}
