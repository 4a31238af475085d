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

/// The URL of database `db` on the Redis server of [`redis_url`] (whatever database, query or
/// fragment that URL names).
pub fn redis_db(db: u8) -> String {
    let base = redis_url();
    let (scheme, rest) = base.split_once("://").unwrap();
    let authority = rest.split(['/', '?', '#']).next().unwrap();
    format!("{scheme}://{authority}/{db}")
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
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `STOP`, `CONT`) to the worker process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
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

/// The next message on `queue`, got as a plain AMQP client would (`basic.get`, acknowledged by
/// the broker at once if `no_ack`), waiting up to [`WAIT`] for one.
pub async fn get_raw(
    channel: &lapin::Channel,
    queue: &str,
    no_ack: bool,
) -> lapin::message::BasicGetMessage {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(message) = channel
            .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack })
            .await
            .expect("basic.get")
        {
            return message;
        }
        assert!(Instant::now() < deadline, "no message in {queue}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `body` as a plain AMQP client (Go's producer) would: persistent, to `exchange`
/// with `key`, waiting for the broker's confirm of the channel (if it has confirms on).
pub async fn publish_raw(channel: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// Number of messages ready in `queue` (0 if it does not exist).
///
/// Asks on a channel of its own: a passive declaration of a missing queue makes the broker
/// close the channel it was sent on, which must not be the caller's.
pub async fn queue_depth(channel: &lapin::Channel, queue: &str) -> u32 {
    let _ = channel;
    queue_probe(queue).await.unwrap_or(0)
}

/// Number of messages ready in `queue`, or `None` if it does not exist: a passive declaration
/// on a connection of its own. RabbitMQ may count it as use of the queue (renewing its
/// `x-expires`).
pub async fn queue_probe(queue: &str) -> Option<u32> {
    let (_conn, channel) = raw_channel().await;
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
        .ok()
        .map(|q| q.message_count())
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

/// A private `redis-server` on a free 127.0.0.1 port, without persistence (`--save ''`,
/// no AOF), for tests that kill and restart Redis or count the commands it processes. It is
/// killed when dropped.
///
/// ```ignore
/// let mut redis = PrivateRedis::start();
/// let url = redis.url();          // redis://127.0.0.1:<port>/
/// redis.kill9();                  // SIGKILL, waits for the process to end
/// redis.restart();                // the same port, an empty data set
/// ```
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
    durable: bool,
}

impl PrivateRedis {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(false)
    }

    /// Like [`start`](Self::start), but every write is in the append-only file before Redis
    /// answers (`appendfsync always`), as a production result store keeps it: a restart after
    /// kill -9 keeps every write that was acknowledged.
    pub fn start_durable() -> PrivateRedis {
        PrivateRedis::start_with(true)
    }

    fn start_with(durable: bool) -> PrivateRedis {
        let port = {
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free local port");
            listener.local_addr().expect("local address").port()
        };
        let dir =
            std::env::temp_dir().join(format!("machinery-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis working directory");
        let mut redis = PrivateRedis {
            child: None,
            port,
            dir,
            durable,
        };
        redis.spawn();
        redis
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no shutdown, no goodbye to clients) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9 redis-server");
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill9`](Self::kill9)), empty unless
    /// it is [durable](Self::start_durable).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut child = Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", if self.durable { "yes" } else { "no" }])
                .args(["--appendfsync", "always"])
                .args(["--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (tests/services.sh installs it)");
            // Up when it answers PING; a server that exits (port still in TIME_WAIT, ...) is
            // started again.
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if self.ping() {
                    self.child = Some(child);
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start on port {} within {WAIT:?}",
                    self.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server kept exiting on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// A counter from `INFO stats` (`total_commands_processed`, `total_reads_processed`, ...),
    /// read over a plain socket: the `INFO` itself is the only command it adds (counted by the
    /// next read). Commands that scripts run count too.
    pub fn stat(&self, name: &str) -> u64 {
        self.info("stats")
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in INFO stats"))
    }

    /// How many times each command has run (`INFO commandstats`), by lower-case name; the
    /// `GET`s and `SET`s a script runs count under `get` and `set`.
    pub fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        self.info("commandstats")
            .lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// An `INFO` section, read over a plain socket.
    pub fn info(&self, section: &str) -> String {
        use std::io::{Read, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        stream
            .write_all(format!("INFO {section}\r\n").as_bytes())
            .expect("send INFO");
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        // `$<len>\r\n<body>\r\n`
        loop {
            let n = stream.read(&mut chunk).expect("read INFO");
            assert!(n > 0, "redis closed the connection");
            reply.extend_from_slice(&chunk[..n]);
            let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let len: usize = String::from_utf8_lossy(&reply[1..end])
                .parse()
                .expect("bulk length");
            if reply.len() >= end + 2 + len + 2 {
                return String::from_utf8_lossy(&reply[end + 2..end + 2 + len]).into_owned();
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
