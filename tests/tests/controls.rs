//! Controls over running work, on the embedded broker: time limits, retry-later with Go's
//! semantics, Go's worker handlers, and the task options `#[task]` carries. Each test uses its
//! own broker; runs are counted per tag, never inferred.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::backend::ResultBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::wire::{self, State};
use machinery::{task, Config, Server, TaskError, WorkerBuilder};

const WAIT: Duration = Duration::from_secs(15);

/// Runs and finishes of the test tasks, by tag.
static RUNS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
static FINISHED: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

fn bump(map: &Mutex<Option<HashMap<String, usize>>>, tag: &str) -> usize {
    let mut map = map.lock().unwrap();
    let n = map
        .get_or_insert_with(HashMap::new)
        .entry(tag.to_owned())
        .or_default();
    *n += 1;
    *n
}

fn count(map: &Mutex<Option<HashMap<String, usize>>>, tag: &str) -> usize {
    map.lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(tag).copied())
        .unwrap_or(0)
}

// ---- tasks ----

/// Sleeps `ms` in an async body.
#[task]
async fn ctl_nap(tag: String, ms: u64) -> u64 {
    bump(&RUNS, &tag);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    bump(&FINISHED, &tag);
    ms
}

/// Sleeps `ms` on its thread.
#[task]
fn ctl_block(tag: String, ms: u64) -> u64 {
    bump(&RUNS, &tag);
    std::thread::sleep(Duration::from_millis(ms));
    bump(&FINISHED, &tag);
    ms
}

/// An async body with the time limit in its attribute.
#[task(timeout = "300ms")]
async fn ctl_limited(tag: String, ms: u64) -> u64 {
    bump(&RUNS, &tag);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    bump(&FINISHED, &tag);
    ms
}

/// Returns `x + 1`, counted.
#[task]
fn ctl_next(tag: String, #[chained] x: u64) -> u64 {
    bump(&RUNS, &tag);
    x + 1
}

/// An error callback: records the error under the tag.
#[task]
fn ctl_errback(#[error_message] error: String, tag: String) -> String {
    bump(&RUNS, &tag);
    ERRORS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(tag, error.clone());
    error
}

static ERRORS: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn error_of(tag: &str) -> Option<String> {
    ERRORS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(tag).cloned())
}

/// Asks to be retried later (after `ms`) until it has run `times` times, then returns the
/// number of runs.
#[task]
async fn ctl_later(tag: String, times: u64, ms: u64) -> Result<u64, TaskError> {
    let n = bump(&RUNS, &tag) as u64;
    if n < times {
        return Err(TaskError::retry_in("not yet", Duration::from_millis(ms)));
    }
    Ok(n)
}

/// `ctl_later` with a bound in its attribute.
#[task(max_retry_later = 2)]
async fn ctl_later_bounded(tag: String) -> Result<u64, TaskError> {
    bump(&RUNS, &tag);
    Err(TaskError::retry_in("still not", Duration::from_millis(10)))
}

/// Fails with an ordinary error until it has run `times` times.
#[task]
fn ctl_flaky(tag: String, times: u64) -> Result<u64, String> {
    let n = bump(&RUNS, &tag) as u64;
    if n < times {
        return Err(format!("failure {n}"));
    }
    Ok(n)
}

/// Every option the attribute takes.
#[task(
    retries = 4,
    retry_timeout = "2s",
    timeout = "1m30s",
    rate_limit = "50/s",
    queue = "ctl_elsewhere",
    priority = 7,
    max_retry_later = 9
)]
fn ctl_optioned(a: u64) -> u64 {
    a
}

// ---- helpers ----

fn config(name: &str) -> Config {
    Config::builder()
        .broker(format!("memory://ctl-{name}"))
        .requeue_delay(Duration::from_millis(50))
        .eta_tolerance(Duration::from_millis(20))
        .build()
        .unwrap()
}

async fn server(name: &str) -> Server {
    Server::new(config(name)).await.unwrap()
}

async fn final_state(server: &Server, uuid: &str) -> wire::TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(deadline))
        .await
        .unwrap()
}

async fn spawn(builder: WorkerBuilder) -> machinery::WorkerHandle {
    builder.spawn().await.unwrap()
}

// ---- time limits ----

#[tokio::test(flavor = "multi_thread")]
async fn an_async_body_past_its_limit_is_cancelled_and_fails() {
    let server = server("tl-async").await;
    let worker = spawn(server.worker().concurrency(1)).await;
    let started = Instant::now();
    let r = server
        .send(
            ctl_nap::signature("tl-async".into(), 30_000).with_timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.starts_with("time limit exceeded"),
        "{}",
        state.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Cancelled: it never reached its end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (count(&RUNS, "tl-async"), count(&FINISHED, "tl-async")),
        (1, 0)
    );
    // The slot is free again (concurrency 1): the next task runs.
    let next = server
        .send(ctl_nap::signature("tl-async-next".into(), 1))
        .await
        .unwrap();
    assert_eq!(next.get_timeout(WAIT).await.unwrap(), 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocking_body_past_its_limit_fails_and_frees_its_slot() {
    let server = server("tl-sync").await;
    let worker = spawn(server.worker().concurrency(1)).await;
    let r = server
        .send(
            ctl_block::signature("tl-sync".into(), 1_500).with_timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.starts_with("time limit exceeded"),
        "{}",
        state.error
    );
    // The slot is free while the abandoned thread still sleeps.
    let next = server
        .send(ctl_nap::signature("tl-sync-next".into(), 1))
        .await
        .unwrap();
    assert_eq!(
        next.get_timeout(Duration::from_millis(1_000))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        count(&FINISHED, "tl-sync"),
        0,
        "the blocking body is still running"
    );
    // The thread runs to its end; its result is discarded.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(count(&FINISHED, "tl-sync"), 1);
    assert_eq!(
        final_state(&server, r.task_uuid()).await.state,
        State::Failure
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_chain_link_takes_the_on_error_path() {
    let server = server("tl-chain").await;
    let worker = spawn(server.worker()).await;
    let chain = ctl_nap::signature("tl-chain-1".into(), 1)
        .then(ctl_next::signature("tl-chain-2".into()))
        .then(
            ctl_nap::signature("tl-chain-3".into(), 30_000)
                .with_timeout(Duration::from_millis(200)),
        )
        .then(ctl_next::signature("tl-chain-4".into()))
        .on_error(ctl_errback::signature("tl-chain-err".into()));
    let uuids = chain.task_uuids().to_vec();
    server.send(chain).await.unwrap();
    let state = final_state(&server, &uuids[2]).await;
    assert_eq!(state.state, State::Failure, "{}", state.error);
    let deadline = Instant::now() + WAIT;
    while error_of("tl-chain-err").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = error_of("tl-chain-err").expect("the OnError callback ran");
    assert!(error.starts_with("time limit exceeded"), "{error}");
    assert_eq!(count(&RUNS, "tl-chain-4"), 0, "the chain stopped");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limit_comes_from_the_task_then_the_worker_and_travels_in_the_headers() {
    let server = server("tl-layers").await;
    let worker = spawn(server.worker().default_timeout(Duration::from_millis(250))).await;
    // The task's own limit (300 ms).
    let a = server
        .send(ctl_limited::signature("tl-task".into(), 30_000))
        .await
        .unwrap();
    // The worker's default (250 ms).
    let b = server
        .send(ctl_nap::signature("tl-worker".into(), 30_000))
        .await
        .unwrap();
    // A message from any producer (Go's, say) with the header: the Rust worker enforces it.
    let mut raw = wire::Signature::new("ctl_nap");
    raw.args
        .push(machinery::value::encode_arg(&"tl-header".to_owned()).unwrap());
    raw.args
        .push(machinery::value::encode_arg(&30_000u64).unwrap());
    raw.headers
        .insert(machinery::options::TIMEOUT_HEADER.into(), 100.into());
    let c = raw.uuid.clone();
    server.send_wire(raw).await.unwrap();
    for uuid in [a.task_uuid(), b.task_uuid(), c.as_str()] {
        let state = final_state(&server, uuid).await;
        assert_eq!(state.state, State::Failure, "{uuid}");
        assert!(
            state.error.starts_with("time limit exceeded"),
            "{}",
            state.error
        );
    }
    // A signature's own limit beats the worker's default.
    let d = server
        .send(ctl_nap::signature("tl-sig".into(), 400).with_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(d.get_timeout(WAIT).await.unwrap(), 400);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_task_with_retries_is_retried() {
    let server = server("tl-retry").await;
    let worker = spawn(server.worker()).await;
    let r = server
        .send(
            ctl_nap::signature("tl-retry".into(), 30_000)
                .with_timeout(Duration::from_millis(100))
                .with_retries(1),
        )
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert_eq!(state.state, State::Failure);
    assert_eq!(
        count(&RUNS, "tl-retry"),
        2,
        "one retry after the first timeout"
    );
    worker.shutdown().await.unwrap();
}

// ---- retry-later (Go's ErrRetryTaskLater) ----

#[tokio::test(flavor = "multi_thread")]
async fn retry_later_needs_no_retry_count_and_uses_none() {
    let server = server("rl-zero").await;
    let worker = spawn(server.worker()).await;
    // RetryCount 0: Go's worker still retries an ErrRetryTaskLater (v2/worker.go, Process).
    let r = server
        .send(ctl_later::signature("rl-zero".into(), 3, 50))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    // RetryCount 1: two retry-laters leave it untouched, so an ordinary failure can still
    // be retried.
    let r = server
        .send(ctl_later::signature("rl-one".into(), 3, 50).with_retries(1))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    let state = r.state().await.unwrap().unwrap();
    assert_eq!(state.state, State::Success);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_later_is_bounded_by_max_retry_later() {
    let server = server("rl-bound").await;
    let worker = spawn(server.worker().max_retry_later(5)).await;
    // The task's bound (2) beats the worker's (5): three runs, then FAILURE.
    let r = server
        .send(ctl_later_bounded::signature("rl-task".into()))
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.contains("max_retry_later is 2"),
        "{}",
        state.error
    );
    assert_eq!(count(&RUNS, "rl-task"), 3);
    // The signature's bound beats both.
    let r = server
        .send(ctl_later::signature("rl-sig".into(), 100, 10).with_max_retry_later(1))
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert!(
        state.error.contains("max_retry_later is 1"),
        "{}",
        state.error
    );
    assert_eq!(count(&RUNS, "rl-sig"), 2);
    // The worker's bound applies when neither sets one.
    let r = server
        .send(ctl_later::signature("rl-worker".into(), 100, 10))
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert!(
        state.error.contains("max_retry_later is 5"),
        "{}",
        state.error
    );
    assert_eq!(count(&RUNS, "rl-worker"), 6);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fibonacci_retries_stay_as_go_has_them() {
    let server = server("rl-fib").await;
    let worker = spawn(server.worker()).await;
    let started = Instant::now();
    let r = server
        .send(ctl_flaky::signature("rl-fib".into(), 3).with_retries(2))
        .await
        .unwrap();
    // Waits FibonacciNext(0) = 1 s, then FibonacciNext(1) = 2 s.
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(2_900),
        "{:?}",
        started.elapsed()
    );
    // With its retries used up it fails.
    let r = server
        .send(ctl_flaky::signature("rl-fib-out".into(), 9).with_retries(1))
        .await
        .unwrap();
    let state = final_state(&server, r.task_uuid()).await;
    assert_eq!(
        (state.state, count(&RUNS, "rl-fib-out")),
        (State::Failure, 2)
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_later_whose_state_write_fails_is_not_lost() {
    let memory = MemoryBroker::open("ctl-rl-fault", "machinery_tasks", "machinery_task");
    let backend = FaultyBackend::new(Arc::new(MemoryBackend::open(
        "ctl-rl-fault",
        Duration::from_secs(3600),
    )));
    let backend = Arc::new(backend);
    let server = Server::from_parts(
        config("rl-fault"),
        Arc::new(memory),
        Some(backend.clone() as Arc<dyn ResultBackend>),
    );
    let worker = spawn(server.worker()).await;
    // The RETRY write fails once: the delivery is handed back and the task still finishes.
    backend.arm(BackendOp::SetState, Fault::once().on_state(State::Retry));
    let r = server
        .send(ctl_later::signature("rl-fault".into(), 2, 10))
        .await
        .unwrap();
    assert!(r.get_timeout(WAIT).await.unwrap() >= 2);
    worker.shutdown().await.unwrap();
}

// ---- placement: in place while the worker's task has time to spare ----

type TaskIds = (Option<tokio::task::Id>, Option<tokio::task::Id>);

/// The Tokio task each [`note_task`] body ran on, before and after it waited once, by set.
static TASK_IDS: Mutex<Vec<(String, TaskIds)>> = Mutex::new(Vec::new());

/// Notes the Tokio task its body runs on, waits once (`wait`), and notes it again, in `set`.
#[task]
async fn note_task(set: String, wait: bool) {
    let before = tokio::task::try_id();
    if wait {
        tokio::task::yield_now().await;
    }
    TASK_IDS
        .lock()
        .unwrap()
        .push((set, (before, tokio::task::try_id())));
}

/// The task ids [`note_task`] noted in `set`, taken out.
fn task_ids(set: &str) -> Vec<TaskIds> {
    let mut all = TASK_IDS.lock().unwrap();
    let (these, others) = std::mem::take(&mut *all)
        .into_iter()
        .partition::<Vec<_>, _>(|(s, _)| s == set);
    *all = others;
    these.into_iter().map(|(_, ids)| ids).collect()
}

/// Runs `n` [`note_task`]s in `set`, one at a time, 20 ms apart; the task ids they noted.
async fn one_at_a_time(server: &Server, set: &str, wait: bool, n: usize) -> Vec<TaskIds> {
    for _ in 0..n {
        let r = server
            .send(note_task::signature(set.into(), wait))
            .await
            .unwrap();
        r.get_timeout(WAIT).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task_ids(set)
}

/// By default a quick async body runs in place: on the worker's own task, with no task of its
/// own per delivery. The tasks come one at a time, 20 ms apart, over several of the worker's
/// 50 ms windows: its task has time to spare. A body that waits goes on as a task of its own.
/// (A pass over the deliveries in place that the OS holds up past its 2 ms budget sends the
/// body it starts to a task of its own: most bodies, not all, are counted on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_quick_bodies_run_on_the_workers_task_and_go_on_their_own_when_they_wait() {
    let server = server("placement-quick").await;
    let worker = spawn(server.worker()).await;
    let quick = one_at_a_time(&server, "quick", false, 8).await;
    let waited = one_at_a_time(&server, "waits", true, 3).await;
    worker.shutdown().await.unwrap();
    assert_eq!(quick.len(), 8);
    // The worker's task: the one most bodies ran on.
    let mut counts: HashMap<tokio::task::Id, usize> = HashMap::new();
    for &(before, after) in &quick {
        assert!(before.is_some(), "a body runs on a Tokio task");
        assert_eq!(
            before, after,
            "a body that does not wait stays where it started"
        );
        *counts.entry(before.unwrap()).or_default() += 1;
    }
    let (worker_task, on_it) = counts.into_iter().max_by_key(|&(_, n)| n).unwrap();
    assert!(
        on_it >= 6,
        "only {on_it} of 8 quick bodies ran on the worker's task: {quick:?}"
    );
    assert_eq!(waited.len(), 3);
    let in_place: Vec<_> = waited
        .iter()
        .filter(|(before, _)| *before == Some(worker_task))
        .collect();
    assert!(
        !in_place.is_empty(),
        "no waiting body took its first poll on the worker's task: {waited:?}"
    );
    for (_, after) in in_place {
        assert_ne!(
            *after,
            Some(worker_task),
            "after its wait, on a task of its own"
        );
    }
}

/// Spawned, a body that waits stays on its delivery's task (it is not spawned again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_a_body_that_waits_stays_on_its_deliverys_task() {
    let server = server("placement-spawned").await;
    let worker = spawn(server.worker().in_place(false)).await;
    let r = server
        .send(note_task::signature("spawned".into(), true))
        .await
        .unwrap();
    r.get_timeout(WAIT).await.unwrap();
    worker.shutdown().await.unwrap();
    let [(before, after)] = task_ids("spawned")[..] else {
        panic!("one body")
    };
    assert!(before.is_some());
    assert_eq!(before, after);
}

static HOGS_NOW: AtomicUsize = AtomicUsize::new(0);
static HOGS_MOST: AtomicUsize = AtomicUsize::new(0);
/// The Tokio task each [`hog_counted`] body ran on.
static HOG_TASKS: Mutex<Vec<Option<tokio::task::Id>>> = Mutex::new(Vec::new());

/// Holds its thread (no await) for `ms`, counting the bodies doing so at once.
#[task]
async fn hog_counted(ms: u64) {
    HOG_TASKS.lock().unwrap().push(tokio::task::try_id());
    let now = HOGS_NOW.fetch_add(1, Ordering::SeqCst) + 1;
    HOGS_MOST.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(ms));
    HOGS_NOW.fetch_sub(1, Ordering::SeqCst);
}

/// By default, bodies that hold their thread do not queue up on the worker's one thread, even
/// when they all start at once after the worker was idle: here the worker starts, 30 ms later
/// 8 such tasks arrive, and their STARTED writes come back together 100 ms later from a slow
/// store. The first body holds the worker's task; the ones that were waiting behind it go on
/// tasks of their own, beside each other on the runtime's threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_burst_of_bodies_that_compute_runs_beside_each_other() {
    let memory = MemoryBroker::open("ctl-hogs", "machinery_tasks", "machinery_task");
    let backend = Arc::new(FaultyBackend::new(Arc::new(MemoryBackend::open(
        "ctl-hogs",
        Duration::from_secs(3600),
    ))));
    backend.arm(
        BackendOp::Transition,
        Fault::always()
            .on_state(State::Started)
            .slow(Duration::from_millis(100)),
    );
    let server = Server::from_parts(
        config("hogs"),
        Arc::new(memory),
        Some(backend.clone() as Arc<dyn ResultBackend>),
    );
    let worker = spawn(server.worker().concurrency(8)).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut sent = Vec::new();
    for _ in 0..8 {
        sent.push(server.send(hog_counted::signature(30)).await.unwrap());
    }
    for r in sent {
        r.get_timeout(WAIT).await.unwrap();
    }
    worker.shutdown().await.unwrap();
    let tasks = HOG_TASKS.lock().unwrap().clone();
    assert_eq!(tasks.len(), 8);
    // The bodies on the worker's task share its id; each other one has its own. The first
    // holds the worker's task; one whose wake came late (both runtime threads held by
    // bodies, no thread turning the timers) may take its first poll there too.
    let mut by_task: HashMap<Option<tokio::task::Id>, usize> = HashMap::new();
    for task in &tasks {
        *by_task.entry(*task).or_default() += 1;
    }
    let on_one = by_task.values().copied().max().unwrap_or(0);
    assert!(
        on_one <= 3,
        "{on_one} of 8 bodies ran one after another on the worker's task: {tasks:?}"
    );
    assert!(
        HOGS_MOST.load(Ordering::SeqCst) >= 2,
        "the bodies ran one after another"
    );
}

// ---- Go's worker handlers ----

#[tokio::test(flavor = "multi_thread")]
async fn handlers_see_the_signature_and_the_outcome_and_a_panicking_one_loses_nothing() {
    let server = server("hooks").await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (pre, post, err) = (seen.clone(), seen.clone(), seen.clone());
    let worker = spawn(
        server
            .worker()
            .pre_task_handler(move |sig| {
                pre.lock().unwrap().push(format!("pre {}", sig.name));
                panic!("a pre-task handler that panics");
            })
            .post_task_handler(move |sig, outcome| {
                post.lock()
                    .unwrap()
                    .push(format!("post {} {}", sig.name, outcome.is_ok()));
                panic!("a post-task handler that panics");
            })
            .error_handler(move |sig, e| {
                err.lock().unwrap().push(format!("error {} {e}", sig.name));
            }),
    )
    .await;
    let ok = server
        .send(ctl_nap::signature("hooks".into(), 1))
        .await
        .unwrap();
    assert_eq!(ok.get_timeout(WAIT).await.unwrap(), 1);
    let bad = server
        .send(ctl_flaky::signature("hooks-bad".into(), 9))
        .await
        .unwrap();
    let state = final_state(&server, bad.task_uuid()).await;
    assert_eq!(state.state, State::Failure);
    worker.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "pre ctl_nap",
            "post ctl_nap true",
            "pre ctl_flaky",
            "error ctl_flaky failure 1",
            "post ctl_flaky false",
        ]
    );
    assert_eq!(count(&RUNS, "hooks"), 1);
}

// ---- task options ----

#[test]
fn the_attribute_s_options_are_the_task_s_defaults_and_a_signature_overrides_them() {
    let options = ctl_optioned::OPTIONS;
    assert_eq!(options.get_retries(), Some(4));
    assert_eq!(options.get_retry_timeout(), Some(2));
    assert_eq!(options.get_timeout(), Some(Duration::from_secs(90)));
    assert_eq!(
        options.get_rate_limit().map(|r| r.to_string()).as_deref(),
        Some("50/1s")
    );
    assert_eq!(options.get_queue(), Some("ctl_elsewhere"));
    assert_eq!(options.get_priority(), Some(7));
    assert_eq!(options.get_max_retry_later(), Some(9));
    let descriptor = machinery::registered_tasks()
        .find(|t| t.name == "ctl_optioned")
        .unwrap();
    assert_eq!(descriptor.options, options);
    // Go's fields carry what Go has.
    let sig = ctl_optioned::signature(1);
    let wire = sig.as_wire();
    assert_eq!(
        (
            wire.retry_count,
            wire.retry_timeout,
            wire.routing_key.as_str(),
            wire.priority
        ),
        (4, 2, "ctl_elsewhere", 7)
    );
    let sig = sig
        .with_retries(1)
        .with_routing_key("other")
        .with_priority(1);
    let wire = sig.as_wire();
    assert_eq!(
        (wire.retry_count, wire.routing_key.as_str(), wire.priority),
        (1, "other", 1)
    );
    assert!(ctl_nap::OPTIONS == machinery::options::TaskOptions::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_s_queue_option_routes_it() {
    let server = server("queue-option").await;
    let worker = spawn(server.worker().queue("ctl_elsewhere")).await;
    let r = server.send(ctl_optioned::signature(5)).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 5);
    worker.shutdown().await.unwrap();
}

static HARD_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
fn ctl_stuck() -> u64 {
    HARD_RUNS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(60));
    0
}

/// The hard limit ends the process: run in a child process (this test binary, re-run with
/// one test and an env var), and check its exit code.
#[test]
fn a_hard_limit_ends_the_process() {
    if std::env::var_os("CTL_HARD_LIMIT_CHILD").is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let server = server("hard").await;
            let worker = spawn(server.worker().hard_time_limit(Duration::from_millis(300))).await;
            server
                .send(ctl_stuck::signature().with_timeout(Duration::from_millis(200)))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            worker.abort();
        });
        return;
    }
    let started = Instant::now();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_hard_limit_ends_the_process", "--nocapture"])
        .env("CTL_HARD_LIMIT_CHILD", "1")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(machinery::worker::HARD_LIMIT_EXIT_CODE));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A rate-limited delivery gives its slot up while it waits; it gets one back even when no
/// other message arrives (the worker's intake must not sit on the freed slot).
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_task_gets_its_slot_back_when_the_queue_is_empty() {
    let server = server("rate-slot").await;
    let worker = spawn(
        server
            .worker()
            .concurrency(1)
            .rate_limit("ctl_nap", "2/s".parse().unwrap()),
    )
    .await;
    let a = server
        .send(ctl_nap::signature("rate-slot".into(), 1))
        .await
        .unwrap();
    let b = server
        .send(ctl_nap::signature("rate-slot".into(), 2))
        .await
        .unwrap();
    assert_eq!(a.get_timeout(Duration::from_secs(5)).await.unwrap(), 1);
    assert_eq!(b.get_timeout(Duration::from_secs(5)).await.unwrap(), 2);
    worker.shutdown().await.unwrap();
}
