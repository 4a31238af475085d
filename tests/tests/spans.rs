//! Task spans, outcome events and W3C trace context, read from what a subscriber receives: the
//! formatted log lines (as an operator reads them) and the spans exported through
//! tracing-opentelemetry to an in-memory exporter (the `opentelemetry` feature, enabled for the
//! tests through this crate's dependency on machinery, so `cargo test --workspace` runs these).
//!
//! One global subscriber serves the whole file (sync bodies log from Tokio's blocking pool, which
//! a thread-local subscriber would not see); each test reads only the lines and spans of its own
//! tasks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use machinery::broker::memory::MemoryBroker;
use machinery::worker::{DefaultMakeSpan, TaskSpan, TraceContext, ROOT_HEADER, TRACEPARENT_HEADER};
use machinery::{task, Config, Server, TaskError};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;

const WAIT: Duration = Duration::from_secs(10);

struct Capture {
    lines: Arc<Mutex<Vec<u8>>>,
    spans: InMemorySpanExporter,
    _provider: SdkTracerProvider,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let spans = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let sink = Sink(lines.clone());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || sink.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("machinery-tests")));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        Capture {
            lines,
            spans,
            _provider: provider,
        }
    })
}

/// The captured log lines that contain `needle`.
fn lines_with(needle: &str) -> Vec<String> {
    let text = String::from_utf8(capture().lines.lock().unwrap().clone()).unwrap();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The exported spans whose `task.id` is `uuid`.
fn spans_of(uuid: &str) -> Vec<SpanData> {
    capture()
        .spans
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "task.id" && kv.value.as_str() == uuid)
        })
        .collect()
}

async fn eventually<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    Some(rest.split([' ', '}', ':']).next().unwrap_or(rest))
}

#[task]
fn sp_first(a: i64) -> i64 {
    tracing::info!("inside the sync body");
    a + 1
}

#[task]
async fn sp_second(k: i64, #[chained] x: i64) -> i64 {
    tracing::info!("inside the async body");
    k * x
}

#[task]
fn sp_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("boom"))
}

#[task]
fn sp_errback(#[error_message] error: String) {
    let _ = error;
}

#[task]
fn sp_retry() -> Result<i64, TaskError> {
    Err(TaskError::retry_in("not yet", Duration::from_secs(3600)))
}

async fn server(name: &str) -> Server {
    capture();
    Server::new(
        Config::builder()
            .broker(format!("memory://{name}"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_runs_in_info_spans_and_is_one_trace() {
    let server = server("spans-chain").await;
    let worker = server
        .worker()
        .success_level(tracing::Level::INFO)
        .name("spans-worker")
        .tasks([sp_first::NAME, sp_second::NAME])
        .spawn()
        .await
        .unwrap();
    // A producer's own trace context, as an instrumented Go or HTTP service would send it.
    let producer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let handle = server
        .send(
            sp_first::signature(1)
                .with_header(TRACEPARENT_HEADER, producer)
                .then(sp_second::signature(10)),
        )
        .await
        .unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 20);
    let first_uuid = eventually("the first task's span", || {
        lines_with("inside the sync body")
            .into_iter()
            .find(|l| l.contains("worker=spans-worker"))
    })
    .await;
    // The sync body's event sits inside the task's span, with every field.
    let line = first_uuid;
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("task{task.name=sp_first"), "{line}");
    assert!(line.contains("attempt=1"), "{line}");
    assert!(line.contains("queue=machinery_tasks"), "{line}");
    assert!(
        line.contains("trace_id=0af7651916cd43dd8448eb211c80319c"),
        "{line}"
    );
    let first = field(&line, "task.id").unwrap().to_owned();

    // One outcome event per execution, with its duration.
    let done = eventually("the success events", || {
        let done = lines_with("task succeeded");
        let ours: Vec<_> = done
            .into_iter()
            .filter(|l| l.contains("trace_id=0af7651916cd43dd8448eb211c80319c"))
            .collect();
        (ours.len() == 2).then_some(ours)
    })
    .await;
    for line in &done {
        assert!(field(line, "duration_ms").is_some(), "{line}");
    }
    // The follow-up carries the chain id: the root task's UUID.
    let second_line = done.iter().find(|l| l.contains("sp_second")).unwrap();
    assert_eq!(
        field(second_line, "chain"),
        Some(first.as_str()),
        "{second_line}"
    );
    let second = field(second_line, "task.id").unwrap().to_owned();
    assert!(lines_with("inside the async body")
        .iter()
        .any(|l| l.contains(&second)));

    // Exported through OpenTelemetry as one trace: producer -> first -> second.
    let (a, b) = eventually("both spans exported", || {
        let a = spans_of(&first).pop()?;
        let b = spans_of(&second).pop()?;
        Some((a, b))
    })
    .await;
    let producer = TraceContext::parse(producer).unwrap();
    assert_eq!(
        u128::from_be_bytes(a.span_context.trace_id().to_bytes()),
        producer.trace_id_u128()
    );
    assert_eq!(
        u64::from_be_bytes(a.parent_span_id.to_bytes()),
        producer.span_id_u64(),
        "the first task's parent is the producer's span"
    );
    assert_eq!(a.span_context.trace_id(), b.span_context.trace_id());
    assert_eq!(
        b.parent_span_id,
        a.span_context.span_id(),
        "the follow-up's parent is the first task's execution"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_event_says_the_error_and_what_happens_next() {
    let server = server("spans-failure").await;
    let worker = server
        .worker()
        .tasks([sp_fail::NAME, sp_errback::NAME, sp_retry::NAME])
        .spawn()
        .await
        .unwrap();
    let handle = server
        .send(sp_fail::signature().on_error(sp_errback::signature()))
        .await
        .unwrap();
    assert!(handle.get_timeout(WAIT).await.is_err());
    let uuid = handle.task_uuid().to_owned();
    let line = eventually("the failure event", || {
        lines_with("task failed")
            .into_iter()
            .find(|l| l.contains(&uuid))
    })
    .await;
    assert!(line.contains(" ERROR "), "{line}");
    assert!(line.contains("error=\"boom\""), "{line}");
    assert!(line.contains("next=\"FAILURE stored\""), "{line}");
    assert!(line.contains("on_error_sent=1"), "{line}");
    assert!(field(&line, "duration_ms").is_some(), "{line}");
    assert_eq!(
        lines_with(&uuid)
            .iter()
            .filter(|l| l.contains("task failed"))
            .count(),
        1,
        "one event per outcome"
    );

    let retried = server.send(sp_retry::signature()).await.unwrap();
    let uuid = retried.task_uuid().to_owned();
    let line = eventually("the retry event", || {
        lines_with("task failed; retrying")
            .into_iter()
            .find(|l| l.contains(&uuid))
    })
    .await;
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("error=\"not yet\""), "{line}");
    assert!(line.contains("next=\"retry\""), "{line}");
    assert!(line.contains("retry_in_s=3600"), "{line}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_is_logged_with_its_reason() {
    let server = server("spans-poison").await;
    let worker = server.worker().spawn().await.unwrap();
    MemoryBroker::open("spans-poison", "machinery_tasks", "machinery_task")
        .push_raw("machinery_tasks", &b"{\"UUID\": \"spans-poison-1\""[..]);
    let line = eventually("the dead-letter event", || {
        lines_with("task dead-lettered")
            .into_iter()
            .find(|l| l.contains("is not a task signature"))
    })
    .await;
    assert!(line.contains(" ERROR "), "{line}");
    assert!(line.contains("next=\"dead-lettered\""), "{line}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_span_can_be_made_by_the_application() {
    let server = server("spans-custom").await;
    let worker = server
        .worker()
        .tasks([sp_first::NAME])
        .make_span(|task: &TaskSpan<'_>| {
            tracing::warn_span!("job", job = task.name, id = task.id, tenant = "acme")
        })
        .spawn()
        .await
        .unwrap();
    let handle = server.send(sp_first::signature(41)).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 42);
    let uuid = handle.task_uuid().to_owned();
    let line = eventually("the custom span", || {
        lines_with("inside the sync body")
            .into_iter()
            .find(|l| l.contains(&uuid))
    })
    .await;
    assert!(line.contains("job{job=\"sp_first\""), "{line}");
    assert!(line.contains("tenant=\"acme\""), "{line}");
    worker.shutdown().await.unwrap();

    // A level below the subscriber's: no span, the body still runs and still logs.
    let worker = server
        .worker()
        .tasks([sp_first::NAME])
        .make_span(DefaultMakeSpan::new().level(tracing::Level::DEBUG))
        .spawn()
        .await
        .unwrap();
    let handle = server.send(sp_first::signature(1)).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 2);
    worker.shutdown().await.unwrap();
    // A success logs at DEBUG by default: nothing at INFO.
    let uuid = handle.task_uuid();
    assert!(lines_with(uuid).is_empty(), "{:?}", lines_with(uuid));
}

/// A message as Go Machinery's producer writes it (v2/tasks/signature.go: `Headers` is a
/// `map[string]interface{}`, published inside the JSON body), with a `traceparent` and a header
/// of its own: the worker reads the trace context and keeps the message's other headers.
#[tokio::test(flavor = "multi_thread")]
async fn a_go_message_with_a_traceparent_continues_its_trace() {
    let server = server("spans-go").await;
    let worker = server
        .worker()
        .success_level(tracing::Level::INFO)
        .tasks([sp_first::NAME])
        .spawn()
        .await
        .unwrap();
    let body = r#"{"UUID":"task_spans-go-1","Name":"sp_first","RoutingKey":"machinery_task",
        "Args":[{"Type":"int64","Value":5}],
        "Headers":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                   "x-go-custom":"kept", "x-machinery-root":"task_root"},
        "Immutable":false,"RetryCount":0,"RetryTimeout":0}"#;
    MemoryBroker::open("spans-go", "machinery_tasks", "machinery_task")
        .push_raw("machinery_tasks", body.as_bytes().to_vec());
    let line = eventually("the Go task's outcome", || {
        lines_with("task succeeded")
            .into_iter()
            .find(|l| l.contains("task_spans-go-1"))
    })
    .await;
    assert!(
        line.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
        "{line}"
    );
    assert!(line.contains("chain=task_root"), "{line}");
    let span = eventually("the exported span", || spans_of("task_spans-go-1").pop()).await;
    assert_eq!(
        span.parent_span_id.to_string(),
        "00f067aa0ba902b7",
        "parented by the Go producer's span"
    );
    let _ = ROOT_HEADER;
    worker.shutdown().await.unwrap();
}

/// A group sent outside any task is one trace: its members share the producer's trace id (each
/// member's execution is a span of it), as a chain's links do.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_sent_outside_a_task_is_one_trace() {
    let server = server("spans-group").await;
    let worker = server
        .worker()
        .success_level(tracing::Level::INFO)
        .name("spans-group-worker")
        .tasks([sp_first::NAME])
        .spawn()
        .await
        .unwrap();
    let sent = server
        .send_group(machinery::Group::new([
            sp_first::signature(101),
            sp_first::signature(102),
            sp_first::signature(103),
        ]))
        .await
        .unwrap();
    let uuids: Vec<String> = sent
        .members()
        .iter()
        .map(|m| m.task_uuids()[0].clone())
        .collect();
    let traces = eventually("the members' success events", || {
        let traces: Vec<String> = uuids
            .iter()
            .filter_map(|uuid| {
                lines_with("task succeeded")
                    .into_iter()
                    .find(|l| field(l, "task.id") == Some(uuid.as_str()))
                    .and_then(|l| field(&l, "trace_id").map(str::to_owned))
            })
            .collect();
        (traces.len() == uuids.len()).then_some(traces)
    })
    .await;
    assert!(
        traces.iter().all(|t| *t == traces[0]),
        "the members are in different traces: {traces:?}"
    );
    worker.shutdown().await.unwrap();
}

/// A delivery that panics outside its task's body is logged with the panic, whether it ran in
/// a task of its own or in place; its message comes again and runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_panicking_outside_its_body_is_logged_spawned_or_in_place() {
    for in_place in [false, true] {
        let name = format!("spans-panic-{in_place}");
        let server = server(&name).await;
        let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let once = panicked.clone();
        let worker = server
            .worker()
            .in_place(in_place)
            .make_span(move |t: &TaskSpan<'_>| {
                if !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    panic!("no span for {}", t.id);
                }
                tracing::info_span!("task")
            })
            .spawn()
            .await
            .unwrap();
        let r = server.send(sp_first::signature(1)).await.unwrap();
        assert_eq!(r.get_timeout(Duration::from_secs(30)).await.unwrap(), 2);
        let uuid = r.task_uuids()[0].clone();
        let line = eventually("the panic's log line", || {
            lines_with("panicked outside its task's body")
                .into_iter()
                .find(|l| l.contains(&format!("no span for {uuid}")))
        })
        .await;
        assert!(line.contains(" ERROR "), "{line}");
        worker.shutdown().await.unwrap();
    }
}

static SENDER: OnceLock<Server> = OnceLock::new();
/// The Tokio task the body ran on before its wait, and after it.
static BODY_TASKS: Mutex<Vec<Option<tokio::task::Id>>> = Mutex::new(Vec::new());

/// Waits, then sends a child task; returns the child's UUID.
#[task]
async fn sp_waits_then_sends() -> String {
    BODY_TASKS.lock().unwrap().push(tokio::task::try_id());
    tokio::time::sleep(Duration::from_millis(20)).await;
    BODY_TASKS.lock().unwrap().push(tokio::task::try_id());
    tracing::info!("after the wait");
    let server = SENDER.get().expect("the test's server");
    let child = server.send(sp_first::signature(5)).await.expect("sent");
    child.task_uuid().to_owned()
}

/// In place, an async body that waits goes on as a task of its own (the worker's `offload`):
/// it is still the same execution, inside its span, so what it logs after the wait is in
/// the task's span and what it sends is the execution's child.
#[tokio::test(flavor = "multi_thread")]
async fn in_place_a_body_that_waits_is_still_its_execution() {
    let server = server("spans-offload").await;
    let _ = SENDER.set(server.clone());
    let worker = server
        .worker()
        .in_place(true)
        .success_level(tracing::Level::INFO)
        .tasks([sp_waits_then_sends::NAME, sp_first::NAME])
        .spawn()
        .await
        .unwrap();
    let parent = server.send(sp_waits_then_sends::signature()).await.unwrap();
    let child: String = parent.get_timeout(WAIT).await.unwrap();
    let parent = parent.task_uuid().to_owned();
    let tasks = BODY_TASKS.lock().unwrap().clone();
    assert!(
        tasks.len() == 2 && tasks[0].is_some() && tasks[1].is_some() && tasks[0] != tasks[1],
        "the body went on as a task of its own after its wait: {tasks:?}"
    );
    let after = eventually("the event after the wait", || {
        lines_with("after the wait")
            .into_iter()
            .find(|l| l.contains(&parent))
    })
    .await;
    assert!(
        after.contains("task{task.name=sp_waits_then_sends"),
        "{after}"
    );
    let done = eventually("the child's success", || {
        lines_with("task succeeded")
            .into_iter()
            .find(|l| l.contains(&child))
    })
    .await;
    assert_eq!(field(&done, "chain"), Some(parent.as_str()), "{done}");
    let (a, b) = eventually("both spans exported", || {
        let a = spans_of(&parent).pop()?;
        let b = spans_of(&child).pop()?;
        Some((a, b))
    })
    .await;
    assert_eq!(a.span_context.trace_id(), b.span_context.trace_id());
    assert_eq!(
        b.parent_span_id,
        a.span_context.span_id(),
        "the child's parent is the execution that sent it"
    );
    worker.shutdown().await.unwrap();
}
