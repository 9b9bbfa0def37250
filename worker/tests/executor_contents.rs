//! What keys a COPY --from consumer on content: a stage reports the digest of each path
//! later stages copy from it (never covering mtimes, so a rebuild that made the same file
//! reports the same digest), and a consumer keyed on a digest refuses to copy anything else.
mod common;

use common::*;

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
        if let Some(coordinator::task::TaskSource::Stage { image_id, .. }) = &mut ti.copy_from {
            *image_id = Some(again.image_id.clone());
        }
    }
    let keyed = |c: &mut coordinator::task::StageTask, out: &str| {
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
