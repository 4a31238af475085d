//! A RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`) while a producer sends and a
//! worker consumes 5,000 tasks: every task reaches SUCCESS with no human action.
//!
//! In its own test binary: it stops the broker that every other AMQP test uses.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cleanup, unique_config};
use machinery::wire::State;
use machinery::Server;

include!("../src/tasks.rs");

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl must be installed (tests/services.sh installs it)");
    assert!(status.success(), "rabbitmqctl {args:?} failed: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_loses_nothing() {
    const TASKS: i64 = 5_000;
    let config = unique_config("restart");
    let producer = Server::new(config.clone()).await.unwrap();
    let consumer_side = Server::new(config.clone()).await.unwrap();
    let worker = consumer_side
        .worker()
        .concurrency(32)
        .spawn()
        .await
        .unwrap();

    let sent = Arc::new(AtomicUsize::new(0));
    let send = tokio::spawn({
        let producer = producer.clone();
        let sent = sent.clone();
        async move {
            let mut handles = Vec::new();
            for start in (0..TASKS).step_by(25) {
                let batch = producer
                    .send_all((start..start + 25).map(|i| long_task::signature(i, 1)))
                    .await
                    .expect("sending survives the restart");
                handles.extend(batch);
                sent.store(handles.len(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            handles
        }
    });

    // Restart the broker in the middle of it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = sent.load(Ordering::SeqCst);
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(2));
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();
    assert!(
        before > 0 && before < TASKS as usize,
        "the restart must happen while sending ({before} sent)"
    );

    let handles = send.await.unwrap();
    assert_eq!(handles.len(), TASKS as usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, handle) in handles.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert_eq!(
            handle.get_timeout(left).await.unwrap(),
            i as i64,
            "task {i}"
        );
        assert_eq!(handle.state().await.unwrap().unwrap().state, State::Success);
    }
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}
