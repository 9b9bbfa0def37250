//! ARG and ENV as BuildKit sees them: ARG defaults that read the base image's ENV, ARGs
//! given by --build-arg over ENV, ENV over an earlier ARG; and the same values when
//! the instructions that set them are reused from cache.

use std::collections::BTreeMap;

use testkit::executor::*;

const GO_BASE: &str = "dbuild-worker-test/goenv:latest";

/// An image with its own ENV (as golang's images have), made by BuildKit from busybox,
/// once per run: rebuilding it under a test would change its id and so every key.
fn go_base(dir: &std::path::Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let df = format!(
            "FROM {BUSYBOX}\nENV GOPATH=/go PATH=/go/bin:/usr/bin:/bin SHADOWED=from-image\n"
        );
        buildkit_base(dir, &df, GO_BASE);
    });
}

fn dockerfile(nonce: &str) -> String {
    format!(
        r#"FROM {GO_BASE}
ENV NONCE={nonce}
WORKDIR $GOPATH/src
ARG SHADOWED=from-arg
ARG DERIVED=${{GOPATH}}-${{SHADOWED}}
ENV FIRST=env-first
ARG FIRST
ARG DEFAULTED=${{FIRST}}-d
ENV LATER=env
ARG LATER=arg
ENV LATER=env-again
ARG FROM_CLI=default
RUN echo "$SHADOWED $DERIVED $FIRST $DEFAULTED $LATER $FROM_CLI $PATH" > seen.txt
ENV COPY_OF_CLI=${{FROM_CLI}} DERIVED_ENV=$DERIVED
LABEL derived=$DERIVED
"#
    )
}

#[tokio::test]
async fn args_and_env_match_buildkit() {
    let ex = executor("targsenv").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    go_base(dir.path());
    let df = dockerfile("1");
    let args = BTreeMap::from([
        ("FROM_CLI".to_string(), "given".to_string()),
        ("FIRST".to_string(), "from-cli".to_string()),
    ]);
    let (tasks, inputs) = tasks_with(&ex, dir.path(), &df, BTreeMap::new(), args).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let ours = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let ours = ours.last().unwrap().image_id.clone();
    build_buildkit_with(
        dir.path(),
        &df,
        "dbuild-worker-bk:argsenv",
        &[
            "--build-arg",
            "FROM_CLI=given",
            "--build-arg",
            "FIRST=from-cli",
        ],
    );
    assert_same(&ours, "dbuild-worker-bk:argsenv");
    let seen = docker(&["run", "--rm", &ours, "cat", "/go/src/seen.txt"]).unwrap();
    assert_eq!(
        seen,
        "from-arg /go-from-arg from-cli from-cli-d env-again given /go/bin:/usr/bin:/bin\n"
    );
}

/// The environment is not in a committed image: reusing the instructions that built it
/// must still give later instructions the same ARG values.
#[tokio::test]
async fn reused_args_still_reach_later_instructions() {
    let ex = executor("targsreuse").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    go_base(dir.path());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    let df = dockerfile(&nonce);
    let args = BTreeMap::from([("FROM_CLI".to_string(), "given".to_string())]);
    let (mut first, inputs) = tasks_with(&ex, dir.path(), &df, BTreeMap::new(), args.clone()).await;
    first[0].no_cache = false;
    let (r, _) = run_all(&ex, &first, &inputs).await;
    let before = r.unwrap().remove(0);
    let df2 = format!("{df}RUN echo \"$DERIVED $FROM_CLI\" > /after.txt\n");
    let (mut second, inputs) = tasks_with(&ex, dir.path(), &df2, BTreeMap::new(), args).await;
    second[0].no_cache = false;
    let (r, lines) = run_all(&ex, &second, &inputs).await;
    let after = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let after = after.last().unwrap().clone();
    assert_eq!(
        after.reused, before.executed,
        "the old instructions are reused"
    );
    assert_eq!(after.executed, 1);
    let out = docker(&["run", "--rm", &after.image_id, "cat", "/after.txt"]).unwrap();
    assert_eq!(out, "/go-from-arg given\n");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}
