//! RUN, multi-stage COPY --from, scratch and ONBUILD, compared with BuildKit.

use testkit::executor::*;

#[tokio::test]
async fn run_and_stages_match_buildkit() {
    let ex = executor("trunstages").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    let df = format!(
        r#"FROM {BUSYBOX} AS build
ARG FOO=bar
ARG SHADOW=arg
ENV SHADOW=env
RUN mkdir -p /out/sub && echo "$FOO $SHADOW" > /out/hello && chmod 0640 /out/hello && chown 1000:1000 /out/sub && ln -s hello /out/link
RUN echo data > /out/sub/data && chown 1000:1000 /out/sub/data && rm /bin/vi
USER app
RUN echo user > /tmp/user.txt
FROM scratch AS assets
COPY --from=build /out /assets
COPY --from=build /out/hello /single
FROM build
USER root
COPY --from=assets /assets/ /copied/
COPY --from=0 --chown=0:0 /out/sub /subroot
COPY --from=build /out/link /linked
RUN ["/bin/sh", "-c", "echo exec > /exec.txt"]
ENTRYPOINT ["/bin/sh"]
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:run");
    assert_same(&ours, "dbuild-worker-bk:run");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn scratch_stage_matches_buildkit() {
    let ex = executor("tscratch").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o600, b"a")]);
    let df = "FROM scratch\nCOPY a.txt /\nLABEL x=y\nCMD [\"/a.txt\"]\n";
    let ours = build_ours(&ex, dir.path(), df).await;
    build_buildkit(dir.path(), df, "dbuild-worker-bk:scratch");
    assert_same(&ours, "dbuild-worker-bk:scratch");
    let empty = "FROM scratch\n";
    let ours = build_ours(&ex, dir.path(), empty).await;
    build_buildkit(dir.path(), empty, "dbuild-worker-bk:empty");
    assert_same(&ours, "dbuild-worker-bk:empty");
}

#[tokio::test]
async fn onbuild_triggers_of_a_base_image_run_first() {
    let ex = executor("tonbuild").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    let base = format!(
        "FROM {BUSYBOX}\nONBUILD RUN echo trig > /trig\nONBUILD COPY a.txt /from-onbuild.txt\nONBUILD ENV T=1\n"
    );
    build_buildkit(dir.path(), &base, "dbuild-worker-test/onbuild:latest");
    let df = "FROM dbuild-worker-test/onbuild:latest\nRUN cat /trig && echo $T > /t\nONBUILD RUN echo next\n";
    let ours = build_ours(&ex, dir.path(), df).await;
    build_buildkit(dir.path(), df, "dbuild-worker-bk:onbuild");
    assert_same(&ours, "dbuild-worker-bk:onbuild");
    // A stage built on a stage with ONBUILD: the plan carries the triggers.
    let df2 = format!("FROM {BUSYBOX} AS a\nONBUILD RUN echo s > /s\nFROM a\nRUN cat /s\n");
    let ours = build_ours(&ex, dir.path(), &df2).await;
    build_buildkit(dir.path(), &df2, "dbuild-worker-bk:onbuild2");
    assert_same(&ours, "dbuild-worker-bk:onbuild2");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn mounts_and_chmod_match_buildkit() {
    let ex = executor("tmountsbk").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(
        dir.path(),
        &[
            ("docs/", 0o755, b""),
            ("docs/one.md", 0o644, b"one"),
            ("a.sh", 0o644, b"echo"),
        ],
    );
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), b"s3cret").unwrap();
    let df = format!(
        r#"FROM {BUSYBOX} AS src
RUN mkdir /out && echo from-stage > /out/f
FROM {BUSYBOX}
RUN --mount=type=cache,target=/cache echo x > /cache/c
RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t
RUN --mount=type=bind,source=docs,target=/docs cat /docs/one.md > /bound
RUN --mount=type=bind,from=src,source=/out,target=/mnt cat /mnt/f > /from-stage
RUN --mount=type=secret,id=tok cat /run/secrets/tok > /tok-copy
COPY --chmod=0700 a.sh /chmodded
COPY --chmod=751 docs /docs-chmod/
"#
    );
    let mut secrets = std::collections::BTreeMap::new();
    secrets.insert("tok".to_string(), b"s3cret".to_vec());
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, secrets).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let results = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let ours = results.last().unwrap().image_id.clone();
    let src = format!("id=tok,src={}", secret.path().display());
    build_buildkit_with(
        dir.path(),
        &df,
        "dbuild-worker-bk:mounts",
        &["--secret", &src],
    );
    assert_same(&ours, "dbuild-worker-bk:mounts");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}
