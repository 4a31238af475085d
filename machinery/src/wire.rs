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
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(self
            .0
            .iter()
            .find(|k| **k == v)
            .or_else(|| self.0.iter().find(|k| k.eq_ignore_ascii_case(v)))
            .copied())
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
                        while let Some(key) = map.next_key_seed(KeySeed($name::KEYS))? {
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
        serde_json::to_vec(self).map_err(|e| Error::encode(format!("signature: {e}")))
    }

    /// Decodes a message body.
    pub fn from_json(body: &[u8]) -> Result<Signature> {
        serde_json::from_slice(body).map_err(|e| Error::decode(format!("signature: {e}")))
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
