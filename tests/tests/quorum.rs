//! Several broker URLs and quorum queues, on the single RabbitMQ node of the normal suite
//! (127.0.0.1:5672): Go's separator, masking, failing over to the next URL (an unreachable
//! first URL; a node lost mid-run, played by a TCP proxy that is shut), a quorum queue and its
//! dead-letter queue, and `x-delivery-limit`. The real 3-node cluster is `tests/cluster_test.sh`.

mod common;

use std::io::Write as _;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cleanup, get_raw, publish_raw, queue_depth, raw_channel, unique_config, WAIT};
use machinery::broker::amqp::AmqpBroker;
use machinery::wire::State;
use machinery::{Config, ErrorKind, Server};

include!("../src/tasks.rs");

/// A password that must never show in a log line or an error.
const SECRET: &str = "s3cret-never-logged";

/// A TCP proxy on a free 127.0.0.1 port to RabbitMQ on 5672, standing in for a cluster node:
/// [`shut`](Self::shut) closes it and every connection through it, as a node killed with -9
/// does (later connections are refused).
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (d, s) = (down.clone(), streams.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                inbound.set_nonblocking(false).unwrap();
                let Ok(outbound) = TcpStream::connect("127.0.0.1:5672") else {
                    continue;
                };
                let mut all = s.lock().unwrap();
                all.push(inbound.try_clone().unwrap());
                all.push(outbound.try_clone().unwrap());
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
            // The listener is dropped here: new connections are refused.
        });
        Proxy {
            port,
            down,
            streams,
        }
    }

    fn url(&self, password: &str) -> String {
        format!("amqp://guest:{password}@127.0.0.1:{}/", self.port)
    }

    fn shut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn with_urls(mut config: Config, urls: &[String]) -> Config {
    config.broker = urls.join(",");
    config.multiple_broker_separator = Some(",".into());
    config.validate().unwrap();
    config
}

fn quorum(mut config: Config) -> Config {
    config
        .amqp
        .queue_declare_args
        .insert("x-queue-type".into(), "quorum".into());
    config
}

/// A server whose broker is `broker` (so that the test can ask it which node it is on), with
/// the Redis results of `config`.
async fn server_on(config: &Config, broker: &AmqpBroker) -> Server {
    let mut results_only = config.clone();
    results_only.broker = "memory://quorum-test-results-only".into();
    results_only.multiple_broker_separator = None;
    let results = Server::new(results_only).await.unwrap();
    Server::from_parts(
        config.clone(),
        Arc::new(broker.clone()),
        results.backend().cloned(),
    )
}

#[test]
fn broker_urls_are_split_by_gos_separator_and_masked() {
    // Go: v2/config/config.go, `MultipleBrokerSeparator` (env `MULTIPLE_BROKEN_SEPARATOR`, sic);
    // v2/common/amqp.go, `AMQPConnector.Connect`: strings.Split(urls, urlSeparator).
    let broker = format!("amqp://guest:{SECRET}@r1:5701/;amqp://guest:{SECRET}@r2:5702/");
    for separator_key in ["MULTIPLE_BROKEN_SEPARATOR", "MULTIPLE_BROKER_SEPARATOR"] {
        let config = Config::from_lookup(|key| match key {
            "BROKER" => Some(broker.clone()),
            k if k == separator_key => Some(";".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            config.broker_urls(),
            [
                format!("amqp://guest:{SECRET}@r1:5701/"),
                format!("amqp://guest:{SECRET}@r2:5702/")
            ]
        );
        assert_eq!(
            config.masked_broker(),
            "amqp://guest:***@r1:5701/;amqp://guest:***@r2:5702/"
        );
        assert!(!format!("{config:?}").contains(SECRET));
    }
    let yaml = Config::from_yaml_str(&format!(
        "broker: '{broker}'\nmultiple_broker_separator: ';'\n"
    ))
    .unwrap();
    assert_eq!(yaml.broker_urls().len(), 2);
    // Without a separator the broker is one URL, commas and all (as in Go).
    let one = Config::from_lookup(|key| (key == "BROKER").then(|| "amqp://h/,x".into())).unwrap();
    assert_eq!(one.broker_urls(), ["amqp://h/,x"]);
    // Every URL of a list must be AMQP.
    let err = Config::builder()
        .broker(format!("amqp://h/;redis://:{SECRET}@h/"))
        .multiple_broker_separator(";")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.to_string().contains(SECRET), "{err}");
}

#[test]
fn quorum_queues_refuse_classic_arguments_at_startup() {
    // RabbitMQ 3.10: PRECONDITION_FAILED - invalid arg 'x-max-priority' ... of queue type
    // rabbit_quorum_queue (and 'x-queue-mode'). Said at startup, not at the first declaration.
    for arg in ["x-max-priority", "x-queue-mode"] {
        let err = Config::builder()
            .broker("amqp://127.0.0.1/")
            .queue_declare_arg("x-queue-type", "quorum")
            .queue_declare_arg(arg, 10)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains(arg), "{err}");
    }
    assert!(Config::builder()
        .broker("amqp://127.0.0.1/")
        .queue_declare_arg("x-queue-type", "quorum")
        .queue_declare_arg("x-delivery-limit", -1)
        .build()
        .is_err());
    // 0 would dead-letter every message on its first delivery.
    assert!(Config::builder()
        .broker("amqp://127.0.0.1/")
        .queue_declare_arg("x-queue-type", "quorum")
        .queue_declare_arg("x-delivery-limit", 0)
        .build()
        .is_err());
    // A classic queue keeps them.
    assert!(Config::builder()
        .broker("amqp://127.0.0.1/")
        .queue_declare_arg("x-max-priority", 10)
        .build()
        .is_ok());
}

#[tokio::test]
async fn an_unreachable_first_url_fails_over_to_the_next_and_logs_it_masked() {
    // Log into a buffer, on this (current-thread) runtime's thread.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Buffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let config = with_urls(
        unique_config("failover_first"),
        &[
            format!("amqp://guest:{SECRET}@127.0.0.1:1/"),
            common::amqp_url(),
        ],
    );
    let started = Instant::now();
    let broker = AmqpBroker::connect(&config).await.unwrap();
    println!(
        "connected past the unreachable URL in {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the next URL is tried at once, not after a backoff"
    );
    assert_eq!(
        broker.node(),
        machinery::config::mask_url(&common::amqp_url())
    );
    let server = server_on(&config, &broker).await;
    let worker = server.worker().concurrency(2).spawn().await.unwrap();
    let result = server.send(add::signature(vec![2, 3])).await.unwrap();
    assert_eq!(result.get_timeout(WAIT).await.unwrap(), 5);
    worker.shutdown().await.unwrap();

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("amqp://guest:***@127.0.0.1:1/"),
        "the failed node is logged, masked:\n{logs}"
    );
    assert!(!logs.contains(SECRET), "a password was logged:\n{logs}");
    let _ = std::io::stdout().flush();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_fails_over_to_the_next_one_mid_run() {
    // Two "nodes" (proxies to the one RabbitMQ); the worker's node is shut mid-run: the worker
    // goes on with the next one (round robin), and every task reaches SUCCESS.
    const TASKS: i64 = 400;
    let (a, b) = (Proxy::start(), Proxy::start());
    let base = quorum(unique_config("failover_drop"));
    let worker_config = with_urls(base.clone(), &[a.url("guest"), b.url("guest")]);
    let broker = AmqpBroker::connect(&worker_config).await.unwrap();
    assert_eq!(
        broker.node(),
        format!("amqp://guest:***@127.0.0.1:{}/", a.port)
    );
    let worker_server = Server::from_parts(
        worker_config.clone(),
        Arc::new(broker.clone()),
        Server::new(base.clone()).await.unwrap().backend().cloned(),
    );
    let producer = Server::new(base.clone()).await.unwrap();
    let worker = worker_server
        .worker()
        .concurrency(16)
        .spawn()
        .await
        .unwrap();
    let handles = producer
        .send_all((0..TASKS).map(|i| long_task::signature(i, 2)))
        .await
        .unwrap();
    // Shut the worker's node once it is busy.
    let backend = producer.backend().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    while backend
        .get_state(handles[20].task_uuid())
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "the worker does not consume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shut_at = Instant::now();
    a.shut();
    while !broker.node().contains(&b.port.to_string()) || broker.reconnects() == 0 {
        assert!(shut_at.elapsed() < WAIT, "no failover to the next node");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("reconnected to the next node in {:?}", shut_at.elapsed());
    for (i, handle) in handles.iter().enumerate() {
        assert_eq!(
            handle.get_timeout(WAIT).await.unwrap(),
            i as i64,
            "task {i}"
        );
        assert_eq!(handle.state().await.unwrap().unwrap().state, State::Success);
    }
    assert!(shut_at.elapsed() < WAIT);
    worker.shutdown().await.unwrap();
    b.shut();
    cleanup(&base).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quorum_queue_is_declared_and_consumed_and_its_dead_letter_queue_stays_classic() {
    let config = quorum(unique_config("quorum"));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(4).spawn().await.unwrap();
    let handles = server
        .send_all((0..50).map(|i| add::signature(vec![i, 1])))
        .await
        .unwrap();
    for (i, handle) in handles.iter().enumerate() {
        assert_eq!(handle.get_timeout(WAIT).await.unwrap(), i as i64 + 1);
    }
    // Not a signature: dead-lettered, into a classic queue as earlier releases declared it.
    let (_conn, channel) = raw_channel().await;
    publish_raw(
        &channel,
        &config.amqp.exchange,
        &config.amqp.binding_key,
        b"not json",
    )
    .await;
    let dead_letter = AmqpBroker::dead_letter_queue(&config.default_queue);
    let deadline = Instant::now() + WAIT;
    while queue_depth(&channel, &dead_letter).await < 1 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_c, probe) = raw_channel().await;
    let classic = probe
        .queue_declare(
            dead_letter.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    // A deployment that ran an earlier release has a classic dead-letter queue; declaring it
    // quorum would fail every dead-letter with PRECONDITION_FAILED.
    classic.expect("the dead-letter queue is a classic queue");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn x_delivery_limit_dead_letters_a_message_whose_workers_keep_dying() {
    // A quorum queue with x-delivery-limit 2 drops a message returned a third time (it has no
    // dead-letter exchange). Two workers die holding it (their channels close unacked); the
    // third delivery, x-delivery-count 2, is the broker's last: the worker dead-letters it and
    // records FAILURE instead of running it into the broker's drop.
    let mut config = quorum(unique_config("delivery_limit"));
    config
        .amqp
        .queue_declare_args
        .insert("x-delivery-limit".into(), 2.into());
    let server = Server::new(config.clone()).await.unwrap();
    let handle = server.send(add::signature(vec![40, 2])).await.unwrap();
    for dying in 0..2u32 {
        let (_conn, channel) = raw_channel().await;
        let message = get_raw(&channel, &config.default_queue, false).await;
        let count = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        assert!(
            dying == 0 || count.is_some(),
            "RabbitMQ counts the deliveries of a quorum queue ({count:?})"
        );
        // The worker dies: its channel closes with the message unacknowledged.
        channel.close(200, "worker died".into()).await.unwrap();
    }
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let dead_letter = AmqpBroker::dead_letter_queue(&config.default_queue);
    let (_conn, channel) = raw_channel().await;
    let deadline = Instant::now() + WAIT;
    while queue_depth(&channel, &dead_letter).await < 1 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = handle.state().await.unwrap().expect("a state");
    assert_eq!(state.state, State::Failure, "{state:?}");
    assert!(
        state.error.contains("x-delivery-limit 2"),
        "{}",
        state.error
    );
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}
