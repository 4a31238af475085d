//! Throughput on the embedded broker, with the full encode -> publish -> decode -> run ->
//! record -> acknowledge path.
//!
//! ```sh
//! cargo run --release --example bench [tasks]
//! ```
//!
//! Prints the cost of encoding and decoding one signature, of decoding Go-style chains of 64 to
//! 5,000 links (and of refusing one whose bottom link is malformed), the producer's send rate,
//! and the end-to-end rate of no-op tasks (async and blocking) from the first send to the last
//! SUCCESS.
//!
//! `BENCH_TRACE=1` installs an INFO `fmt` subscriber writing into a sink without colours, and
//! `BENCH_SPAN=0|3|5` makes the task span with that many fields instead of the default's (the
//! README's "What it costs"). `BENCH_IN_PLACE=1` runs the worker's deliveries in place,
//! `BENCH_IN_PLACE=0` spawned (`WorkerBuilder::placement`; unset, the default, adaptive). The
//! allocator is mimalloc; `--features system-alloc` measures with the system's `malloc`
//! instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use machinery::wire::Signature;
use machinery::worker::TaskSpan;
use machinery::{task, Config, Server};
use tokio::sync::Notify;

#[path = "common/placement.rs"]
mod placement;

/// mimalloc, as a service that wants this rate would set it: glibc's `malloc` takes a lock
/// when one thread frees what another allocated (the producer encodes a body, the worker drops
/// it), and that lock and its futex calls were about 30% of this bench's time (`perf`). The
/// `system-alloc` feature measures with the system allocator instead (README, "Embedded, and
/// the allocator").
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: Notify = Notify::const_new();

fn count() {
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        FINISHED.notify_one();
    }
}

#[task]
async fn noop(n: i64) {
    let _ = n;
    count();
}

#[task]
fn noop_blocking(n: i64) {
    let _ = n;
    count();
}

#[task]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

fn codec(iterations: usize) -> Duration {
    let sig = add::signature(1.0, 2.0).as_wire().clone();
    if std::env::args().nth(2).as_deref() == Some("codec") {
        let started = Instant::now();
        let mut n = 0;
        for _ in 0..iterations {
            n += sig.to_json().expect("encode").len();
        }
        println!(
            "  encode: {:.2} us",
            started.elapsed().as_secs_f64() * 1e6 / iterations as f64
        );
        let body = sig.to_json().expect("encode");
        let started = Instant::now();
        for _ in 0..iterations {
            n += Signature::from_json(&body).expect("decode").args.len();
        }
        println!(
            "  decode: {:.2} us ({} bytes)",
            started.elapsed().as_secs_f64() * 1e6 / iterations as f64,
            body.len()
        );
        let started = Instant::now();
        for i in 0..iterations {
            n += add::signature(i as f64, 2.0).as_wire().args.len();
        }
        println!(
            "  build a signature: {:.2} us",
            started.elapsed().as_secs_f64() * 1e6 / iterations as f64
        );
        std::hint::black_box(n);
    }
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..iterations {
        let body = sig.to_json().expect("encode");
        let back = Signature::from_json(&body).expect("decode");
        bytes += body.len() + back.args.len();
    }
    std::hint::black_box(bytes);
    started.elapsed() / iterations as u32
}

async fn end_to_end(tasks: usize, blocking: bool, name: &str) -> (f64, f64) {
    let config = Config::builder()
        .broker(format!("memory://{name}"))
        .build()
        .expect("config");
    let server = Server::new(config).await.expect("server");
    DONE.store(0, Ordering::SeqCst);
    TARGET.store(tasks, Ordering::SeqCst);
    let mut builder = server
        .worker()
        .concurrency(256)
        .placement(placement::from_env());
    match std::env::var("BENCH_SPAN").as_deref() {
        Ok("0") => builder = builder.make_span(|_: &TaskSpan<'_>| tracing::info_span!("task")),
        Ok("3") => {
            builder = builder.make_span(|t: &TaskSpan<'_>| {
                tracing::info_span!("task", task.name = %t.name, task.id = %t.id, attempt = t.attempt)
            });
        }
        Ok("5") => {
            builder = builder.make_span(|t: &TaskSpan<'_>| {
                tracing::info_span!(
                    "task",
                    task.name = %t.name,
                    task.id = %t.id,
                    attempt = t.attempt,
                    queue = %t.queue,
                    worker = %t.worker
                )
            });
        }
        Ok(other) => panic!("BENCH_SPAN={other}: 0, 3 or 5 (unset: the default span)"),
        Err(_) => {}
    }
    let worker = builder.spawn().await.expect("worker");
    let started = Instant::now();
    let finished = FINISHED.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let batch = 1000;
    for start in (0..tasks).step_by(batch) {
        let end = (start + batch).min(tasks);
        if blocking {
            server
                .send_all((start..end).map(|i| noop_blocking::signature(i as i64)))
                .await
                .expect("send");
        } else {
            server
                .send_all((start..end).map(|i| noop::signature(i as i64)))
                .await
                .expect("send");
        }
    }
    let sent = started.elapsed();
    finished.await;
    let total = started.elapsed();
    worker.shutdown().await.expect("shutdown");
    (
        tasks as f64 / sent.as_secs_f64(),
        tasks as f64 / total.as_secs_f64(),
    )
}

/// Decoding Go-style nested chains (each link in the previous link's `OnSuccess`): a whole
/// chain, and one whose bottom link is malformed (the error unwinds through every level).
fn deep_chains() {
    for links in [64usize, 1_000, 5_000] {
        let mut json = String::new();
        for i in 0..links {
            json.push_str(&format!(
                r#"{{"UUID":"task_{i}","Name":"add","Args":[{{"Type":"float64","Value":1}}],"OnSuccess":["#
            ));
        }
        json.push_str(&"]}".repeat(links));
        let bad = json.replace(
            &format!(r#""UUID":"task_{}","Name":"add""#, links - 1),
            &format!(r#""UUID":"task_{}","Name":5"#, links - 1),
        );
        let started = Instant::now();
        let ok = Signature::from_json(json.as_bytes()).is_ok();
        let whole = started.elapsed();
        let started = Instant::now();
        let refused = Signature::from_json(bad.as_bytes()).is_err();
        let failing = started.elapsed();
        println!(
            "chain of {links} links ({} KiB): decode {:.2} ms (ok: {ok}); bad bottom link refused in {:.2} ms (refused: {refused})",
            json.len() / 1024,
            whole.as_secs_f64() * 1e3,
            failing.as_secs_f64() * 1e3
        );
    }
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_TRACE").is_ok_and(|v| v == "1") {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::io::sink),
            );
        tracing::subscriber::set_global_default(subscriber).expect("subscriber");
    }
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let per_sig = codec(200_000);
    println!(
        "encode+decode one signature: {:.2} us",
        per_sig.as_secs_f64() * 1e6
    );

    deep_chains();

    // Warm up allocators and the runtime.
    end_to_end(tasks / 10, false, "bench-warmup").await;

    let (send, e2e) = end_to_end(tasks, false, "bench-async").await;
    println!("async no-op tasks: {tasks} sent at {send:.0}/s; end to end {e2e:.0} tasks/s");
    let target = 200_000.0;
    println!("  end-to-end vs target 200,000/s: {:.2}x", e2e / target);
    if std::env::args().nth(2).as_deref() == Some("async") {
        return;
    }
    let (send, e2e) = end_to_end(tasks, true, "bench-blocking").await;
    println!("blocking no-op tasks: {tasks} sent at {send:.0}/s; end to end {e2e:.0} tasks/s");
}
