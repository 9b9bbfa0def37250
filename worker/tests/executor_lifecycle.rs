//! Failure, cancellation, per-instruction reuse, mounts, heredocs and image resolution.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use model::task::{Executor, StageLog};
use testkit::executor::*;
use tokio_util::sync::CancellationToken;

fn nonce() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn failing_run_reports_exit_code_line_and_tail() {
    let ex = executor("tfail").await;
    let dir = tempfile::tempdir().unwrap();
    let df = format!(
        "FROM {BUSYBOX}\nENV N={}\nRUN echo before; echo err >&2; exit 3\n",
        nonce()
    );
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, BTreeMap::new()).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let e = r.expect_err("the RUN fails");
    assert!(e.message.contains("exit code: 3"), "{e:?}");
    assert_eq!(e.line, Some(3));
    assert!(!e.cancelled);
    assert!(e.log_tail.iter().any(|l| l == "before"), "{e:?}");
    assert!(e.log_tail.iter().any(|l| l == "err"), "{e:?}");
    assert!(lines.iter().any(|l| l == "before"), "{lines:?}");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn cancel_kills_the_run_and_cleans_up() {
    let ex = executor("tcancel").await;
    let dir = tempfile::tempdir().unwrap();
    let df = format!("FROM {BUSYBOX}\nENV N={}\nRUN sleep 60\n", nonce());
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, BTreeMap::new()).await;
    let cancel = CancellationToken::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel::<StageLog>();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c2.cancel();
    });
    let started = Instant::now();
    let r = ex.run_stage(tasks[0].clone(), inputs, tx, cancel).await;
    let e = r.expect_err("cancelled");
    assert!(e.cancelled, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn unchanged_prefix_is_reused() {
    let ex = executor("treuse").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(dir.path(), &[("a.txt", 0o644, b"a")]);
    let df = format!(
        "FROM {BUSYBOX}\nENV N={}\nCOPY a.txt /a\nRUN cat /a > /b\nLABEL l=1\n",
        nonce()
    );
    let (mut tasks, inputs) = tasks(&ex, dir.path(), &df, BTreeMap::new()).await;
    tasks[0].no_cache = false;
    let (first, _) = run_all(&ex, &tasks, &inputs).await;
    let first = first.unwrap().remove(0);
    assert_eq!((first.executed, first.reused), (4, 0));
    assert!(first.command_time > Duration::ZERO);
    let (second, _) = run_all(&ex, &tasks, &inputs).await;
    let second = second.unwrap().remove(0);
    assert_eq!((second.executed, second.reused), (0, 4));
    assert_eq!(first.image_id, second.image_id);
    assert_eq!(
        ex.stage_image(&tasks[0].key).await,
        Some(first.image_id.clone())
    );
    // Changing the last instruction reuses the first three.
    let df2 = df.replace("LABEL l=1", "LABEL l=2");
    let (mut tasks2, inputs2) =
        testkit::executor::tasks(&ex, dir.path(), &df2, BTreeMap::new()).await;
    tasks2[0].no_cache = false;
    let (third, _) = run_all(&ex, &tasks2, &inputs2).await;
    let third = third.unwrap().remove(0);
    assert_eq!((third.executed, third.reused), (1, 3));
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--network=none",
            &third.image_id,
            "cat",
            "/b"
        ])
        .unwrap(),
        "a"
    );
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
}

#[tokio::test]
async fn mounts_and_heredocs_behave_like_buildkit() {
    let ex = executor("tmounts").await;
    let dir = tempfile::tempdir().unwrap();
    write_context(
        dir.path(),
        &[("docs/", 0o755, b""), ("docs/one.md", 0o644, b"one")],
    );
    let df = format!(
        r#"FROM {BUSYBOX} AS src
RUN mkdir /out && echo from-stage > /out/f
FROM {BUSYBOX}
RUN --mount=type=cache,target=/cache sh -c 'echo x >> /cache/count; wc -l < /cache/count > /count'
RUN --mount=type=secret,id=tok cat /run/secrets/tok > /tok-copy
RUN --mount=type=secret,id=absent ls /run/secrets > /absent || true
RUN --mount=type=tmpfs,target=/scratch sh -c 'echo t > /scratch/t && cat /scratch/t > /tmpfs-ok'
RUN --mount=type=bind,source=docs,target=/docs cat /docs/one.md > /bound
RUN --mount=type=bind,from=src,source=/out,target=/mnt cat /mnt/f > /from-stage
RUN <<EOF
echo heredoc > /heredoc
echo two >> /heredoc
EOF
RUN <<EOF
#!/bin/sh
echo "shebang $0" > /shebang
EOF
"#
    );
    let mut secrets = BTreeMap::new();
    secrets.insert("tok".to_string(), b"s3cret".to_vec());
    let (tasks, inputs) = tasks(&ex, dir.path(), &df, secrets.clone()).await;
    let (r, lines) = run_all(&ex, &tasks, &inputs).await;
    let results = r.unwrap_or_else(|e| panic!("{e:?}\n{}", lines.join("\n")));
    let img = &results.last().unwrap().image_id;
    let cat = |p: &str| docker(&["run", "--rm", "--network=none", img, "cat", p]).unwrap();
    assert_eq!(cat("/count").trim(), "1");
    assert_eq!(cat("/tok-copy"), "s3cret");
    assert_eq!(cat("/tmpfs-ok"), "t\n");
    assert_eq!(cat("/bound"), "one");
    assert_eq!(cat("/from-stage"), "from-stage\n");
    assert_eq!(cat("/heredoc"), "heredoc\ntwo\n");
    assert_eq!(cat("/shebang"), "shebang /dev/pipes/EOF\n");
    let ls = docker(&[
        "run",
        "--rm",
        img,
        "ls",
        "-a",
        "/run/secrets",
        "/scratch",
        "/docs",
        "/mnt",
    ])
    .unwrap_or_default();
    assert!(
        !ls.contains("tok") && !ls.contains("one.md"),
        "mount contents leaked: {ls}"
    );
    // The cache volume outlives the build; a second build sees it.
    let (r, _) = run_all(&ex, &tasks, &inputs).await;
    let img = r.unwrap().last().unwrap().image_id.clone();
    assert_eq!(
        docker(&["run", "--rm", "--network=none", &img, "cat", "/count"])
            .unwrap()
            .trim(),
        "2"
    );
    // A required secret that is missing fails the RUN.
    let df2 =
        format!("FROM {BUSYBOX}\nRUN --mount=type=secret,id=nope,required cat /run/secrets/nope\n");
    let (t2, i2) = testkit::executor::tasks(&ex, dir.path(), &df2, BTreeMap::new()).await;
    let e = run_all(&ex, &t2, &i2).await.0.expect_err("missing secret");
    assert!(e.message.contains("nope"), "{e:?}");
    assert!(
        leftovers(&ex).await.is_empty(),
        "{:?}",
        leftovers(&ex).await
    );
    // Remove only this test's cache volume (named after the executor and the cache id).
    let hash = model::digest::BlobDigest::of(format!("{}\0/cache", ex.name_prefix()).as_bytes());
    let volume = format!("dbuild-cache-{}", &hash.to_hex()[..32]);
    docker(&["volume", "rm", &volume]).expect("the cache volume exists");
}

#[tokio::test]
async fn missing_image_error_says_how_to_provide_it() {
    let ex = executor("tresolve").await;
    let e = ex
        .resolve_image("dbuild-worker-test/absent:1", false)
        .await
        .expect_err("absent");
    assert!(e.message.contains("dbuild-worker-test/absent:1"), "{e:?}");
    assert!(
        e.message.contains("docker load") && e.message.contains("docker tag"),
        "{e:?}"
    );
    let id = ex.resolve_image(BUSYBOX, false).await.unwrap();
    assert!(id.starts_with("sha256:"));
    assert!(ex.resolve_image("scratch", false).await.is_err());
}

#[tokio::test]
async fn pull_failure_fails_the_resolve() {
    let ex = executor("tpullfail").await;
    // This image exists only on the daemon: with --pull the registry must be asked, and
    // with none reachable (or no such repository) that is an error, not the local copy.
    let e = ex
        .resolve_image(BUSYBOX, true)
        .await
        .expect_err("--pull without the image in a registry");
    assert!(e.message.contains(BUSYBOX), "{e:?}");
    assert!(e.message.contains("--pull"), "{e:?}");
    assert!(ex.resolve_image(BUSYBOX, false).await.is_ok());
}
