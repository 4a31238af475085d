//! Go Machinery's README messages, published byte for byte as written, with only the fields the
//! README shows: no `UUID`, no `Headers`. Go's worker runs them (and stores their states under
//! the empty key); ours gives each a fresh `task_<uuid4>`, logs it, and runs it.
//!
//! The README (github.com/RichardKnop/machinery, README.md as of May 2015, "when a worker
//! receives a message like this ... It will call AddTask(1, 1)", and its "Chains" section:
//! `((1 + 1) + (5 + 6)) * 4 = 13 * 4 = 52`). Its message is written with trailing commas,
//! which no JSON reader takes (Go's neither); the bytes here are that message without them.
//! The README gives its chain as Go code only; the chain message is what that code
//! (`machinery.Chain(task1, task2, task3)`) nests, with the same fields as the README's message.
//!
//! Runs on the embedded broker and on RabbitMQ with Redis (`tests/services.sh`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cleanup, publish_raw, raw_channel, unique_config};
use machinery::backend::memory::MemoryBackend;
use machinery::backend::ResultBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Broker;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::value::decode;
use machinery::wire::{State, TaskState};
use machinery::{task, Config, Server};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// The README's message, verbatim but for the trailing commas.
const README_ADD: &str = r#"{"Name":"add","Args":[{"Type":"float64","Value":1},{"Type":"float64","Value":1}],"Immutable":false,"OnSuccess":null,"OnError":null}"#;

/// The README's chain, `add(1, 1) -> add(5, 6) -> multiply(4)`, in the same fields.
const README_CHAIN: &str = r#"{"Name":"add","Args":[{"Type":"float64","Value":1},{"Type":"float64","Value":1}],"Immutable":false,"OnSuccess":[{"Name":"add","Args":[{"Type":"float64","Value":5},{"Type":"float64","Value":6}],"Immutable":false,"OnSuccess":[{"Name":"multiply","Args":[{"Type":"float64","Value":4}],"Immutable":false,"OnSuccess":null,"OnError":null}],"OnError":null}],"OnError":null}"#;

/// The README's `AddTask(args ...float64)`.
#[task]
fn add(#[variadic] args: Vec<f64>) -> f64 {
    args.iter().sum()
}

/// The README's `MultiplyTask(args ...float64)`.
#[task]
fn multiply(#[variadic] args: Vec<f64>) -> f64 {
    args.iter().product()
}

const WAIT: Duration = Duration::from_secs(20);

// ---- what the worker logs: the `task` spans (name, id) and the ids it assigned ----

static SPANS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static ASSIGNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The tests read the log one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Fields {
    name: String,
    id: String,
    message: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let value = format!("{value:?}");
        match field.name() {
            "task.name" => self.name = value,
            "task.id" => self.id = value,
            "message" => self.message = value,
            _ => {}
        }
    }
}

struct Recorder;

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "task" {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            SPANS.lock().unwrap().push((fields.name, fields.id));
        }
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if *event.metadata().level() == tracing::Level::WARN && fields.message.contains("no UUID") {
            ASSIGNED.lock().unwrap().push(fields.id);
        }
    }
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::registry()
            .with(Recorder)
            .try_init()
            .expect("the only global subscriber of this test binary");
    });
    SPANS.lock().unwrap().clear();
    ASSIGNED.lock().unwrap().clear();
}

/// The UUID the worker assigned to the one message it received without one.
async fn assigned() -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(id) = ASSIGNED.lock().unwrap().first() {
            return id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker assigned no UUID (dead-lettered the message?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The id of the first `task` span of task `name` (the chain's links get theirs from their
/// parent's id).
async fn span_of(name: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let spans = SPANS.lock().unwrap().clone();
        if let Some((_, id)) = spans.iter().find(|(n, _)| n == name) {
            return id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{name}` task ran: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn final_state(server: &Server, uuid: &str) -> TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(deadline))
        .await
        .unwrap()
}

fn result(state: &TaskState) -> f64 {
    assert_eq!(state.state, State::Success, "{state:?}");
    let results = state.results.as_ref().unwrap();
    decode::<f64>(&results[0].type_name, &results[0].value).unwrap()
}

/// Sends the README's message, then its chain, with `publish`; checks what they stored.
async fn readme_messages_run(server: &Server, publish: impl AsyncFn(&str)) {
    publish(README_ADD).await;
    let id = assigned().await;
    assert!(
        id.starts_with("task_") && id.len() == "task_".len() + 36,
        "{id}"
    );
    assert_eq!(span_of("add").await, id);
    let state = final_state(server, &id).await;
    assert_eq!(result(&state), 2.0);
    assert_eq!(state.task_name, "add");

    install();
    publish(README_CHAIN).await;
    let head = assigned().await;
    assert_eq!(result(&final_state(server, &head).await), 2.0);
    // ((1 + 1) + (5 + 6)) * 4 = 52
    let last = span_of("multiply").await;
    assert_eq!(result(&final_state(server, &last).await), 52.0);
    assert_eq!(
        ASSIGNED.lock().unwrap().len(),
        1,
        "only the head had no UUID"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_messages_run_on_the_embedded_broker() {
    let _serial = SERIAL.lock().await;
    install();
    let name = format!("readme_{}", uuid::Uuid::new_v4().simple());
    let config = Config::builder()
        .broker(format!("memory://{name}"))
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    let broker = MemoryBroker::open(&name, "machinery_tasks", "machinery_task");
    let worker = server.worker().concurrency(2).spawn().await.unwrap();
    readme_messages_run(&server, async |body: &str| {
        broker.push_raw("machinery_tasks", body.as_bytes().to_vec());
    })
    .await;

    // A message without a name can never run: it is still dead-lettered.
    let nameless = r#"{"Args":[{"Type":"float64","Value":1}],"Immutable":false}"#;
    broker.push_raw("machinery_tasks", nameless.as_bytes().to_vec());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dead = broker.dead_letters_with_reasons("machinery_tasks");
        if let Some((body, reason)) = dead.first() {
            assert_eq!(&body[..], nameless.as_bytes());
            assert!(reason.contains("no task name"), "{reason}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_messages_run_on_rabbitmq() {
    let _serial = SERIAL.lock().await;
    install();
    let config = unique_config("readme");
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(2).spawn().await.unwrap();
    let (_conn, channel) = raw_channel().await;
    let (exchange, key) = (
        config.amqp.exchange.clone(),
        config.amqp.binding_key.clone(),
    );
    readme_messages_run(&server, async |body: &str| {
        publish_raw(&channel, &exchange, &key, body.as_bytes()).await;
    })
    .await;
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_readme_message_sent_again_keeps_its_assigned_uuid() {
    // The result store fails when the worker records STARTED, longer than the worker retries
    // it: the message goes back to the broker, re-encoded with the UUID it was given (its
    // body has none), so it runs once, under that one id.
    let _serial = SERIAL.lock().await;
    install();
    let name = format!("readme_fault_{}", uuid::Uuid::new_v4().simple());
    let config = Config::builder()
        .broker(format!("memory://{name}"))
        .requeue_delay(Duration::from_millis(20))
        .store_retry_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let memory = MemoryBroker::open(&name, "machinery_tasks", "machinery_task");
    let backend = FaultyBackend::new(Arc::new(MemoryBackend::open(
        &name,
        Duration::from_secs(3600),
    )));
    let server = Server::from_parts(
        config,
        Arc::new(memory.clone()) as Arc<dyn Broker>,
        Some(Arc::new(backend.clone()) as Arc<dyn ResultBackend>),
    );
    backend.arm(BackendOp::Transition, Fault::always());
    let worker = server.worker().spawn().await.unwrap();
    memory.push_raw("machinery_tasks", README_ADD.as_bytes().to_vec());
    let id = assigned().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while backend.calls(BackendOp::Transition) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no STARTED write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.heal(BackendOp::Transition);
    assert_eq!(result(&final_state(&server, &id).await), 2.0);
    let ids: Vec<_> = SPANS
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert!(ids.len() >= 2, "delivered again: {ids:?}");
    assert!(
        ids.iter().all(|i| *i == id),
        "one id for every delivery: {ids:?}"
    );
    assert_eq!(ASSIGNED.lock().unwrap().len(), 1);
    assert_eq!(backend.writes(&id, State::Success), 1);
    worker.shutdown().await.unwrap();
}
