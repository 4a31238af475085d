//! Periodic tasks (Go's `RegisterPeriodicTask` & co.): each tick fires once across scheduler
//! processes sharing Go's Redis lock, killing the sender loses at most one tick, schedules can
//! be listed and removed, a failed publish does not stop later ticks, and the lock's Redis
//! records are Go's. Sends are counted twice: from the schedulers' own log lines and from the
//! messages that reached the queue.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Broker;
use machinery::periodic::{lock_key, PeriodicKind, PeriodicLock, RedisLock};
use machinery::testing::{BrokerOp, Fault, FaultyBroker};
use machinery::{task, Config, ErrorKind, Group, Server};

use common::{cleanup, env_of, queue_depth, raw_channel, redis_url, unique_config, WAIT};

#[task]
fn periodic_tick(n: i64) -> i64 {
    n
}

#[task]
fn periodic_sum(#[variadic] xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

fn unique(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{tag}-{}", &id[..12])
}

/// A scheduler process (`machinery-test-scheduler`) with its stderr read line by line.
struct SchedulerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Reads the process's log into `lines`; ends when the process has ended.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The ticks this process logged as sent, in Unix ms.
    sent: Vec<i64>,
    /// Its other lines (warnings, errors, skips), for a failure's message.
    other: Vec<String>,
}

impl SchedulerProcess {
    fn start(config: &Config, lock: &str, name: &str, spec: &str, binary: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_machinery-test-scheduler"))
            .envs(env_of(config))
            .env("LOCK", lock)
            .env("PERIODIC_NAME", name)
            .env("PERIODIC_SPEC", spec)
            .env("PERIODIC_BINARY", binary)
            .env("RUST_LOG", "warn,machinery::periodic=trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the scheduler process");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let process = SchedulerProcess {
            child,
            lines,
            reader: Some(reader),
            sent: Vec::new(),
            other: Vec::new(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let line = process
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the scheduler process did not start");
            if line.contains("scheduler ready") {
                return process;
            }
            assert!(!line.contains("scheduler failed"), "{line}");
        }
    }

    /// Reads the lines logged so far; returns the ticks sent among them.
    fn poll(&mut self) -> Vec<i64> {
        let mut new = Vec::new();
        for line in self.lines.try_iter() {
            match sent_tick(&line) {
                Some(tick) => new.push(tick),
                None if line.contains("scheduler sleeping") => {}
                None => self.other.push(line),
            }
        }
        self.sent.extend(&new);
        new
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to end and reads the rest of its log (all of it:
    /// the reader ends at the end of the pipe).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.poll();
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tick of a `periodic task sent` log line.
fn sent_tick(line: &str) -> Option<i64> {
    if !line.contains("periodic task sent") {
        return None;
    }
    let rest = line.split("periodic.tick=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Every tick must be sent by one process only; returns the ticks in order.
fn ticks_sent_once(processes: &[SchedulerProcess]) -> Vec<i64> {
    let mut by_tick: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, p) in processes.iter().enumerate() {
        for tick in &p.sent {
            by_tick.entry(*tick).or_default().push(i);
        }
    }
    for (tick, senders) in &by_tick {
        assert_eq!(
            senders.len(),
            1,
            "tick {tick} was sent by processes {senders:?}"
        );
    }
    by_tick.into_keys().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_scheduler_processes_send_each_tick_once() {
    let config = unique_config("periodic3");
    let name = unique("every-second");
    let binary = unique("machinery-periodic-test");
    let mut processes: Vec<SchedulerProcess> = (0..3)
        .map(|_| SchedulerProcess::start(&config, &redis_url(), &name, "@every 1s", &binary))
        .collect();
    // The window opens at the first tick sent: three processes starting on a loaded machine
    // may take a second or two before any of them ticks.
    let deadline = Instant::now() + WAIT;
    let first = 'first: loop {
        assert!(Instant::now() < deadline, "no process sent a tick");
        for p in &mut processes {
            if let Some(tick) = p.poll().first() {
                break 'first *tick;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Ticks are counted by their own times: (first - 1 ms, first + 10 s] holds 11 of them. The
    // processes run a second past the window, so that its last tick is sent.
    let started = first - 1;
    let ended = first + 10_000;
    tokio::time::sleep(Duration::from_secs(11)).await;
    for p in &mut processes {
        p.stop();
    }

    let ticks = ticks_sent_once(&processes);
    let per_process: Vec<usize> = processes.iter().map(|p| p.sent.len()).collect();
    eprintln!("ticks {ticks:?}, sent per process {per_process:?}");
    for (i, p) in processes.iter().enumerate() {
        // Why a tick was skipped (taken elsewhere, a lock or send error) is in these.
        eprintln!("process {i}, other lines:\n{}", p.other.join("\n"));
    }
    // Every whole second of the 10 s window once, none twice (`ticks_sent_once`). One may be
    // skipped on a loaded machine, as with Go's lock: the lock of a tick lasts until the next
    // tick after the moment it is taken (Go: v2/server.go, `schedule.Next(time.Now())`), so a
    // sender held up past the next tick takes that one's slot too (seen once in CI: 838 s,
    // then 840 s).
    let in_window = ticks
        .iter()
        .filter(|t| **t > started && **t <= ended)
        .count();
    assert!(
        (10..=11).contains(&in_window),
        "{in_window} ticks in 10 s after the first: {ticks:?}"
    );
    let gaps: Vec<i64> = ticks.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(
        gaps.iter().all(|g| *g == 1000 || *g == 2000)
            && gaps.iter().filter(|g| **g == 2000).count() <= 1,
        "ticks not one second apart, or more than one skipped: {ticks:?}"
    );
    // The broker saw exactly as many messages as the schedulers logged sends.
    let (_conn, channel) = raw_channel().await;
    let depth = queue_depth(&channel, &config.default_queue).await;
    assert_eq!(
        depth as usize,
        ticks.len(),
        "messages in the queue against ticks sent"
    );
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_sender_loses_at_most_one_tick() {
    let config = unique_config("periodickill");
    let name = unique("every-second");
    let binary = unique("machinery-periodic-test");
    let mut processes: Vec<SchedulerProcess> = (0..3)
        .map(|_| SchedulerProcess::start(&config, &redis_url(), &name, "@every 1s", &binary))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Wait for the next send and kill -9 the process that made it, which holds the lock
    // until the next tick.
    let deadline = Instant::now() + WAIT;
    let (victim, killed_tick) = 'found: loop {
        assert!(Instant::now() < deadline, "no process sent a tick");
        for (i, p) in processes.iter_mut().enumerate() {
            if let Some(tick) = p.poll().last() {
                break 'found (i, *tick);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    processes[victim].kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (i, p) in processes.iter_mut().enumerate() {
        if i != victim {
            p.stop();
        }
    }

    let ticks = ticks_sent_once(&processes);
    eprintln!("killed process {victim} after tick {killed_tick}; ticks {ticks:?}");
    let after: Vec<i64> = ticks.iter().copied().filter(|t| *t > killed_tick).collect();
    assert!(
        after.len() >= 3,
        "the survivors sent {after:?} after the kill"
    );
    let gaps: Vec<i64> = ticks.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g == 1000 || *g == 2000),
        "a tick twice or more than one lost: {ticks:?}"
    );
    assert!(
        gaps.iter().filter(|g| **g == 2000).count() <= 1,
        "more than one tick lost: {ticks:?}"
    );
    let (_conn, channel) = raw_channel().await;
    let depth = queue_depth(&channel, &config.default_queue).await;
    assert_eq!(
        depth as usize,
        ticks.len(),
        "messages in the queue against ticks sent"
    );
    cleanup(&config).await;
}

/// A server on the embedded broker `name`, and that broker for counting its messages.
async fn embedded(name: &str) -> (Server, MemoryBroker) {
    let server = Server::new(
        Config::builder()
            .broker(format!("memory://{name}"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let memory = MemoryBroker::open(name, "machinery_tasks", "machinery_task");
    (server, memory)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_schedulers_in_one_process_share_the_in_process_lock() {
    let name = unique("inproc");
    let (server, memory) = embedded(&name).await;
    let a = server.scheduler();
    let b = server.scheduler();
    a.register_task("@every 1s", "tick", periodic_tick::signature(1))
        .unwrap();
    b.register_task("@every 1s", "tick", periodic_tick::signature(1))
        .unwrap();
    let (ra, rb) = (a.spawn().await.unwrap(), b.spawn().await.unwrap());
    eventually("three ticks", || a.list()[0].sent + b.list()[0].sent >= 3).await;
    ra.shutdown().await.unwrap();
    rb.shutdown().await.unwrap();
    let (sa, sb) = (&a.list()[0], &b.list()[0]);
    let sent = sa.sent + sb.sent;
    assert_eq!(memory.depth("machinery_tasks").0 as u64, sent);
    // Every tick one of them sent, the other found the lock taken.
    assert!(
        (sa.skipped + sb.skipped).abs_diff(sent) <= 1,
        "{sa:?} {sb:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_are_listed_and_removed_while_running() {
    let name = unique("listremove");
    let (server, memory) = embedded(&name).await;
    let scheduler = server.scheduler();
    scheduler
        .register_task("@every 1s", "keep", periodic_tick::signature(1))
        .unwrap();
    scheduler
        .register_task("@every 1s", "drop", periodic_tick::signature(2))
        .unwrap();
    // A bad spec and a name in use are errors at registration, and change nothing.
    let bad = scheduler.register_task("61 * * * *", "bad", periodic_tick::signature(3));
    assert_eq!(bad.unwrap_err().kind(), ErrorKind::Config);
    let twice = scheduler.register_task("@hourly", "keep", periodic_tick::signature(3));
    assert_eq!(twice.unwrap_err().kind(), ErrorKind::Config);
    let listed: Vec<(String, String, PeriodicKind)> = scheduler
        .list()
        .into_iter()
        .map(|i| (i.name, i.spec, i.kind))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "keep".to_owned(),
                "@every 1s".to_owned(),
                PeriodicKind::Task
            ),
            (
                "drop".to_owned(),
                "@every 1s".to_owned(),
                PeriodicKind::Task
            ),
        ]
    );

    let running = scheduler.spawn().await.unwrap();
    eventually("a send of `drop`", || scheduler.list()[1].sent >= 1).await;
    assert!(scheduler.remove("drop"));
    assert!(!scheduler.remove("drop"));
    let dropped_sends = drain(&memory)
        .await
        .iter()
        .filter(|s| first_arg(s) == 2)
        .count();
    let keep_before = scheduler.list()[0].sent;
    eventually("two more sends of `keep`", || {
        scheduler.list()[0].sent >= keep_before + 2
    })
    .await;
    running.shutdown().await.unwrap();
    let later = drain(&memory).await;
    assert!(
        later.iter().filter(|s| first_arg(s) == 2).count() + dropped_sends <= 2,
        "`drop` was sent after its removal (one send may have been in flight)"
    );
    assert!(dropped_sends >= 1);
    assert_eq!(scheduler.list().len(), 1);
    // The name is free again.
    scheduler
        .register_task("@every 1s", "drop", periodic_tick::signature(2))
        .unwrap();
}

/// Every message waiting in the embedded broker's default queue, decoded (the queue is
/// drained).
async fn drain(memory: &MemoryBroker) -> Vec<machinery::wire::Signature> {
    let ready = memory.depth("machinery_tasks").0;
    let mut consumer = memory.consume("machinery_tasks", 1024).await.unwrap();
    let mut out = Vec::with_capacity(ready);
    while out.len() < ready {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a waiting message")
            .expect("the consumer ended")
            .unwrap();
        out.push(machinery::wire::Signature::from_json(delivery.body()).unwrap());
        delivery.ack().await.unwrap();
    }
    consumer.cancel().await.unwrap();
    out
}

fn first_arg(sig: &machinery::wire::Signature) -> i64 {
    serde_json::to_value(&sig.args[0].value)
        .unwrap()
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_publish_does_not_stop_later_ticks() {
    let name = unique("faulty");
    let config = Config::builder()
        .broker(format!("memory://{name}"))
        .build()
        .unwrap();
    let memory = MemoryBroker::open(&name, "machinery_tasks", "machinery_task");
    let broker = FaultyBroker::new(Arc::new(memory.clone()));
    broker.arm(BrokerOp::Publish, Fault::once());
    let backend = MemoryBackend::open(&name, Duration::from_secs(60));
    let server = Server::from_parts(config, Arc::new(broker.clone()), Some(Arc::new(backend)));
    let scheduler = server.scheduler();
    scheduler
        .register_task("@every 1s", "tick", periodic_tick::signature(1))
        .unwrap();
    let running = scheduler.spawn().await.unwrap();
    eventually("two sends after the failed one", || {
        let info = &scheduler.list()[0];
        info.failed == 1 && info.sent >= 2
    })
    .await;
    running.shutdown().await.unwrap();
    let info = &scheduler.list()[0];
    assert_eq!(info.failed, 1, "{info:?}");
    assert_eq!(memory.depth("machinery_tasks").0 as u64, info.sent);
    assert_eq!(broker.calls(BrokerOp::Publish), info.sent + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_and_chords_are_sent_fresh_on_every_tick() {
    let name = unique("groupchord");
    let (server, memory) = embedded(&name).await;
    let scheduler = server.scheduler();
    let group = Group::new([
        periodic_sum::signature(vec![1]),
        periodic_sum::signature(vec![2]),
    ]);
    scheduler
        .register_group("@every 1s", "group", group)
        .unwrap();
    let chord = Group::new([
        periodic_sum::signature(vec![3]),
        periodic_sum::signature(vec![4]),
    ])
    .chord(periodic_sum::signature(vec![]));
    scheduler
        .register_chord("@every 1s", "chord", chord)
        .unwrap();
    let kinds: Vec<PeriodicKind> = scheduler.list().into_iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [PeriodicKind::Group, PeriodicKind::Chord]);
    let running = scheduler.spawn().await.unwrap();
    eventually("two ticks of each", || {
        scheduler.list().iter().all(|i| i.sent >= 2)
    })
    .await;
    running.shutdown().await.unwrap();
    let sent: u64 = scheduler.list().iter().map(|i| i.sent).sum();
    // Two members per tick, each with a UUID of its own, each tick's group a new group.
    let messages = drain(&memory).await;
    assert_eq!(messages.len() as u64, 2 * sent);
    let uuids: BTreeSet<&str> = messages.iter().map(|m| m.uuid.as_str()).collect();
    assert_eq!(uuids.len(), messages.len(), "a UUID sent twice");
    let groups: BTreeSet<&str> = messages.iter().map(|m| m.group_uuid.as_str()).collect();
    assert_eq!(groups.len() as u64, sent, "each tick is a group of its own");
    for m in &messages {
        assert_eq!(m.group_task_count, 2);
        if let Some(callback) = &m.chord_callback {
            assert!(callback.uuid.starts_with("chord_"));
            assert_eq!(callback.name, "periodic_sum");
        }
    }
    let chords = messages
        .iter()
        .filter(|m| m.chord_callback.is_some())
        .count();
    assert_eq!(chords as u64, 2 * scheduler.list()[1].sent);
}

#[tokio::test]
async fn without_a_result_backend_a_chord_is_refused_at_registration() {
    let config = Config::builder()
        .broker(common::amqp_url())
        .build()
        .unwrap();
    let memory = MemoryBroker::open(&unique("nobackend"), "machinery_tasks", "machinery_task");
    let server = Server::from_parts(config, Arc::new(memory), None);
    let chord =
        Group::new([periodic_sum::signature(vec![1])]).chord(periodic_sum::signature(vec![]));
    let err = server
        .scheduler()
        .register_chord("@hourly", "c", chord)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}

#[tokio::test]
async fn an_unknown_lock_url_is_an_error_at_spawn() {
    let config = Config::builder()
        .broker(format!("memory://{}", unique("badlock")))
        .lock("zookeeper://somewhere")
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    let err = server.scheduler().spawn().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn the_redis_lock_writes_gos_records() {
    let lock = RedisLock::connect(&redis_url()).await.unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = lock_key(&unique("bin"), "report", "@every 1m");
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let until = now + 60_000_000_000 - 1;

    // Go: v2/locks/redis/redis.go, Lock: `SetNX(key, value, value + 1 - now)`.
    assert!(lock.lock(&key, until).await.unwrap());
    let (value, pttl): (String, i64) = redis::pipe()
        .get(&key)
        .pttl(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, until.to_string());
    assert!((58_000..=60_000).contains(&pttl), "PTTL {pttl}");
    // Held until its value: a second scheduler does not get it.
    assert!(!lock.lock(&key, until).await.unwrap());

    // A stale value left without expiry is taken over with GETSET, and given an expiry.
    let stale = lock_key(&unique("bin"), "report", "@every 1m");
    let () = redis::cmd("SET")
        .arg(&stale)
        .arg(now - 1_000_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(lock.lock(&stale, until).await.unwrap());
    let (value, ttl): (String, i64) = redis::pipe()
        .get(&stale)
        .ttl(&stale)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, until.to_string());
    assert!((58..=60).contains(&ttl), "TTL {ttl}");

    // A value that is not a number is an error, as Go's strconv.Atoi makes it.
    let garbage = lock_key(&unique("bin"), "report", "@every 1m");
    let () = redis::cmd("SET")
        .arg(&garbage)
        .arg("not a time")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(lock.lock(&garbage, until).await.is_err());

    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .arg(&stale)
        .arg(&garbage)
        .query_async(&mut conn)
        .await
        .unwrap();
}
