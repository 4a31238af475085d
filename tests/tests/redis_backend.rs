//! The Redis result backend against a real Redis on 127.0.0.1:6379 (`tests/services.sh` starts
//! one). These tests fail, not skip, when Redis is not there.
//!
//! Golden values are literal JSON as Go's `encoding/json` writes a `tasks.TaskState`; every
//! test uses fresh UUIDs, so the tests run in parallel and leave nothing behind that matters
//! (states expire).

mod common;

use std::time::Duration;

use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::wire::{GoTime, State, TaskResult, TaskState};
use machinery::{Config, ErrorKind, Group, Server, TaskError};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::time::Instant;

const REDIS: &str = "redis://127.0.0.1:6379/";
const TTL: Duration = Duration::from_secs(120);
const CREATED: &str = "2026-11-29T20:17:52.337696883Z";
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

async fn raw() -> MultiplexedConnection {
    redis::Client::open(REDIS)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running on 127.0.0.1:6379 (run tests/services.sh)")
}

async fn backend() -> RedisBackend {
    RedisBackend::connect(REDIS, TTL)
        .await
        .expect("Redis must be running on 127.0.0.1:6379 (run tests/services.sh)")
}

fn task_uuid() -> String {
    format!("task_{}", uuid::Uuid::new_v4())
}

async fn raw_get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

async fn raw_set(conn: &mut MultiplexedConnection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("EX")
        .arg(120)
        .query_async::<()>(conn)
        .await
        .expect("SET");
}

async fn raw_ttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("TTL")
}

fn created() -> GoTime {
    let t = chrono::DateTime::parse_from_rfc3339(CREATED).expect("time");
    GoTime::from_datetime(t.with_timezone(&chrono::Utc))
}

/// Go's JSON for a `TaskState`, field by field, as `json.Marshal` lays it out.
fn go_json(uuid: &str, name: &str, state: &str, results: &str, error: &str, at: &str) -> String {
    format!(
        r#"{{"TaskUUID":"{uuid}","TaskName":"{name}","State":"{state}","Results":{results},"Error":"{error}","CreatedAt":"{at}","TTL":0}}"#
    )
}

// ---- Go -> Rust ------------------------------------------------------------------------------

#[tokio::test]
async fn reads_go_success_state() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    let golden = go_json(
        &uuid,
        "add",
        "SUCCESS",
        r#"[{"Type":"float64","Value":8}]"#,
        "",
        CREATED,
    );
    raw_set(&mut conn, &uuid, &golden).await;
    let state = b.get_state(&uuid).await.unwrap().expect("stored");
    assert_eq!(
        state,
        TaskState {
            task_uuid: uuid.clone(),
            task_name: "add".into(),
            state: State::Success,
            results: Some(vec![TaskResult {
                type_name: "float64".into(),
                value: json!(8),
            }]),
            error: String::new(),
            created_at: created(),
            ttl: 0,
        }
    );
    assert_eq!(state.results.unwrap()[0].value.to_string(), "8");
}

#[tokio::test]
async fn reads_go_pending_and_failure_states() {
    let (b, mut conn) = (backend().await, raw().await);

    let pending = task_uuid();
    raw_set(
        &mut conn,
        &pending,
        &go_json(&pending, "add", "PENDING", "null", "", CREATED),
    )
    .await;
    let state = b.get_state(&pending).await.unwrap().expect("stored");
    assert_eq!(state.state, State::Pending);
    assert_eq!(state.results, None);
    assert_eq!(state.created_at, created());

    let failed = task_uuid();
    raw_set(
        &mut conn,
        &failed,
        &go_json(
            &failed,
            "div",
            "FAILURE",
            "null",
            "division by zero",
            CREATED,
        ),
    )
    .await;
    let state = b.get_state(&failed).await.unwrap().expect("stored");
    assert_eq!(state.state, State::Failure);
    assert_eq!(state.error, "division by zero");
    assert_eq!(state.task_name, "div");

    // Results: [] (a Go task that returned only an error value) is "finished, no results".
    let empty = task_uuid();
    raw_set(
        &mut conn,
        &empty,
        &go_json(&empty, "noop", "SUCCESS", "[]", "", CREATED),
    )
    .await;
    let state = b.get_state(&empty).await.unwrap().expect("stored");
    assert_eq!(state.results, Some(Vec::new()));
}

#[tokio::test]
async fn missing_state_is_none_and_purge_deletes() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    assert_eq!(b.get_state(&uuid).await.unwrap(), None);
    b.set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    assert!(raw_get(&mut conn, &uuid).await.is_some());
    b.purge_state(&uuid).await.unwrap();
    assert_eq!(raw_get(&mut conn, &uuid).await, None);
    assert_eq!(b.get_state(&uuid).await.unwrap(), None);
}

#[tokio::test]
async fn undecodable_state_is_a_decode_error() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    raw_set(&mut conn, &uuid, "not json").await;
    let err = b.get_state(&uuid).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
}

// ---- Rust -> Go ------------------------------------------------------------------------------

#[tokio::test]
async fn writes_the_bytes_go_writes() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());

    // PENDING, as a producer records it: Results is null.
    b.set_state(TaskState {
        task_uuid: uuid.clone(),
        task_name: "add".into(),
        state: State::Pending,
        created_at: created(),
        ..TaskState::default()
    })
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "PENDING", "null", "", CREATED)
    );

    // SUCCESS with one result.
    b.set_state(TaskState {
        task_uuid: uuid.clone(),
        task_name: "add".into(),
        state: State::Success,
        results: Some(vec![TaskResult {
            type_name: "float64".into(),
            value: json!(8),
        }]),
        created_at: created(),
        ..TaskState::default()
    })
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(
            &uuid,
            "add",
            "SUCCESS",
            r#"[{"Type":"float64","Value":8}]"#,
            "",
            CREATED
        )
    );

    // SUCCESS with no results: [], not null.
    let none = task_uuid();
    b.set_state(TaskState {
        task_uuid: none.clone(),
        task_name: "noop".into(),
        state: State::Success,
        results: Some(Vec::new()),
        created_at: created(),
        ..TaskState::default()
    })
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &none).await.unwrap(),
        go_json(&none, "noop", "SUCCESS", "[]", "", CREATED)
    );
}

#[tokio::test]
async fn carries_name_and_creation_time_forward() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    b.set_state(TaskState {
        task_uuid: uuid.clone(),
        task_name: "add".into(),
        state: State::Pending,
        created_at: created(),
        ..TaskState::default()
    })
    .await
    .unwrap();

    // Neither value given (Go's NewReceivedTaskState).
    b.set_state(TaskState::new(&uuid, State::Received))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "RECEIVED", "null", "", CREATED)
    );

    // Only the creation time missing (what a Rust worker sends); the given name wins.
    b.set_state(TaskState {
        task_name: "renamed".into(),
        ..TaskState::new(&uuid, State::Started)
    })
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "renamed", "STARTED", "null", "", CREATED)
    );

    // Only the name missing; the given time wins.
    let later = GoTime::from_datetime(
        chrono::DateTime::parse_from_rfc3339("2026-11-30T01:02:03Z")
            .unwrap()
            .with_timezone(&chrono::Utc),
    );
    b.set_state(TaskState {
        created_at: later,
        error: "boom".into(),
        ..TaskState::new(&uuid, State::Failure)
    })
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(
            &uuid,
            "renamed",
            "FAILURE",
            "null",
            "boom",
            "2026-11-30T01:02:03Z"
        )
    );
}

#[tokio::test]
async fn carries_forward_from_a_go_record_keeping_every_other_byte() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    // A name with characters JSON escapes, as Go escapes them (`<` is \u003c in Go).
    let go_name = r#"a \"q\" \\ n/s é \u0001 \u003ctag\u003e \u0026 \u2028\u2029"#;
    let name = "a \"q\" \\ n/s é \u{1} <tag> & \u{2028}\u{2029}";
    raw_set(
        &mut conn,
        &uuid,
        &go_json(&uuid, go_name, "PENDING", "null", "", CREATED),
    )
    .await;

    let results = vec![
        TaskResult {
            type_name: "int64".into(),
            value: serde_json::from_str("9007199254740993").unwrap(),
        },
        TaskResult {
            type_name: "float64".into(),
            value: serde_json::from_str("0.1").unwrap(),
        },
        TaskResult {
            type_name: "float64".into(),
            value: serde_json::from_str("8").unwrap(),
        },
    ];
    b.set_state(TaskState {
        results: Some(results.clone()),
        ..TaskState::new(&uuid, State::Success)
    })
    .await
    .unwrap();

    let expected = TaskState {
        task_uuid: uuid.clone(),
        task_name: name.into(),
        state: State::Success,
        results: Some(results),
        created_at: created(),
        ..TaskState::default()
    };
    let stored = raw_get(&mut conn, &uuid).await.unwrap();
    // The carried name is quoted as Go quotes it, as the rest of the record is encoded.
    assert_eq!(
        stored,
        String::from_utf8(expected.to_json().unwrap()).unwrap()
    );
    assert!(
        stored.contains(&format!(r#""TaskName":"{go_name}""#)),
        "{stored}"
    );
    assert!(
        stored.contains(
            r#""Results":[{"Type":"int64","Value":9007199254740993},{"Type":"float64","Value":0.1},{"Type":"float64","Value":8}]"#
        ),
        "{stored}"
    );
    assert_eq!(b.get_state(&uuid).await.unwrap(), Some(expected));
}

/// The write script reads records in Go's exact layout without decoding them; every record
/// near that layout must still be read as JSON reads it.
#[tokio::test]
async fn records_near_gos_layout_are_read_as_json_reads_them() {
    let (b, mut conn) = (backend().await, raw().await);
    let later = "2026-11-30T01:02:03Z";
    // (stored record with @ID@, expected TaskName and CreatedAt carried into a STARTED write)
    let cases: Vec<(String, &str, &str)> = vec![
        // The common shape, with and without a TTL.
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED),
            "add",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED).replace(r#","TTL":0}"#, "}"),
            "add",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED)
                .replace(r#""TTL":0"#, r#""TTL":-7"#),
            "add",
            CREATED,
        ),
        // Raw `<`, `&`, U+2028 and a control character, which Go would have escaped: carried
        // as Go escapes them.
        (
            go_json("@ID@", "a<b&c", "PENDING", "null", "", CREATED),
            r"a\u003cb\u0026c",
            CREATED,
        ),
        (
            go_json("@ID@", "x\u{2028}y", "PENDING", "null", "", CREATED),
            r"x\u2028y",
            CREATED,
        ),
        (
            go_json("@ID@", "x\u{1}y", "PENDING", "null", "", CREATED),
            r"x\u0001y",
            CREATED,
        ),
        // Not JSON after the last field: no record.
        (
            format!(
                "{}x",
                go_json("@ID@", "add", "PENDING", "null", "", CREATED)
            ),
            "",
            ZERO_TIME,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED)
                .replace(r#""TTL":0"#, r#""TTL":0,"#),
            "",
            ZERO_TIME,
        ),
        // A state that is none of the six: no record, as Go replaces it.
        (
            go_json("@ID@", "add", "DONE", "null", "", CREATED),
            "",
            ZERO_TIME,
        ),
        // Valid JSON in other forms: decoded.
        (
            go_json("@ID@", "é", "PENDING", "null", "", CREATED),
            "é",
            CREATED,
        ),
        (
            go_json("@ID@", "a\u{7f}b", "PENDING", "null", "", CREATED),
            "a\u{7f}b",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "RETRY", "null", "a>b", CREATED),
            "add",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED)
                .replace(r#""TTL":0"#, r#""TTL":1e3"#),
            "add",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED)
                .replace(r#""TTL":0"#, r#""TTL":07"#),
            "add",
            CREATED,
        ),
        (
            go_json("@ID@", "add", "PENDING", "null", "", CREATED)
                .replace(r#","State""#, r#", "State""#),
            "add",
            CREATED,
        ),
        (
            format!(
                "{}\0x",
                go_json("@ID@", "add", "PENDING", "null", "", CREATED)
            ),
            "add",
            CREATED,
        ),
        // Results, escapes and a later time: decoded.
        (
            go_json("@ID@", r"a\\b", "RETRY", "[]", r#"x \"y\""#, later),
            r"a\\b",
            later,
        ),
    ];
    for (record, name, at) in cases {
        let uuid = task_uuid();
        raw_set(&mut conn, &uuid, &record.replace("@ID@", &uuid)).await;
        b.set_state(TaskState::new(&uuid, State::Started))
            .await
            .unwrap();
        assert_eq!(
            raw_get(&mut conn, &uuid).await.unwrap(),
            go_json(&uuid, name, "STARTED", "null", "", at),
            "stored before: {record}"
        );
    }

    // A revoke in the common shape is read as one: nothing replaces it.
    let uuid = task_uuid();
    let revoked = go_json(&uuid, "add", "FAILURE", "null", "revoked", CREATED);
    raw_set(&mut conn, &uuid, &revoked).await;
    b.set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    assert_eq!(raw_get(&mut conn, &uuid).await.unwrap(), revoked);
    // A FAILURE with another error is final but not a revoke: SUCCESS may replace it.
    let uuid = task_uuid();
    raw_set(
        &mut conn,
        &uuid,
        &go_json(&uuid, "add", "FAILURE", "null", "revokedx", CREATED),
    )
    .await;
    b.set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", "null", "", CREATED)
    );
}

#[tokio::test]
async fn carries_forward_keys_matched_case_insensitively() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    raw_set(
        &mut conn,
        &uuid,
        &format!(
            r#"{{"taskuuid":"{uuid}","taskname":"add","state":"PENDING","createdat":"{CREATED}"}}"#
        ),
    )
    .await;
    b.set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "STARTED", "null", "", CREATED)
    );
}

#[tokio::test]
async fn nothing_to_carry_forward_writes_go_zero_values() {
    let (b, mut conn) = (backend().await, raw().await);

    // No stored record.
    let fresh = task_uuid();
    b.set_state(TaskState::new(&fresh, State::Received))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&mut conn, &fresh).await.unwrap(),
        go_json(&fresh, "", "RECEIVED", "null", "", ZERO_TIME)
    );

    // A stored record that is not JSON is replaced, as Go replaces it.
    let corrupt = task_uuid();
    raw_set(&mut conn, &corrupt, "{not json").await;
    b.set_state(TaskState::new(&corrupt, State::Started))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&mut conn, &corrupt).await.unwrap(),
        go_json(&corrupt, "", "STARTED", "null", "", ZERO_TIME)
    );
}

#[tokio::test]
async fn every_write_sets_the_expiry() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    let limit = TTL.as_secs() as i64;

    // A full state: plain SET.
    b.set_state(TaskState {
        task_name: "add".into(),
        created_at: created(),
        ..TaskState::new(&uuid, State::Pending)
    })
    .await
    .unwrap();
    let ttl = raw_ttl(&mut conn, &uuid).await;
    assert!(ttl > 0 && ttl <= limit, "TTL {ttl}");

    // Carried forward: the script.
    redis::cmd("PERSIST")
        .arg(&uuid)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw_ttl(&mut conn, &uuid).await, -1);
    b.set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    let ttl = raw_ttl(&mut conn, &uuid).await;
    assert!(ttl > 0 && ttl <= limit, "TTL {ttl}");

    // Zero means Go's default, an hour.
    let hourly = RedisBackend::connect(REDIS, Duration::ZERO).await.unwrap();
    hourly
        .set_state(TaskState::new(&uuid, State::Retry))
        .await
        .unwrap();
    let ttl = raw_ttl(&mut conn, &uuid).await;
    assert!(ttl > limit && ttl <= 3600, "TTL {ttl}");
}

#[tokio::test]
async fn concurrent_writers_never_lose_the_carried_values() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    b.set_state(TaskState {
        task_name: "add".into(),
        created_at: created(),
        ..TaskState::new(&uuid, State::Pending)
    })
    .await
    .unwrap();
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let (b, uuid) = (b.clone(), uuid.clone());
            tokio::spawn(async move {
                let state = if i % 2 == 0 {
                    State::Started
                } else {
                    State::Retry
                };
                b.set_state(TaskState::new(uuid, state)).await
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let stored = b.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(stored.task_name, "add");
    assert_eq!(stored.created_at, created());
    assert!(raw_get(&mut conn, &uuid).await.unwrap().contains(CREATED));
}

#[tokio::test]
async fn selects_the_database_in_the_url() {
    let (mut conn, uuid) = (raw().await, task_uuid());
    let db3 = RedisBackend::connect("redis://127.0.0.1:6379/3", TTL)
        .await
        .unwrap();
    db3.set_state(TaskState::new(&uuid, State::Pending))
        .await
        .unwrap();
    assert_eq!(raw_get(&mut conn, &uuid).await, None);
    let mut conn3 = redis::Client::open("redis://127.0.0.1:6379/3")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert!(raw_get(&mut conn3, &uuid).await.is_some());
    db3.purge_state(&uuid).await.unwrap();
}

// ---- Waiting ---------------------------------------------------------------------------------

async fn finish_later(b: RedisBackend, uuid: String, state: TaskState, after: Duration) {
    tokio::time::sleep(after).await;
    b.set_state(TaskState {
        task_uuid: uuid,
        ..state
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn wait_final_returns_on_success() {
    let (b, uuid) = (backend().await, task_uuid());
    b.set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    let writer = tokio::spawn(finish_later(
        b.clone(),
        uuid.clone(),
        TaskState {
            results: Some(Vec::new()),
            ..TaskState::new("", State::Success)
        },
        Duration::from_millis(50),
    ));
    let state = b
        .wait_final(&uuid, Some(Instant::now() + Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(state.state, State::Success);
    writer.await.unwrap();

    // Without a deadline too.
    let other = task_uuid();
    let writer = tokio::spawn(finish_later(
        b.clone(),
        other.clone(),
        TaskState::new("", State::Success),
        Duration::from_millis(30),
    ));
    assert_eq!(
        b.wait_final(&other, None).await.unwrap().state,
        State::Success
    );
    writer.await.unwrap();
}

#[tokio::test]
async fn wait_final_returns_on_failure() {
    let (b, uuid) = (backend().await, task_uuid());
    let writer = tokio::spawn(finish_later(
        b.clone(),
        uuid.clone(),
        TaskState {
            error: "boom".into(),
            ..TaskState::new("", State::Failure)
        },
        Duration::from_millis(50),
    ));
    let state = b
        .wait_final(&uuid, Some(Instant::now() + Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(
        (state.state, state.error.as_str()),
        (State::Failure, "boom")
    );
    writer.await.unwrap();
}

#[tokio::test]
async fn wait_final_times_out_at_the_deadline() {
    let (b, uuid) = (backend().await, task_uuid());
    b.set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    for key in [uuid, task_uuid()] {
        let start = Instant::now();
        let err = b
            .wait_final(&key, Some(start + Duration::from_millis(300)))
            .await
            .unwrap_err();
        let waited = start.elapsed();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }
    // A deadline already past still answers at once.
    let err = b
        .wait_final(&task_uuid(), Some(Instant::now()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
}

// ---- Connecting ------------------------------------------------------------------------------

#[tokio::test]
async fn refused_credentials_are_a_backend_error_without_the_password() {
    // The test server has no password, so AUTH fails.
    let err = RedisBackend::connect("redis://hunter2@127.0.0.1:6379/", TTL)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("redis://***@127.0.0.1:6379/0"), "{text}");
}

#[tokio::test]
async fn unreachable_server_is_a_backend_error_without_the_password() {
    let err = RedisBackend::connect("redis://user:hunter2@127.0.0.1:1/", TTL)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(err.is_retryable());
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn server_opens_redis_backends_by_url() {
    let broker = format!("memory://redis-open-{}", uuid::Uuid::new_v4());
    let config = Config::builder()
        .broker(broker.as_str())
        .result_backend("redis://hunter2@127.0.0.1:6379/")
        .build()
        .unwrap();
    let err = Server::new(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(!format!("{err} {err:?}").contains("hunter2"));

    let config = Config::builder()
        .broker(broker.as_str())
        .result_backend("redis://127.0.0.1:6379/x")
        .build()
        .unwrap();
    assert_eq!(
        Server::new(config).await.unwrap_err().kind(),
        ErrorKind::Config
    );

    let config = Config::builder()
        .broker(broker.as_str())
        .result_backend(REDIS)
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    assert!(format!("{:?}", server.backend().unwrap()).contains("RedisBackend"));
}

// ---- Groups ----------------------------------------------------------------------------------

#[tokio::test]
async fn group_records_as_go_lays_them_out() {
    let (b, mut conn) = (backend().await, raw().await);
    let group = format!("group_{}", uuid::Uuid::new_v4());
    let members = vec![task_uuid(), task_uuid()];
    b.init_group(&group, &members).await.unwrap();

    let stored = raw_get(&mut conn, &group).await.unwrap();
    let prefix = format!(
        r#"{{"GroupUUID":"{group}","TaskUUIDs":["{}","{}"],"ChordTriggered":false,"Lock":false,"CreatedAt":""#,
        members[0], members[1]
    );
    assert!(stored.starts_with(&prefix), "{stored}");
    assert!(stored.ends_with(r#"Z","TTL":0}"#), "{stored}");
    let ttl = raw_ttl(&mut conn, &group).await;
    assert!(ttl > 0 && ttl <= TTL.as_secs() as i64);

    let meta = b.group_meta(&group).await.unwrap().unwrap();
    assert_eq!(meta.task_uuids, members);
    assert!(!meta.created_at.is_zero());

    assert_eq!(b.group_task_states(&group).await.unwrap(), vec![None, None]);
    assert!(!b.group_completed(&group, 2).await.unwrap());
    b.set_state(TaskState::new(&members[0], State::Success))
        .await
        .unwrap();
    b.set_state(TaskState::new(&members[1], State::Started))
        .await
        .unwrap();
    assert!(!b.group_completed(&group, 2).await.unwrap());
    b.set_state(TaskState::new(&members[1], State::Failure))
        .await
        .unwrap();
    assert!(b.group_completed(&group, 2).await.unwrap());
    let states = b.group_task_states(&group).await.unwrap();
    assert_eq!(states[1].as_ref().unwrap().state, State::Failure);

    // Exactly one caller triggers the chord.
    let triggers: Vec<_> = (0..8)
        .map(|_| {
            let (b, group) = (b.clone(), group.clone());
            tokio::spawn(async move { b.trigger_chord(&group).await })
        })
        .collect();
    let mut won = 0;
    for t in triggers {
        won += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(won, 1);
    assert!(raw_get(&mut conn, &group)
        .await
        .unwrap()
        .contains(r#""ChordTriggered":true,"#));
    assert!(b.group_meta(&group).await.unwrap().unwrap().chord_triggered);

    b.purge_group_meta(&group).await.unwrap();
    assert_eq!(b.group_meta(&group).await.unwrap(), None);
    // A group that is gone cannot be triggered.
    assert!(!b.trigger_chord(&group).await.unwrap());
}

#[tokio::test]
async fn trigger_chord_reads_a_go_group_record() {
    let (b, mut conn) = (backend().await, raw().await);
    let group = format!("group_{}", uuid::Uuid::new_v4());
    raw_set(
        &mut conn,
        &group,
        &format!(
            r#"{{"GroupUUID":"{group}","TaskUUIDs":["task_a"],"ChordTriggered":false,"Lock":false,"CreatedAt":"{CREATED}","TTL":0}}"#
        ),
    )
    .await;
    assert!(b.trigger_chord(&group).await.unwrap());
    assert_eq!(
        raw_get(&mut conn, &group).await.unwrap(),
        format!(
            r#"{{"GroupUUID":"{group}","TaskUUIDs":["task_a"],"ChordTriggered":true,"Lock":false,"CreatedAt":"{CREATED}","TTL":0}}"#
        )
    );
    assert!(!b.trigger_chord(&group).await.unwrap());
}

#[tokio::test]
async fn trigger_chord_waits_for_a_go_workers_lock() {
    let (b, mut conn) = (backend().await, raw().await);
    let group = format!("group_{}", uuid::Uuid::new_v4());
    b.init_group(&group, &[task_uuid()]).await.unwrap();
    // What redsync's Lock() does in a Go worker; the lock expires after 300 ms.
    let taken: Option<String> = redis::cmd("SET")
        .arg("TriggerChordMutex")
        .arg(uuid::Uuid::new_v4().to_string())
        .arg("NX")
        .arg("PX")
        .arg(300)
        .query_async(&mut conn)
        .await
        .unwrap();
    let start = Instant::now();
    assert!(b.trigger_chord(&group).await.unwrap());
    if taken.is_some() {
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
    }
}

// ---- End to end ------------------------------------------------------------------------------

#[machinery::task]
fn redis_backend_add(a: i64, b: i64) -> i64 {
    a + b
}

#[machinery::task]
fn redis_backend_fail(message: String) -> Result<i64, TaskError> {
    Err(TaskError::from(message))
}

#[tokio::test]
async fn server_and_worker_share_results_through_redis() {
    let config = Config::builder()
        .broker(format!("memory://redis-e2e-{}", uuid::Uuid::new_v4()))
        .result_backend(REDIS)
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();

    let sum = server
        .send(redis_backend_add::signature(2, 3))
        .await
        .unwrap();
    assert_eq!(sum.get_timeout(Duration::from_secs(20)).await.unwrap(), 5);

    // What a Go client would read: the worker's record keeps the producer's name and time.
    let mut conn = raw().await;
    let stored = raw_get(&mut conn, sum.task_uuid()).await.unwrap();
    let value: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(value["TaskName"], "redis_backend_add");
    assert_eq!(value["State"], "SUCCESS");
    assert_eq!(
        value["Results"],
        json!([{"Type": "int64", "Value": 5}]),
        "{stored}"
    );
    assert_ne!(value["CreatedAt"], ZERO_TIME);
    let ttl = raw_ttl(&mut conn, sum.task_uuid()).await;
    assert!(ttl > 0 && ttl <= 3600, "TTL {ttl}");

    let failed = server
        .send(redis_backend_fail::signature("nope".to_owned()))
        .await
        .unwrap();
    let err = failed
        .get_timeout(Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Task);
    assert_eq!(err.task_error(), Some("nope"));

    worker.shutdown().await.unwrap();
}

#[machinery::task]
fn redis_backend_sum(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().sum()
}

#[machinery::task]
fn redis_backend_product(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().product()
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_and_chords_run_through_redis() {
    let config = Config::builder()
        .broker(format!("memory://redis-chord-{}", uuid::Uuid::new_v4()))
        .result_backend(REDIS)
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    let worker = server.worker().concurrency(4).spawn().await.unwrap();

    let group = Group::new([
        redis_backend_sum::signature(vec![1, 1]),
        redis_backend_sum::signature(vec![2, 2]),
    ]);
    let r = server.send_group(group).await.unwrap();
    assert_eq!(
        r.get_timeout(Duration::from_secs(20)).await.unwrap(),
        [2, 4]
    );
    let mut conn = raw().await;
    let meta = raw_get(&mut conn, r.group_uuid()).await.unwrap();
    assert!(meta.contains(r#""ChordTriggered":false"#), "{meta}");

    // (1 + 1) * (2 + 2) * (3 + 3), the callback sent exactly once through trigger_chord.
    let chord = Group::new([
        redis_backend_sum::signature(vec![1, 1]),
        redis_backend_sum::signature(vec![2, 2]),
        redis_backend_sum::signature(vec![3, 3]),
    ])
    .chord(redis_backend_product::signature(vec![]));
    let r = server.send_chord(chord).await.unwrap();
    assert_eq!(r.get_timeout(Duration::from_secs(20)).await.unwrap(), 48);

    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn set_states_stores_a_batch_in_one_call() {
    let backend = backend().await;
    let ids: Vec<String> = (0..3)
        .map(|_| format!("task_{}", uuid::Uuid::new_v4()))
        .collect();
    let mut first = TaskState::new(ids[0].clone(), State::Pending);
    first.task_name = "add".into();
    first.created_at = GoTime::now();
    let mut second = first.clone();
    second.task_uuid = ids[1].clone();
    backend
        .set_state(TaskState {
            task_name: "mul".into(),
            created_at: GoTime::now(),
            ..TaskState::new(ids[2].clone(), State::Pending)
        })
        .await
        .unwrap();
    // Two pipelined PENDING writes and one that needs the carry-forward script.
    backend
        .set_states(vec![
            first,
            second,
            TaskState::new(ids[2].clone(), State::Started),
        ])
        .await
        .unwrap();
    for (id, name, state) in [
        (&ids[0], "add", State::Pending),
        (&ids[1], "add", State::Pending),
        (&ids[2], "mul", State::Started),
    ] {
        let stored = backend.get_state(id).await.unwrap().unwrap();
        assert_eq!((stored.task_name.as_str(), stored.state), (name, state));
        assert!(!stored.created_at.is_zero());
    }
}

// ---- Outages ---------------------------------------------------------------------------------

/// The backend's bound on one command (Go Machinery's default `ReadTimeout`).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `op` and checks that it fails as an outage should: a retryable backend error, in time.
async fn fails_in_time<T: std::fmt::Debug>(
    what: &str,
    op: impl std::future::Future<Output = machinery::Result<T>>,
) {
    let start = Instant::now();
    let outcome = tokio::time::timeout(RESPONSE_TIMEOUT + Duration::from_secs(5), op)
        .await
        .unwrap_or_else(|_| panic!("{what} hung through the outage"));
    let took = start.elapsed();
    let err = outcome.expect_err(what);
    assert_eq!(err.kind(), ErrorKind::Backend, "{what}: {err}");
    assert!(err.is_retryable(), "{what}: {err}");
    eprintln!("{what} failed in {took:?}: {err}");
    assert!(
        took <= RESPONSE_TIMEOUT + Duration::from_secs(1),
        "{what} took {took:?}"
    );
}

/// Retries `op` until it succeeds, for up to 30 s.
async fn recovers<T>(
    what: &str,
    mut op: impl FnMut() -> std::pin::Pin<
        Box<dyn std::future::Future<Output = machinery::Result<T>> + Send>,
    >,
) -> T {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if Instant::now() < give_up => {
                assert_eq!(e.kind(), ErrorKind::Backend, "{what}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what} did not recover after the restart: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_a_backend_error_and_the_backend_recovers() {
    let mut redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let uuid = task_uuid();
    b.set_state(TaskState {
        task_name: "add".into(),
        created_at: created(),
        ..TaskState::new(&uuid, State::Pending)
    })
    .await
    .unwrap();

    redis.kill9();
    fails_in_time(
        "set_state",
        b.set_state(TaskState::new(&uuid, State::Started)),
    )
    .await;
    fails_in_time("get_state", b.get_state(&uuid)).await;
    fails_in_time(
        "transition",
        b.transition(TaskState::new(&uuid, State::Received)),
    )
    .await;
    fails_in_time("get_states", b.get_states(&[uuid.clone(), task_uuid()])).await;
    fails_in_time(
        "set_states",
        b.set_states(vec![TaskState::new(&uuid, State::Started)]),
    )
    .await;
    fails_in_time(
        "wait_final",
        b.wait_final(&uuid, Some(Instant::now() + Duration::from_secs(60))),
    )
    .await;

    // The same backend, not rebuilt, works once the server is back (empty: no persistence).
    redis.restart();
    let (b2, id) = (b.clone(), uuid.clone());
    recovers("get_state", move || {
        let (b, id) = (b2.clone(), id.clone());
        Box::pin(async move { b.get_state(&id).await })
    })
    .await;
    assert_eq!(b.get_state(&uuid).await.unwrap(), None);
    assert_eq!(
        b.transition(TaskState::new(&uuid, State::Received))
            .await
            .unwrap(),
        None
    );
    b.set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    assert_eq!(
        b.wait_final(&uuid, Some(Instant::now() + Duration::from_secs(10)))
            .await
            .unwrap()
            .state,
        State::Success
    );
}

// ---- Batched reads ---------------------------------------------------------------------------

/// The commands a private server ran while `op` ran, by name (`INFO` left out); those a script
/// runs count too (under `get`, `set`).
async fn commands_during<T>(
    redis: &common::PrivateRedis,
    op: impl std::future::Future<Output = T>,
) -> (T, std::collections::BTreeMap<String, u64>) {
    let before = redis.command_calls();
    let out = op.await;
    let after = redis.command_calls();
    let ran = after
        .into_iter()
        .filter(|(name, _)| name != "info")
        .filter_map(|(name, calls)| {
            let delta = calls - before.get(&name).copied().unwrap_or(0);
            (delta > 0).then_some((name, delta))
        })
        .collect();
    (out, ran)
}

fn calls(ran: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    ran.iter().map(|(name, n)| (name.to_string(), *n)).collect()
}

#[tokio::test]
async fn get_states_reads_in_order_in_one_round_trip() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ids: Vec<String> = (0..2_500).map(|_| task_uuid()).collect();
    // Every third one stored: a Go record with lower-case keys, a Rust record, nothing.
    for (i, id) in ids.iter().enumerate() {
        match i % 3 {
            0 => {
                raw_set(
                    &mut conn,
                    id,
                    &format!(r#"{{"taskuuid":"{id}","state":"SUCCESS","results":[]}}"#),
                )
                .await
            }
            1 => b
                .set_state(TaskState::new(id, State::Started))
                .await
                .unwrap(),
            _ => {}
        }
    }
    assert_eq!(b.get_states(&[]).await.unwrap(), Vec::new());
    let (states, commands) = commands_during(&redis, b.get_states(&ids)).await;
    let states = states.unwrap();
    assert_eq!(states.len(), ids.len());
    for (i, (id, state)) in ids.iter().zip(&states).enumerate() {
        match (i % 3, state) {
            (0, Some(s)) => {
                assert_eq!((&s.task_uuid, s.state), (id, State::Success));
                assert_eq!(s.results, Some(Vec::new()));
            }
            (1, Some(s)) => assert_eq!((&s.task_uuid, s.state), (id, State::Started)),
            (2, None) => {}
            (_, other) => panic!("{i}: {other:?}"),
        }
    }
    // One pipelined round trip: MGETs of at most a few thousand keys each.
    let mgets = commands.get("mget").copied().unwrap_or(0);
    assert!(mgets <= 3, "{commands:?} for {} keys", ids.len());
    assert_eq!(commands.len(), 1, "{commands:?}");

    // A record that is not a state is a decode error, as get_state reports it.
    raw_set(&mut conn, &ids[2], "not json").await;
    assert_eq!(
        b.get_states(&ids).await.unwrap_err().kind(),
        ErrorKind::Decode
    );
}

// ---- Guarded transitions ---------------------------------------------------------------------

fn pending(uuid: &str) -> TaskState {
    TaskState {
        task_name: "add".into(),
        created_at: created(),
        ..TaskState::new(uuid, State::Pending)
    }
}

/// The results of [`success`], as Go lays them out.
const FIVE: &str = r#"[{"Type":"int64","Value":5}]"#;

fn success(uuid: &str) -> TaskState {
    TaskState {
        results: Some(vec![TaskResult {
            type_name: "int64".into(),
            value: json!(5),
        }]),
        ..TaskState::new(uuid, State::Success)
    }
}

/// Writes `next` over whatever is stored through each of the five writers; `None` when the
/// write must be refused (the stored bytes are then checked to be unchanged).
async fn write_all_ways(
    b: &RedisBackend,
    conn: &mut MultiplexedConnection,
    stored: &str,
    next: &TaskState,
    expect_written: bool,
) {
    for way in ["set_state", "set_states", "transition", "start", "record"] {
        let uuid = task_uuid();
        raw_set(conn, &uuid, &stored.replace("@ID@", &uuid)).await;
        let next = TaskState {
            task_uuid: uuid.clone(),
            ..next.clone()
        };
        match way {
            "set_state" => b.set_state(next.clone()).await.unwrap(),
            "set_states" => b.set_states(vec![next.clone()]).await.unwrap(),
            "transition" => {
                b.transition(next.clone()).await.unwrap();
            }
            "start" => {
                b.start(next.clone()).await.unwrap();
            }
            _ => {
                b.record(next.clone()).await.unwrap();
            }
        }
        let now = raw_get(conn, &uuid).await.unwrap();
        let stored_state = b.get_state(&uuid).await.unwrap().unwrap().state;
        if expect_written {
            assert_eq!(stored_state, next.state, "{way}: {stored} -> {now}");
        } else {
            assert_eq!(
                now,
                stored.replace("@ID@", &uuid),
                "{way} wrote {}",
                next.state
            );
        }
    }
}

/// A Go record for the placeholder UUID `@ID@` (write_all_ways fills it in).
fn go_record(state: &str) -> String {
    go_json("@ID@", "add", state, "null", "", CREATED)
}

/// A fresh task UUID with Go's record in `state` stored under it.
async fn go_stored(conn: &mut MultiplexedConnection, state: &str) -> String {
    let uuid = task_uuid();
    raw_set(conn, &uuid, &go_record(state).replace("@ID@", &uuid)).await;
    uuid
}

#[tokio::test]
async fn a_final_state_is_never_replaced_by_a_non_final_one() {
    let (b, mut conn) = (backend().await, raw().await);
    for stored in ["SUCCESS", "FAILURE"] {
        for next in [
            State::Pending,
            State::Received,
            State::Started,
            State::Retry,
        ] {
            let record = go_record(stored);
            let full = TaskState {
                task_name: "x".into(),
                created_at: GoTime::now(),
                ..TaskState::new("", next)
            };
            write_all_ways(&b, &mut conn, &record, &full, false).await;
            write_all_ways(&b, &mut conn, &record, &TaskState::new("", next), false).await;
        }
    }
}

#[tokio::test]
async fn pending_does_not_replace_a_received_or_started_task() {
    let (b, mut conn) = (backend().await, raw().await);
    let next = pending("");
    for stored in ["RECEIVED", "STARTED"] {
        write_all_ways(&b, &mut conn, &go_record(stored), &next, false).await;
    }
    // A retried task is sent again: PENDING replaces RETRY, and PENDING itself.
    for stored in ["RETRY", "PENDING"] {
        write_all_ways(&b, &mut conn, &go_record(stored), &next, true).await;
    }
    // Every other move forward is allowed, also out of order (STARTED before RECEIVED).
    for (stored, next) in [
        ("PENDING", State::Received),
        ("PENDING", State::Started),
        ("STARTED", State::Received),
        ("RECEIVED", State::Retry),
        ("RETRY", State::Started),
        ("STARTED", State::Success),
        ("PENDING", State::Failure),
    ] {
        write_all_ways(
            &b,
            &mut conn,
            &go_record(stored),
            &TaskState::new("", next),
            true,
        )
        .await;
    }
}

#[tokio::test]
async fn failure_may_replace_success_and_the_other_way_round() {
    let (b, mut conn) = (backend().await, raw().await);
    let failure = TaskState {
        error: "late failure".into(),
        ..TaskState::new("", State::Failure)
    };
    write_all_ways(&b, &mut conn, &go_record("SUCCESS"), &failure, true).await;
    write_all_ways(&b, &mut conn, &go_record("FAILURE"), &success(""), true).await;
    write_all_ways(&b, &mut conn, &go_record("SUCCESS"), &success(""), true).await;
}

#[tokio::test]
async fn guards_go_records_with_keys_in_any_case() {
    let (b, mut conn) = (backend().await, raw().await);
    let lower = format!(
        r#"{{"taskuuid":"@ID@","taskname":"add","state":"SUCCESS","results":[],"createdat":"{CREATED}"}}"#
    );
    let mixed = format!(r#"{{"TASKUUID":"@ID@","sTaTe":"STARTED","CreatedAt":"{CREATED}"}}"#);
    write_all_ways(
        &b,
        &mut conn,
        &lower,
        &TaskState::new("", State::Received),
        false,
    )
    .await;
    write_all_ways(&b, &mut conn, &mixed, &pending(""), false).await;
    // A record without a State is PENDING, as Go's zero value: any write goes.
    let stateless = r#"{"TaskUUID":"@ID@","TaskName":"add"}"#;
    write_all_ways(
        &b,
        &mut conn,
        stateless,
        &TaskState::new("", State::Received),
        true,
    )
    .await;

    // The previous record, decoded, whatever the case of its keys.
    let uuid = task_uuid();
    raw_set(&mut conn, &uuid, &lower.replace("@ID@", &uuid)).await;
    let previous = b
        .transition(TaskState::new(&uuid, State::Received))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            previous.task_uuid.as_str(),
            previous.task_name.as_str(),
            previous.state
        ),
        (uuid.as_str(), "add", State::Success)
    );
    assert_eq!(previous.created_at, created());
    assert_eq!(previous.results, Some(Vec::new()));
}

#[tokio::test]
async fn transition_returns_the_previous_state_written_or_not() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    assert_eq!(b.transition(pending(&uuid)).await.unwrap(), None);
    let previous = b
        .transition(TaskState::new(&uuid, State::Received))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(previous, pending(&uuid));
    // Carried forward, as set_state does.
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "RECEIVED", "null", "", CREATED)
    );
    let previous = b.transition(success(&uuid)).await.unwrap().unwrap();
    assert_eq!(previous.state, State::Received);
    let done = raw_get(&mut conn, &uuid).await.unwrap();

    // A redelivery: RECEIVED is refused, and the caller sees the result.
    let previous = b
        .transition(TaskState::new(&uuid, State::Received))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        previous,
        TaskState {
            task_name: "add".into(),
            created_at: created(),
            ..success(&uuid)
        }
    );
    assert_eq!(raw_get(&mut conn, &uuid).await.unwrap(), done);

    // A stored record that is not a state is replaced, and reported as nothing stored.
    let corrupt = task_uuid();
    raw_set(&mut conn, &corrupt, "{not json").await;
    assert_eq!(
        b.transition(TaskState::new(&corrupt, State::Received))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        raw_get(&mut conn, &corrupt).await.unwrap(),
        go_json(&corrupt, "", "RECEIVED", "null", "", ZERO_TIME)
    );
}

#[tokio::test]
async fn start_writes_as_transition_does_and_returns_a_final_record_whole_any_other_by_its_state() {
    let (b, mut conn) = (backend().await, raw().await);
    let started = |uuid: &str| TaskState::new(uuid, State::Started);
    // Nothing stored, or nothing that is a state: none.
    let fresh = task_uuid();
    assert_eq!(b.start(started(&fresh)).await.unwrap(), None);
    let corrupt = task_uuid();
    raw_set(&mut conn, &corrupt, "{not json").await;
    assert_eq!(b.start(started(&corrupt)).await.unwrap(), None);
    let bogus = go_stored(&mut conn, "BOGUS").await;
    assert_eq!(b.start(started(&bogus)).await.unwrap(), None);

    // PENDING (Go's record), a record without a State (PENDING, Go's zero value), RECEIVED and
    // STARTED: the state alone, and STARTED written with the name and time carried forward.
    let stateless = r#"{"TaskUUID":"@ID@","TaskName":"add"}"#.to_owned();
    for (record, was) in [
        (go_record("PENDING"), State::Pending),
        (stateless, State::Pending),
        (go_record("RECEIVED"), State::Received),
        (go_record("STARTED"), State::Started),
        (go_record("RETRY"), State::Retry),
    ] {
        let uuid = task_uuid();
        raw_set(&mut conn, &uuid, &record.replace("@ID@", &uuid)).await;
        assert_eq!(
            b.start(started(&uuid)).await.unwrap(),
            Some(TaskState::new(&uuid, was)),
            "{record}"
        );
        assert!(raw_get(&mut conn, &uuid)
            .await
            .unwrap()
            .contains(r#""TaskName":"add","State":"STARTED""#));
    }

    // SUCCESS and a revoke: refused, and the record comes back whole.
    let done = task_uuid();
    let done_record = go_json(&done, "add", "SUCCESS", FIVE, "", CREATED);
    raw_set(&mut conn, &done, &done_record).await;
    assert_eq!(
        b.start(started(&done)).await.unwrap(),
        Some(TaskState {
            task_name: "add".into(),
            created_at: created(),
            ..success(&done)
        })
    );
    assert_eq!(raw_get(&mut conn, &done).await.unwrap(), done_record);
    let revoked = task_uuid();
    b.revoke(std::slice::from_ref(&revoked)).await.unwrap();
    let kept = b.start(started(&revoked)).await.unwrap().unwrap();
    assert_eq!(
        (kept.state, kept.error.as_str()),
        (State::Failure, "revoked")
    );
}

#[tokio::test]
async fn record_writes_as_transition_does_and_returns_only_a_revoke() {
    let (b, mut conn) = (backend().await, raw().await);
    // Over STARTED: written (carried forward as transition does), and nothing comes back.
    let uuid = task_uuid();
    b.set_state(pending(&uuid)).await.unwrap();
    b.transition(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    assert_eq!(b.record(success(&uuid)).await.unwrap(), None);
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", FIVE, "", CREATED)
    );
    // RETRY over a final state: refused, and still nothing comes back (it is no revoke).
    let retry = TaskState {
        error: "again".into(),
        ..TaskState::new(&uuid, State::Retry)
    };
    assert_eq!(b.record(retry).await.unwrap(), None);
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", FIVE, "", CREATED)
    );

    // Over a revoke: refused, and the revoke comes back, in our layout or in any other that
    // decodes as JSON (keys in another case, read by the script's slow path).
    let ours = task_uuid();
    assert_eq!(b.revoke(std::slice::from_ref(&ours)).await.unwrap(), [true]);
    let lower = task_uuid();
    let lower_record = format!(
        r#"{{"taskuuid":"{lower}","taskname":"add","state":"FAILURE","error":"revoked","createdat":"{CREATED}"}}"#
    );
    raw_set(&mut conn, &lower, &lower_record).await;
    // One the script reads as a revoke but that does not decode as a state (a number for a
    // name): still a revoke.
    let odd = task_uuid();
    let odd_record =
        format!(r#"{{"TaskUUID":"{odd}","TaskName":5,"State":"FAILURE","Error":"revoked"}}"#);
    raw_set(&mut conn, &odd, &odd_record).await;
    for uuid in [&ours, &lower, &odd] {
        let before = raw_get(&mut conn, uuid).await.unwrap();
        let kept = b.record(success(uuid)).await.unwrap().expect("the revoke");
        assert_eq!(
            (kept.task_uuid.as_str(), kept.state, kept.error.as_str()),
            (uuid.as_str(), State::Failure, "revoked")
        );
        assert_eq!(raw_get(&mut conn, uuid).await.unwrap(), before);
    }

    // A FAILURE that is no revoke is replaced, and does not come back.
    let failed = go_stored(&mut conn, "FAILURE").await;
    assert_eq!(b.record(success(&failed)).await.unwrap(), None);
    assert!(raw_get(&mut conn, &failed)
        .await
        .unwrap()
        .contains(r#""State":"SUCCESS""#));
}

#[tokio::test]
async fn set_states_guards_and_carries_forward_in_a_batch() {
    let (b, mut conn) = (backend().await, raw().await);
    let ids: Vec<String> = (0..4).map(|_| task_uuid()).collect();
    b.set_state(pending(&ids[0])).await.unwrap();
    b.set_state(success(&ids[1])).await.unwrap();
    b.set_state(TaskState::new(&ids[2], State::Started))
        .await
        .unwrap();
    b.set_states(vec![
        TaskState::new(&ids[0], State::Started),
        pending(&ids[1]),
        pending(&ids[2]),
        pending(&ids[3]),
    ])
    .await
    .unwrap();
    assert_eq!(
        raw_get(&mut conn, &ids[0]).await.unwrap(),
        go_json(&ids[0], "add", "STARTED", "null", "", CREATED)
    );
    let states = b.get_states(&ids).await.unwrap();
    let states: Vec<State> = states.into_iter().map(|s| s.unwrap().state).collect();
    assert_eq!(
        states,
        [
            State::Started,
            State::Success,
            State::Started,
            State::Pending
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_undo_a_final_state() {
    let b = backend().await;
    for _ in 0..20 {
        let uuid = task_uuid();
        b.set_state(pending(&uuid)).await.unwrap();
        let mut writers = Vec::new();
        for i in 0..12 {
            let (b, uuid) = (b.clone(), uuid.clone());
            writers.push(tokio::spawn(async move {
                match i {
                    5 => b.set_state(success(&uuid)).await,
                    _ if i % 3 == 0 => b
                        .transition(TaskState::new(&uuid, State::Received))
                        .await
                        .map(drop),
                    _ if i % 3 == 1 => b.set_state(TaskState::new(&uuid, State::Started)).await,
                    _ => b.set_states(vec![pending(&uuid)]).await,
                }
            }));
        }
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let stored = b.get_state(&uuid).await.unwrap().unwrap();
        assert_eq!(stored.state, State::Success);
        assert_eq!(
            (stored.task_name.as_str(), stored.created_at),
            ("add", created())
        );
    }
}

/// Single writes made at the same time (a worker's tasks each recording STARTED, then SUCCESS)
/// share runs of the write script, as a worker's acknowledgements share frames; each still
/// gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_writes_share_script_runs() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let ids: Vec<String> = (0..400).map(|_| task_uuid()).collect();
    b.set_states(ids.iter().map(|id| pending(id)).collect())
        .await
        .unwrap();

    let started = futures_util::future::join_all(
        ids.iter()
            .map(|id| b.transition(TaskState::new(id, State::Started))),
    );
    let (previous, commands) = commands_during(&redis, started).await;
    for p in previous {
        assert_eq!(p.unwrap().unwrap().state, State::Pending);
    }
    // One run per write before; how many share a run depends on how the 400 futures are
    // polled (futures-util yields every 32) and when the writes in flight end: up to 41 runs
    // seen on a loaded machine.
    let runs = commands.get("evalsha").copied().unwrap_or(0);
    assert!(
        runs <= 100,
        "400 transitions took {runs} script runs: {commands:?}"
    );
    assert_eq!(commands.get("set").copied(), Some(400), "{commands:?}");

    // A mix of transitions and plain writes, each with its own outcome: a refused one refused.
    b.set_state(success(&ids[0])).await.unwrap();
    let mixed = futures_util::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let b = &b;
        async move {
            if i % 2 == 0 {
                b.transition(success(id)).await.map(|p| p.map(|p| p.state))
            } else {
                b.set_state(success(id)).await.map(|()| None)
            }
        }
    }));
    let (outcomes, commands) = commands_during(&redis, mixed).await;
    assert_eq!(outcomes[0].as_ref().unwrap(), &Some(State::Success));
    for (i, outcome) in outcomes.iter().enumerate().skip(1) {
        let expected = (i % 2 == 0).then_some(State::Started);
        assert_eq!(outcome.as_ref().unwrap(), &expected, "write {i}");
    }
    let runs = commands.get("evalsha").copied().unwrap_or(0);
    assert!(
        runs <= 100,
        "400 writes took {runs} script runs: {commands:?}"
    );
    for state in b.get_states(&ids).await.unwrap() {
        assert_eq!(state.unwrap().state, State::Success);
    }
}

/// Writes queue behind those in flight; when a write in flight is abandoned (its caller
/// dropped it), the queued ones are still written and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_behind_an_abandoned_write_are_still_made() {
    use std::future::Future;
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let ids: Vec<String> = (0..52).map(|_| task_uuid()).collect();
    b.set_states(ids.iter().map(|id| pending(id)).collect())
        .await
        .unwrap();

    // Writes wait while the server is paused, so that a write polled once cannot be answered
    // before it is left alone (under load, the connection's task could otherwise complete the
    // round trip between the two steps of that first poll).
    let mut pause = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1_500)
        .arg("WRITE")
        .query_async::<()>(&mut pause)
        .await
        .unwrap();
    // Two writes in flight, polled once and then left alone: the queue's room is taken.
    let mut first = Box::pin(b.transition(TaskState::new(&ids[0], State::Started)));
    let mut second = Box::pin(b.transition(TaskState::new(&ids[1], State::Started)));
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());

    let queued: Vec<_> = ids[2..]
        .iter()
        .map(|id| {
            let b = b.clone();
            let id = id.clone();
            tokio::spawn(async move { b.transition(TaskState::new(&id, State::Started)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queued.iter().all(|q| !q.is_finished()), "the writes queue");

    drop((first, second));
    for q in queued {
        let previous = tokio::time::timeout(Duration::from_secs(5), q)
            .await
            .expect("a queued write is answered")
            .unwrap()
            .unwrap();
        assert_eq!(previous.unwrap().state, State::Pending);
    }
    for state in b.get_states(&ids[2..]).await.unwrap() {
        assert_eq!(state.unwrap().state, State::Started);
    }
}

/// A task UUID that names a key of another type (a list, say the broker's queue) fails its
/// own write, for good, and leaves the key alone; the writes that share its run succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uuid_naming_a_key_of_another_type_fails_alone() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let list = task_uuid();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&list)
        .arg("a message")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<String> = (0..50).map(|_| task_uuid()).collect();
    let all = ids.iter().chain(std::iter::once(&list));
    let outcomes = futures_util::future::join_all(
        all.map(|id| b.transition(TaskState::new(id, State::Started))),
    )
    .await;
    let (bad, good) = outcomes.split_last().unwrap();
    for outcome in good {
        assert_eq!(outcome.as_ref().unwrap(), &None);
    }
    let err = bad.as_ref().unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(b
        .set_state(TaskState::new(&list, State::Success))
        .await
        .is_err());
    let kept: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, ["a message"]);
}

#[tokio::test]
async fn writes_are_one_round_trip() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let ids: Vec<String> = (0..1_500).map(|_| task_uuid()).collect();
    // The first write may load the script.
    b.set_state(pending(&ids[0])).await.unwrap();

    // One command each; the script's own GET and SET show up too.
    let (previous, commands) = commands_during(
        &redis,
        b.transition(TaskState::new(&ids[0], State::Received)),
    )
    .await;
    assert_eq!(previous.unwrap().unwrap().state, State::Pending);
    let one_write = calls(&[("evalsha", 1), ("get", 1), ("set", 1)]);
    assert_eq!(commands, one_write, "transition");

    let (_, commands) =
        commands_during(&redis, b.set_state(TaskState::new(&ids[0], State::Started))).await;
    assert_eq!(commands, one_write, "set_state");

    // A refused write: the script reads and stops.
    b.set_state(success(&ids[0])).await.unwrap();
    let (previous, commands) = commands_during(
        &redis,
        b.transition(TaskState::new(&ids[0], State::Received)),
    )
    .await;
    assert_eq!(previous.unwrap().unwrap().state, State::Success);
    assert_eq!(commands, calls(&[("evalsha", 1), ("get", 1)]), "refused");

    // A send's batch of PENDING records and a batch of carried-forward ones: a few runs of
    // the script, pipelined.
    let rest = &ids[1..];
    let n = rest.len() as u64;
    let (outcome, commands) = commands_during(
        &redis,
        b.set_states(rest.iter().map(|id| pending(id)).collect()),
    )
    .await;
    outcome.unwrap();
    let runs = commands.get("evalsha").copied().unwrap_or(0);
    assert!(runs <= 3, "set_states: {commands:?}");
    assert_eq!(
        commands,
        calls(&[("evalsha", runs), ("get", n), ("set", n)])
    );
    let batch = rest
        .iter()
        .map(|id| TaskState::new(id, State::Received))
        .collect();
    let (outcome, commands) = commands_during(&redis, b.set_states(batch)).await;
    outcome.unwrap();
    let runs = commands.get("evalsha").copied().unwrap_or(0);
    assert!(runs <= 3, "set_states: {commands:?}");
    assert_eq!(
        commands,
        calls(&[("evalsha", runs), ("get", n), ("set", n)])
    );
    for state in b.get_states(rest).await.unwrap() {
        let state = state.unwrap();
        assert_eq!(
            (state.state, state.task_name.as_str()),
            (State::Received, "add")
        );
    }
}

// ---- Shared waiting --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_one_batched_poller() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let ids: Vec<String> = (0..500).map(|_| task_uuid()).collect();
    b.set_states(ids.iter().map(|id| pending(id)).collect())
        .await
        .unwrap();

    let before = redis.stat("total_commands_processed");
    let waiters: Vec<_> = ids
        .iter()
        .map(|id| {
            let (b, id) = (b.clone(), id.clone());
            tokio::spawn(async move {
                b.wait_final(&id, Some(Instant::now() + Duration::from_secs(30)))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let commands = redis.stat("total_commands_processed") - before - 1;
    // One GET per waiter per poll would be thousands (500 waiters, 1 ms .. 100 ms apart).
    assert!(
        commands < 150,
        "{commands} commands for 500 waiters in 1.5 s"
    );

    b.set_states(ids.iter().map(|id| success(id)).collect())
        .await
        .unwrap();
    for (id, w) in ids.iter().zip(waiters) {
        let state = w.await.unwrap().unwrap();
        assert_eq!((&state.task_uuid, state.state), (id, State::Success));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiters_leave_no_traffic_behind() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let ids: Vec<String> = (0..200).map(|_| task_uuid()).collect();
    let waiters: Vec<_> = ids
        .iter()
        .map(|id| {
            let (b, id) = (b.clone(), id.clone());
            tokio::spawn(async move { b.wait_final(&id, None).await })
        })
        .collect();
    // Two waiters on the same task, one with a deadline that passes.
    let timed_out = b
        .wait_final(&ids[0], Some(Instant::now() + Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(timed_out.kind(), ErrorKind::Timeout);
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = redis.stat("total_commands_processed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = redis.stat("total_commands_processed") - before - 1;
    assert_eq!(idle, 0, "commands while no one waits");

    // Waiting again starts polling again.
    b.set_state(success(&ids[1])).await.unwrap();
    let state = b
        .wait_final(&ids[1], Some(Instant::now() + Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(state.state, State::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_outlives_the_runtime_that_started_polling() {
    let b = backend().await;
    let (first, second) = (task_uuid(), task_uuid());
    // A waiter in a runtime of its own starts polling there, then that runtime goes away.
    let (other, id) = (b.clone(), first.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::spawn(async move { other.wait_final(&id, None).await });
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = {
        let (b, id) = (b.clone(), second.clone());
        tokio::spawn(async move {
            b.wait_final(&id, Some(Instant::now() + Duration::from_secs(20)))
                .await
        })
    };
    thread.join().unwrap();
    b.set_state(success(&second)).await.unwrap();
    let state = waiter.await.unwrap().unwrap();
    assert_eq!(state.state, State::Success);
}

#[tokio::test]
async fn a_waiter_on_an_undecodable_record_gets_a_decode_error() {
    let (b, mut conn, uuid) = (backend().await, raw().await, task_uuid());
    raw_set(&mut conn, &uuid, "not json").await;
    let err = b
        .wait_final(&uuid, Some(Instant::now() + Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_result_waits_for_its_members_in_one_batch() {
    let redis = common::PrivateRedis::start();
    let config = Config::builder()
        .broker(format!("memory://redis-batch-{}", uuid::Uuid::new_v4()))
        .result_backend(redis.url())
        .build()
        .unwrap();
    let server = Server::new(config).await.unwrap();
    let worker = server.worker().concurrency(8).spawn().await.unwrap();
    let group = Group::new((0..300).map(|i| redis_backend_sum::signature(vec![i, 1])));
    let r = server.send_group(group).await.unwrap();
    let expected: Vec<i64> = (1..=300).collect();
    assert_eq!(
        r.get_timeout(Duration::from_secs(30)).await.unwrap(),
        expected
    );

    // Every member is final now: reading them again takes a round trip or two, not 300.
    let (results, commands) = commands_during(&redis, r.get()).await;
    assert_eq!(results.unwrap(), expected);
    let reads =
        commands.get("mget").copied().unwrap_or(0) + commands.get("get").copied().unwrap_or(0);
    assert!(reads <= 5, "{commands:?}");
    worker.shutdown().await.unwrap();
}

// ---- A worker's outcome over its own STARTED ---------------------------------------------

/// The arguments of the last `EVALSHA` the private server ran, from its slow log (every
/// command is logged: `slowlog-log-slower-than 0`).
async fn last_evalsha_args(conn: &mut MultiplexedConnection) -> Vec<String> {
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100)
        .query_async(conn)
        .await
        .expect("SLOWLOG GET");
    for entry in log {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let Some(redis::Value::Array(args)) = fields.get(3) else {
            continue;
        };
        let args: Vec<String> = args
            .iter()
            .map(|a| match a {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if args
            .first()
            .is_some_and(|a| a.eq_ignore_ascii_case("evalsha"))
        {
            return args;
        }
    }
    panic!("no EVALSHA in the slow log");
}

/// A raw connection to a private server.
async fn raw_to(redis: &common::PrivateRedis) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("private Redis")
}

/// A private server whose slow log keeps every command, and a raw connection to it.
async fn logged_redis() -> (common::PrivateRedis, MultiplexedConnection) {
    let redis = common::PrivateRedis::start();
    let mut conn = raw_to(&redis).await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query_async::<()>(&mut conn)
        .await
        .expect("CONFIG SET");
    (redis, conn)
}

#[tokio::test]
async fn an_outcome_over_the_workers_own_started_is_written_by_comparison() {
    let (redis, mut conn) = logged_redis().await;
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let uuid = task_uuid();
    raw_set(
        &mut conn,
        &uuid,
        &go_json(&uuid, "add", "PENDING", "null", "", CREATED),
    )
    .await;
    let previous = b
        .start(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    assert_eq!(previous.map(|p| p.state), Some(State::Pending));
    let started = raw_get(&mut conn, &uuid).await.unwrap();
    assert_eq!(
        started,
        go_json(&uuid, "add", "STARTED", "null", "", CREATED)
    );

    let (revoked, commands) = commands_during(&redis, b.record(success(&uuid))).await;
    assert_eq!(revoked.unwrap(), None);
    // One run: the stored record compared with the STARTED record `start` wrote, then the
    // outcome written, the creation time carried by the caller.
    assert_eq!(commands, calls(&[("evalsha", 1), ("get", 1), ("set", 1)]));
    // The key, expiry, reply flag, then the write: its flags (`E`: by comparison, SUCCESS,
    // the name and creation time carried, a revoke sent back) and two records (the slow log
    // cuts arguments at 128 bytes).
    let args = last_evalsha_args(&mut conn).await;
    assert_eq!(args.len(), 9, "{args:?}");
    assert_eq!(
        args[3..7],
        [uuid.clone(), "120".into(), "1".into(), "EU111".into()]
    );
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", FIVE, "", CREATED)
    );
    assert!(raw_ttl(&mut conn, &uuid).await > 100);
}

#[tokio::test]
async fn an_outcome_over_a_started_record_changed_since_goes_through_the_guard() {
    let redis = common::PrivateRedis::start();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let mut conn = raw_to(&redis).await;

    // Revoked while it ran: the comparison fails, and the guard keeps the revoke.
    let uuid = task_uuid();
    b.set_state(pending(&uuid)).await.unwrap();
    b.start(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    assert_eq!(b.revoke(std::slice::from_ref(&uuid)).await.unwrap(), [true]);
    let revoked_record = raw_get(&mut conn, &uuid).await.unwrap();
    let (revoked, commands) = commands_during(&redis, b.record(success(&uuid))).await;
    assert_eq!(revoked.unwrap().map(|r| r.error), Some("revoked".into()));
    assert_eq!(commands.get("evalsha"), Some(&2), "{commands:?}");
    assert_eq!(raw_get(&mut conn, &uuid).await.unwrap(), revoked_record);

    // Rewritten by another writer (a Go worker's STARTED, another creation time): the guard
    // writes the outcome and carries what is stored now.
    let uuid = task_uuid();
    b.set_state(pending(&uuid)).await.unwrap();
    b.start(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    let later = "2026-12-01T00:00:00Z";
    raw_set(
        &mut conn,
        &uuid,
        &go_json(&uuid, "add", "STARTED", "null", "", later),
    )
    .await;
    let (revoked, commands) = commands_during(&redis, b.record(success(&uuid))).await;
    assert_eq!(revoked.unwrap(), None);
    assert_eq!(commands.get("evalsha"), Some(&2), "{commands:?}");
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", FIVE, "", later)
    );

    // Finished by a duplicate meanwhile: SUCCESS over SUCCESS, through the guard.
    let uuid = task_uuid();
    b.set_state(pending(&uuid)).await.unwrap();
    b.start(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();
    b.set_state(success(&uuid)).await.unwrap();
    let failed = TaskState {
        error: "boom".into(),
        ..TaskState::new(&uuid, State::Failure)
    };
    assert_eq!(b.record(failed).await.unwrap(), None);
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "FAILURE", "null", "boom", CREATED)
    );
}

/// `start` then `record`, against `set_state` of the same two states (the guarded path),
/// over each stored record, with and without the worker's task name: the same bytes, and
/// the outcome written by comparison in one run (`E`) wherever the STARTED record allows it.
#[tokio::test]
async fn an_outcome_by_comparison_writes_the_bytes_the_guard_writes() {
    let (redis, mut conn) = logged_redis().await;
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let decoded = |name: &str| {
        format!(
            r#"{{"taskuuid":"@ID@","taskname":{},"state":"PENDING","createdat":"2026-11-29T20:17:52Z"}}"#,
            serde_json::to_string(name).unwrap()
        )
    };
    // Each stored record, and whether its name can be carried by comparison (a name with a
    // quote in it cannot: the guard carries it).
    let stored = [
        (
            Some(go_json("@ID@", "add", "PENDING", "null", "", CREATED)),
            true,
        ),
        // Read by decoding them (keys in another case), names that need escaping.
        (Some(decoded("a<b")), true),
        (Some(decoded("é\u{2028}\u{1}")), true),
        (Some(decoded("say \"hi\"")), false),
        // A RETRY with its error, then run again.
        (
            Some(go_json(
                "@ID@",
                "add",
                "RETRY",
                "null",
                "try again",
                CREATED,
            )),
            true,
        ),
        // No record at all: the zero time is carried.
        (None, true),
    ];
    let outcomes = [
        success(""),
        TaskState {
            error: "it \"failed\" <badly>".into(),
            ..TaskState::new("", State::Failure)
        },
        TaskState {
            error: "later".into(),
            ..TaskState::new("", State::Retry)
        },
    ];
    for (record, name_by_comparison) in &stored {
        for outcome in &outcomes {
            for name in ["add", ""] {
                for start in [State::Started, State::Received] {
                    let mut written = Vec::new();
                    for way in ["compared", "guarded"] {
                        let uuid = task_uuid();
                        if let Some(record) = record {
                            raw_set(&mut conn, &uuid, &record.replace("@ID@", &uuid)).await;
                        }
                        let started = TaskState {
                            task_name: name.into(),
                            ..TaskState::new(&uuid, start)
                        };
                        let outcome = TaskState {
                            task_uuid: uuid.clone(),
                            task_name: name.into(),
                            ..outcome.clone()
                        };
                        if way == "compared" {
                            b.start(started).await.unwrap();
                            let (_, commands) = commands_during(&redis, b.record(outcome)).await;
                            let form = last_evalsha_args(&mut conn).await[6].clone();
                            let compared = *name_by_comparison || !name.is_empty();
                            let case = format!("{record:?} {name:?} {start}: {form}");
                            assert_eq!(form.starts_with('E'), compared, "{case}");
                            assert_eq!(commands.get("evalsha"), Some(&1), "{case}");
                        } else {
                            b.set_state(started).await.unwrap();
                            b.set_state(outcome).await.unwrap();
                        }
                        written.push(
                            raw_get(&mut conn, &uuid)
                                .await
                                .unwrap()
                                .replace(&uuid, "@ID@"),
                        );
                    }
                    assert_eq!(written[0], written[1], "over {record:?}, {name:?}, {start}");
                }
            }
        }
    }
}

/// The outcome's first write fails with the server down; the store retries it, and the retry
/// (which no longer holds the STARTED record) goes through the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_first_write_failed_is_written_through_the_guard() {
    let mut redis = common::PrivateRedis::start_durable();
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    let uuid = task_uuid();
    b.set_state(pending(&uuid)).await.unwrap();
    b.start(TaskState::new(&uuid, State::Started))
        .await
        .unwrap();

    redis.kill9();
    fails_in_time("record", b.record(success(&uuid))).await;
    redis.restart();
    let (b2, id) = (b.clone(), uuid.clone());
    recovers("record", move || {
        let (b, id) = (b2.clone(), id.clone());
        Box::pin(async move { b.record(success(&id)).await })
    })
    .await;
    let mut conn = raw_to(&redis).await;
    assert_eq!(
        raw_get(&mut conn, &uuid).await.unwrap(),
        go_json(&uuid, "add", "SUCCESS", FIVE, "", CREATED)
    );
}

/// Only STARTED and RECEIVED records are kept for a comparison: `start` with any other state
/// reports the stored final record whole, as before, and a revoke written through `start`
/// is never overwritten by an outcome.
#[tokio::test]
async fn start_keeps_only_a_started_or_received_record_for_a_comparison() {
    let (b, mut conn) = (backend().await, raw().await);
    let uuid = go_stored(&mut conn, "SUCCESS").await;
    let previous = b.start(success(&uuid)).await.unwrap().unwrap();
    assert_eq!(previous.state, State::Success);
    assert_eq!(
        previous.task_name, "add",
        "the final record comes back whole"
    );

    let uuid = go_stored(&mut conn, "PENDING").await;
    let revoke = TaskState {
        error: "revoked".into(),
        ..TaskState::new(&uuid, State::Failure)
    };
    b.start(revoke).await.unwrap();
    let revoked = raw_get(&mut conn, &uuid).await.unwrap();
    assert_eq!(
        b.record(success(&uuid)).await.unwrap().map(|r| r.error),
        Some("revoked".into())
    );
    assert_eq!(raw_get(&mut conn, &uuid).await.unwrap(), revoked);
}

/// The write script checks every write's flags and the number of its arguments before it writes
/// anything: a run with one bad write is an error and leaves every key as it was. Nothing in
/// the library sends bad flags, so the script is called here by hand, by the SHA a real write
/// used (read from the slow log).
#[tokio::test]
async fn the_write_script_refuses_a_run_with_bad_flags_before_it_writes() {
    let (redis, mut conn) = logged_redis().await;
    let b = RedisBackend::connect(&redis.url(), TTL).await.unwrap();
    b.set_state(TaskState::new(task_uuid(), State::Pending))
        .await
        .unwrap();
    let sha = last_evalsha_args(&mut conn).await[1].clone();
    let (first, second) = (task_uuid(), task_uuid());
    let pieces = |uuid: &str| -> Vec<String> {
        vec![
            format!(r#"{{"TaskUUID":"{uuid}","TaskName":"#),
            r#""add""#.to_owned(),
            r#","State":"STARTED","Results":null,"Error":"","CreatedAt":"#.to_owned(),
            r#""0001-01-01T00:00:00Z""#.to_owned(),
            r#","TTL":0}"#.to_owned(),
        ]
    };
    let run = |second_write: Vec<String>| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha)
            .arg(2)
            .arg(&first)
            .arg(&second)
            .arg(60)
            .arg("0");
        cmd.arg("PS110");
        for piece in pieces(&first) {
            cmd.arg(piece);
        }
        for arg in second_write {
            cmd.arg(arg);
        }
        cmd
    };
    let with = |flags: &str, rest: Vec<String>| -> Vec<String> {
        std::iter::once(flags.to_owned()).chain(rest).collect()
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "an unknown form",
            with("XS110", pieces(&second)),
            "bad state flags",
        ),
        (
            "an unknown state",
            with("PZ110", pieces(&second)),
            "bad state flags",
        ),
        (
            "a carry flag not 0 or 1",
            with("PS210", pieces(&second)),
            "bad state flags",
        ),
        (
            "an unknown record to send back",
            with("PS114", pieces(&second)),
            "bad state flags",
        ),
        (
            "four flag bytes",
            with("PS11", pieces(&second)),
            "bad state flags",
        ),
        (
            "a comparison for a STARTED",
            with("ES110", vec!["{}".to_owned(), "{}".to_owned()]),
            "bad state flags",
        ),
        ("no flags", Vec::new(), "bad state flags"),
        (
            "a piece missing",
            with("PS110", pieces(&second)[..4].to_vec()),
            "bad state arguments",
        ),
        (
            "an argument too many",
            with("PS110", [pieces(&second), vec!["x".to_owned()]].concat()),
            "bad state arguments",
        ),
    ];
    for (what, second_write, error) in cases {
        let refused = run(second_write)
            .query_async::<redis::Value>(&mut conn)
            .await;
        let e = refused.expect_err(what);
        assert!(e.to_string().contains(error), "{what}: {e}");
        assert_eq!(
            raw_get(&mut conn, &first).await,
            None,
            "{what}: the good write went in"
        );
        assert_eq!(raw_get(&mut conn, &second).await, None, "{what}");
    }
    // The same run with good flags writes both.
    let written: Vec<i64> = run(with("PS110", pieces(&second)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(written, vec![1, 1]);
    for uuid in [&first, &second] {
        let stored = raw_get(&mut conn, uuid).await.unwrap();
        assert_eq!(stored, pieces(uuid).concat());
    }
}
