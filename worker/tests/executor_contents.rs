//! What keys a COPY --from consumer on content: a stage reports the digest of each path
//! later stages copy from it (never covering mtimes, so a rebuild that made the same file
//! reports the same digest), and a consumer keyed on a digest refuses to copy anything else.

use testkit::executor::*;

#[tokio::test]
async fn contents_ignore_mtimes_and_a_consumer_checks_what_it_copies() {
    let ex = executor("tcontents").await;
    let dir = tempfile::tempdir().unwrap();
    let marker = std::process::id();
    let (tasks, inputs) = tasks(
        &ex,
        dir.path(),
        &format!(
            "FROM alpine:latest AS p\nRUN echo one-{marker} > /out && mkdir -p /d && echo x > /d/x\n\
             FROM alpine:latest\nCOPY --from=p /out /out\nCOPY --from=p /d/ /d/\n"
        ),
        Default::default(),
    )
    .await;
    assert_eq!(tasks[0].digest_paths, ["/d", "/out"]);
    let (first, _) = run_all(&ex, &tasks[..1], &inputs).await;
    let first = first.unwrap().remove(0);
    assert_eq!(first.contents.len(), 2, "{:?}", first.contents);
    // Built again (new mtimes, so another image): the same contents.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (again, _) = run_all(&ex, &tasks[..1], &inputs).await;
    let again = again.unwrap().remove(0);
    assert_eq!(again.contents, first.contents);

    // The consumer keyed on those digests copies; keyed on others, it refuses.
    let mut consumer = tasks[1].clone();
    for ti in &mut consumer.instructions {
        if let Some(model::task::TaskSource::Stage { image_id, .. }) = &mut ti.copy_from {
            *image_id = Some(again.image_id.clone());
        }
    }
    let keyed = |c: &mut model::task::StageTask, out: &str| {
        c.instructions[0].from_contents = [("/out".to_string(), out.to_string())].into();
    };
    keyed(&mut consumer, &first.contents["/out"]);
    let (ok, _) = run_all(&ex, std::slice::from_ref(&consumer), &inputs).await;
    ok.unwrap();
    keyed(&mut consumer, &"0".repeat(64));
    let (bad, _) = run_all(&ex, &[consumer], &inputs).await;
    let err = bad.unwrap_err();
    assert!(
        err.message.contains("is not what this build keyed it on"),
        "{}",
        err.message
    );
}

/// A stage works out the contents of paths its own layers settle without reading its
/// image; those digests must be exactly what reading the image gives, or a cache hit
/// (whose contents are read from the image) would key its consumers differently from the
/// build that made it. A second executor, with nothing cached, reads the image.
#[tokio::test]
async fn contents_from_the_stage_layers_equal_an_image_read() {
    let ex = executor("tlayerread").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ctx.txt"), "from the context\n").unwrap();
    let marker = std::process::id();
    let (tasks, inputs) = tasks(
        &ex,
        dir.path(),
        &format!(
            "FROM alpine:latest AS p\n\
             COPY --chmod=640 ctx.txt /copied/ctx.txt\n\
             RUN echo {marker} > /out && mkdir -p /tree/a/b /tree/empty && echo 1 > /tree/a/one \
               && echo 2 > /tree/a/b/two && chmod 700 /tree/a/b && chown 7:8 /tree/a/one \
               && ln -s a/one /tree/link && mkdir -p /etc/new && echo e > /etc/new/f \
               && ln -s /out /outlink \
               && mkdir -p /dup/bin && ln -s /bin/busybox /dup/bin/sh && touch /dup.stamp\n\
             FROM alpine:latest AS q\n\
             COPY --chown=3000000:3000001 ctx.txt /big/ctx.txt\n\
             FROM alpine:latest\n\
             COPY --from=p /out /copied/ctx.txt /tree /etc/new /outlink /etc/passwd /dup /o/\n\
             COPY --from=q /big/ctx.txt /o/\n"
        ),
        Default::default(),
    )
    .await;
    // `/dup.stamp` sorts between `/dup` and `/dup/bin` as plain strings: the RUN's layer
    // must still hold `/dup` once. An owner past 2^21 is a PAX record in Docker's archives
    // and a base-256 header field in the layer the executor writes.
    let fresh = executor("tlayerread2").await;
    for (task, n) in [(&tasks[0], 7), (&tasks[1], 1)] {
        let paths = task.digest_paths.clone();
        assert_eq!(paths.len(), n, "{paths:?}");
        let (built, _) = run_all(&ex, std::slice::from_ref(task), &inputs).await;
        let built = built.unwrap().remove(0);
        assert_eq!(built.contents.len(), n, "{:?}", built.contents);
        let read = model::task::Executor::contents(&*fresh, &built.image_id, &paths).await;
        assert_eq!(read, built.contents);
    }
}

/// A farm worker turns a stage's exported paths into an image it writes in the
/// background (`load_paths_image`): the consumer reads each path from its archive at
/// once, exactly what its key names, and the image itself still lands on the daemon. The
/// image's own layer is left empty here, so the copy can only have come from the archives.
#[tokio::test]
async fn exported_paths_are_read_ahead_for_the_consumer() {
    let ex = executor("tpathsahead").await;
    let dir = tempfile::tempdir().unwrap();
    let marker = std::process::id();
    let (tasks, inputs) = tasks(
        &ex,
        dir.path(),
        &format!(
            "FROM alpine:latest AS p\nRUN echo ahead-{marker} > /out && mkdir -p /d/e && echo x > /d/e/x\n\
             FROM alpine:latest\nCOPY --from=p /out /out\nCOPY --from=p /d/ /d/\n"
        ),
        Default::default(),
    )
    .await;
    let (built, _) = run_all(&ex, &tasks[..1], &inputs).await;
    let built = built.unwrap().remove(0);
    let archive = |p: &str| ex.cached_path_archive(&built.image_id, p).unwrap();
    let paths = vec![
        ("/out".to_string(), archive("/out")),
        ("/d".to_string(), archive("/d")),
    ];

    let empty_layer = tar::Builder::new(Vec::new()).into_inner().unwrap();
    let reference = format!("dbuild-paths:tpathsahead-{marker}");
    let id = ex
        .load_paths_image(&reference, "linux/amd64", empty_layer, &paths)
        .unwrap();
    let mut consumer = tasks[1].clone();
    for ti in &mut consumer.instructions {
        ti.copy_from = Some(model::task::TaskSource::Image {
            reference: id.clone(),
            id: id.clone(),
        });
    }
    consumer.instructions[0].from_contents =
        [("/out".into(), built.contents["/out"].clone())].into();
    consumer.instructions[1].from_contents = [("/d".into(), built.contents["/d"].clone())].into();
    let (out, _) = run_all(&ex, std::slice::from_ref(&consumer), &inputs).await;
    let out = out.unwrap().remove(0);
    let cat = docker(&["run", "--rm", &out.image_id, "cat", "/out", "/d/e/x"]).unwrap();
    assert_eq!(cat, format!("ahead-{marker}\nx\n"));

    ex.settle(&reference).await.unwrap();
    let on_daemon = docker(&["image", "inspect", "--format", "{{.Id}}", &reference]).unwrap();
    assert_eq!(on_daemon.trim(), id);
    let _ = docker(&["rmi", &reference]);
}
