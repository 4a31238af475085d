//! The real `machinery` binary against RabbitMQ and Redis (results and registry in Redis DB
//! 11), with a worker running in this process. Needs the `cli` feature, which the
//! `machinery-tests` crate turns on, so `cargo test --workspace` runs these.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use machinery::wire::{self, Arg};
use machinery::{task, Config, Server, TaskError, WorkerHandle};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

#[task]
fn cli_add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn cli_double(#[chained] x: i64) -> i64 {
    2 * x
}

#[task]
fn cli_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("boom from cli_fail"))
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_db11() -> String {
    let base = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let (scheme, rest) = base.split_once("://").unwrap();
    format!("{scheme}://{}/11", rest.split('/').next().unwrap())
}

/// A configuration on its own exchange and queue.
fn config(tag: &str) -> Config {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let mut config = Config::builder()
        .broker(amqp_url())
        .result_backend(redis_db11())
        .exchange(format!("cli_{tag}_{id}_exchange"))
        .default_queue(format!("cli_{tag}_{id}_tasks"))
        .binding_key(format!("cli_{tag}_{id}_key"))
        .requeue_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    config.registry.heartbeat = Duration::from_millis(300);
    config
}

/// The environment the CLI reads the same configuration from (Go's names).
fn env_of(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("BROKER", config.broker.clone()),
        ("RESULT_BACKEND", config.result_backend.clone()),
        ("DEFAULT_QUEUE", config.default_queue.clone()),
        ("AMQP_EXCHANGE", config.amqp.exchange.clone()),
        ("AMQP_BINDING_KEY", config.amqp.binding_key.clone()),
    ]
}

/// Runs the binary with `env` and `args`, stdin empty.
fn run(env: &[(&str, String)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_machinery"));
    for var in [
        "BROKER",
        "RESULT_BACKEND",
        "DEFAULT_QUEUE",
        "AMQP_EXCHANGE",
        "AMQP_BINDING_KEY",
        "REGISTRY_REDIS",
        "RECONNECT_TIMEOUT_MS",
    ] {
        command.env_remove(var);
    }
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdin(Stdio::null());
    command.output().expect("run the machinery binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs and expects success; returns stdout.
fn ok(env: &[(&str, String)], args: &[&str]) -> String {
    let output = run(env, args);
    assert!(
        output.status.success(),
        "machinery {args:?} failed: {}{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Runs and expects failure with one line on stderr; returns it.
fn fails(env: &[(&str, String)], args: &[&str]) -> String {
    let output = run(env, args);
    assert!(
        !output.status.success(),
        "machinery {args:?} should fail: {}",
        stdout(&output)
    );
    let err = stderr(&output);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    lines[0].to_owned()
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Polls `probe` (a CLI run) until it returns `Some`.
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn worker(config: &Config, name: &str) -> (Server, WorkerHandle) {
    let server = Server::new(config.clone()).await.unwrap();
    let handle = server.worker().name(name).spawn().await.unwrap();
    (server, handle)
}

/// Runs blocking CLI calls off the runtime (the worker runs on it meanwhile).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn send_status_result_workers_and_queues() {
    let config = config("send");
    let name = format!(
        "cli-worker-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (_server, handle) = worker(&config, &name).await;
    let env = env_of(&config);
    let queue = config.default_queue.clone();
    let worker_name = name.clone();
    blocking(move || {
        // send --wait prints the result.
        assert_eq!(
            ok(&env, &["send", "cli_add", "int64:2", "int64:3", "--wait"]),
            "5\n"
        );
        // send prints the UUID; result --wait and status read it back.
        let uuid = ok(
            &env,
            &[
                "send",
                "cli_add",
                r#"{"Type":"int64","Value":4}"#,
                "int64:5",
            ],
        );
        let uuid = uuid.trim().to_owned();
        assert!(uuid.starts_with("task_"), "{uuid}");
        assert_eq!(ok(&env, &["result", &uuid, "--wait"]), "9\n");
        let status = ok(&env, &["status", &uuid]);
        assert!(
            status.contains("SUCCESS") && status.contains("cli_add"),
            "{status}"
        );
        let status = json_of(&ok(&env, &["--json", "status", &uuid]));
        assert_eq!(status["state"]["State"], "SUCCESS");
        assert_eq!(status["uuid"], json!(uuid));
        // --json on send.
        let sent = json_of(&ok(
            &env,
            &["--json", "send", "cli_add", "int64:1", "int64:1"],
        ));
        assert!(sent["uuid"].as_str().unwrap().starts_with("task_"));

        // A failing task: one line and a non-zero exit.
        let err = fails(&env, &["send", "cli_fail", "--wait"]);
        assert!(err.contains("boom from cli_fail"), "{err}");
        // A bad argument: nothing is sent.
        let err = fails(&env, &["send", "cli_add", "int64:x"]);
        assert!(err.contains("argument 1"), "{err}");
        let err = fails(&env, &["send", "cli_add", "int65:1"]);
        assert!(err.contains("int65"), "{err}");
        // An unknown task.
        let err = fails(&env, &["status", "task_does_not_exist"]);
        assert!(err.contains("task_does_not_exist"), "{err}");

        // The live worker, by name, with its counts.
        let workers = eventually("the worker's record", || {
            let listed = json_of(&ok(&env, &["--json", "workers"]));
            listed
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["name"] == json!(worker_name) && w["processed"].as_u64() >= Some(4))
                .cloned()
        });
        assert_eq!(workers["queues"], json!([queue]));
        assert_eq!(workers["failed"], 1);
        let table = ok(&env, &["workers"]);
        assert!(
            table.starts_with("NAME") && table.contains(&worker_name),
            "{table}"
        );

        // Queues: ours, with its consumer.
        let queues = json_of(&ok(&env, &["--json", "queues"]));
        let ours = queues
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == json!(queue))
            .cloned()
            .unwrap();
        assert_eq!(ours["consumers"], 1);
        assert_eq!(ours["dead_letters"], 0);
        let table = ok(&env, &["queues"]);
        assert!(
            table.starts_with("QUEUE") && table.contains(&queue),
            "{table}"
        );

        // The recent index and the throughput.
        let recent = json_of(&ok(&env, &["--json", "recent", "success", "--limit", "2"]));
        assert_eq!(recent["items"].as_array().unwrap().len(), 2);
        assert!(ok(&env, &["throughput", "--window", "60"]).contains("TASKS/S"));
    })
    .await;
    handle.shutdown().await.unwrap();
    // Gone from the registry at once.
    let env = env_of(&config);
    blocking(move || {
        let listed = json_of(&ok(&env, &["--json", "workers"]));
        assert!(listed
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["name"] != json!(name)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_shows_a_chain_as_a_tree() {
    let config = config("inspect");
    let (server, handle) = worker(&config, "cli-inspect").await;
    let chain = cli_add::signature(1, 2)
        .then(cli_double::signature())
        .then(cli_double::signature());
    let result = server.send(chain).await.unwrap();
    assert_eq!(result.get_timeout(WAIT).await.unwrap(), 12);
    let uuids = result.task_uuids().to_vec();
    let env = env_of(&config);
    blocking(move || {
        let tree = eventually("the chain's tree", || {
            let text = ok(&env, &["inspect", &uuids[1]]);
            (text.lines().count() == 3).then_some(text)
        });
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(lines[0], format!("cli_add {} SUCCESS", uuids[0]));
        assert_eq!(lines[1], format!("└─ then cli_double {} SUCCESS", uuids[1]));
        assert_eq!(
            lines[2],
            format!("   └─ then cli_double {} SUCCESS", uuids[2])
        );
        let json = json_of(&ok(&env, &["--json", "inspect", &uuids[2]]));
        assert_eq!(json["uuid"], json!(uuids[0]));
        assert_eq!(json["children"][0]["children"][0]["state"], "SUCCESS");
    })
    .await;
    handle.shutdown().await.unwrap();
}

/// Sends `cli_add(2, 3)` with attempts used up: the worker dead-letters it.
async fn dead_letter_one(server: &Server) -> String {
    let mut signature = wire::Signature::new("cli_add");
    signature.uuid = format!("task_{}", uuid::Uuid::new_v4());
    signature.args = vec![
        Arg {
            name: String::new(),
            type_name: "int64".into(),
            value: json!(2),
        },
        Arg {
            name: String::new(),
            type_name: "int64".into(),
            value: json!(3),
        },
    ];
    signature
        .headers
        .insert("x-machinery-attempts".into(), json!(100));
    let uuid = signature.uuid.clone();
    server.send_wire(signature).await.unwrap();
    uuid
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_shown_requeued_and_purged() {
    let config = config("dlq");
    let (server, handle) = worker(&config, "cli-dlq").await;
    let uuid = dead_letter_one(&server).await;
    let env = env_of(&config);
    let env2 = env.clone();
    let id = uuid.clone();
    blocking(move || {
        let listed = eventually("the dead letter", || {
            let listed = json_of(&ok(&env, &["--json", "dlq", "list"]));
            (listed["total"] == 1).then_some(listed)
        });
        assert_eq!(listed["items"][0]["id"], json!(id));
        assert_eq!(listed["items"][0]["task_name"], "cli_add");
        let table = ok(&env, &["dlq", "list"]);
        assert!(
            table.contains(&id) && table.contains("max_deliveries"),
            "{table}"
        );
        let shown = ok(&env, &["dlq", "show", "--id", &id]);
        assert!(shown.contains("reason  delivered 100 times"), "{shown}");
        let err = fails(&env, &["dlq", "show", "--id", "task_nope"]);
        assert!(err.contains("task_nope"), "{err}");
        // The dead-lettering recorded FAILURE; a requeue runs it again, to SUCCESS.
        assert_eq!(ok(&env, &["dlq", "requeue", "--id", &id]), "requeued 1\n");
        assert_eq!(ok(&env, &["result", &id, "--wait"]), "5\n");
        let listed = json_of(&ok(&env, &["--json", "dlq", "list"]));
        assert_eq!(listed["total"], 0);
        let err = fails(&env, &["dlq", "requeue", "--id", &id]);
        assert!(err.contains("not in the dead-letter queue"), "{err}");
    })
    .await;

    // Purge: two more dead letters, then none.
    dead_letter_one(&server).await;
    dead_letter_one(&server).await;
    blocking(move || {
        let env = env2;
        eventually("two dead letters", || {
            let listed = json_of(&ok(&env, &["--json", "dlq", "list"]));
            (listed["total"] == 2).then_some(())
        });
        let err = fails(&env, &["dlq", "purge"]);
        assert!(err.contains("not confirmed"), "{err}");
        assert!(ok(&env, &["dlq", "purge", "--yes"]).starts_with("purged 2 messages"));
        let listed = json_of(&ok(&env, &["--json", "dlq", "list"]));
        assert_eq!(listed["total"], 0);
    })
    .await;
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_and_purge_a_queue_without_workers() {
    let config = config("purge");
    let env = env_of(&config);
    let queue = config.default_queue.clone();
    blocking(move || {
        let uuid = ok(&env, &["send", "cli_add", "int64:1", "int64:1"]);
        let uuid = uuid.trim();
        assert_eq!(ok(&env, &["revoke", uuid]), format!("revoked {uuid}\n"));
        let status = json_of(&ok(&env, &["--json", "status", uuid]));
        assert_eq!(status["state"]["State"], "FAILURE");
        assert_eq!(status["state"]["Error"], "revoked");
        for _ in 0..3 {
            ok(&env, &["send", "cli_add", "int64:1", "int64:1"]);
        }
        let depth = |env: &[(&str, String)]| {
            let queues = json_of(&ok(env, &["--json", "queues"]));
            queues
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == json!(queue))
                .map(|q| q["depth"].as_u64().unwrap())
                .unwrap()
        };
        assert_eq!(depth(&env), 4);
        // Without --yes and without a "y" on stdin: refused, nothing deleted.
        let err = fails(&env, &["purge", &queue]);
        assert!(err.contains("not confirmed"), "{err}");
        assert_eq!(depth(&env), 4);
        assert_eq!(
            ok(&env, &["purge", &queue, "--yes"]),
            format!("purged 4 messages from {queue}\n")
        );
        assert_eq!(depth(&env), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_and_passwords_are_masked() {
    let config = config("errors");
    blocking(move || {
        // An unreachable broker, with a password in its URL.
        let mut env = env_of(&config);
        env[0].1 = "amqp://guest:s3cretpw@127.0.0.1:1/".to_owned();
        env.push(("RECONNECT_TIMEOUT_MS", "300".to_owned()));
        let err = fails(&env, &["queues"]);
        assert!(!err.contains("s3cretpw"), "{err}");
        assert!(err.contains("guest:***@127.0.0.1:1"), "{err}");
        // A Redis that refuses the password.
        let mut env = env_of(&config);
        env[1].1 = redis_db11().replace("redis://", "redis://hunter2pw@");
        let err = fails(&env, &["--json", "workers"]);
        assert!(!err.contains("hunter2pw"), "{err}");
        // A URL the CLI cannot read.
        let mut env = env_of(&config);
        env[0].1 = "bogus://user:pw123456@host/".to_owned();
        let err = fails(&env, &["queues"]);
        assert!(!err.contains("pw123456"), "{err}");
        assert!(err.contains("unsupported broker URL"), "{err}");
        // A usage error is clap's, with its exit code 2.
        let output = run(&env_of(&config), &["dlq", "requeue"]);
        assert_eq!(output.status.code(), Some(2));
    })
    .await;
}
