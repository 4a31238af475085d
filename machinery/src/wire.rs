//! Go Machinery's wire format: [`Signature`], [`Arg`], [`TaskResult`], [`TaskState`] and
//! [`GroupMeta`], with Go's field names.
//!
//! Encoding writes every key, in Go's field order, with Go's zero values (`""`, `0`, `false`,
//! `null`; `Args`, `OnSuccess` and `OnError` are `null` when empty and `Headers` is `{}`), so a Go
//! reader cannot tell a Rust producer from a Go one. Decoding is as tolerant as Go's
//! `encoding/json`: keys match case-insensitively, unknown keys are ignored, missing keys and
//! `null` take the zero value. It is as strict as Go where Go is strict: a number where a string
//! is expected, or `1.5` where an integer is expected, is an error.
//!
//! ```
//! use machinery::wire::Signature;
//!
//! let sig: Signature = serde_json::from_str(
//!     r#"{"uuid":"task_1","name":"add","Args":[{"Type":"int64","Value":1}],"Extra":true}"#,
//! )?;
//! assert_eq!(sig.name, "add");
//! assert_eq!(sig.args[0].type_name, "int64");
//! assert!(sig.on_success.is_empty());
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A field type with Go's JSON zero-value conventions.
trait GoField: Sized {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error>;
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error>;
}

macro_rules! plain_go_field {
    ($($t:ty),*) => {$(
        impl GoField for $t {
            fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                self.serialize(s)
            }
            fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                // Go leaves the zero value in place when the JSON value is null.
                Ok(Option::<$t>::deserialize(d)?.unwrap_or_default())
            }
        }
    )*};
}
plain_go_field!(String, bool, u8, i64, Value);

/// Slices: `null` when empty, as Go encodes a nil slice.
impl<T: Serialize + DeserializeOwned> GoField for Vec<T> {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.is_empty() {
            s.serialize_none()
        } else {
            self.serialize(s)
        }
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
    }
}

/// `Results` distinguishes `null` (no results yet) from `[]` (finished with no results).
impl GoField for Option<Vec<TaskResult>> {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Option::<Vec<TaskResult>>::deserialize(d)
    }
}

/// Headers: always an object (`{}` when empty), as Go producers write them.
impl GoField for Map<String, Value> {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
    }
}

impl GoField for Option<Box<Signature>> {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Option::<Box<Signature>>::deserialize(d)
    }
}

impl GoField for Option<GoTime> {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Some(t) => t.serialize(s),
            None => s.serialize_none(),
        }
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Go's zero time behind a pointer is still a time; we read it as "none".
        Ok(Option::<GoTime>::deserialize(d)?.filter(|t| !t.is_zero()))
    }
}

impl GoField for GoTime {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<GoTime>::deserialize(d)?.unwrap_or_default())
    }
}

impl GoField for State {
    fn encode<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
    fn decode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        State::parse(&s).ok_or_else(|| de::Error::custom(format!("unknown task state `{s}`")))
    }
}

struct Enc<'a, T>(&'a T);
impl<T: GoField> Serialize for Enc<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.encode(s)
    }
}

struct Dec<T>(T);
impl<'de, T: GoField> Deserialize<'de> for Dec<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        T::decode(d).map(Dec)
    }
}

/// Finds the canonical key a JSON key stands for: the exact key first, then a case-insensitive
/// match, as Go's `encoding/json` does. Borrowed keys are compared without allocating.
struct KeySeed {
    /// The exact match, compiled to a `match` on the literal keys.
    exact: fn(&str) -> Option<&'static str>,
    keys: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok((self.exact)(v).or_else(|| {
            self.keys
                .iter()
                .find(|k| k.eq_ignore_ascii_case(v))
                .copied()
        }))
    }
}

macro_rules! go_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $key:literal => pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            const KEYS: &'static [&'static str] = &[$($key),*];

            fn exact_key(key: &str) -> Option<&'static str> {
                match key {
                    $( $key => Some($key), )*
                    _ => None,
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                let mut st = s.serialize_struct(stringify!($name), Self::KEYS.len())?;
                $( st.serialize_field($key, &Enc(&self.$field))?; )*
                st.end()
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a JSON object (", stringify!($name), ")"))
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> std::result::Result<$name, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) = map.next_key_seed(KeySeed {
                            exact: $name::exact_key,
                            keys: $name::KEYS,
                        })? {
                            match key {
                                $( Some($key) => {
                                    out.$field = map.next_value::<Dec<$ty>>()?.0;
                                } )*
                                _ => {
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

go_struct! {
    /// A task message: what producers publish and workers consume (Go's `tasks.Signature`).
    ///
    /// Build one with a task's typed builder (`add::signature(1.0, 2.0)`) rather than by hand;
    /// this type is the wire form, public for tools, tests and interoperability.
    pub struct Signature {
        /// `task_<uuid4>` (`chord_<uuid4>` for chord callbacks).
        "UUID" => pub uuid: String,
        /// The registered task name.
        "Name" => pub name: String,
        /// The routing key; empty means the broker's default.
        "RoutingKey" => pub routing_key: String,
        /// Earliest time the task may run.
        "ETA" => pub eta: Option<GoTime>,
        /// `group_<uuid4>` for group members, else empty.
        "GroupUUID" => pub group_uuid: String,
        /// Number of tasks in the group.
        "GroupTaskCount" => pub group_task_count: i64,
        /// Positional arguments.
        "Args" => pub args: Vec<Arg>,
        /// Message headers.
        "Headers" => pub headers: Map<String, Value>,
        /// Message priority, 0-255.
        "Priority" => pub priority: u8,
        /// When true, this task's results are not appended to its `OnSuccess` callbacks.
        "Immutable" => pub immutable: bool,
        /// How many more times the task is retried on failure.
        "RetryCount" => pub retry_count: i64,
        /// Seconds to wait before the next retry (grows as a Fibonacci sequence).
        "RetryTimeout" => pub retry_timeout: i64,
        /// Signatures sent when this task succeeds (a chain's next link).
        "OnSuccess" => pub on_success: Vec<Signature>,
        /// Signatures sent when this task fails, with the error prepended to their args.
        "OnError" => pub on_error: Vec<Signature>,
        /// The callback of the chord this task belongs to.
        "ChordCallback" => pub chord_callback: Option<Box<Signature>>,
        /// SQS FIFO message group (unused by AMQP; carried through).
        "BrokerMessageGroupId" => pub broker_message_group_id: String,
        /// SQS receipt handle (unused by AMQP; carried through).
        "SQSReceiptHandle" => pub sqs_receipt_handle: String,
        /// SQS option (unused by AMQP; carried through).
        "StopTaskDeletionOnError" => pub stop_task_deletion_on_error: bool,
        /// When true, a worker that does not know the task drops it instead of handing it back.
        "IgnoreWhenTaskNotRegistered" => pub ignore_when_task_not_registered: bool,
    }
}

go_struct! {
    /// A positional task argument: `{"Name":"","Type":"int64","Value":1}`.
    ///
    /// `Type` is a Go type name (see the [table](crate::value)); `Name` is ignored.
    pub struct Arg {
        /// Ignored by workers; Go producers leave it empty.
        "Name" => pub name: String,
        /// The Go type name of `value` (`int64`, `[]string`, ...).
        "Type" => pub type_name: String,
        /// The value.
        "Value" => pub value: Value,
    }
}

go_struct! {
    /// One result of a finished task: `{"Type":"float64","Value":8}`.
    pub struct TaskResult {
        /// The Go type name of `value`.
        "Type" => pub type_name: String,
        /// The value.
        "Value" => pub value: Value,
    }
}

go_struct! {
    /// The state of a task as the result backend stores it (Go's `tasks.TaskState`).
    pub struct TaskState {
        /// The task's UUID.
        "TaskUUID" => pub task_uuid: String,
        /// The task's name (carried forward from the PENDING state).
        "TaskName" => pub task_name: String,
        /// The state.
        "State" => pub state: State,
        /// Results: `None` until the task succeeds.
        "Results" => pub results: Option<Vec<TaskResult>>,
        /// The error message of a failed task.
        "Error" => pub error: String,
        /// When the task was sent (carried forward from the PENDING state).
        "CreatedAt" => pub created_at: GoTime,
        /// Time to live in seconds, where the backend records one.
        "TTL" => pub ttl: i64,
    }
}

go_struct! {
    /// The record a result backend keeps for a group (Go's `tasks.GroupMeta`).
    pub struct GroupMeta {
        /// The group's UUID.
        "GroupUUID" => pub group_uuid: String,
        /// The members' UUIDs in creation order.
        "TaskUUIDs" => pub task_uuids: Vec<String>,
        /// Whether the chord callback has been sent.
        "ChordTriggered" => pub chord_triggered: bool,
        /// Lock flag used by some Go backends.
        "Lock" => pub lock: bool,
        /// When the group was created.
        "CreatedAt" => pub created_at: GoTime,
        /// Time to live in seconds, where the backend records one.
        "TTL" => pub ttl: i64,
    }
}

/// The states a task goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum State {
    /// Sent, not yet received by a worker.
    #[default]
    Pending,
    /// A worker has received it.
    Received,
    /// A worker is running it.
    Started,
    /// It failed and will be retried.
    Retry,
    /// It succeeded (final).
    Success,
    /// It failed (final).
    Failure,
}

impl State {
    /// The wire name (`"PENDING"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Received => "RECEIVED",
            State::Started => "STARTED",
            State::Retry => "RETRY",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
        }
    }

    /// Parses a wire name; `None` for an unknown state.
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "PENDING" | "" => State::Pending,
            "RECEIVED" => State::Received,
            "STARTED" => State::Started,
            "RETRY" => State::Retry,
            "SUCCESS" => State::Success,
            "FAILURE" => State::Failure,
            _ => return None,
        })
    }

    /// SUCCESS or FAILURE.
    pub fn is_final(self) -> bool {
        matches!(self, State::Success | State::Failure)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point in time as Go's `time.Time` encodes it: RFC 3339 in UTC with nanoseconds, trailing
/// zeros trimmed. The default value is Go's zero time, `0001-01-01T00:00:00Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoTime(Option<DateTime<Utc>>);

impl GoTime {
    /// The current time.
    pub fn now() -> GoTime {
        GoTime(Some(Utc::now()))
    }

    /// Wraps a UTC time.
    pub fn from_datetime(t: DateTime<Utc>) -> GoTime {
        GoTime(Some(t))
    }

    /// The time, or `None` for Go's zero time.
    pub fn datetime(&self) -> Option<DateTime<Utc>> {
        self.0
    }

    /// Whether this is Go's zero time.
    pub fn is_zero(&self) -> bool {
        self.0.is_none()
    }

    fn format(&self) -> String {
        let Some(t) = self.0 else {
            return "0001-01-01T00:00:00Z".to_owned();
        };
        let nanos = t.nanosecond() % 1_000_000_000;
        let mut out = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        if nanos != 0 {
            let frac = format!(".{nanos:09}");
            out.push_str(frac.trim_end_matches('0'));
        }
        out.push('Z');
        out
    }
}

impl fmt::Display for GoTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format())
    }
}

impl Serialize for GoTime {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.format())
    }
}

impl<'de> Deserialize<'de> for GoTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoTime;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 time string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<GoTime, E> {
                let t = DateTime::parse_from_rfc3339(v)
                    .map_err(|e| E::custom(format!("invalid time `{v}`: {e}")))?;
                let t = t.with_timezone(&Utc);
                // Go's zero time (year 1) stands for "no time".
                if t.year() <= 1 && t.ordinal() == 1 && t.num_seconds_from_midnight() == 0 {
                    return Ok(GoTime(None));
                }
                Ok(GoTime(Some(t)))
            }
        }
        d.deserialize_str(V)
    }
}

impl From<DateTime<Utc>> for GoTime {
    fn from(t: DateTime<Utc>) -> Self {
        GoTime(Some(t))
    }
}

impl Signature {
    /// A signature for task `name` with a fresh `task_<uuid4>` UUID and no arguments.
    pub fn new(name: impl Into<String>) -> Signature {
        Signature {
            uuid: new_uuid("task_"),
            name: name.into(),
            ..Signature::default()
        }
    }

    /// Encodes to compact JSON, as published.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        // Go's field names and zero values alone take ~330 bytes; start big enough for a
        // typical task, so the buffer is not regrown on the hot path.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, self)
            .map_err(|e| Error::encode(format!("signature: {e}")))?;
        Ok(out)
    }

    /// Decodes a message body.
    pub fn from_json(body: &[u8]) -> Result<Signature> {
        // Validating the UTF-8 of the whole body at once is much cheaper than string by string.
        let text = std::str::from_utf8(body)
            .map_err(|e| Error::decode(format!("signature: not UTF-8: {e}")))?;
        serde_json::from_str(text).map_err(|e| Error::decode(format!("signature: {e}")))
    }
}

impl From<TaskResult> for Arg {
    /// A result passed on as an argument (to a chain's next link or a chord's callback).
    fn from(result: TaskResult) -> Arg {
        Arg {
            name: String::new(),
            type_name: result.type_name,
            value: result.value,
        }
    }
}

impl TaskState {
    /// A state record for `uuid`.
    pub fn new(uuid: impl Into<String>, state: State) -> TaskState {
        TaskState {
            task_uuid: uuid.into(),
            state,
            ..TaskState::default()
        }
    }
}

/// A fresh `<prefix><uuid4>` identifier.
pub(crate) fn new_uuid(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 36);
    s.push_str(prefix);
    let mut buf = uuid::Uuid::encode_buffer();
    s.push_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{decode, encode_arg};
    use serde_json::json;

    /// Byte for byte what a Go Machinery v2 producer publishes for `add(1, 1)`.
    const GO_PLAIN: &str = r#"{"UUID":"task_5d7a3ec6-2f6a-4a44-b1b5-50c1e8f5b9e1","Name":"add","RoutingKey":"machinery_task","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":1},{"Name":"","Type":"int64","Value":1}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;

    /// The head of Go's `NewChain(add(2,2), add(5,6), multiply(4))`: links nested in OnSuccess,
    /// nested RoutingKeys empty until a worker publishes them.
    const GO_CHAIN_HEAD: &str = r#"{"UUID":"task_1","Name":"add","RoutingKey":"machinery_task","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":2},{"Name":"","Type":"int64","Value":2}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":[{"UUID":"task_2","Name":"add","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":5},{"Name":"","Type":"int64","Value":6}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":[{"UUID":"task_3","Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":4}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}],"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}],"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;

    /// A member of Go's `NewChord(NewGroup(add(1,1), add(5,5)), multiply())`.
    const GO_CHORD_MEMBER: &str = r#"{"UUID":"task_a","Name":"add","RoutingKey":"machinery_task","ETA":"2026-11-29T20:17:52.337696883Z","GroupUUID":"group_g","GroupTaskCount":2,"Args":[{"Name":"","Type":"int64","Value":1},{"Name":"","Type":"int64","Value":1}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":{"UUID":"chord_c","Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":null,"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false},"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;

    fn round_trip(golden: &str) -> Signature {
        let sig = Signature::from_json(golden.as_bytes()).unwrap();
        let encoded = String::from_utf8(sig.to_json().unwrap()).unwrap();
        assert_eq!(encoded, golden, "re-encoding must reproduce Go's bytes");
        sig
    }

    #[test]
    fn plain_task_golden() {
        let sig = round_trip(GO_PLAIN);
        assert_eq!(sig.name, "add");
        assert_eq!(sig.args.len(), 2);
        assert_eq!(
            decode::<i64>(&sig.args[0].type_name, &sig.args[0].value).unwrap(),
            1
        );
    }

    #[test]
    fn chain_head_golden() {
        let sig = round_trip(GO_CHAIN_HEAD);
        assert_eq!(sig.on_success.len(), 1);
        assert_eq!(sig.on_success[0].routing_key, "");
        assert_eq!(sig.on_success[0].on_success[0].name, "multiply");
    }

    #[test]
    fn chord_member_golden() {
        let sig = round_trip(GO_CHORD_MEMBER);
        assert_eq!(sig.group_task_count, 2);
        let eta = sig.eta.unwrap().datetime().unwrap();
        assert_eq!(eta.nanosecond(), 337_696_883);
        let callback = sig.chord_callback.unwrap();
        assert_eq!(callback.uuid, "chord_c");
        assert!(callback.args.is_empty());
    }

    #[test]
    fn our_encoding_matches_go_shape() {
        let mut sig = Signature::new("add");
        sig.routing_key = "machinery_task".into();
        sig.args.push(encode_arg(&1i64).unwrap());
        sig.args.push(encode_arg(&1i64).unwrap());
        sig.uuid = "task_5d7a3ec6-2f6a-4a44-b1b5-50c1e8f5b9e1".into();
        assert_eq!(String::from_utf8(sig.to_json().unwrap()).unwrap(), GO_PLAIN);
        assert!(Signature::new("x").uuid.starts_with("task_"));
        assert_eq!(Signature::new("x").uuid.len(), "task_".len() + 36);
    }

    #[test]
    fn decoding_is_tolerant_like_go() {
        let sig: Signature = serde_json::from_str(
            r#"{"uuid":"u","NAME":"add","args":null,"headers":null,"Unknown":{"deep":[1,2]},"priority":3,"onsuccess":null,"eta":null}"#,
        )
        .unwrap();
        assert_eq!(
            (sig.uuid.as_str(), sig.name.as_str(), sig.priority),
            ("u", "add", 3)
        );
        assert!(sig.args.is_empty() && sig.headers.is_empty());
        // Missing keys are zero values; an empty object is a valid (if useless) signature.
        assert_eq!(Signature::from_json(b"{}").unwrap(), Signature::default());
        // Null strings and numbers keep their zero value, as in Go.
        let sig = Signature::from_json(br#"{"Name":null,"RetryCount":null}"#).unwrap();
        assert_eq!((sig.name.as_str(), sig.retry_count), ("", 0));
    }

    #[test]
    fn decoding_is_strict_like_go() {
        for bad in [
            r#"[1,2]"#,
            r#"{"Name":5}"#,
            r#"{"RetryCount":1.5}"#,
            r#"{"Priority":256}"#,
            r#"{"Priority":-1}"#,
            r#"{"Args":{}}"#,
            r#"{"Args":[{"Type":1}]}"#,
            r#"{"ETA":"yesterday"}"#,
            r#"{"Name":"x""#,
            "not json",
        ] {
            assert!(
                Signature::from_json(bad.as_bytes()).is_err(),
                "{bad} must be rejected"
            );
        }
    }

    #[test]
    fn task_state_golden() {
        let go = r#"{"TaskUUID":"task_1","TaskName":"add","State":"SUCCESS","Results":[{"Type":"float64","Value":8}],"Error":"","CreatedAt":"2026-11-29T20:17:52.337696883Z","TTL":0}"#;
        let state: TaskState = serde_json::from_str(go).unwrap();
        assert_eq!(state.state, State::Success);
        let results = state.results.clone().unwrap();
        assert_eq!(
            decode::<f64>(&results[0].type_name, &results[0].value).unwrap(),
            8.0
        );
        assert_eq!(serde_json::to_string(&state).unwrap(), go);

        let pending = TaskState::new("task_2", State::Pending);
        assert_eq!(
            serde_json::to_string(&pending).unwrap(),
            r#"{"TaskUUID":"task_2","TaskName":"","State":"PENDING","Results":null,"Error":"","CreatedAt":"0001-01-01T00:00:00Z","TTL":0}"#
        );
        let back: TaskState =
            serde_json::from_str(&serde_json::to_string(&pending).unwrap()).unwrap();
        assert!(back.created_at.is_zero());
        assert!(serde_json::from_str::<TaskState>(r#"{"State":"DONE"}"#).is_err());
    }

    #[test]
    fn group_meta_golden() {
        let go = r#"{"GroupUUID":"group_1","TaskUUIDs":["task_a","task_b"],"ChordTriggered":true,"Lock":false,"CreatedAt":"2026-11-29T20:17:52Z","TTL":0}"#;
        let meta: GroupMeta = serde_json::from_str(go).unwrap();
        assert_eq!(meta.task_uuids, ["task_a", "task_b"]);
        assert_eq!(serde_json::to_string(&meta).unwrap(), go);
    }

    #[test]
    fn go_time_formatting() {
        for (input, output) in [
            (
                "2026-11-29T20:17:52.337696883Z",
                "2026-11-29T20:17:52.337696883Z",
            ),
            ("2026-11-29T20:17:52.100Z", "2026-11-29T20:17:52.1Z"),
            ("2026-11-29T20:17:52Z", "2026-11-29T20:17:52Z"),
            ("2026-11-29T21:17:52+01:00", "2026-11-29T20:17:52Z"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ] {
            let t: GoTime = serde_json::from_value(json!(input)).unwrap();
            assert_eq!(t.to_string(), output);
        }
    }

    #[test]
    fn every_arg_type() {
        fn check<T>(value: T, type_name: &str, json: Value)
        where
            T: Serialize + DeserializeOwned + PartialEq + fmt::Debug + 'static,
        {
            let arg = encode_arg(&value).unwrap();
            assert_eq!(arg.type_name, type_name);
            assert_eq!(arg.value, json);
            let wire = serde_json::to_string(&arg).unwrap();
            let back: Arg = serde_json::from_str(&wire).unwrap();
            assert_eq!(decode::<T>(&back.type_name, &back.value).unwrap(), value);
        }
        check(true, "bool", json!(true));
        check(-5i8, "int8", json!(-5));
        check(-300i16, "int16", json!(-300));
        check(-70_000i32, "int32", json!(-70_000));
        check(i64::MIN, "int64", json!(i64::MIN));
        check(-1isize, "int", json!(-1));
        check(255u8, "uint8", json!(255));
        check(65_535u16, "uint16", json!(65_535));
        check(4_000_000_000u32, "uint32", json!(4_000_000_000u32));
        check(u64::MAX, "uint64", json!(u64::MAX));
        check(7usize, "uint", json!(7));
        check(1.5f32, "float32", json!(1.5));
        check(8.25f64, "float64", json!(8.25));
        check("hi".to_owned(), "string", json!("hi"));
        check(vec![true, false], "[]bool", json!([true, false]));
        check(vec![1i8], "[]int8", json!([1]));
        check(vec![1i16], "[]int16", json!([1]));
        check(vec![1i32], "[]int32", json!([1]));
        check(vec![1i64, 2], "[]int64", json!([1, 2]));
        check(vec![1isize], "[]int", json!([1]));
        check(vec![1u8, 2], "[]uint8", json!([1, 2]));
        check(vec![1u16], "[]uint16", json!([1]));
        check(vec![1u32], "[]uint32", json!([1]));
        check(vec![1u64], "[]uint64", json!([1]));
        check(vec![1usize], "[]uint", json!([1]));
        check(vec![0.5f32], "[]float32", json!([0.5]));
        check(vec![0.5f64], "[]float64", json!([0.5]));
        check(vec!["a".to_owned()], "[]string", json!(["a"]));
        check(Some(3i64), "json", json!(3));
    }

    #[test]
    fn strict_arg_decoding() {
        // Integers: no fraction, no exponent, in range.
        assert!(decode::<i64>("int64", &json!(1.0)).is_err());
        assert!(decode::<i64>("int64", &serde_json::from_str::<Value>("1e3").unwrap()).is_err());
        assert!(decode::<i64>("int64", &json!(1.5)).is_err());
        assert!(decode::<i8>("int8", &json!(128)).is_err());
        assert!(decode::<u8>("uint8", &json!(-1)).is_err());
        assert!(decode::<u64>(
            "uint64",
            &serde_json::from_str::<Value>("18446744073709551616").unwrap()
        )
        .is_err());
        assert!(decode::<u32>("uint32", &json!(4_294_967_296u64)).is_err());
        // The declared type must be the task's.
        assert!(decode::<i64>("int", &json!(1)).is_err());
        assert!(decode::<i64>("int128", &json!(1)).is_err());
        assert!(decode::<String>("int64", &json!("1")).is_err());
        assert!(decode::<f64>("float64", &json!("1.5")).is_err());
        // Floats accept integers.
        assert_eq!(decode::<f64>("float64", &json!(2)).unwrap(), 2.0);
        // A null slice is empty; a null scalar is an error.
        assert_eq!(
            decode::<Vec<i64>>("[]int64", &Value::Null).unwrap(),
            Vec::<i64>::new()
        );
        assert!(decode::<i64>("int64", &Value::Null).is_err());
        // []byte: Go's alias, and Go's base64 encoding.
        assert_eq!(
            decode::<Vec<u8>>("[]byte", &json!("aGk=")).unwrap(),
            b"hi".to_vec()
        );
        assert_eq!(
            decode::<Vec<u8>>("[]uint8", &json!([104, 105])).unwrap(),
            b"hi".to_vec()
        );
        assert!(decode::<Vec<u8>>("[]uint8", &json!("not base64!")).is_err());
        // Errors say what was expected and what came.
        let err = decode::<i64>("int64", &json!(1.5)).unwrap_err();
        assert!(
            err.message().contains("int64") && err.message().contains("1.5"),
            "{err}"
        );
    }
}
