//! Scheduler simulation: a simulated executor (sleeps instead of Docker) checks the
//! scheduling rules alone — concurrency, slot limits, dependency order, failure and cancel.
//! The real executor is tested against a real daemon in the worker crate and end to end.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::scheduler::{BuildError, BuildEvent, BuildRequest, PinnedImages, Scheduler};
use model::context::ContextManifest;
use model::frontend::parser::parse;
use model::frontend::plan::{plan, PlanOptions, Platform};
use model::keys::{compute_keys, StageKey, Unresolved};
use model::task::{
    BuildInputs, EmptyContext, Executor, StageError, StageLog, StageResult, StageTask,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sleeps `ms` per stage (by name), fails stages named `fail*`, records what overlapped.
#[derive(Default)]
struct SimulatedExecutor {
    ms: BTreeMap<String, u64>,
    running: Mutex<BTreeSet<usize>>,
    max_parallel: Mutex<usize>,
    started: Mutex<Vec<usize>>,
    cleaned_up: Mutex<Vec<usize>>,
    present: Mutex<BTreeSet<StageKey>>,
    /// What every stage reports as the content of each path read from it.
    contents: Mutex<BTreeMap<String, String>>,
}

impl SimulatedExecutor {
    fn contents_of(&self, paths: &[String]) -> BTreeMap<String, String> {
        let c = self.contents.lock().unwrap();
        paths
            .iter()
            .filter_map(|p| Some((p.clone(), c.get(p)?.clone())))
            .collect()
    }
}

#[async_trait::async_trait]
impl Executor for SimulatedExecutor {
    fn name(&self) -> &str {
        "sim"
    }
    async fn resolve_image(&self, r: &str, _: bool) -> Result<String, StageError> {
        Ok(format!("sha256:{r}"))
    }
    async fn stage_image(&self, key: &StageKey) -> Option<String> {
        self.present
            .lock()
            .unwrap()
            .contains(key)
            .then(|| format!("img-{key}"))
    }
    async fn contents(&self, _: &str, paths: &[String]) -> BTreeMap<String, String> {
        self.contents_of(paths)
    }
    async fn run_stage(
        &self,
        task: StageTask,
        _: BuildInputs,
        logs: mpsc::UnboundedSender<StageLog>,
        cancel: CancellationToken,
    ) -> Result<StageResult, StageError> {
        let name = task.display_name();
        {
            let mut r = self.running.lock().unwrap();
            r.insert(task.stage);
            let mut m = self.max_parallel.lock().unwrap();
            *m = (*m).max(r.len());
            self.started.lock().unwrap().push(task.stage);
        }
        let _ = logs.send(StageLog {
            stage: task.stage,
            line: format!("hello from {name}"),
            placed_on: None,
        });
        let ms = self.ms.get(&name).copied().unwrap_or(50);
        let outcome = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                if name.starts_with("fail") {
                    Err(StageError { line: Some(1), log_tail: vec!["boom".into()], ..StageError::new("exit code 1") })
                } else {
                    self.present.lock().unwrap().insert(task.key);
                    Ok(StageResult {
                        contents: self.contents_of(&task.digest_paths),
                        size: 0,
                        stage: task.stage,
                        key: task.key,
                        image_id: format!("img-{}", task.key),
                        executed: task.instructions.len(),
                        reused: 0,
                        duration: Duration::from_millis(ms),
                        command_time: Duration::from_millis(ms),
                    })
                }
            }
            _ = cancel.cancelled() => Err(StageError::cancelled()),
        };
        self.running.lock().unwrap().remove(&task.stage);
        self.cleaned_up.lock().unwrap().push(task.stage);
        outcome
    }
}

fn request(src: &str, target: Option<&str>) -> BuildRequest {
    request_with(src, target, &[])
}

fn request_with(src: &str, target: Option<&str>, args: &[(&str, &str)]) -> BuildRequest {
    let df = parse(src.as_bytes()).unwrap();
    let p = plan(
        &df,
        &PlanOptions {
            target: target.map(str::to_string),
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            platform: Platform::host(),
        },
    )
    .unwrap();
    let keys = compute_keys(&p, &ContextManifest::default(), &Unresolved);
    BuildRequest {
        build_id: "sim".into(),
        plan: Arc::new(p),
        keys: Arc::new(keys),
        pinned: PinnedImages::default(),
        no_cache: false,
        no_cache_stages: Default::default(),
        network: None,
        exports: Default::default(),
    }
}

fn inputs() -> BuildInputs {
    BuildInputs {
        manifest: Arc::new(ContextManifest::default()),
        context: Arc::new(EmptyContext),
        secrets: Arc::new(BTreeMap::new()),
    }
}

async fn run(
    exec: Arc<SimulatedExecutor>,
    jobs: usize,
    req: &BuildRequest,
    cancel: CancellationToken,
) -> (
    Result<coordinator::scheduler::BuildOutcome, BuildError>,
    Vec<BuildEvent>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let r = Scheduler::new(exec, jobs)
        .run(req, inputs(), tx, cancel)
        .await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (r, events)
}

const FANOUT: &str = "FROM alpine AS a\nRUN a\nFROM alpine AS b\nRUN b\nFROM alpine AS c\nRUN c\nFROM alpine AS d\nRUN d\nFROM alpine\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\nCOPY --from=d /d /d\n";

#[tokio::test]
async fn independent_stages_run_at_the_same_time() {
    let exec = Arc::new(SimulatedExecutor {
        ms: ["a", "b", "c", "d"]
            .iter()
            .map(|n| (n.to_string(), 200))
            .collect(),
        ..Default::default()
    });
    let req = request(FANOUT, None);
    let t = Instant::now();
    let (r, events) = run(Arc::clone(&exec), 8, &req, CancellationToken::new()).await;
    let outcome = r.unwrap();
    assert_eq!(*exec.max_parallel.lock().unwrap(), 4);
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(outcome.target, 4);
    assert_eq!(
        exec.started.lock().unwrap().last(),
        Some(&4),
        "the final stage waits for all"
    );
    // Every stage's log precedes its result, and the build ends with build_finished.
    let pos = |f: &dyn Fn(&BuildEvent) -> bool| events.iter().position(f).unwrap();
    let log0 = pos(&|e| matches!(e, BuildEvent::Log { stage: 0, .. }));
    let fin0 = pos(&|e| matches!(e, BuildEvent::StageFinished { stage: 0, .. }));
    assert!(log0 < fin0);
    assert!(matches!(
        events.last(),
        Some(BuildEvent::BuildFinished {
            ok: true,
            stage: 4,
            ..
        })
    ));
}

#[tokio::test]
async fn slots_limit_parallelism() {
    let exec = Arc::new(SimulatedExecutor::default());
    let req = request(FANOUT, None);
    let (r, _) = run(Arc::clone(&exec), 2, &req, CancellationToken::new()).await;
    r.unwrap();
    assert_eq!(*exec.max_parallel.lock().unwrap(), 2);
}

#[tokio::test]
async fn only_stages_the_target_needs_are_built() {
    let exec = Arc::new(SimulatedExecutor::default());
    let src =
        "FROM alpine AS base\nFROM base AS fail-unused\nRUN false\nFROM base AS app\nRUN ok\n";
    let req = request(src, Some("app"));
    let (r, _) = run(Arc::clone(&exec), 4, &req, CancellationToken::new()).await;
    r.unwrap();
    let started: BTreeSet<usize> = exec.started.lock().unwrap().iter().copied().collect();
    assert_eq!(started, BTreeSet::from([0, 2]));
}

#[tokio::test]
async fn critical_path_goes_first() {
    // With one slot, the stage that heads the longest chain starts before the short one.
    let src = "FROM alpine AS short\nRUN s\nFROM alpine AS long1\nRUN l\nFROM long1 AS long2\nRUN l\nFROM long2\nCOPY --from=short /s /s\n";
    let exec = Arc::new(SimulatedExecutor::default());
    let (r, _) = run(
        Arc::clone(&exec),
        1,
        &request(src, None),
        CancellationToken::new(),
    )
    .await;
    r.unwrap();
    assert_eq!(exec.started.lock().unwrap()[0], 1);
}

#[tokio::test]
async fn first_failure_cancels_the_running_stages() {
    let src = "FROM alpine AS fail-fast\nRUN x\nFROM alpine AS slow\nRUN y\nFROM alpine\nCOPY --from=fail-fast /a /a\nCOPY --from=slow /b /b\n";
    let exec = Arc::new(SimulatedExecutor {
        ms: BTreeMap::from([("fail-fast".into(), 50), ("slow".into(), 10_000)]),
        ..Default::default()
    });
    let t = Instant::now();
    let (r, events) = run(
        Arc::clone(&exec),
        4,
        &request(src, None),
        CancellationToken::new(),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "slow stage was not cancelled"
    );
    match r {
        Err(BuildError::Stage { name, error, .. }) => {
            assert_eq!(name, "fail-fast");
            assert_eq!(error.log_tail, vec!["boom"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        exec.cleaned_up.lock().unwrap().len(),
        2,
        "every started stage cleaned up"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, BuildEvent::StageFailed { stage: 0, .. })));
    assert!(
        !exec.started.lock().unwrap().contains(&2),
        "the final stage never started"
    );
    assert!(matches!(
        events.last(),
        Some(BuildEvent::BuildFinished { ok: false, .. })
    ));
}

#[tokio::test]
async fn cancel_stops_everything_and_waits_for_cleanup() {
    let exec = Arc::new(SimulatedExecutor {
        ms: ["a", "b", "c", "d"]
            .iter()
            .map(|n| (n.to_string(), 10_000))
            .collect(),
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.cancel();
    });
    let (r, _) = run(Arc::clone(&exec), 8, &request(FANOUT, None), cancel).await;
    assert!(matches!(r, Err(BuildError::Cancelled)), "{r:?}");
    assert_eq!(exec.cleaned_up.lock().unwrap().len(), 4);
    assert!(exec.running.lock().unwrap().is_empty());
}

#[tokio::test]
async fn stages_already_built_are_cached() {
    let exec = Arc::new(SimulatedExecutor::default());
    let req = request(FANOUT, None);
    run(Arc::clone(&exec), 4, &req, CancellationToken::new())
        .await
        .0
        .unwrap();
    exec.started.lock().unwrap().clear();
    let (r, events) = run(Arc::clone(&exec), 4, &req, CancellationToken::new()).await;
    let outcome = r.unwrap();
    assert!(exec.started.lock().unwrap().is_empty());
    assert_eq!(outcome.cached.len(), 5);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, BuildEvent::StageCached { .. }))
            .count(),
        5
    );
    // --no-cache runs everything again.
    let no_cache = BuildRequest {
        no_cache: true,
        no_cache_stages: Default::default(),
        ..req
    };
    run(Arc::clone(&exec), 4, &no_cache, CancellationToken::new())
        .await
        .0
        .unwrap();
    assert_eq!(exec.started.lock().unwrap().len(), 5);
}

/// BuildKit's content-based reuse: a `COPY --from` consumer is keyed on what it copies, so
/// a rebuilt source stage that produced the same file leaves its consumer cached, and one
/// that produced another file does not.
#[tokio::test]
async fn a_consumer_is_keyed_on_the_content_it_copies() {
    const DF: &str = "FROM alpine AS a\nARG V\nRUN make $V\nFROM alpine\nCOPY --from=a /out /out\n";
    let exec = Arc::new(SimulatedExecutor::default());
    exec.contents
        .lock()
        .unwrap()
        .insert("/out".into(), "digest-1".into());
    let req = |v| request_with(DF, None, &[("V", v)]);
    assert_eq!(
        model::keys::content_paths(&req("1").plan)
            .get(&0)
            .map(|p| p.iter().cloned().collect::<Vec<_>>()),
        Some(vec!["/out".to_string()])
    );
    let first = run(Arc::clone(&exec), 2, &req("1"), CancellationToken::new())
        .await
        .0
        .unwrap();
    assert_ne!(
        first.keys[1].key,
        req("1").keys[1].key,
        "the consumer is re-keyed on the content"
    );
    // Stage a's input changed, its output did not: only a runs.
    exec.started.lock().unwrap().clear();
    let second = run(Arc::clone(&exec), 2, &req("2"), CancellationToken::new())
        .await
        .0
        .unwrap();
    assert_eq!(*exec.started.lock().unwrap(), vec![0]);
    assert_eq!(second.cached, BTreeSet::from([1]));
    assert_eq!(second.target_key, first.target_key);
    // Its output changed too: the consumer runs again.
    exec.contents
        .lock()
        .unwrap()
        .insert("/out".into(), "digest-2".into());
    exec.started.lock().unwrap().clear();
    let third = run(Arc::clone(&exec), 2, &req("3"), CancellationToken::new())
        .await
        .0
        .unwrap();
    assert_eq!(*exec.started.lock().unwrap(), vec![0, 1]);
    assert_ne!(third.target_key, first.target_key);
}
