//! machinery's bytes against Go Machinery's, byte for byte.
//!
//! The files in `tests/golden/` were written by Go's own `encoding/json`
//! (`tests/golden/gen_golden.go`, which copies Go Machinery v2's types and the steps of its
//! `SendTask`, `SendChain`, `SendGroup` and `SendChord`). These tests send the same logical
//! signatures through machinery's server on the embedded broker, read the published bytes,
//! and compare them with Go's, UUIDs aside (random on both sides; Go's files use fixed ones).

// Test helpers outside `#[test]` functions, where clippy.toml's allowances do not reach.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use machinery::value::{encode_arg, encode_result};
use machinery::wire::{self, GoTime, Signature, State, TaskState};
use machinery::{task, Config, Group, Server};
use serde_json::{json, Value};

const TASK: &str = include_str!("golden/task.json");
const CHAIN: &str = include_str!("golden/chain.json");
const GROUP: &str = include_str!("golden/group.json");
const CHORD: &str = include_str!("golden/chord.json");
const FLOATS: &str = include_str!("golden/floats.json");
const STRINGS: &str = include_str!("golden/strings.json");
const STATE: &str = include_str!("golden/state.json");

#[task]
fn add(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().sum()
}

#[task]
fn multiply(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().product()
}

#[task]
fn report(#[error_message] error: String) -> String {
    error
}

/// A server on an embedded broker of its own, with no worker: what it sends stays queued.
async fn server(tag: &str) -> Server {
    let url = format!("memory://golden_{tag}_{}", uuid::Uuid::new_v4().simple());
    let config = Config::builder()
        .broker(url.clone())
        .result_backend(url)
        .build()
        .unwrap();
    Server::new(config).await.unwrap()
}

/// The bodies of every message queued on the server's default queue.
async fn published(server: &Server, n: usize) -> Vec<String> {
    let mut consumer = server
        .broker()
        .consume(&server.config().default_queue, 100)
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a published message")
            .unwrap()
            .unwrap();
        bodies.push(String::from_utf8(delivery.body().to_vec()).unwrap());
    }
    bodies
}

/// Every UUID of a signature (its own, its group's, its callbacks'), in a fixed order.
fn uuids(sig: &Signature, out: &mut Vec<String>) {
    out.push(sig.uuid.clone());
    if !sig.group_uuid.is_empty() {
        out.push(sig.group_uuid.clone());
    }
    for next in sig.on_success.iter().chain(&sig.on_error) {
        uuids(next, out);
    }
    if let Some(callback) = &sig.chord_callback {
        uuids(callback, out);
    }
}

/// `body` without the W3C `traceparent` header a Rust producer adds to the message's own
/// `Headers` (README, "differs on purpose": Go's producer adds its tracer's headers there
/// instead, v2/tracing HeadersWithSpan), after checking that it is one.
fn without_trace(body: &str) -> String {
    const KEY: &str = r#""traceparent":""#;
    let Some(at) = body.find(KEY) else {
        return body.to_owned();
    };
    let value = &body[at + KEY.len()..];
    let end = value.find('"').expect("a closed string");
    let parts: Vec<&str> = value[..end].split('-').collect();
    let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    assert_eq!(
        lengths,
        [2, 32, 16, 2],
        "a W3C traceparent: {}",
        &value[..end]
    );
    let mut rest = &value[end + 1..];
    let mut head = &body[..at];
    if let Some(after_comma) = rest.strip_prefix(',') {
        rest = after_comma;
    } else if let Some(before_comma) = head.strip_suffix(',') {
        head = before_comma;
    }
    format!("{head}{rest}")
}

/// `ours` with its UUIDs replaced by those `go` has in the same places.
fn with_go_uuids(ours: &str, go: &str) -> String {
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    uuids(&Signature::from_json(ours.as_bytes()).unwrap(), &mut mine);
    uuids(&Signature::from_json(go.as_bytes()).unwrap(), &mut theirs);
    assert_eq!(mine.len(), theirs.len(), "{ours}\n{go}");
    let mut out = ours.to_owned();
    for (m, t) in mine.iter().zip(&theirs) {
        assert!(!m.is_empty(), "every UUID is set: {ours}");
        out = out.replace(&format!("\"{m}\""), &format!("\"{t}\""));
    }
    out
}

#[tokio::test]
async fn a_task_with_an_error_callback_is_sent_as_go_sends_it() {
    // Go: SendTask sets the message's own Headers ({}); the nested OnError keeps its nil
    // map, written null (v2/server.go SendTaskWithContext, v2/tracing HeadersWithSpan).
    let server = server("task").await;
    let sig = add::signature(vec![1, 1]).on_error(report::signature());
    server.send(sig).await.unwrap();
    let body = &published(&server, 1).await[0];
    assert_eq!(with_go_uuids(&without_trace(body), TASK), TASK);
}

#[tokio::test]
async fn a_chain_is_sent_as_go_sends_it() {
    // Go: SendChain sends the first link through SendTask; the nested links keep nil headers.
    let server = server("chain").await;
    let chain = add::signature(vec![1, 1])
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    server.send(chain).await.unwrap();
    let body = &published(&server, 1).await[0];
    assert_eq!(with_go_uuids(&without_trace(body), CHAIN), CHAIN);
}

#[tokio::test]
async fn group_members_are_sent_as_go_sends_them() {
    // Go: SendGroup (through SendGroupWithContext) sets every member's headers.
    let server = server("group").await;
    let group = Group::new([add::signature(vec![1, 1]), add::signature(vec![2, 2])]);
    server.send_group(group).await.unwrap();
    let bodies = published(&server, 2).await;
    let first = bodies.iter().find(|b| b.contains(r#""Value":1}"#)).unwrap();
    assert_eq!(with_go_uuids(&without_trace(first), GROUP), GROUP);
}

#[tokio::test]
async fn chord_members_are_sent_as_go_sends_them() {
    // Go: SendChord sets the callback's headers too (AnnotateSpanWithChordInfo), so a member's
    // ChordCallback carries {}; the callback's own OnError keeps its nil map.
    let server = server("chord").await;
    let group = Group::new([add::signature(vec![1, 1]), add::signature(vec![2, 2])]);
    let chord = group.chord(multiply::signature(vec![4]).on_error(report::signature()));
    server.send_chord(chord).await.unwrap();
    let bodies = published(&server, 2).await;
    let first = bodies.iter().find(|b| b.contains(r#""Value":1}"#)).unwrap();
    assert_eq!(with_go_uuids(&without_trace(first), CHORD), CHORD);
}

/// A signature as `gen_golden.go` builds it by hand.
fn signature(uuid: &str, name: &str, args: Vec<wire::Arg>) -> Signature {
    Signature {
        uuid: uuid.into(),
        name: name.into(),
        routing_key: "machinery_task".into(),
        args,
        ..Signature::default()
    }
}

#[test]
fn floats_are_written_as_go_writes_them() {
    // Go: encoding/json encode.go floatEncoder: 'f' format with the shortest digits, 'e' below
    // 1e-6 and from 1e21 on (1e+21, 1e-7); float32 values with float32's shortest digits.
    let floats = [
        8.0,
        0.0,
        0.1,
        -2.5,
        1e20,
        123456789012345680000.0,
        1e21,
        1.5e300,
        1e-6,
        1e-7,
        2.5e-10,
        5e-324,
        f64::MAX,
        100.0,
        1e15,
        1e16,
        1e17,
        123456.789,
        -1e21,
        -1e-7,
        0.000123,
    ];
    let mut args: Vec<_> = floats.iter().map(|f| encode_arg(f).unwrap()).collect();
    args.push(encode_arg(&floats.to_vec()).unwrap());
    args.push(encode_arg(&0.1f32).unwrap());
    args.push(encode_arg(&vec![0.1f32, 8.0, 1e-7, f32::MAX, 16777216.0, 1.1]).unwrap());
    let sig = signature("task_1", "sum_floats", args);
    assert_eq!(String::from_utf8(sig.to_json().unwrap()).unwrap(), FLOATS);
    // Both forms decode to the same values.
    let decoded = Signature::from_json(FLOATS.as_bytes()).unwrap();
    assert_eq!(decoded.to_json().unwrap(), sig.to_json().unwrap());
    let eight: f64 = machinery::value::decode_arg(&decoded.args[0]).unwrap();
    assert_eq!(eight, 8.0);
    let point_one: f32 = machinery::value::decode_arg(&decoded.args[22]).unwrap();
    assert_eq!(point_one, 0.1f32);
    let ours_before =
        r#"{"Args":[{"Type":"float64","Value":8.0},{"Type":"float64","Value":1e21}]}"#;
    let decoded = Signature::from_json(ours_before.as_bytes()).unwrap();
    assert_eq!(decoded.args[0].value.as_f64(), Some(8.0));
    assert_eq!(decoded.args[1].value.as_f64(), Some(1e21));
}

#[test]
fn strings_are_escaped_as_go_escapes_them() {
    // Go: encoding/json escapes <, > and & (json.Marshal's HTML escaping) and U+2028, U+2029.
    let mut sig = signature(
        "task_<1>&",
        "concat",
        vec![
            encode_arg(&r#"<a href="x?a=1&b=2">é😀</a>"#.to_owned()).unwrap(),
            encode_arg(&"line\u{2028}para\u{2029}end".to_owned()).unwrap(),
            encode_arg(&"tab\tnl\ncr\r ctl\u{1}\u{1f} del\u{7f} quote\" back\\ slash/".to_owned())
                .unwrap(),
            encode_arg(&["<", ">", "&", "&amp;"].map(String::from).to_vec()).unwrap(),
        ],
    );
    let headers = json!({"z-last": "1", "a-first": "<&>", "m": {"<k>": [1, "\u{2028}"]}});
    let Value::Object(headers) = headers else {
        unreachable!()
    };
    sig.headers = headers;
    assert_eq!(String::from_utf8(sig.to_json().unwrap()).unwrap(), STRINGS);
    // Either form decodes to the same strings.
    let decoded = Signature::from_json(STRINGS.as_bytes()).unwrap();
    assert_eq!(decoded, sig);
    let plain = r#"{"UUID":"task_<1>&","Headers":{"a-first":"<&>"}}"#;
    let decoded = Signature::from_json(plain.as_bytes()).unwrap();
    assert_eq!(decoded.uuid, "task_<1>&");
    assert_eq!(decoded.headers["a-first"], "<&>");
}

#[test]
fn a_stored_state_is_written_as_go_writes_it() {
    // Go: the Redis backend stores json.Marshal(taskState) (v2/backends/redis).
    let state = TaskState {
        task_name: "add".into(),
        results: Some(vec![
            encode_result(&8.0f64).unwrap(),
            encode_result(&1e21f64).unwrap(),
            encode_result(&1e-7f64).unwrap(),
            encode_result(&"<b>&amp;</b>\u{2028}".to_owned()).unwrap(),
            encode_result(&vec![2.0f64, 0.5]).unwrap(),
        ]),
        created_at: serde_json::from_str::<GoTime>(r#""2026-11-29T20:17:52.337696883Z""#).unwrap(),
        ..TaskState::new("task_1", State::Success)
    };
    assert_eq!(String::from_utf8(state.to_json().unwrap()).unwrap(), STATE);
    // Read back (as Go's `8` or as our former `8.0`), it is the same state and the same bytes.
    for stored in [
        STATE.to_owned(),
        STATE.replace(r#""Value":8}"#, r#""Value":8.0}"#),
    ] {
        let decoded: TaskState = serde_json::from_str(&stored).unwrap();
        assert_eq!(
            String::from_utf8(decoded.to_json().unwrap()).unwrap(),
            STATE
        );
        let eight: f64 = machinery::value::decode(
            &decoded.results.as_ref().unwrap()[0].type_name,
            &decoded.results.as_ref().unwrap()[0].value,
        )
        .unwrap();
        assert_eq!(eight, 8.0);
    }
}

#[test]
fn nested_headers_decode_from_null_and_from_an_object() {
    // Go's SendChainWithContext writes {} in every link; SendChain null in nested ones.
    let with_objects = CHAIN.replace(r#""Headers":null"#, r#""Headers":{}"#);
    let a = Signature::from_json(with_objects.as_bytes()).unwrap();
    let b = Signature::from_json(CHAIN.as_bytes()).unwrap();
    assert_eq!(a, b);
    assert_eq!(String::from_utf8(a.to_json().unwrap()).unwrap(), CHAIN);
    // Headers that are set are written in nested signatures too.
    let mut sig = b;
    sig.on_success[0]
        .headers
        .insert("k".into(), Value::from("v"));
    let json = String::from_utf8(sig.to_json().unwrap()).unwrap();
    assert!(json.contains(r#""Headers":{"k":"v"}"#), "{json}");
}

#[test]
fn random_floats_are_written_as_go_writes_them() {
    // 2,000 floats from random bit patterns and at random scales, as Go's json.Marshal wrote
    // them: the same shortest digits, the same format.
    let bits: Vec<u64> =
        serde_json::from_str(include_str!("golden/floats_random_bits.json")).unwrap();
    let go = include_str!("golden/floats_random.json");
    let floats: Vec<f64> = bits.iter().map(|b| f64::from_bits(*b)).collect();
    let sig = signature("task_1", "sum_floats", vec![encode_arg(&floats).unwrap()]);
    let json = String::from_utf8(sig.to_json().unwrap()).unwrap();
    let ours = json
        .split_once(r#""Value":"#)
        .and_then(|(_, rest)| rest.split_once("}]"))
        .map(|(value, _)| value)
        .unwrap();
    let inner = |s: &str| s.trim_matches(['[', ']']).to_owned();
    for (i, (a, b)) in inner(ours).split(',').zip(inner(go).split(',')).enumerate() {
        assert_eq!(a, b, "float {i} (bits {:#x})", bits[i]);
    }
    assert_eq!(ours, go);
}
