//! COPY/ADD destination rules, modes and owners, compared with BuildKit.

use testkit::executor::*;

fn context(dir: &std::path::Path) {
    write_context(
        dir,
        &[
            ("a.txt", 0o644, b"a"),
            ("b.sh", 0o755, b"#!/bin/sh\necho b\n"),
            ("secret.key", 0o600, b"k"),
            ("src/", 0o750, b""),
            ("src/main.c", 0o644, b"int main(){}"),
            ("src/lib/", 0o700, b""),
            ("src/lib/x.h", 0o640, b"#define X"),
            ("src/link", 0o777, b"->main.c"),
            ("link-to-a", 0o777, b"->a.txt"),
            ("docs/", 0o755, b""),
            ("docs/one.md", 0o644, b"1"),
            ("docs/two.md", 0o644, b"2"),
            ("docs/three.txt", 0o644, b"3"),
        ],
    );
}

#[tokio::test]
async fn copy_rules_match_buildkit() {
    let ex = executor("tcopyrules").await;
    let dir = tempfile::tempdir().unwrap();
    context(dir.path());
    let df = format!(
        r#"FROM {BUSYBOX}
COPY a.txt /new/dir/
COPY a.txt /renamed.txt
COPY b.sh secret.key /multi/
COPY src /srcdir
COPY src/ /etc/
COPY docs/*.md /md/
COPY link-to-a /followed
COPY --chown=app:app src /owned/src
COPY --chown=1000 a.txt /owned/deep/er/
COPY --chown=app a.txt /tmp/
WORKDIR /work
COPY a.txt .
COPY docs rel/
COPY . /ctx/
COPY a.txt /new/dir
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:copy");
    assert_same(&ours, "dbuild-worker-bk:copy");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn add_unpacks_local_archives_like_buildkit() {
    let ex = executor("taddarchive").await;
    let dir = tempfile::tempdir().unwrap();
    let inner = tempfile::tempdir().unwrap();
    write_context(
        inner.path(),
        &[
            ("pkg/", 0o755, b""),
            ("pkg/bin.sh", 0o755, b"echo"),
            ("pkg/readme", 0o644, b"r"),
        ],
    );
    let tar = dir.path().join("pkg.tar");
    let tgz = dir.path().join("pkg.tar.gz");
    for (file, flag) in [(&tar, "-cf"), (&tgz, "-czf")] {
        let st = std::process::Command::new("tar")
            .args(["--owner=42", "--group=43", flag])
            .arg(file)
            .args(["-C", inner.path().to_str().unwrap(), "pkg"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    write_context(
        dir.path(),
        &[("plain.gz", 0o644, b"\x1f\x8bnot really gzip")],
    );
    let df = format!(
        r#"FROM {BUSYBOX}
ADD pkg.tar /opt/plain/
ADD pkg.tar.gz /opt/gz
ADD plain.gz /opt/file/
COPY pkg.tar /opt/copied/
ADD --chown=1000:1000 pkg.tar /opt/owned/new/
ADD --chown=app --chmod=0700 pkg.tar.gz /opt/chmodded/
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:add");
    assert_same(&ours, "dbuild-worker-bk:add");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

/// Features the daemon's BuildKit (Docker 20.10) does not have: checked against the
/// documented BuildKit behaviour instead.
#[tokio::test]
async fn heredoc_exclude_parents_and_from_wildcards() {
    let ex = executor("tcopynew").await;
    let dir = tempfile::tempdir().unwrap();
    context(dir.path());
    let df = format!(
        r#"FROM {BUSYBOX} AS files
RUN mkdir -p /out && echo 1 > /out/one.log && echo 2 > /out/two.log && echo x > /out/keep.txt
FROM {BUSYBOX}
ARG WHO=world
COPY <<EOF /greeting
hello $WHO
EOF
COPY --chmod=0755 <<-'EOT' /scripts/
	#!/bin/sh
	echo $WHO
	EOT
COPY --exclude=*.md docs /nomd/
COPY --parents src/lib/x.h docs/one.md /p/
COPY --parents ./src/./lib/x.h ./docs/./*.md /q/
COPY --parents src/lib /r/
COPY --from=files /out/*.log /logs/
"#
    );
    let img = build_ours(&ex, dir.path(), &df).await;
    let sh = |cmd: &str| {
        docker(&[
            "run",
            "--rm",
            "--network=none",
            "--user",
            "0",
            &img,
            "sh",
            "-c",
            cmd,
        ])
        .unwrap()
    };
    assert_eq!(sh("cat /greeting"), "hello world\n");
    assert_eq!(sh("cat /scripts/EOT"), "#!/bin/sh\necho $WHO\n");
    assert_eq!(sh("stat -c %a /scripts/EOT /greeting"), "755\n644\n");
    assert_eq!(sh("ls /nomd"), "three.txt\n");
    assert_eq!(
        sh("find /p | sort"),
        "/p\n/p/docs\n/p/docs/one.md\n/p/src\n/p/src/lib\n/p/src/lib/x.h\n"
    );
    assert_eq!(sh("stat -c %a /p/src /p/src/lib"), "750\n700\n");
    // A "/./" in the source is the pivot: only the path below it is kept.
    assert_eq!(
        sh("find /q | sort"),
        "/q\n/q/lib\n/q/lib/x.h\n/q/one.md\n/q/two.md\n"
    );
    assert_eq!(sh("stat -c %a /q/lib"), "700\n");
    // A directory source keeps its own name (and mode) under its parents.
    assert_eq!(
        sh("find /r | sort"),
        "/r\n/r/src\n/r/src/lib\n/r/src/lib/x.h\n"
    );
    assert_eq!(sh("stat -c %a /r/src /r/src/lib"), "750\n700\n");
    assert_eq!(sh("ls /logs"), "one.log\ntwo.log\n");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

/// COPY and WORKDIR write their layers by hand when they can (no commit): the directories
/// above what they write must keep their modes and owners, a symlinked destination must
/// still be followed, and a COPY after a RUN, a cache hit of an earlier step and several
/// `--from` reads of one image must all see the right state.
#[tokio::test]
async fn layers_written_by_hand_match_buildkit() {
    let ex = executor("thandlayers").await;
    let dir = tempfile::tempdir().unwrap();
    context(dir.path());
    let df = format!(
        r#"FROM {BUSYBOX} AS src
RUN mkdir -p /data/sub && echo one > /data/sub/f && echo two > /data/g

FROM {BUSYBOX}
RUN mkdir -p /a/b /real && chown 12:34 /a && chmod 0750 /a && chmod 0701 /a/b && ln -s /real /link
COPY a.txt /a/b/
COPY b.sh /a/b/c/d/
WORKDIR /a/b/w
COPY --from=src /data/sub /a/b/fromsub/
COPY --from=src /data/g /data/sub/f /a/
COPY a.txt /link/
COPY a.txt /link/deeper/
RUN stat -c '%n %a %u %g %F' /a /a/b /a/b/w /real /real/deeper /link > /listing
COPY secret.key /a/b/c/
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:handlayers");
    assert_same(&ours, "dbuild-worker-bk:handlayers");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}
