//! Context scanning: manifest contents, `.dockerignore` application, the stat cache.
use model::context::{
    scan, stat_cache_path, ContextError, ContextManifest, EntryKind, ScanOptions, ScanStats,
};
use model::digest::BlobDigest;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// An hour ago: old enough that the stat cache trusts it (not "racy").
fn old_time(offset_secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(3600 + offset_secs)
}

fn write(root: &Path, rel: &str, content: &[u8], mode: u32) -> PathBuf {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(&path, old_time(0));
    path
}

fn set_mtime(path: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn paths(m: &ContextManifest) -> Vec<&str> {
    m.iter().map(|e| e.path.as_str()).collect()
}

fn file_digest(m: &ContextManifest, path: &str) -> BlobDigest {
    m.get(path)
        .and_then(|e| e.digest())
        .unwrap_or_else(|| panic!("{path} is not a file in the manifest"))
}

fn scan_with(ctx: &Path, opts: &ScanOptions) -> (ContextManifest, ScanStats) {
    scan(ctx, opts).expect("scan succeeds")
}

#[test]
fn manifest_records_files_dirs_modes_and_unfollowed_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    write(&ctx, "a.txt", b"hello", 0o644);
    write(&ctx, "bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    write(&ctx, "sub/deeper/x", b"", 0o600);
    let big: Vec<u8> = (0..(9u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    write(&ctx, "sub/big.bin", &big, 0o640);
    fs::create_dir(ctx.join("empty")).unwrap();
    fs::set_permissions(ctx.join("empty"), fs::Permissions::from_mode(0o2750)).unwrap();
    write(dir.path(), "outside/secret", b"not in context", 0o644);
    symlink("a.txt", ctx.join("link-rel")).unwrap();
    symlink("../outside/secret", ctx.join("link-out")).unwrap();
    symlink("/etc/passwd", ctx.join("link-abs")).unwrap();
    symlink("../outside", ctx.join("link-dir")).unwrap();
    symlink("does/not/exist", ctx.join("dangling")).unwrap();

    let (m, stats) = scan_with(&ctx, &ScanOptions::default());
    assert_eq!(
        paths(&m),
        [
            "a.txt",
            "bin",
            "bin/run.sh",
            "dangling",
            "empty",
            "link-abs",
            "link-dir",
            "link-out",
            "link-rel",
            "sub",
            "sub/big.bin",
            "sub/deeper",
            "sub/deeper/x",
        ]
    );
    let a = m.get("a.txt").unwrap();
    assert_eq!(a.mode, 0o644);
    assert_eq!(
        a.kind,
        EntryKind::File {
            size: 5,
            digest: blake3::hash(b"hello").into()
        }
    );
    assert_eq!(m.get("bin/run.sh").unwrap().mode, 0o755);
    assert_eq!(m.get("sub/deeper/x").unwrap().mode, 0o600);
    assert_eq!(file_digest(&m, "sub/deeper/x"), BlobDigest::of(b""));
    assert_eq!(file_digest(&m, "sub/big.bin"), BlobDigest::of(&big));
    assert_eq!(m.get("empty").unwrap().kind, EntryKind::Dir);
    assert_eq!(m.get("empty").unwrap().mode, 0o2750);
    for (link, target) in [
        ("link-rel", "a.txt"),
        ("link-out", "../outside/secret"),
        ("link-abs", "/etc/passwd"),
        ("link-dir", "../outside"),
        ("dangling", "does/not/exist"),
    ] {
        let e = m.get(link).unwrap();
        assert_eq!(
            e.kind,
            EntryKind::Symlink {
                target: target.into()
            }
        );
        assert_eq!(e.mode, 0o777);
    }
    assert_eq!(stats.files, 4);
    assert_eq!(stats.bytes, 5 + 18 + big.len() as u64);
    assert_eq!(m.total_file_bytes(), stats.bytes);
    assert_eq!((stats.hashed_files, stats.stat_cache_hits), (4, 0));

    // The manifest travels as JSON: digests as hex, entries sorted by path.
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains(&BlobDigest::of(b"hello").to_hex()));
    assert!(json.starts_with(r#"[{"path":"a.txt","mode":420,"kind":{"type":"file""#));
    let back: ContextManifest = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

#[test]
fn dockerignore_is_applied_and_dockerfile_specific_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    write(ctx, "main.go", b"package main", 0o644);
    write(ctx, "README.md", b"readme", 0o644);
    write(ctx, "NOTES.md", b"notes", 0o644);
    write(ctx, "tmp/scratch", b"x", 0o644);
    write(ctx, "src/tempfile", b"x", 0o644);
    write(ctx, "src/lib.go", b"x", 0o644);
    write(ctx, "build/app.Dockerfile", b"FROM scratch", 0o644);
    write(
        ctx,
        ".dockerignore",
        b"# generic\n*.md\n!README.md\n/tmp/\n*/temp*\n",
        0o644,
    );

    let (m, _) = scan_with(ctx, &ScanOptions::default());
    assert_eq!(
        paths(&m),
        [
            ".dockerignore",
            "README.md",
            "build",
            "build/app.Dockerfile",
            "main.go",
            "src",
            "src/lib.go",
        ]
    );

    write(
        ctx,
        "build/app.Dockerfile.dockerignore",
        b"**/*.go\nbuild\n",
        0o644,
    );
    let opts = ScanOptions {
        dockerfile: Some(ctx.join("build/app.Dockerfile")),
        stat_cache: None,
    };
    let (m, _) = scan_with(ctx, &opts);
    assert_eq!(
        paths(&m),
        [
            ".dockerignore",
            "NOTES.md",
            "README.md",
            "src",
            "src/tempfile",
            "tmp",
            "tmp/scratch"
        ]
    );
    // Without the Dockerfile option the generic file applies again.
    assert!(scan_with(ctx, &ScanOptions::default())
        .0
        .get("NOTES.md")
        .is_none());
}

#[test]
fn excluded_dirs_with_exceptions() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    write(ctx, "node_modules/keep.txt", b"keep", 0o644);
    write(ctx, "node_modules/drop.txt", b"drop", 0o644);
    write(ctx, "node_modules/pkg/index.js", b"js", 0o644);
    write(ctx, "vendor/a/x.go", b"go", 0o644);
    write(ctx, "vendor/a/x.c", b"c", 0o644);
    write(ctx, "vendor/b/y.c", b"c", 0o644);
    write(ctx, "cache/data", b"d", 0o644);
    fs::create_dir(ctx.join("excluded-empty")).unwrap();
    // A non-UTF-8 name is fatal only if the walk has to look at it.
    let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
    fs::create_dir_all(ctx.join("cache/deep")).unwrap();
    fs::write(ctx.join("cache/deep").join(bad), b"?").unwrap();
    write(
        ctx,
        ".dockerignore",
        b"node_modules\n!node_modules/keep.txt\nvendor\n!vendor/**/*.go\ncache\nexcluded-empty\n.dockerignore\n",
        0o644,
    );
    let (m, stats) = scan_with(ctx, &ScanOptions::default());
    assert_eq!(
        paths(&m),
        [
            "node_modules",
            "node_modules/keep.txt",
            "vendor",
            "vendor/a",
            "vendor/a/x.go"
        ]
    );
    assert_eq!(m.get("vendor/a").unwrap().kind, EntryKind::Dir);
    assert_eq!(stats.files, 2);

    // The same bad name in an included directory is an error naming it.
    fs::write(ctx.join(bad), b"?").unwrap();
    match scan(ctx, &ScanOptions::default()) {
        Err(ContextError::NonUtf8Path(p)) => assert_eq!(p, ctx.join(bad)),
        other => panic!("expected NonUtf8Path, got {other:?}"),
    }
}

fn cached_opts(data: &Path, ctx: &Path) -> ScanOptions {
    ScanOptions {
        dockerfile: None,
        stat_cache: Some(stat_cache_path(data, ctx).unwrap()),
    }
}

#[test]
fn stat_cache_hits_and_detects_changes() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let data = dir.path().join("data");
    let a = write(&ctx, "a.txt", b"aaaa", 0o644);
    let b = write(&ctx, "dir/b.txt", b"bbbb", 0o644);
    write(&ctx, "dir/c.txt", b"cccc", 0o644);
    let opts = cached_opts(&data, &ctx);

    let (m1, s1) = scan_with(&ctx, &opts);
    assert_eq!((s1.hashed_files, s1.stat_cache_hits), (3, 0));
    assert!(opts.stat_cache.as_ref().unwrap().is_file());

    let (m2, s2) = scan_with(&ctx, &opts);
    assert_eq!(
        (s2.hashed_files, s2.hashed_bytes, s2.stat_cache_hits),
        (0, 0, 3)
    );
    assert_eq!(m1, m2);

    // Same-size edit with a different (still old) mtime.
    fs::write(&a, b"AAAA").unwrap();
    set_mtime(&a, old_time(10));
    // Same-size edit with the mtime put back: only ctime tells (hence the pause, so the
    // coarse ctime clock has certainly ticked since the first scan).
    std::thread::sleep(Duration::from_millis(50));
    let b_mtime = fs::metadata(&b).unwrap().modified().unwrap();
    fs::write(&b, b"BBBB").unwrap();
    set_mtime(&b, b_mtime);

    let (m3, s3) = scan_with(&ctx, &opts);
    assert_eq!((s3.hashed_files, s3.stat_cache_hits), (2, 1));
    assert_eq!(file_digest(&m3, "a.txt"), BlobDigest::of(b"AAAA"));
    assert_eq!(file_digest(&m3, "dir/b.txt"), BlobDigest::of(b"BBBB"));
    assert_eq!(file_digest(&m3, "dir/c.txt"), BlobDigest::of(b"cccc"));

    // Deletions and additions.
    fs::remove_file(&a).unwrap();
    write(&ctx, "new.txt", b"new", 0o644);
    let (m4, s4) = scan_with(&ctx, &opts);
    assert!(m4.get("a.txt").is_none());
    assert_eq!((s4.hashed_files, s4.stat_cache_hits), (1, 2));
    let (_, s5) = scan_with(&ctx, &opts);
    assert_eq!((s5.hashed_files, s5.stat_cache_hits), (0, 3));
}

#[test]
fn recently_modified_files_are_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    fs::create_dir(&ctx).unwrap();
    fs::write(ctx.join("fresh"), b"written just now").unwrap();
    write(&ctx, "old", b"old", 0o644);
    let opts = cached_opts(&dir.path().join("data"), &ctx);
    scan_with(&ctx, &opts);
    let (_, s) = scan_with(&ctx, &opts);
    // "fresh" may still change within the timestamp granularity: re-hashed every time.
    assert_eq!((s.hashed_files, s.stat_cache_hits), (1, 1));
}

#[test]
fn corrupt_or_foreign_cache_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let other = dir.path().join("other");
    write(&ctx, "f", b"content", 0o644);
    write(&other, "f", b"content", 0o644);
    let cache = dir.path().join("data/cache.bin");
    let opts = ScanOptions {
        dockerfile: None,
        stat_cache: Some(cache.clone()),
    };
    let (reference, _) = scan_with(&ctx, &opts);
    let good = fs::read(&cache).unwrap();

    let mut flipped = good.clone();
    flipped[20] ^= 1;
    for junk in [
        b"garbage".to_vec(),
        Vec::new(),
        good[..good.len() - 1].to_vec(),
        flipped,
    ] {
        fs::write(&cache, &junk).unwrap();
        let (m, s) = scan_with(&ctx, &opts);
        assert_eq!(m, reference);
        assert_eq!((s.hashed_files, s.stat_cache_hits), (1, 0));
        // ...and rebuilt, so the next scan hits.
        assert_eq!(scan_with(&ctx, &opts).1.stat_cache_hits, 1);
    }

    // The same cache file used for another context is not trusted (inodes differ anyway,
    // but the context path check makes that independent of luck).
    let (_, s) = scan_with(&other, &opts);
    assert_eq!(s.stat_cache_hits, 0);

    // A cache path whose directory cannot be created only loses caching.
    write(dir.path(), "blocker", b"", 0o644);
    let opts = ScanOptions {
        dockerfile: None,
        stat_cache: Some(dir.path().join("blocker/cache.bin")),
    };
    assert_eq!(scan_with(&ctx, &opts).0, reference);
}

#[test]
fn stat_cache_path_is_keyed_by_canonical_context() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    fs::create_dir(&ctx).unwrap();
    symlink(&ctx, dir.path().join("alias")).unwrap();
    let data = dir.path().join("data");
    let p1 = stat_cache_path(&data, &ctx).unwrap();
    assert_eq!(
        p1,
        stat_cache_path(&data, &dir.path().join("alias")).unwrap()
    );
    assert!(p1.starts_with(&data));
    fs::create_dir(dir.path().join("ctx2")).unwrap();
    assert_ne!(
        p1,
        stat_cache_path(&data, &dir.path().join("ctx2")).unwrap()
    );
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "plain", b"x", 0o644);
    assert!(matches!(
        scan(&file, &ScanOptions::default()),
        Err(ContextError::NotADirectory(p)) if p == file
    ));
    let missing = dir.path().join("missing");
    assert!(matches!(
        scan(&missing, &ScanOptions::default()),
        Err(ContextError::Io { path, .. }) if path == missing
    ));
    write(dir.path(), ".dockerignore", b"[\n", 0o644);
    assert!(matches!(
        scan(dir.path(), &ScanOptions::default()),
        Err(ContextError::BadPattern { .. })
    ));
    fs::remove_file(dir.path().join(".dockerignore")).unwrap();

    let locked = write(dir.path(), "locked", b"secret", 0o000);
    if fs::File::open(&locked).is_ok() {
        eprintln!("running with CAP_DAC_OVERRIDE (root): unreadable-file check skipped");
        return;
    }
    match scan(dir.path(), &ScanOptions::default()) {
        Err(ContextError::Io { path, .. }) => assert_eq!(path, locked),
        other => panic!("expected an I/O error naming {locked:?}, got {other:?}"),
    }
}
