//! The worker pool's placement under contention, driven as the worker service drives it
//! (register, attach, report) with the real pool and a real index on disk; the test plays
//! the worker. No Docker: the stages are never run, only placed.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coordinator::cache::StageCache;
use coordinator::pool::{Job, Report, WorkerPool};
use coordinator::scheduler::{stage_task, BuildRequest, PinnedImages};
use model::context::ContextManifest;
use model::frontend::parser::parse;
use model::frontend::plan::{plan, PlanOptions, Platform};
use model::keys::{compute_keys, Unresolved};
use model::task::{BuildInputs, EmptyContext, Executor, StageResult};
use tokio_util::sync::CancellationToken;

fn request(stages: usize) -> BuildRequest {
    let src: String = (0..stages)
        .map(|i| format!("FROM scratch AS s{i}\nENV N={i}\n"))
        .collect();
    let p = plan(
        &parse(src.as_bytes()).unwrap(),
        &PlanOptions {
            target: None,
            build_args: BTreeMap::new(),
            platform: Platform::host(),
        },
    )
    .unwrap();
    let keys = compute_keys(&p, &ContextManifest::default(), &Unresolved);
    BuildRequest {
        build_id: "placement".into(),
        plan: Arc::new(p),
        keys: Arc::new(keys),
        pinned: PinnedImages::default(),
        no_cache: true,
        no_cache_stages: Default::default(),
        network: None,
        exports: Default::default(),
    }
}

/// Many stages wait for one worker's one slot; every time it frees, all of them try to
/// take it at once. The worker must never hold more tasks than it has slots. (Before the
/// slot was taken under the same lock as the choice, about one round in five let two
/// stages in; sixteen rounds make a miss of that kind near certain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_is_taken_by_one_stage_at_a_time() {
    for round in 0..16 {
        let most = contended_round().await;
        assert_eq!(
            most, 1,
            "round {round}: a one-slot worker held {most} tasks at once"
        );
    }
}

/// One round: every stage placed and reported; returns the most tasks the worker held.
async fn contended_round() -> usize {
    const STAGES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(StageCache::open(dir.path(), true).unwrap());
    let pool = WorkerPool::new(cache);
    pool.register("w1", "test", 1, Vec::new());
    let mut queue = pool.attach("w1").unwrap();
    // The worker keeps its lease, as a real one does.
    let beat = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            loop {
                pool.heartbeat("w1");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let req = request(STAGES);
    let inputs = BuildInputs {
        manifest: Arc::new(ContextManifest::default()),
        context: Arc::new(EmptyContext),
        secrets: Arc::new(BTreeMap::new()),
    };
    let mut stages = Vec::new();
    for i in 0..STAGES {
        let (pool, task, inputs) = (Arc::clone(&pool), stage_task(&req, i), inputs.clone());
        stages.push(tokio::spawn(async move {
            let (logs, _rx) = tokio::sync::mpsc::unbounded_channel();
            pool.run_stage(task, inputs, logs, CancellationToken::new())
                .await
        }));
    }
    // Play the worker: hold each task a moment (so that every waiting stage is ready to
    // race for the slot when it frees), count what is outstanding, report it done.
    let outstanding = Arc::new(AtomicUsize::new(0));
    let (mut most, mut received) = (0, 0);
    while received < STAGES {
        let Ok(job) = tokio::time::timeout(Duration::from_secs(20), queue.recv()).await else {
            panic!("no task for 20 s; the pool says {:?}", pool.workers())
        };
        let job = job.expect("the queue stays open");
        let Job::Stage(a) = job else {
            panic!("only stage tasks here")
        };
        received += 1;
        most = most.max(outstanding.fetch_add(1, Ordering::SeqCst) + 1);
        // Whatever else was already sent to the worker counts as outstanding too.
        while let Ok(Job::Stage(more)) = queue.try_recv() {
            received += 1;
            most = most.max(outstanding.fetch_add(1, Ordering::SeqCst) + 1);
            finish(&pool, &more, &outstanding);
        }
        tokio::task::yield_now().await;
        finish(&pool, &a, &outstanding);
    }
    for s in stages {
        s.await.unwrap().expect("every stage reported");
    }
    beat.abort();
    most
}

fn finish(pool: &WorkerPool, a: &coordinator::pool::Assignment, outstanding: &AtomicUsize) {
    outstanding.fetch_sub(1, Ordering::SeqCst);
    let result = StageResult {
        stage: a.task.stage,
        key: a.task.key,
        image_id: format!("sha256:{:064x}", a.task.stage),
        executed: 1,
        reused: 0,
        duration: Duration::ZERO,
        command_time: Duration::ZERO,
        size: 0,
        contents: BTreeMap::new(),
    };
    assert!(pool.report(
        "w1",
        a.task_id.as_str(),
        Report {
            outcome: Ok(result),
            artifacts: Vec::new(),
        }
    ));
}
