//! Shared helpers for the integration tests against RabbitMQ and Redis.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use machinery::Config;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A configuration on its own exchange, queue and binding key, with Redis results.
pub fn unique_config(tag: &str) -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let id = &id[..12];
    Config::builder()
        .broker(amqp_url())
        .result_backend(redis_url())
        .exchange(format!("test_{tag}_{id}_exchange"))
        .default_queue(format!("test_{tag}_{id}_tasks"))
        .binding_key(format!("test_{tag}_{id}_key"))
        .prefetch_count(64)
        .requeue_delay(Duration::from_millis(100))
        .reconnect_timeout(Duration::from_secs(60))
        .build()
        .expect("config")
}

/// The environment a worker process reads the same configuration from (Go's names).
pub fn env_of(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("BROKER", config.broker.clone()),
        ("RESULT_BACKEND", config.result_backend.clone()),
        ("DEFAULT_QUEUE", config.default_queue.clone()),
        ("AMQP_EXCHANGE", config.amqp.exchange.clone()),
        ("AMQP_BINDING_KEY", config.amqp.binding_key.clone()),
        (
            "AMQP_PREFETCH_COUNT",
            config.amqp.prefetch_count.to_string(),
        ),
        ("REQUEUE_DELAY_MS", "100".into()),
    ]
}

/// A worker running in its own process (`machinery-test-worker`).
pub struct WorkerProcess {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub started_in: Duration,
}

impl WorkerProcess {
    /// Starts a worker process and waits until it consumes.
    pub fn start(config: &Config, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_machinery-test-worker"));
        command
            .envs(env_of(config))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start the worker process");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = WorkerProcess {
            child,
            lines,
            started_in: Duration::ZERO,
        };
        worker.wait_for_line("worker started", WAIT);
        worker.started_in = started.elapsed();
        worker
    }

    /// Waits for a log line containing `needle`; panics with the log on timeout.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!(
                    "worker did not log {needle:?} within {timeout:?}; its log:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// Everything logged so far.
    pub fn drain_log(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects a raw lapin channel, for publishing bad messages and inspecting queues.
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (tests/services.sh starts it)");
    let channel = conn.create_channel().await.expect("channel");
    (conn, channel)
}

/// Number of messages ready in `queue`.
pub async fn queue_depth(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(0)
}

/// Number of messages ready in `queue`, asked on a channel of its own: asking about a queue that
/// does not exist (yet) makes the broker close the channel it was asked on.
pub async fn queue_depth_probe(conn: &lapin::Connection, queue: &str) -> u32 {
    let Ok(probe) = conn.create_channel().await else {
        return 0;
    };
    let depth = queue_depth(&probe, queue).await;
    let _ = probe.close(200, "probe done".into()).await;
    depth
}

/// Deletes the test's exchange and queues.
pub async fn cleanup(config: &Config) {
    let (_conn, channel) = raw_channel().await;
    for queue in [
        config.default_queue.clone(),
        format!("{}.dead_letter", config.default_queue),
    ] {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    let _ = channel
        .exchange_delete(config.amqp.exchange.as_str().into(), Default::default())
        .await;
}
