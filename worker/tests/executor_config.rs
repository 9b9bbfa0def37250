//! Config-only instructions and WORKDIR, compared with BuildKit.

use testkit::executor::*;

#[tokio::test]
async fn config_instructions_match_buildkit() {
    let ex = executor("tconfig").await;
    let dir = tempfile::tempdir().unwrap();
    let df = format!(
        r#"FROM {BUSYBOX}
ARG V=1.2
ENV A=1 B="x y" C=$V
ENV D=${{A}}-$B PATH=/opt/bin:$PATH
LABEL l1=v1 "l 2"="v 2" ver=$V
EXPOSE 80 53/udp 8000-8002/tcp
VOLUME /data ["/v2"]
VOLUME ["/v3", "/v4"]
STOPSIGNAL SIGKILL
HEALTHCHECK --interval=1m30s --timeout=5s --start-period=2s --retries=4 CMD echo hi
USER 1000:1000
WORKDIR /a/b
USER app
WORKDIR c/../d
USER root
WORKDIR /e/
SHELL ["/bin/sh", "-ec"]
CMD echo cmd $A
ENTRYPOINT ["/bin/echo"]
ONBUILD RUN echo onbuild
MAINTAINER me
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:config");
    assert_same(&ours, "dbuild-worker-bk:config");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn entrypoint_clears_inherited_cmd_like_buildkit() {
    let ex = executor("tentrypoint").await;
    let dir = tempfile::tempdir().unwrap();
    let df = format!(
        r#"FROM {BUSYBOX} AS base
CMD ["base-cmd"]
HEALTHCHECK CMD ["/bin/true"]
FROM base AS child
ENTRYPOINT /bin/echo shell form
HEALTHCHECK NONE
FROM child
CMD ["kept"]
ENTRYPOINT ["/bin/echo"]
"#
    );
    let ours = build_ours(&ex, dir.path(), &df).await;
    build_buildkit(dir.path(), &df, "dbuild-worker-bk:entrypoint");
    assert_same(&ours, "dbuild-worker-bk:entrypoint");
    let df_child = df.replace(
        "FROM child\nCMD [\"kept\"]\nENTRYPOINT [\"/bin/echo\"]\n",
        "",
    );
    let ours = build_ours(&ex, dir.path(), &df_child).await;
    build_buildkit(dir.path(), &df_child, "dbuild-worker-bk:entrypoint2");
    assert_same(&ours, "dbuild-worker-bk:entrypoint2");
}
