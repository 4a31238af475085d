//! Sending a task by name with Go-typed arguments, and following a task by its UUID (Go:
//! `server.SendTask(&tasks.Signature{Name: "add", Args: ...})` and
//! `result.NewAsyncResult(signature, backend)` in v2/server.go and
//! v2/backends/result/async_result.go). On the embedded broker and backend, and on RabbitMQ
//! with the Redis backend.

mod common;

use std::sync::Arc;

use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::wire::{Arg, State, TaskResult};
use machinery::{task, AsyncResult, Config, ErrorKind, Server};
use serde_json::json;

use common::WAIT;

#[task]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

#[task]
fn pair(a: String, b: i64) -> (String, i64) {
    (a, b)
}

fn float(v: f64) -> Arg {
    Arg {
        name: String::new(),
        type_name: "float64".into(),
        value: json!(v),
    }
}

fn memory_config(name: &str) -> Config {
    Config::builder()
        .broker(format!("memory://by-name-{name}"))
        .build()
        .unwrap()
}

/// The same checks on any broker and backend: `Vec<Arg>` and JSON in, typed and dynamic out,
/// and a second server that did not send the task follows it by UUID.
async fn sends_by_name_and_follows(sender: &Server, follower: &Server) {
    let handle = sender
        .send_by_name("add", vec![float(1.5), float(2.0)])
        .await
        .unwrap();
    // Typed: Go's float64 as f64.
    assert_eq!(handle.typed::<f64>().get_timeout(WAIT).await.unwrap(), 3.5);
    // Dynamic: the results as Go-typed values, and as plain JSON.
    let results = handle.get_timeout(WAIT).await.unwrap();
    assert_eq!(
        results,
        vec![TaskResult {
            type_name: "float64".into(),
            value: json!(3.5)
        }]
    );
    assert_eq!(handle.json().get_timeout(WAIT).await.unwrap(), json!(3.5));

    // The README's JSON form, Go's type names.
    let handle = sender
        .send_by_name(
            "add",
            json!([{"Type": "float64", "Value": 1}, {"Type": "float64", "Value": 1}]),
        )
        .await
        .unwrap();
    assert_eq!(handle.json().get_timeout(WAIT).await.unwrap(), json!(2.0));

    // Several results: dynamic as a list, JSON as an array.
    let handle = sender
        .send_by_name(
            "pair",
            json!([{"Type": "string", "Value": "x"}, {"Type": "int64", "Value": 7}]),
        )
        .await
        .unwrap();
    assert_eq!(
        handle.json().get_timeout(WAIT).await.unwrap(),
        json!(["x", 7])
    );
    assert_eq!(handle.get_timeout(WAIT).await.unwrap().len(), 2);
    // Typed as one value, two results are a decode error, not a panic.
    let err = handle
        .typed::<String>()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);

    // Another service follows a task it did not send, by UUID.
    let sent = sender
        .send_by_name("add", vec![float(20.0), float(22.0)])
        .await
        .unwrap();
    let uuid = sent.task_uuid().to_owned();
    let followed = AsyncResult::from_uuid(follower, &uuid);
    assert_eq!(followed.task_uuid(), uuid);
    assert_eq!(
        followed.typed::<f64>().get_timeout(WAIT).await.unwrap(),
        42.0
    );
    let state = follower.state(&uuid).await.unwrap().expect("a state");
    assert_eq!(state.state, State::Success);
    assert_eq!(state.task_name, "add");
    // A UUID nobody sent has no state.
    assert!(follower
        .state("task_nobody_sent_this")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn embedded_send_by_name_and_follow_by_uuid() {
    let config = memory_config("embedded");
    let sender = Server::new(config.clone()).await.unwrap();
    // Another server over the same embedded broker and backend (another "service").
    let follower = Server::new(config).await.unwrap();
    let worker = sender.worker().spawn().await.unwrap();
    sends_by_name_and_follows(&sender, &follower).await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn amqp_redis_send_by_name_and_follow_by_uuid() {
    let config = common::unique_config("by_name");
    let sender = Server::new(config.clone()).await.unwrap();
    let follower = Server::new(config).await.unwrap();
    let worker = sender.worker().spawn().await.unwrap();
    sends_by_name_and_follows(&sender, &follower).await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_go_type_is_refused_before_sending() {
    let config = memory_config("bad-type");
    let sender = Server::new(config.clone()).await.unwrap();
    for args in [
        json!([{"Type": "float65", "Value": 1}]),
        json!([{"Type": "Float64", "Value": 1}]),
        json!([{"Value": 1}]),
        // A known type with a value that is not of it.
        json!([{"Type": "int64", "Value": "one"}]),
        json!([{"Type": "int8", "Value": 300}]),
        // Not an array of arguments.
        json!({"Type": "float64", "Value": 1}),
        json!([1, 2]),
    ] {
        let err = sender.send_by_name("add", args.clone()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Encode, "{args}");
    }
    let err = sender
        .send_by_name("add", json!([{"Type": "float65", "Value": 1}]))
        .await
        .unwrap_err();
    assert!(err.message().contains("float65"), "{err}");
    let bad = Arg {
        name: String::new(),
        type_name: "complex128".into(),
        value: json!(1),
    };
    let err = sender.send_by_name("add", vec![bad]).await.unwrap_err();
    assert!(err.message().contains("complex128"), "{err}");
    let err = sender.send_by_name("", vec![float(1.0)]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode);
    // Nothing was sent: the queue is empty.
    let broker = MemoryBroker::open("by-name-bad-type", "machinery_tasks", "machinery_task");
    assert_eq!(broker.depth("machinery_tasks"), (0, 0));
}

#[tokio::test]
async fn backend_failing_on_state_is_an_error() {
    let config = memory_config("faulty");
    let broker = Arc::new(MemoryBroker::open(
        "by-name-faulty",
        &config.default_queue,
        config.default_routing_key(),
    ));
    let backend = Arc::new(FaultyBackend::new(Arc::new(MemoryBackend::open(
        "by-name-faulty",
        std::time::Duration::from_secs(60),
    ))));
    let server = Server::from_parts(config, broker, Some(backend.clone()));
    let handle = server
        .send_by_name("add", vec![float(1.0), float(2.0)])
        .await
        .unwrap();
    backend.arm(BackendOp::GetState, Fault::always());
    let err = server.state(handle.task_uuid()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    let err = AsyncResult::from_uuid(&server, handle.task_uuid())
        .state()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    backend.heal(BackendOp::GetState);
    assert_eq!(
        server
            .state(handle.task_uuid())
            .await
            .unwrap()
            .unwrap()
            .state,
        State::Pending
    );
}

#[tokio::test]
async fn state_without_a_backend_is_an_error() {
    let config = Config::builder()
        .broker("memory://by-name-nobackend")
        .build()
        .unwrap();
    let broker = Arc::new(MemoryBroker::open(
        "by-name-nobackend",
        &config.default_queue,
        config.default_routing_key(),
    ));
    let server = Server::from_parts(config, broker, None);
    let err = server.state("task_x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}
