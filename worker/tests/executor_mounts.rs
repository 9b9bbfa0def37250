//! RUN mounts that show a single file (secrets, binds of one file), compared with
//! BuildKit: the file alone appears at its target, its siblings stay visible, and nothing
//! of it (not even the mount point the runtime had to create) is left in the image.

use std::collections::BTreeMap;

use testkit::executor::*;

#[tokio::test]
async fn single_file_mounts_match_buildkit() {
    let ex = executor("tfilemounts").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o640, b"context-a")]);
    let df = format!(
        r#"FROM {BUSYBOX} AS src
RUN mkdir /out && echo from-stage > /out/f && chmod 0604 /out/f && chown 1000:1000 /out/f
FROM {BUSYBOX}
RUN mkdir -p /etc/conf && echo keep > /etc/conf/sibling && chmod 0750 /etc/conf
RUN --mount=type=secret,id=tok,target=/etc/conf/app-token cat /etc/conf/sibling /etc/conf/app-token > /seen && stat -c '%a %u %g' /etc/conf/app-token >> /seen
RUN --mount=type=secret,id=tok,target=/top-token wc -c < /top-token > /top
RUN --mount=type=secret,id=tok,target=/new/deep/tok,mode=0444,uid=1000,gid=1000 stat -c '%a %u %g' /new/deep/tok > /deep
RUN --mount=type=secret,id=tok --mount=type=secret,id=tok2 cat /run/secrets/tok /run/secrets/tok2 > /both
RUN --mount=type=secret,id=tok,target=/etc/group cat /etc/group > /group-seen
RUN --mount=type=bind,source=a.txt,target=/bound.txt cat /bound.txt > /b && stat -c '%a %u' /bound.txt >> /b && (echo x > /bound.txt) 2>/dev/null || echo read-only >> /b
RUN --mount=type=bind,source=a.txt,target=/rw.txt,rw echo changed > /rw.txt && cat /rw.txt > /rw
RUN --mount=type=bind,from=src,source=/out/f,target=/etc/conf/f stat -c '%a %u' /etc/conf/f > /f-stat && cat /etc/conf/f >> /f-stat
"#
    );
    let secret = |v: &[u8]| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), v).unwrap();
        f
    };
    let (tok, tok2) = (secret(b"s3cret"), secret(b"other"));
    let secrets = BTreeMap::from([
        ("tok".to_string(), b"s3cret".to_vec()),
        ("tok2".to_string(), b"other".to_vec()),
    ]);
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, secrets).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let ours = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let ours = ours.last().unwrap().image_id.clone();
    let (s1, s2) = (
        format!("id=tok,src={}", tok.path().display()),
        format!("id=tok2,src={}", tok2.path().display()),
    );
    build_buildkit_with(
        dir.path(),
        &df,
        "dbuild-worker-bk:filemounts",
        &["--secret", &s1, "--secret", &s2],
    );
    assert_same(&ours, "dbuild-worker-bk:filemounts");
    let cat = |p: &str| docker(&["run", "--rm", "--network=none", &ours, "cat", p]).unwrap();
    assert_eq!(cat("/seen"), "keep\ns3cret400 0 0\n");
    assert_eq!(cat("/deep"), "444 1000 1000\n");
    assert_eq!(cat("/both"), "s3cretother");
    assert_eq!(cat("/b"), "context-a640 0\nread-only\n");
    assert_eq!(cat("/f-stat"), "604 1000\nfrom-stage\n");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

/// uid, gid and mode of a cache mount set its root when the cache is made, as BuildKit
/// does; the default root is 0755 root.
#[tokio::test]
async fn cache_mount_roots_match_buildkit() {
    let ex = executor("tcacheroot").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    let id = format!(
        "root-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let df = format!(
        r#"FROM {BUSYBOX}
RUN --mount=type=cache,id={id},target=/c1,uid=1000,gid=1000,mode=0700 stat -c '%a %u %g' /c1 > /c1.txt
RUN --mount=type=cache,id={id}-p,target=/c2,sharing=private,mode=0750 stat -c '%a %u %g' /c2 > /c2.txt
RUN --mount=type=cache,id={id}-d,target=/c3 stat -c '%a %u %g' /c3 > /c3.txt
"#
    );
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, BTreeMap::new()).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let ours = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let ours = ours.last().unwrap().image_id.clone();
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:cacheroot");
    assert_same(&ours, "dbuild-worker-bk:cacheroot");
    let cat = |p: &str| docker(&["run", "--rm", "--network=none", &ours, "cat", p]).unwrap();
    assert_eq!(cat("/c1.txt"), "700 1000 1000\n");
    assert_eq!(cat("/c2.txt"), "750 0 0\n");
    assert_eq!(cat("/c3.txt"), "755 0 0\n");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
    // This test's shared cache volumes (the private one is already gone), named as the
    // executor names them: after the executor, the cache id and any root it was given.
    for key in [format!("{id}\u{0}1000:1000:700"), format!("{id}-d")] {
        let name = format!("{}\u{0}{key}", ex.name_prefix());
        let hash = model::digest::BlobDigest::of(name.as_bytes());
        let volume = format!("dbuild-cache-{}", &hash.to_hex()[..32]);
        docker(&["volume", "rm", &volume]).expect("the cache volume exists");
    }
}
