//! The whole path on a real RabbitMQ with Redis results: Go Machinery's suite, delays,
//! shared queues, bad messages, and worker processes killed mid-task or stopped with SIGTERM.
//! RabbitMQ and Redis must be running on 127.0.0.1 (`tests/services.sh`); these tests fail,
//! never skip, when they are not.

mod common;

use std::time::{Duration, Instant};

use common::{
    cleanup, get_raw, publish_raw, queue_depth, queue_depth_probe, raw_channel, unique_config,
    WorkerProcess, WAIT,
};
use machinery::broker::amqp::AmqpBroker;
use machinery::broker::{Broker, Delivery, Message};
use machinery::wire::{self, State};
use machinery::{ErrorKind, Server};

include!("../src/tasks.rs");

async fn server(tag: &str) -> Server {
    Server::new(unique_config(tag))
        .await
        .expect("connect to RabbitMQ and Redis")
}

/// The consumer's next delivery, within [`WAIT`].
async fn next(consumer: &mut Box<dyn machinery::broker::Consumer>) -> Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery")
        .expect("the consumer is open")
        .expect("a delivery, not an error")
}

/// Publishes an empty JSON object to `config`'s binding key.
async fn publish_empty(broker: &AmqpBroker, config: &machinery::Config) {
    broker
        .publish(Message::new(
            config.amqp.binding_key.clone(),
            b"{}".to_vec(),
        ))
        .await
        .unwrap();
}

async fn final_state(server: &Server, uuid: &str) -> wire::TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .expect("backend")
        .wait_final(uuid, Some(deadline))
        .await
        .expect("final state")
}

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_on_rabbitmq() {
    let server = server("suite").await;
    let worker = server.worker().concurrency(8).spawn().await.unwrap();

    let r = server.send(add::signature(vec![1, 1])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 2);
    let r = server.send(sum_ints::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);

    let chain = add::signature(vec![2, 2])
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    assert_eq!(
        server
            .send(chain)
            .await
            .unwrap()
            .get_timeout(WAIT)
            .await
            .unwrap(),
        60
    );

    let chain = float_add::signature(1.0, 1.0).then(float_multiply::signature(4.0));
    assert_eq!(
        server
            .send(chain)
            .await
            .unwrap()
            .get_timeout(WAIT)
            .await
            .unwrap(),
        8.0
    );

    let err = server
        .send(return_just_error::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("kaboom"));

    let r = server
        .send(return_multiple_values::signature(
            "foo".into(),
            "bar".into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        r.get_timeout(WAIT).await.unwrap(),
        ("foo".to_owned(), "bar".to_owned())
    );

    let err = server
        .send(panic_task::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Task);
    assert_eq!(err.task_error(), Some("oops"));

    worker.shutdown().await.unwrap();
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_task_runs_no_earlier_than_its_eta() {
    let server = server("delay").await;
    let worker = server.worker().spawn().await.unwrap();
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let r = server
        .send(add::signature(vec![40, 2]).with_eta(eta).with_priority(3))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 42);
    let done = chrono::Utc::now();
    assert!(done >= eta, "ran at {done}, before its ETA {eta}");
    worker.shutdown().await.unwrap();
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_with_different_tasks_share_a_queue() {
    let server = server("shared").await;
    let adders = server
        .worker()
        .tasks(["add"])
        .concurrency(4)
        .spawn()
        .await
        .unwrap();
    let multipliers = server
        .worker()
        .tasks(["multiply"])
        .concurrency(4)
        .spawn()
        .await
        .unwrap();
    let mut adds = Vec::new();
    let mut products = Vec::new();
    for i in 0..50 {
        adds.push(server.send(add::signature(vec![i, 1])).await.unwrap());
        products.push(server.send(multiply::signature(vec![i, 2])).await.unwrap());
    }
    for (i, (a, m)) in adds.iter().zip(&products).enumerate() {
        let i = i as i64;
        assert_eq!(a.get_timeout(WAIT).await.unwrap(), i + 1);
        assert_eq!(m.get_timeout(WAIT).await.unwrap(), i * 2);
    }
    adders.shutdown().await.unwrap();
    multipliers.shutdown().await.unwrap();
    let (_c, channel) = raw_channel().await;
    assert_eq!(
        queue_depth(&channel, &server.config().default_queue).await,
        0
    );
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_queue_worker() {
    let server = server("custom").await;
    let queue = format!("{}_images", server.config().default_queue);
    let worker = server.worker().queue(queue.clone()).spawn().await.unwrap();
    let r = server
        .send(add::signature(vec![3, 4]).with_routing_key(queue.clone()))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 7);
    worker.shutdown().await.unwrap();
    // A routing key no queue is bound to is an error, not a silent loss.
    let err = server
        .send(add::signature(vec![1]).with_routing_key("nobody_listens_here"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.is_permanent());
    assert!(err.to_string().contains("no queue is bound"), "{err}");
    let (_c, channel) = raw_channel().await;
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_are_dead_lettered_or_failed_and_the_worker_keeps_going() {
    let server = server("bad").await;
    let config = server.config().clone();
    let worker = server
        .worker()
        .tasks(["add", "sum_ints"])
        .spawn()
        .await
        .unwrap();
    let (conn, channel) = raw_channel().await;
    let publish = |body: Vec<u8>| {
        let channel = channel.clone();
        let (exchange, key) = (
            config.amqp.exchange.clone(),
            config.amqp.binding_key.clone(),
        );
        async move { publish_raw(&channel, &exchange, &key, &body).await }
    };

    // Bodies that are not signatures: dead-lettered.
    publish(b"not json at all".to_vec()).await;
    publish(br#"{"UUID": 12, "Name": ["add"]}"#.to_vec()).await;
    publish(vec![b'x'; 10 * 1024 * 1024]).await;
    let dlq = format!("{}.dead_letter", config.default_queue);
    let deadline = Instant::now() + WAIT;
    // Probed on channels of their own: the dead-letter queue does not exist at first.
    while queue_depth_probe(&conn, &dlq).await < 3 {
        assert!(
            Instant::now() < deadline,
            "bad bodies were not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Signatures whose args do not fit: FAILURE with a clear error.
    let cases = [
        (
            r#"[{"Type":"int128","Value":1}]"#,
            "add",
            "expected type `int64`, got `int128`",
        ),
        (
            r#"[{"Type":"int64","Value":1.5}]"#,
            "add",
            "invalid `int64` value 1.5",
        ),
        (r#"[]"#, "sum_ints", "takes 1 argument, got 0"),
        (
            r#"[{"Type":"[]int64","Value":[1]},{"Type":"int64","Value":1}]"#,
            "sum_ints",
            "takes 1 argument, got 2",
        ),
    ];
    for (args, name, expected) in cases {
        let uuid = format!("task_{}", uuid::Uuid::new_v4());
        let body = format!(r#"{{"UUID":"{uuid}","Name":"{name}","Args":{args}}}"#);
        publish(body.into_bytes()).await;
        let state = final_state(&server, &uuid).await;
        assert_eq!(state.state, State::Failure);
        assert!(
            state.error.contains(expected),
            "{:?} should say {expected:?}",
            state.error
        );
    }

    // Unregistered, flagged: dropped. Unregistered, not flagged: handed back, still queued.
    let dropped = format!("task_{}", uuid::Uuid::new_v4());
    publish(
        format!(r#"{{"UUID":"{dropped}","Name":"multiply","IgnoreWhenTaskNotRegistered":true}}"#)
            .into_bytes(),
    )
    .await;
    let kept = server.send(multiply::signature(vec![6, 7])).await.unwrap();

    // The worker still runs good tasks.
    let r = server.send(add::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kept.state().await.unwrap().unwrap().state, State::Pending);
    worker.shutdown().await.unwrap();

    // A worker that has `multiply` picks up the handed-back task; the dropped one is gone.
    let full = server.worker().spawn().await.unwrap();
    assert_eq!(kept.get_timeout(WAIT).await.unwrap(), 42);
    full.shutdown().await.unwrap();
    assert_eq!(queue_depth(&channel, &config.default_queue).await, 0);
    assert_eq!(queue_depth_probe(&conn, &dlq).await, 3);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_loses_nothing() {
    let server = server("kill9").await;
    let mut worker = WorkerProcess::start(server.config(), &[("WORKER_CONCURRENCY", "8")]);
    let handles = server
        .send_all((0..24).map(|i| long_task::signature(i, 1500)))
        .await
        .unwrap();
    // Let it take the first batch, then kill it in the middle of those tasks.
    tokio::time::sleep(Duration::from_millis(700)).await;
    worker.kill9();
    let running = {
        let mut n = 0;
        for h in &handles {
            if h.state().await.unwrap().map(|s| s.state) == Some(State::Started) {
                n += 1;
            }
        }
        n
    };
    assert!(running > 0, "the worker was killed with tasks in flight");
    let _restarted = WorkerProcess::start(server.config(), &[("WORKER_CONCURRENCY", "8")]);
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(
            h.get_timeout(Duration::from_secs(60)).await.unwrap(),
            i as i64
        );
    }
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_tasks_and_exits_zero() {
    let server = server("sigterm").await;
    let mut worker = WorkerProcess::start(server.config(), &[("WORKER_CONCURRENCY", "4")]);
    assert!(
        worker.started_in < Duration::from_secs(5),
        "worker took {:?} to start",
        worker.started_in
    );
    let handles = server
        .send_all((0..4).map(|i| long_task::signature(i, 1000)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.sigterm();
    let status = worker.child.wait().unwrap();
    assert!(status.success(), "worker exited with {status}");
    for h in &handles {
        let state = h.state().await.unwrap().unwrap();
        assert_eq!(state.state, State::Success, "{state:?}");
    }
    let (_c, channel) = raw_channel().await;
    assert_eq!(
        queue_depth(&channel, &server.config().default_queue).await,
        0
    );
    cleanup(server.config()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_appear_in_errors() {
    let mut config = unique_config("secret");
    config.broker = "amqp://guest:hunter2-secret@127.0.0.1:1/".into();
    config.reconnect_timeout = Duration::from_millis(300);
    let err = Server::new(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker);
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("guest:***@127.0.0.1:1"), "{text}");
}

static RUN_ORDER: std::sync::Mutex<Vec<i64>> = std::sync::Mutex::new(Vec::new());

#[machinery::task]
fn record_order(id: i64) -> i64 {
    RUN_ORDER.lock().unwrap().push(id);
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_headers_go_in_the_amqp_headers_but_the_trace_context_stays_in_the_body() {
    // Go's Publish (v2/brokers/amqp/amqp.go) puts signature.Headers in the AMQP headers too; so
    // does machinery, except the trace context it gives every message: Go's consumeOne and
    // machinery's consumer read it from the body, and a header table costs the broker and every
    // consumer of every message (README, "differs on purpose").
    let config = unique_config("header_table");
    let server = Server::new(config.clone()).await.unwrap();
    server
        .send(add::signature(vec![1, 2]).with_header("tenant", "acme"))
        .await
        .unwrap();
    server.send(add::signature(vec![3, 4])).await.unwrap();
    let (_conn, channel) = raw_channel().await;

    let tagged = get_raw(&channel, &config.default_queue, true).await;
    let table = tagged
        .delivery
        .properties
        .headers()
        .clone()
        .expect("the signature's own header is in the AMQP headers");
    let keys: Vec<&str> = table.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["tenant"], "{table:?}");
    let body: serde_json::Value = serde_json::from_slice(&tagged.delivery.data).unwrap();
    assert_eq!(body["Headers"]["tenant"], "acme");
    assert!(
        body["Headers"]["traceparent"].is_string(),
        "the trace context travels in the body: {body}"
    );

    let plain = get_raw(&channel, &config.default_queue, true).await;
    assert_eq!(
        plain.delivery.properties.headers(),
        &None,
        "a message with only the trace context has no header table"
    );
    let body: serde_json::Value = serde_json::from_slice(&plain.delivery.data).unwrap();
    assert!(body["Headers"]["traceparent"].is_string(), "{body}");
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_declare_args_pass_through_and_priorities_are_honoured() {
    // x-max-priority through AMQP_QUEUE_DECLARE_ARGS: with the tasks queued before the worker
    // starts, the high-priority ones run first.
    let mut config = unique_config("priority");
    config
        .amqp
        .queue_declare_args
        .insert("x-max-priority".into(), 10.into());
    let server = Server::new(config.clone()).await.unwrap();
    let mut handles = Vec::new();
    for (id, priority) in [(0i64, 1u8), (1, 1), (2, 9), (3, 1), (4, 9)] {
        let h = server
            .send(record_order::signature(id).with_priority(priority))
            .await
            .unwrap();
        handles.push(h);
    }
    let worker = server
        .worker()
        .tasks(["record_order"])
        .concurrency(1)
        .spawn()
        .await
        .unwrap();
    for h in &handles {
        h.get_timeout(WAIT).await.unwrap();
    }
    worker.shutdown().await.unwrap();
    let order = RUN_ORDER.lock().unwrap().clone();
    assert_eq!(order.len(), 5);
    let mut first_two = order[..2].to_vec();
    first_two.sort_unstable();
    assert_eq!(first_two, [2, 4], "run order {order:?}");
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delay_queue_survives_reuse_past_its_expiry() {
    // A delay queue expires 2 * delay after its last declaration, and publishing to it does not
    // count as use: a message published to it late in its life must still come out.
    let server = server("delay_reuse").await;
    let worker = server.worker().tasks(["add"]).spawn().await.unwrap();
    let mut uuids = Vec::new();
    for _ in 0..2 {
        let mut sig = wire::Signature::new("add");
        sig.args = vec![machinery::value::encode_arg(&1i64).unwrap()];
        sig.routing_key = server.config().amqp.binding_key.clone();
        uuids.push(sig.uuid.clone());
        let mut message = machinery::broker::Message::new(
            server.config().amqp.binding_key.clone(),
            sig.to_json().unwrap(),
        );
        message.delay = Some(Duration::from_millis(600));
        server.broker().publish(message).await.unwrap();
        // The second publish comes when the queue (declared at t=0, expiring at 1.2 s) would
        // still hold it past its expiry, had it not been declared again.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    for uuid in &uuids {
        let state = final_state(&server, uuid).await;
        assert_eq!(state.state, State::Success);
    }
    worker.shutdown().await.unwrap();
    cleanup(server.config()).await;
}

/// A delayed message for `routing_key` with an empty body, straight to the broker.
fn delayed(routing_key: &str, delay: Duration) -> Message {
    let mut message = Message::new(routing_key.to_owned(), b"{}".to_vec());
    message.delay = Some(delay);
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_messages_go_through_the_exchange_as_in_go() {
    // Go: v2/brokers/amqp/amqp.go `delay`: the delay queue is bound to the exchange with its own
    // name as binding key, and the message is published to the exchange with that name as
    // routing key (not to the default exchange).
    let config = unique_config("delay_exchange");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let (exchange, key) = (
        config.amqp.exchange.clone(),
        config.amqp.binding_key.clone(),
    );
    let delay_queue = AmqpBroker::delay_queue(60_000, &exchange, &key);
    let (_conn, channel) = raw_channel().await;
    // A queue bound to the exchange with the delay queue's name gets a copy of what the
    // exchange routes there, and nothing of what goes through the default exchange.
    let probe = format!("{}.probe", config.default_queue);
    channel
        .queue_declare(
            probe.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            probe.as_str().into(),
            exchange.as_str().into(),
            delay_queue.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    broker
        .publish(delayed(&key, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(queue_depth(&channel, &delay_queue).await, 1);
    assert_eq!(
        queue_depth(&channel, &probe).await,
        1,
        "not sent through the exchange"
    );
    // The delay queue is bound: a message a Go producer publishes to the exchange with its
    // name lands in it.
    publish_raw(&channel, &exchange, &delay_queue, b"{}").await;
    let deadline = Instant::now() + WAIT;
    while queue_depth(&channel, &delay_queue).await < 2 {
        assert!(Instant::now() < deadline, "the delay queue is not bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for queue in [delay_queue, probe] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlong_names_are_refused_before_they_reach_the_client_library() {
    // amq-protocol panics on a short string over 255 bytes; the broker must refuse such a
    // message with an Encode error instead, before anything is sent.
    let server = server("long").await;
    let err = server
        .send(add::signature(vec![1]).with_routing_key("r".repeat(300)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    assert!(err.is_permanent());
    assert!(err.to_string().contains("routing key"), "{err}");

    // A routing key that fits, but not inside `delay.<ms>.<exchange>.<routing key>`.
    let message = delayed(&"k".repeat(250), Duration::from_secs(1));
    let err = server.broker().validate(&message).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    assert!(err.to_string().contains("delay queue"), "{err}");
    let err = server.broker().publish(message.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    let outcomes = server.broker().publish_many(vec![message]).await;
    assert_eq!(outcomes[0].as_ref().unwrap_err().kind(), ErrorKind::Encode);

    // Header keys, at any depth.
    for headers in [
        serde_json::json!({ "h".repeat(256): 1 }),
        serde_json::json!({ "outer": { "list": [1, { "h".repeat(256): true }] } }),
    ] {
        let mut sig = add::signature(vec![1]);
        for (key, value) in headers.as_object().unwrap() {
            sig = sig.with_header(key.clone(), value.clone());
        }
        let err = server.send(sig).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
        assert!(err.to_string().contains("header"), "{err}");
    }

    // A worker for a queue whose name (or whose dead-letter queue's name) cannot be carried.
    for queue in ["q".repeat(256), "q".repeat(250)] {
        let err = server.worker().queue(queue).spawn().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    }

    // The broker still works.
    let worker = server.worker().spawn().await.unwrap();
    let r = server.send(add::signature(vec![2, 3])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 5);
    worker.shutdown().await.unwrap();
    cleanup(server.config()).await;

    // Configured names are checked at startup.
    let configs: [fn(&mut machinery::Config); 5] = [
        |c| c.amqp.exchange = "e".repeat(256),
        |c| c.amqp.binding_key = "b".repeat(256),
        |c| c.default_queue = "q".repeat(250),
        |c| {
            c.amqp.queue_declare_args.insert("a".repeat(256), 1.into());
        },
        |c| {
            c.amqp
                .queue_binding_args
                .insert("x".into(), serde_json::json!({ "a".repeat(256): 1 }));
        },
    ];
    for change in configs {
        let mut config = unique_config("long_config");
        change(&mut config);
        let err = Server::new(config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_permanent_and_nacks_retryable() {
    // A queue the broker refuses to declare with our arguments (PRECONDITION_FAILED): an
    // existing queue declared differently, an argument out of range. Permanent, so it fails at
    // once instead of retrying for reconnect_timeout.
    let (_c, channel) = raw_channel().await;
    let mut existing = unique_config("refused");
    existing.reconnect_timeout = Duration::from_secs(20);
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        lapin::types::AMQPValue::LongLongInt(5),
    );
    channel
        .queue_declare(
            existing.default_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    existing
        .amqp
        .queue_declare_args
        .insert("x-max-priority".into(), 10.into());
    let mut out_of_range = unique_config("refused");
    out_of_range.reconnect_timeout = Duration::from_secs(20);
    out_of_range
        .amqp
        .queue_declare_args
        .insert("x-expires".into(), 0.into());
    for config in [existing, out_of_range] {
        let started = Instant::now();
        let err = Server::new(config.clone()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.is_permanent());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        cleanup(&config).await;
    }

    // A queue that refuses new messages (reject-publish overflow) nacks them: retryable.
    let mut config = unique_config("nack");
    config
        .amqp
        .queue_declare_args
        .insert("x-max-length".into(), 0.into());
    config
        .amqp
        .queue_declare_args
        .insert("x-overflow".into(), "reject-publish".into());
    let server = Server::new(config.clone()).await.unwrap();
    let err = server.send(add::signature(vec![1])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker, "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("nack"), "{err}");
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_delay_queue_stays_on_its_own_channel() {
    // RabbitMQ refuses to declare a delay queue that exists with other arguments. That refusal
    // closes the channel it came on: it must not be the publishing channel (failing the other
    // publishes in flight) nor make the broker reconnect.
    let config = unique_config("isolation");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let key = config.amqp.binding_key.clone();
    let delay = Duration::from_millis(5_000);
    let delay_queue = AmqpBroker::delay_queue(5_000, &config.amqp.exchange, &key);
    let (_c, channel) = raw_channel().await;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongLongInt(1234),
    );
    channel
        .queue_declare(
            delay_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();

    for round in 0..3 {
        let normal: Vec<_> = (0..100)
            .map(|i| {
                let broker = broker.clone();
                let message = Message::new(key.clone(), format!("{{\"n\":{i}}}").into_bytes());
                tokio::spawn(async move { broker.publish(message).await })
            })
            .collect();
        let refused = {
            let broker = broker.clone();
            let message = delayed(&key, delay);
            tokio::spawn(async move { broker.publish(message).await })
        };
        let err = refused.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
        assert!(err.to_string().contains(&delay_queue), "{err}");
        for publish in normal {
            publish.await.unwrap().unwrap();
        }
        assert_eq!(broker.reconnects(), 0, "round {round}");
    }
    // Other delays still work, on a fresh declaration channel.
    broker
        .publish(delayed(&key, Duration::from_millis(5_001)))
        .await
        .unwrap();
    assert_eq!(queue_depth(&channel, &config.default_queue).await, 300);
    assert_eq!(broker.reconnects(), 0);
    for queue in [
        delay_queue,
        AmqpBroker::delay_queue(5_001, &config.amqp.exchange, &key),
    ] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn far_etas_travel_in_hops_rabbitmq_accepts() {
    // RabbitMQ refuses x-message-ttl / x-expires over ten years; a delay is clamped to
    // MAX_DELAY_HOP per hop (the worker delays a message that arrives early again).
    let server = server("century").await;
    let config = server.config().clone();
    let key = config.amqp.binding_key.clone();
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    server
        .broker()
        .publish(delayed(&key, century))
        .await
        .unwrap();
    let eta = chrono::DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    server
        .send(add::signature(vec![1]).with_eta(eta))
        .await
        .unwrap();
    let hop = u64::try_from(AmqpBroker::MAX_DELAY_HOP.as_millis()).unwrap();
    let queue = AmqpBroker::delay_queue(hop, &config.amqp.exchange, &key);
    let (_c, channel) = raw_channel().await;
    assert_eq!(queue_depth(&channel, &queue).await, 2);
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quorum_queue_redeliveries_carry_their_count() {
    let mut config = unique_config("quorum");
    config
        .amqp
        .queue_declare_args
        .insert("x-queue-type".into(), "quorum".into());
    let broker = AmqpBroker::connect(&config).await.unwrap();
    publish_empty(&broker, &config).await;
    let mut consumer = broker.consume(&config.default_queue, 1).await.unwrap();
    let first = next(&mut consumer).await;
    assert!(!first.redelivered());
    assert_eq!(first.delivery_count(), Some(0));
    first.requeue().await.unwrap();
    let second = next(&mut consumer).await;
    assert!(second.redelivered());
    assert_eq!(second.delivery_count(), Some(1));
    second.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    consumer.close().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test]
async fn each_unroutable_message_of_a_window_fails_itself() {
    // RabbitMQ acknowledges a run of publishes at once (`multiple`), and lapin hands a returned
    // message to whichever confirm of the run it completes first: each return must still be
    // reported for the message that was returned, and no other.
    let config = unique_config("returns");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let key = config.amqp.binding_key.clone();
    let (_c, channel) = raw_channel().await;
    let unroutable = |i: usize| i % 37 == 5;
    let messages: Vec<Message> = (0..3000)
        .map(|i| {
            let body = format!("{{\"n\":{i}}}").into_bytes();
            if unroutable(i) {
                Message::new(format!("nobody_listens_{i}"), body)
            } else {
                Message::new(key.clone(), body)
            }
        })
        .collect();
    let outcomes = broker.publish_many(messages).await;
    let wrong: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(i, outcome)| match outcome {
            Err(e) => !unroutable(*i) || e.kind() != ErrorKind::Rejected,
            Ok(()) => unroutable(*i),
        })
        .map(|(i, _)| i)
        .collect();
    assert!(wrong.is_empty(), "misreported: {wrong:?}");
    let routed = (0..3000).filter(|i| !unroutable(*i)).count() as u32;
    assert_eq!(queue_depth(&channel, &config.default_queue).await, routed);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_many_reports_each_message() {
    // One outcome per message, in order: the ones the broker cannot take fail alone, in any
    // confirm window, and the others are published.
    let config = unique_config("many");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let key = config.amqp.binding_key.clone();
    let refused_delay = AmqpBroker::delay_queue(7_000, &config.amqp.exchange, &key);
    let (_c, channel) = raw_channel().await;
    channel
        .queue_declare(
            refused_delay.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let unroutable = 600;
    let overlong = 5;
    let refused = 900;
    let messages: Vec<Message> = (0..1100)
        .map(|i| match i {
            _ if i == unroutable => Message::new("nobody_listens_here", b"{}".to_vec()),
            _ if i == overlong => Message::new("r".repeat(300), b"{}".to_vec()),
            _ if i == refused => delayed(&key, Duration::from_millis(7_000)),
            _ => Message::new(key.clone(), format!("{{\"n\":{i}}}").into_bytes()),
        })
        .collect();
    let outcomes = broker.publish_many(messages).await;
    assert_eq!(outcomes.len(), 1100);
    for (i, outcome) in outcomes.iter().enumerate() {
        match i {
            _ if i == unroutable || i == refused => {
                let err = outcome.as_ref().unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Rejected, "{i}: {err}");
            }
            _ if i == overlong => {
                let err = outcome.as_ref().unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Encode, "{i}: {err}");
            }
            _ => assert!(outcome.is_ok(), "{i}: {outcome:?}"),
        }
    }
    assert_eq!(queue_depth(&channel, &config.default_queue).await, 1097);
    assert_eq!(broker.reconnects(), 0);

    // A delay queue that went away after it was declared is declared again, not reported
    // as unroutable.
    let delay_queue = AmqpBroker::delay_queue(60_000, &config.amqp.exchange, &key);
    let once = vec![delayed(&key, Duration::from_secs(60))];
    assert!(broker.publish_many(once.clone()).await[0].is_ok());
    channel
        .queue_delete(delay_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    assert!(broker.publish_many(once.clone()).await[0].is_ok());
    channel
        .queue_delete(delay_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    broker.publish(once[0].clone()).await.unwrap();
    assert_eq!(queue_depth(&channel, &delay_queue).await, 1);

    for queue in [refused_delay, delay_queue] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    cleanup(&config).await;
}

/// Everything logged at any level, by any target, while [`CAPTURING`] is on: a global
/// subscriber, since lapin logs from its own I/O thread.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
static CAPTURING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct CaptureWriter;

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_everything() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| CaptureWriter)
            .with_filter(tracing_subscriber::filter::filter_fn(|_| {
                CAPTURING.load(std::sync::atomic::Ordering::SeqCst)
            }));
        tracing_subscriber::registry()
            .with(layer)
            .try_init()
            .expect("the only global subscriber of this test binary");
    });
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (run the tests as root, with RabbitMQ from tests/services.sh)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_appear_at_no_log_level() {
    // lapin logs every frame it writes at TRACE, the login frame (`\0user\0password`) included,
    // and a message the broker returned, body and all, at WARN: a task's arguments may hold
    // secrets too.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let user = format!("machinery_log_test_{}", &id[..8]);
    let password = format!("Pw-{}-sEcReT", &id[8..24]);
    rabbitmqctl(&["add_user", &user, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);

    capture_everything();
    CAPTURING.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut config = unique_config("logs");
    config.reconnect_timeout = Duration::from_secs(3);
    config.broker = format!("amqp://{user}:wrong-{password}@127.0.0.1:5672/%2f");
    let err = AmqpBroker::connect(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Broker, "{err}");
    config.broker = format!("amqp://{user}:{password}@127.0.0.1:5672/%2f");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    publish_empty(&broker, &config).await;
    let token = format!("Tk-{}-sEcReT", &id[..8]);
    let returned = broker
        .publish(Message::new(
            "nobody_binds_this_key",
            format!(r#"{{"token":"{token}"}}"#).into_bytes(),
        ))
        .await
        .unwrap_err();
    assert_eq!(returned.kind(), ErrorKind::Rejected, "{returned}");
    drop(broker);
    tokio::time::sleep(Duration::from_millis(200)).await;
    CAPTURING.store(false, std::sync::atomic::Ordering::SeqCst);
    rabbitmqctl(&["delete_user", &user]);
    cleanup(&config).await;

    let log = String::from_utf8_lossy(&CAPTURED.lock().unwrap()).into_owned();
    // The capture saw lapin's TRACE events, those of its I/O thread included.
    assert!(
        log.contains("lapin::io_loop: io_loop run"),
        "nothing captured"
    );
    // And those of its tasks.
    assert!(log.contains("lapin::internal_rpc: Handling internal RPC command"));
    assert!(log.contains(&user), "the user name is no secret");
    // The password, as text or as the bytes lapin prints a long string as.
    let as_bytes = |s: &str| {
        s.bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for secret in [
        password.clone(),
        as_bytes(&password),
        token.clone(),
        as_bytes(&token),
    ] {
        if let Some(at) = log.find(&secret) {
            let start = log[..at].rfind('\n').map_or(0, |n| n + 1);
            let end = log[at..].find('\n').map_or(log.len(), |n| at + n);
            panic!("a secret was logged:\n{}", &log[start..end]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_publishing_channel_is_reopened_without_reconnecting() {
    // Publishing to an exchange that was deleted makes the broker close the publishing channel
    // (NOT_FOUND): another is opened on the same connection, with the topology declared again.
    let config = unique_config("reopen");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let key = config.amqp.binding_key.clone();
    let (_c, channel) = raw_channel().await;
    channel
        .exchange_delete(config.amqp.exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    broker
        .publish(Message::new(key.clone(), b"{}".to_vec()))
        .await
        .unwrap();
    assert_eq!(broker.reconnects(), 1);
    assert_eq!(queue_depth(&channel, &config.default_queue).await, 1);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_looks_at_missing_queues_leave_the_broker_working() {
    // A passive declaration of a missing queue has the broker close its channel, and lapin
    // never gives such a channel's number back: the depth of a dead-letter queue nothing was
    // dead-lettered to yet (read by the metrics every 2 s, and every 60 s while it is missing,
    // and by every admin page) took
    // one of the main connection's 2,047 channels each time, until the worker could open none.
    use futures_util::StreamExt as _;
    let config = unique_config("missing_looks");
    let broker = AmqpBroker::connect(&config).await.unwrap();
    let prefix = config.default_queue.clone();
    let looks = futures_util::stream::iter(0..2_200)
        .map(|i| {
            let (broker, missing) = (broker.clone(), format!("{prefix}_missing_{i}"));
            async move { (i, broker.queue_depth(&missing).await) }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (i, look) in looks {
        let e = look.expect_err("a missing queue has no depth");
        assert!(e.to_string().contains("does not exist"), "look {i}: {e}");
    }
    // This broker still opens channels on its main connection (a consumer's), publishes, and
    // looks at queues.
    let mut consumer = broker.consume(&config.default_queue, 1).await.unwrap();
    publish_empty(&broker, &config).await;
    next(&mut consumer).await.ack().await.unwrap();
    assert_eq!(
        broker.queue_depth(&config.default_queue).await.unwrap(),
        Some(0)
    );
    consumer.cancel().await.unwrap();
    consumer.close().await.unwrap();
    cleanup(&config).await;
}
