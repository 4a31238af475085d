//! A result-store outage loses nothing (issue 6, item 13): during a run of 2,000 tasks on
//! RabbitMQ, the worker's Redis is killed with SIGKILL for 30 s (longer than the 15 s request
//! timeout) and restarted. While it is down the worker takes no new deliveries and keeps the
//! ones in hand; afterwards every task is SUCCESS, and none ran twice except those in flight at
//! the kill. Executions are counted per task.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{cleanup, unique_config, PrivateRedis};
use machinery::wire::State;
use machinery::{task, Config, Server};

const TASKS: i64 = 2_000;
const CONCURRENCY: usize = 8;

static RUNS: Mutex<Option<HashMap<i64, usize>>> = Mutex::new(None);

#[task]
async fn outage_task(id: i64) -> i64 {
    tokio::time::sleep(Duration::from_millis(5)).await;
    *RUNS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_default() += 1;
    id
}

fn ran() -> usize {
    RUNS.lock().unwrap().as_ref().map_or(0, HashMap::len)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_of_30_s_during_2000_tasks_loses_nothing() {
    let mut redis = PrivateRedis::start_durable();
    let base = unique_config("outage");
    let config = Config::builder()
        .broker(base.broker.clone())
        .result_backend(redis.url())
        .exchange(base.amqp.exchange.clone())
        .default_queue(base.default_queue.clone())
        .binding_key(base.amqp.binding_key.clone())
        .prefetch_count(16)
        .store_retry_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server
        .worker()
        .tasks([outage_task::NAME])
        .concurrency(CONCURRENCY)
        .spawn()
        .await
        .unwrap();
    let handles = server
        .send_all((0..TASKS).map(outage_task::signature))
        .await
        .unwrap();

    // Kill Redis a little way into the run, for 30 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ran() < 200 {
        assert!(Instant::now() < deadline, "the run did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.kill9();
    let at_kill = ran();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let soon_after = ran();
    tokio::time::sleep(Duration::from_secs(28)).await;
    let before_restart = ran();
    // Nothing new was taken while the store was down: at most the deliveries in hand ran.
    assert!(
        before_restart - at_kill <= CONCURRENCY,
        "{} tasks ran while Redis was down",
        before_restart - at_kill
    );
    assert_eq!(
        soon_after, before_restart,
        "tasks kept running during the outage"
    );
    redis.restart();

    for handle in &handles {
        handle.get_timeout(Duration::from_secs(120)).await.unwrap();
    }
    assert!(!worker.is_finished(), "the worker stopped");
    let uuids: Vec<String> = handles.iter().map(|h| h.task_uuid().to_owned()).collect();
    let states = server.backend().unwrap().get_states(&uuids).await.unwrap();
    assert!(states
        .iter()
        .all(|s| s.as_ref().is_some_and(|s| s.state == State::Success)));
    let runs = RUNS.lock().unwrap().clone().unwrap();
    assert_eq!(runs.len(), usize::try_from(TASKS).unwrap());
    let twice = runs.values().filter(|n| **n > 1).count();
    eprintln!("ran before the kill: {at_kill}; ran twice: {twice}");
    assert!(twice <= CONCURRENCY, "{twice} tasks ran twice");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}
