//! A real 3-node RabbitMQ cluster (`tests/cluster.sh`: r1..r3 on 127.0.0.1:5701..5703) and a
//! quorum queue: 5,000 tasks, and the node the worker is connected to is killed with -9 in the
//! middle of the run. Pass: no task lost, every task SUCCESS, consuming again on another node
//! within 5 s; the reconnect time and the duplicate runs are printed.
//!
//! Ignored in the normal suite (three nodes on two cores are heavy): `tests/cluster_test.sh`
//! starts the cluster, runs this with `MACHINERY_CLUSTER=1 ... --ignored`, and stops it.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use common::{redis_url, unique_config};
use machinery::broker::amqp::AmqpBroker;
use machinery::wire::State;
use machinery::{Config, Server};

const TASKS: i64 = 5_000;

/// Every run of a task: its id and when it started.
static RUNS: LazyLock<Mutex<Vec<(i64, Instant)>>> = LazyLock::new(|| Mutex::new(Vec::new()));

#[machinery::task(name = "cluster_job")]
async fn cluster_job(id: i64) -> i64 {
    if let Ok(mut runs) = RUNS.lock() {
        runs.push((id, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    id
}

fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/")
}

/// The configuration of a client whose broker list starts at `first` (r1, r2, r3 in turn).
fn config_from(base: &Config, first: usize) -> Config {
    let ports = [5701u16, 5702, 5703];
    let urls: Vec<String> = (0..3).map(|i| node_url(ports[(first + i) % 3])).collect();
    let mut config = base.clone();
    config.broker = urls.join(",");
    config.multiple_broker_separator = Some(",".into());
    config.validate().expect("a valid cluster configuration");
    config
}

/// The node (r1..r3) behind a masked URL of ours.
fn node_name(masked: &str) -> &'static str {
    if masked.contains(":5701/") {
        "r1"
    } else if masked.contains(":5702/") {
        "r2"
    } else {
        "r3"
    }
}

fn kill_node(node: &str) {
    let dir = std::env::var("CLUSTER_DIR").unwrap_or_else(|_| "/tmp/machinery-cluster".into());
    let pid = std::fs::read_to_string(format!("{dir}/{node}/pid"))
        .expect("the node's PID_FILE (tests/cluster.sh start)");
    let status = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {node} ({})", pid.trim());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the 3-node cluster: run tests/cluster_test.sh"]
async fn killing_the_workers_node_loses_nothing() {
    assert_eq!(
        std::env::var("MACHINERY_CLUSTER").as_deref(),
        Ok("1"),
        "start the cluster first: tests/cluster_test.sh runs this test"
    );
    let mut base = unique_config("cluster");
    base.result_backend = redis_url();
    base.amqp
        .queue_declare_args
        .insert("x-queue-type".into(), "quorum".into());
    base.amqp.prefetch_count = 64;
    base.reconnect_timeout = Duration::from_secs(60);

    // The worker connects first (r1 first): it declares the quorum queue, whose leader is then
    // its own node, so the kill takes the queue's leader too. The producer starts at r2.
    let worker_config = config_from(&base, 0);
    let broker = AmqpBroker::connect(&worker_config).await.unwrap();
    let producer = Server::new(config_from(&base, 1)).await.unwrap();
    let worker_server = Server::from_parts(
        worker_config.clone(),
        Arc::new(broker.clone()),
        producer.backend().cloned(),
    );
    let worker = worker_server
        .worker()
        .concurrency(32)
        .spawn()
        .await
        .unwrap();
    let worker_node = node_name(&broker.node());
    println!("worker on {worker_node} ({})", broker.node());

    let started = Instant::now();
    let send = tokio::spawn({
        let producer = producer.clone();
        async move {
            let mut handles = Vec::new();
            for start in (0..TASKS).step_by(100) {
                let batch = producer
                    .send_all((start..start + 100).map(cluster_job::signature))
                    .await
                    .expect("sending survives the node's death");
                handles.extend(batch);
            }
            handles
        }
    });

    // Kill the worker's node once a fifth of the tasks ran.
    let deadline = Instant::now() + Duration::from_secs(120);
    while RUNS.lock().unwrap().len() < (TASKS / 5) as usize {
        assert!(Instant::now() < deadline, "the worker does not consume");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ran_before = RUNS.lock().unwrap().len();
    let killed_at = Instant::now();
    kill_node(worker_node);
    println!(
        "killed {worker_node} after {ran_before} runs ({:?} into the run)",
        killed_at - started
    );
    let mut reconnected_at = None;
    while reconnected_at.is_none() {
        if node_name(&broker.node()) != worker_node && broker.reconnects() > 0 {
            reconnected_at = Some(Instant::now());
        }
        assert!(killed_at.elapsed() < Duration::from_secs(60), "no failover");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reconnected_at = reconnected_at.unwrap();

    let handles = send.await.unwrap();
    assert_eq!(handles.len(), TASKS as usize);
    let deadline = Instant::now() + Duration::from_secs(180);
    for (i, handle) in handles.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert_eq!(
            handle.get_timeout(left).await.unwrap(),
            i as i64,
            "task {i} lost"
        );
        assert_eq!(
            handle.state().await.unwrap().unwrap().state,
            State::Success,
            "task {i}"
        );
    }
    let total = started.elapsed();
    worker.shutdown().await.unwrap();

    let runs = RUNS.lock().unwrap().clone();
    let mut per_task: HashMap<i64, u32> = HashMap::new();
    for (id, _) in &runs {
        *per_task.entry(*id).or_default() += 1;
    }
    assert_eq!(per_task.len(), TASKS as usize, "every task ran");
    let duplicates: u32 = per_task.values().map(|n| n - 1).sum();
    let duplicated_tasks = per_task.values().filter(|n| **n > 1).count();
    let consuming_again = runs
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at >= reconnected_at)
        .min()
        .expect("tasks ran after the reconnect")
        - killed_at;
    println!(
        "CLUSTER RESULT: {TASKS} tasks, 0 lost, all SUCCESS in {total:?}; killed {worker_node}; \
         worker reconnected to {} in {:?}; consuming again after {consuming_again:?}; \
         duplicate runs: {duplicates} ({duplicated_tasks} tasks ran more than once); \
         publishing connection reconnects of the worker's broker: {}",
        node_name(&broker.node()),
        reconnected_at - killed_at,
        broker.reconnects()
    );
    assert!(
        consuming_again < Duration::from_secs(5),
        "consuming again took {consuming_again:?}"
    );
    // The queue lives on: delete it through a surviving node.
    let survivor = node_name(&broker.node());
    let port = match survivor {
        "r1" => 5701,
        "r2" => 5702,
        _ => 5703,
    };
    if let Ok(conn) =
        lapin::Connection::connect(&format!("{}%2f", node_url(port)), Default::default()).await
    {
        if let Ok(channel) = conn.create_channel().await {
            for queue in [
                base.default_queue.clone(),
                AmqpBroker::dead_letter_queue(&base.default_queue),
            ] {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
            }
        }
    }
}
