//! Go Machinery's wire format: [`Signature`], [`Arg`], [`TaskResult`], [`TaskState`] and
//! [`GroupMeta`], with Go's field names.
//!
//! Encoding writes every key, in Go's field order, with Go's zero values (`""`, `0`, `false`,
//! `null`; `Args`, `OnSuccess` and `OnError` are `null` when empty; empty `Headers` are `{}`,
//! but `null` in the signatures nested in `OnSuccess` and `OnError`), with Go's `encoding/json`
//! spelling of floats (`8`, `1e+21`) and strings (`\u003c` for `<`), so that the bytes are the
//! ones a Go producer writes for the same signature. Decoding is as tolerant as Go's
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
use std::marker::PhantomData;

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, TimeDelta, Timelike, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// The deepest nesting of JSON arrays and objects a message may have, counting every `[` and
/// `{` from the outermost object (level 1) down: Go's `encoding/json` limit
/// (`maxNestingDepth` in Go's `encoding/json/scanner.go`), so a message nests here exactly as
/// deep as a Go worker accepts.
///
/// A chain nests each link two levels below the previous one (`"OnSuccess":[{...}]`), so it
/// may have up to 5,000 links, as in Go (where the last one may have arguments if its
/// `Headers` are `null`); chord callbacks nest one level each. Since this crate encodes
/// `"Headers":{}` in a message's own signature and a chord callback (and headers that are set
/// anywhere), every signature takes two levels of the budget even where its message has no
/// headers (stricter than Go by that one level), so that everything decoded here can be
/// encoded again.
///
/// Why a bound of its own rather than serde_json's (128 levels, which stops chains at 63
/// links), and why not none: a message may be up to `max_message_size` (4 MiB by default)
/// long, enough for two million levels of `[`, and a deeply nested [`Signature`] is recursed
/// over not only to decode and encode it but also by `Clone`, `PartialEq`, `Debug` and
/// `Drop`. All but `Drop` grow the stack onto the heap when it runs low (with `stacker`), so
/// they work at any depth; `Drop` is the compiler's recursive drop glue, which cannot be
/// hooked without giving up moving fields out of a signature, and at this bound it needs at
/// most about 1.3 MiB (debug build; less optimised), inside a tokio worker's 2 MiB stack.
pub const MAX_NESTING: usize = 10_000;

/// The deepest nesting of arrays and objects inside one argument, result or header value
/// (`[[1]]` nests 2 deep).
///
/// Go's own type table needs 1 (`[]int64`); `json` values and headers rarely need more than a
/// few. Values are held as [`serde_json::Value`], whose `Clone`, `PartialEq`, `Debug` and
/// `Drop` recurse without any stack check; 100 levels keep each of them under ~150 KiB of
/// stack. A [`TaskState`] holding such a value also stays inside serde_json's default limit of
/// 128, which result backends may decode with. Go has no such limit below [`MAX_NESTING`].
pub const MAX_VALUE_NESTING: usize = 100;

/// Stack that must be left before descending one more level into a signature or a value. It
/// covers the deepest recursion between two checks: a level of serde_json's (unoptimised)
/// parser, or cloning or formatting a whole [`MAX_VALUE_NESTING`]-deep value.
const RED_ZONE: usize = 256 * 1024;

/// The size of each stack segment allocated when the stack runs low.
const STACK_SEGMENT: usize = 2 * 1024 * 1024;

/// Runs `f`, on a fresh stack segment on the heap if less than [`RED_ZONE`] of the current
/// stack is left. Every recursive step over signatures and values goes through here.
fn grow<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, f)
}

/// Checks that an array or object may open at nesting `level`, and (for a value) that `room`
/// levels are left in its own budget.
fn check_level(level: usize, room: usize) -> std::result::Result<(), String> {
    if level > MAX_NESTING {
        Err(format!(
            "JSON nests deeper than {MAX_NESTING} levels (Go's encoding/json limit)"
        ))
    } else if room == 0 {
        Err(format!(
            "a value nests deeper than {MAX_VALUE_NESTING} levels"
        ))
    } else {
        Ok(())
    }
}

/// serde_json's compact output, with Go's `encoding/json` spelling of floats and strings, so
/// that the bytes are the ones `json.Marshal` writes for the same values.
///
/// - Floats (`write_f64`): Go's `floatEncoder` (encoding/json encode.go) writes the shortest
///   digits that read back the same, in `'f'` format (`8`, not `8.0`; `100000000000000000000`,
///   `0.000001`), and in `'e'` format below 1e-6 and from 1e21 on, with at least one exponent
///   digit and its sign (`1e+21`, `1e-7`, `1.5e+300`). NaN and infinities never get here: the
///   values that carry them are refused before (serde_json writes them as `null`).
/// - Strings (`write_string_fragment`): `json.Marshal` escapes `<`, `>` and `&` (its HTML-safe
///   escaping) and U+2028 and U+2029 (JavaScript line terminators) as `\u003c`, `\u003e`,
///   `\u0026`, `\u2028` and `\u2029`. serde_json escapes the rest as Go 1.22 and later do
///   (`\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other control characters as `\u00XX` in lower
///   case hex); Go before 1.22 wrote `\b` and `\f` as `\u0008` and `\u000c`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        write_go_float(writer, value)
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let bytes = fragment.as_bytes();
        // Nearly every string has none of these: check first, in a loop the compiler vectorises.
        if !needs_go_escape(bytes) {
            return writer.write_all(bytes);
        }
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            // U+2028 and U+2029 are E2 80 A8 and E2 80 A9 in UTF-8.
            let (escape, len): (&[u8], usize) = match bytes[i] {
                b'<' => (b"\\u003c", 1),
                b'>' => (b"\\u003e", 1),
                b'&' => (b"\\u0026", 1),
                0xE2 if bytes.get(i + 1) == Some(&0x80) => match bytes.get(i + 2) {
                    Some(0xA8) => (b"\\u2028", 3),
                    Some(0xA9) => (b"\\u2029", 3),
                    _ => {
                        i += 1;
                        continue;
                    }
                },
                _ => {
                    i += 1;
                    continue;
                }
            };
            writer.write_all(&bytes[start..i])?;
            writer.write_all(escape)?;
            i += len;
            start = i;
        }
        writer.write_all(&bytes[start..])
    }
}

/// Whether `bytes` holds `<`, `>`, `&` or the first byte of U+2028 or U+2029 (and of other
/// characters from U+2000 to U+2FFF, which [`GoFormatter`] then writes as they are).
fn needs_go_escape(bytes: &[u8]) -> bool {
    // `|`, not `||`: no branch per byte, so that the folds vectorise.
    let special = |b: u8| (b == b'<') | (b == b'>') | (b == b'&') | (b == 0xE2);
    let mut chunks = bytes.chunks_exact(16);
    chunks
        .by_ref()
        .any(|chunk| chunk.iter().fold(false, |found, &b| found | special(b)))
        || chunks
            .remainder()
            .iter()
            .fold(false, |found, &b| found | special(b))
}

/// Writes a finite `f64` as Go's `encoding/json` does (`floatEncoder` for 64 bits): the
/// shortest digits that read back the same (Rust's and Go's formatting both give those).
fn write_go_float<W: ?Sized + std::io::Write>(writer: &mut W, value: f64) -> std::io::Result<()> {
    let abs = value.abs();
    if abs < 1e15 && value.fract() == 0.0 {
        // The common case, a whole number (`8`): its digits, written without `fmt`. Exact, as
        // every whole f64 below 2^53 is.
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        let mut n = abs as u64;
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if value.is_sign_negative() {
            // Go writes -0 as `-0`, as it writes -8 as `-8`.
            at -= 1;
            buf[at] = b'-';
        }
        return writer.write_all(&buf[at..]);
    }
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // Rust writes `1e21` and `1e-7`; Go `1e+21` and (after trimming `e-07`) `1e-7`.
        let text = format!("{value:e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with('-') => {
                write!(writer, "{mantissa}e+{exponent}")
            }
            _ => writer.write_all(text.as_bytes()),
        }
    } else {
        // Rust's `Display` never uses an exponent and writes whole numbers without `.0`.
        write!(writer, "{value}")
    }
}

/// Encodes `value` as Go's `json.Marshal` would (see [`GoFormatter`]).
pub(crate) fn to_go_writer<W: std::io::Write, T: Serialize + ?Sized>(
    writer: W,
    value: &T,
) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(writer, GoFormatter);
    value.serialize(&mut ser)
}

/// [`to_go_writer`] into a `String`.
pub(crate) fn to_go_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::with_capacity(64);
    to_go_writer(&mut out, value)?;
    // Only UTF-8 is written: strings as they are, escapes and numbers in ASCII.
    String::from_utf8(out).map_err(ser::Error::custom)
}

/// A field type with Go's JSON zero-value conventions.
///
/// `level` is the nesting level an array or object written for the field would have (the
/// enclosing object's plus one); see [`MAX_NESTING`].
trait GoField: Sized {
    /// Whether the encoding always is an array or object (even for the zero value).
    const ALWAYS_NESTS: bool = false;
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error>;
    fn decode<'de, D: Deserializer<'de>>(d: D, level: usize)
        -> std::result::Result<Self, D::Error>;
    /// Encodes the field of a struct that is itself an array element (`in_list`: a signature
    /// in `OnSuccess` or `OnError`), where Go may have left the field nil.
    fn encode_in<S: Serializer>(
        &self,
        s: S,
        level: usize,
        in_list: bool,
    ) -> std::result::Result<S::Ok, S::Error> {
        let _ = in_list;
        self.encode(s, level)
    }
}

macro_rules! plain_go_field {
    ($($t:ty),*) => {$(
        impl GoField for $t {
            fn encode<S: Serializer>(&self, s: S, _: usize) -> std::result::Result<S::Ok, S::Error> {
                self.serialize(s)
            }
            fn decode<'de, D: Deserializer<'de>>(
                d: D,
                _: usize,
            ) -> std::result::Result<Self, D::Error> {
                // Go leaves the zero value in place when the JSON value is null.
                Ok(Option::<$t>::deserialize(d)?.unwrap_or_default())
            }
        }
    )*};
}
plain_go_field!(String, bool, u8, i64);

/// Argument and result values: any JSON, nesting at most [`MAX_VALUE_NESTING`] deep.
impl GoField for Value {
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error> {
        BoundedValue::new(self, level).serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error> {
        ValueSeed::new(level).deserialize(d)
    }
}

/// An element of an array field, decoded strictly (`null` is not a zero value here).
trait Elem: Sized {
    fn encode_elem<S: Serializer>(
        &self,
        s: S,
        level: usize,
    ) -> std::result::Result<S::Ok, S::Error>;
    fn decode_elem<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error>;
}

impl Elem for String {
    fn encode_elem<S: Serializer>(&self, s: S, _: usize) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
    fn decode_elem<'de, D: Deserializer<'de>>(
        d: D,
        _: usize,
    ) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)
    }
}

/// Encodes `items` as an array opening at `level`.
fn encode_seq<S: Serializer, T: Elem>(
    s: S,
    items: &[T],
    level: usize,
) -> std::result::Result<S::Ok, S::Error> {
    check_level(level, 1).map_err(ser::Error::custom)?;
    let mut seq = s.serialize_seq(Some(items.len()))?;
    for item in items {
        seq.serialize_element(&ElemAt(item, level + 1))?;
    }
    seq.end()
}

/// Slices: `null` when empty, as Go encodes a nil slice.
impl<T: Elem> GoField for Vec<T> {
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error> {
        if self.is_empty() {
            s.serialize_none()
        } else {
            encode_seq(s, self, level)
        }
    }
    fn decode<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error> {
        Ok(decode_nullable(d, SeqSeed::new(level))?.unwrap_or_default())
    }
}

/// `Results` distinguishes `null` (no results yet) from `[]` (finished with no results).
impl GoField for Option<Vec<TaskResult>> {
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Some(results) => encode_seq(s, results, level),
            None => s.serialize_none(),
        }
    }
    fn decode<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error> {
        decode_nullable(d, SeqSeed::new(level))
    }
}

/// Headers: an object, but `null` when empty in a signature nested in `OnSuccess` or `OnError`,
/// as Go writes them. Go writes a nil map as `null` and a set one as `{}`; its `SendTask`
/// sets the headers of the signature it publishes (v2/server.go `SendTaskWithContext`, through
/// v2/tracing/tracing.go `HeadersWithSpan`), and so do `SendGroup` (every member) and
/// `SendChord` (every member and the callback), while the signatures nested in `OnSuccess` and
/// `OnError` keep the nil map they were built with (`SendChain` sets only the first link's).
/// Both forms decode alike.
impl GoField for Map<String, Value> {
    const ALWAYS_NESTS: bool = true;
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error> {
        check_level(level, 1).map_err(ser::Error::custom)?;
        let mut map = s.serialize_map(Some(self.len()))?;
        for (key, value) in self {
            map.serialize_entry(key, &BoundedValue::new(value, level + 1))?;
        }
        map.end()
    }
    fn encode_in<S: Serializer>(
        &self,
        s: S,
        level: usize,
        in_list: bool,
    ) -> std::result::Result<S::Ok, S::Error> {
        if in_list && self.is_empty() {
            s.serialize_none()
        } else {
            self.encode(s, level)
        }
    }
    fn decode<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error> {
        Ok(decode_nullable(d, HeadersSeed { level })?.unwrap_or_default())
    }
}

impl GoField for Option<Box<Signature>> {
    fn encode<S: Serializer>(&self, s: S, level: usize) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Some(sig) => sig.encode_at(s, level, false),
            None => s.serialize_none(),
        }
    }
    fn decode<'de, D: Deserializer<'de>>(
        d: D,
        level: usize,
    ) -> std::result::Result<Self, D::Error> {
        Ok(decode_nullable(d, StructSeed::new(level))?.map(Box::new))
    }
}

impl GoField for Option<GoTime> {
    fn encode<S: Serializer>(&self, s: S, _: usize) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Some(t) => t.serialize(s),
            None => s.serialize_none(),
        }
    }
    fn decode<'de, D: Deserializer<'de>>(d: D, _: usize) -> std::result::Result<Self, D::Error> {
        // Go's zero time behind a pointer is still a time; we read it as "none".
        Ok(Option::<GoTime>::deserialize(d)?.filter(|t| !t.is_zero()))
    }
}

impl GoField for GoTime {
    fn encode<S: Serializer>(&self, s: S, _: usize) -> std::result::Result<S::Ok, S::Error> {
        self.serialize(s)
    }
    fn decode<'de, D: Deserializer<'de>>(d: D, _: usize) -> std::result::Result<Self, D::Error> {
        Ok(Option::<GoTime>::deserialize(d)?.unwrap_or_default())
    }
}

impl GoField for State {
    fn encode<S: Serializer>(&self, s: S, _: usize) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
    fn decode<'de, D: Deserializer<'de>>(d: D, _: usize) -> std::result::Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        State::parse(&s).ok_or_else(|| de::Error::custom(format!("unknown task state `{s}`")))
    }
}

/// A field, encoded at a nesting level.
struct Enc<'a, T>(&'a T, usize, bool);
impl<T: GoField> Serialize for Enc<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.encode_in(s, self.1, self.2)
    }
}

/// An array element, encoded at a nesting level.
struct ElemAt<'a, T>(&'a T, usize);
impl<T: Elem> Serialize for ElemAt<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.encode_elem(s, self.1)
    }
}

/// Decodes a field at a nesting level.
struct FieldSeed<T> {
    level: usize,
    _t: PhantomData<T>,
}
impl<T> FieldSeed<T> {
    fn new(level: usize) -> Self {
        FieldSeed {
            level,
            _t: PhantomData,
        }
    }
}
impl<'de, T: GoField> DeserializeSeed<'de> for FieldSeed<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<T, D::Error> {
        T::decode(d, self.level)
    }
}

/// Decodes `null` as `None` and anything else with `seed`.
fn decode_nullable<'de, D: Deserializer<'de>, T: DeserializeSeed<'de>>(
    d: D,
    seed: T,
) -> std::result::Result<Option<T::Value>, D::Error> {
    struct Nullable<T>(T);
    impl<'de, T: DeserializeSeed<'de>> Visitor<'de> for Nullable<T> {
        type Value = Option<T::Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value or null")
        }
        fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            self.0.deserialize(d).map(Some)
        }
    }
    d.deserialize_option(Nullable(seed))
}

/// Decodes an array opening at `level` whose elements are `T`.
struct SeqSeed<T> {
    level: usize,
    _t: PhantomData<T>,
}
impl<T> SeqSeed<T> {
    fn new(level: usize) -> Self {
        SeqSeed {
            level,
            _t: PhantomData,
        }
    }
}
impl<'de, T: Elem> DeserializeSeed<'de> for SeqSeed<T> {
    type Value = Vec<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}
impl<'de, T: Elem> Visitor<'de> for SeqSeed<T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<T>, A::Error> {
        check_level(self.level, 1).map_err(de::Error::custom)?;
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(ElemSeed::<T>::new(self.level + 1))? {
            out.push(item);
        }
        Ok(out)
    }
}

/// Decodes one array element at a nesting level.
struct ElemSeed<T> {
    level: usize,
    _t: PhantomData<T>,
}
impl<T> ElemSeed<T> {
    fn new(level: usize) -> Self {
        ElemSeed {
            level,
            _t: PhantomData,
        }
    }
}
impl<'de, T: Elem> DeserializeSeed<'de> for ElemSeed<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<T, D::Error> {
        T::decode_elem(d, self.level)
    }
}

/// Decodes the headers object opening at `level`.
struct HeadersSeed {
    level: usize,
}
impl<'de> DeserializeSeed<'de> for HeadersSeed {
    type Value = Map<String, Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}
impl<'de> Visitor<'de> for HeadersSeed {
    type Value = Map<String, Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        check_level(self.level, 1).map_err(de::Error::custom)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(ValueSeed::new(self.level + 1))?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// Decodes a [`Value`] whose arrays and objects open at `level`, with `room` levels left of
/// its own budget ([`MAX_VALUE_NESTING`]). It builds the same values as `Value`'s own
/// `Deserialize`.
struct ValueSeed {
    level: usize,
    room: usize,
}
impl ValueSeed {
    fn new(level: usize) -> Self {
        ValueSeed {
            level,
            room: MAX_VALUE_NESTING,
        }
    }
    fn inner(&self) -> Self {
        ValueSeed {
            level: self.level + 1,
            room: self.room.saturating_sub(1),
        }
    }
}
impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        grow(|| d.deserialize_any(self))
    }
}
impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> std::result::Result<Value, E> {
        Number::deserialize(de::value::I128Deserializer::new(v)).map(Value::Number)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> std::result::Result<Value, E> {
        Number::deserialize(de::value::U128Deserializer::new(v)).map(Value::Number)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        check_level(self.level, self.room).map_err(de::Error::custom)?;
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(self.inner())? {
            out.push(item);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        check_level(self.level, self.room).map_err(de::Error::custom)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.inner())?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Encodes a [`Value`] as `Value`'s own `Serialize` does, checking its nesting as
/// [`ValueSeed`] does when decoding.
struct BoundedValue<'a> {
    value: &'a Value,
    level: usize,
    room: usize,
}
impl<'a> BoundedValue<'a> {
    fn new(value: &'a Value, level: usize) -> Self {
        BoundedValue {
            value,
            level,
            room: MAX_VALUE_NESTING,
        }
    }
    fn inner(&self, value: &'a Value) -> Self {
        BoundedValue {
            value,
            level: self.level + 1,
            room: self.room.saturating_sub(1),
        }
    }
}
impl Serialize for BoundedValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.value {
            Value::Array(items) => {
                check_level(self.level, self.room).map_err(ser::Error::custom)?;
                grow(|| {
                    let mut seq = s.serialize_seq(Some(items.len()))?;
                    for item in items {
                        seq.serialize_element(&self.inner(item))?;
                    }
                    seq.end()
                })
            }
            Value::Object(entries) => {
                check_level(self.level, self.room).map_err(ser::Error::custom)?;
                grow(|| {
                    let mut map = s.serialize_map(Some(entries.len()))?;
                    for (key, value) in entries {
                        map.serialize_entry(key, &self.inner(value))?;
                    }
                    map.end()
                })
            }
            scalar => scalar.serialize(s),
        }
    }
}

/// Skips a value (of an unknown key) whose arrays and objects open at `level`, checking only
/// Go's nesting limit.
struct Skip {
    level: usize,
}
impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        grow(|| d.deserialize_any(self))
    }
}
impl<'de> Visitor<'de> for Skip {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        check_level(self.level, 1).map_err(de::Error::custom)?;
        while seq
            .next_element_seed(Skip {
                level: self.level + 1,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        check_level(self.level, 1).map_err(de::Error::custom)?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Skip {
                level: self.level + 1,
            })?;
        }
        Ok(())
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

/// A wire struct, encoded and decoded at a nesting level.
trait GoStruct: Sized {
    /// How many levels below its object its encoding always nests (1 for `"Headers":{}`).
    const EXTRA_LEVELS: usize;
    const EXPECTING: &'static str;
    /// Encodes the struct as an object opening at `level`; `in_list`: as an array element.
    fn encode_at<S: Serializer>(
        &self,
        s: S,
        level: usize,
        in_list: bool,
    ) -> std::result::Result<S::Ok, S::Error>;
    fn decode_map<'de, A: MapAccess<'de>>(
        map: A,
        level: usize,
    ) -> std::result::Result<Self, A::Error>;
}

/// Decodes a wire struct whose object opens at `level`.
struct StructSeed<T> {
    level: usize,
    _t: PhantomData<T>,
}
impl<T> StructSeed<T> {
    fn new(level: usize) -> Self {
        StructSeed {
            level,
            _t: PhantomData,
        }
    }
}
impl<'de, T: GoStruct> DeserializeSeed<'de> for StructSeed<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<T, D::Error> {
        grow(|| d.deserialize_map(self))
    }
}
impl<'de, T: GoStruct> Visitor<'de> for StructSeed<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
        T::decode_map(map, self.level)
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

        impl GoStruct for $name {
            const EXTRA_LEVELS: usize = {
                let mut extra = 0;
                $( if <$ty as GoField>::ALWAYS_NESTS { extra = 1; } )*
                extra
            };
            const EXPECTING: &'static str = concat!("a JSON object (", stringify!($name), ")");

            fn encode_at<S: Serializer>(
                &self,
                s: S,
                level: usize,
                in_list: bool,
            ) -> std::result::Result<S::Ok, S::Error> {
                check_level(level + Self::EXTRA_LEVELS, 1).map_err(ser::Error::custom)?;
                grow(|| {
                    let mut st = s.serialize_struct(stringify!($name), Self::KEYS.len())?;
                    $( st.serialize_field($key, &Enc(&self.$field, level + 1, in_list))?; )*
                    st.end()
                })
            }

            fn decode_map<'de, A: MapAccess<'de>>(
                mut map: A,
                level: usize,
            ) -> std::result::Result<Self, A::Error> {
                check_level(level + Self::EXTRA_LEVELS, 1).map_err(de::Error::custom)?;
                let mut out = $name::default();
                while let Some(key) = map.next_key_seed(KeySeed {
                    exact: $name::exact_key,
                    keys: $name::KEYS,
                })? {
                    match key {
                        $( Some($key) => {
                            out.$field = map.next_value_seed(FieldSeed::<$ty>::new(level + 1))?;
                        } )*
                        _ => map.next_value_seed(Skip { level: level + 1 })?,
                    }
                }
                Ok(out)
            }
        }

        impl Elem for $name {
            fn encode_elem<S: Serializer>(
                &self,
                s: S,
                level: usize,
            ) -> std::result::Result<S::Ok, S::Error> {
                self.encode_at(s, level, true)
            }
            fn decode_elem<'de, D: Deserializer<'de>>(
                d: D,
                level: usize,
            ) -> std::result::Result<Self, D::Error> {
                StructSeed::new(level).deserialize(d)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                self.encode_at(s, 1, false)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                StructSeed::new(1).deserialize(d)
            }
        }
    };
}

go_struct! {
    /// A task message: what producers publish and workers consume (Go's `tasks.Signature`).
    ///
    /// Build one with a task's typed builder (`add::signature(1.0, 2.0)`) rather than by hand;
    /// this type is the wire form, public for tools, tests and interoperability.
    ///
    /// Signatures nest (`OnSuccess`, `OnError`, `ChordCallback`) up to [`MAX_NESTING`] levels
    /// of JSON. `Clone`, `PartialEq` and `Debug` work at any depth without overflowing the
    /// stack; `{:#?}` prints nested signatures on one line each.
    #[derive(Default)]
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

// Clone, PartialEq and Debug recurse through nested signatures: each level goes through
// `grow`, so they work at any depth (see `MAX_NESTING`). Each binds every field by name, so
// that a new field cannot be forgotten here.

impl Clone for Signature {
    fn clone(&self) -> Self {
        grow(|| {
            let Signature {
                uuid,
                name,
                routing_key,
                eta,
                group_uuid,
                group_task_count,
                args,
                headers,
                priority,
                immutable,
                retry_count,
                retry_timeout,
                on_success,
                on_error,
                chord_callback,
                broker_message_group_id,
                sqs_receipt_handle,
                stop_task_deletion_on_error,
                ignore_when_task_not_registered,
            } = self;
            Signature {
                uuid: uuid.clone(),
                name: name.clone(),
                routing_key: routing_key.clone(),
                eta: *eta,
                group_uuid: group_uuid.clone(),
                group_task_count: *group_task_count,
                args: args.clone(),
                headers: headers.clone(),
                priority: *priority,
                immutable: *immutable,
                retry_count: *retry_count,
                retry_timeout: *retry_timeout,
                on_success: on_success.clone(),
                on_error: on_error.clone(),
                chord_callback: chord_callback.clone(),
                broker_message_group_id: broker_message_group_id.clone(),
                sqs_receipt_handle: sqs_receipt_handle.clone(),
                stop_task_deletion_on_error: *stop_task_deletion_on_error,
                ignore_when_task_not_registered: *ignore_when_task_not_registered,
            }
        })
    }
}

impl PartialEq for Signature {
    fn eq(&self, other: &Self) -> bool {
        grow(|| {
            let Signature {
                uuid,
                name,
                routing_key,
                eta,
                group_uuid,
                group_task_count,
                args,
                headers,
                priority,
                immutable,
                retry_count,
                retry_timeout,
                on_success,
                on_error,
                chord_callback,
                broker_message_group_id,
                sqs_receipt_handle,
                stop_task_deletion_on_error,
                ignore_when_task_not_registered,
            } = self;
            *uuid == other.uuid
                && *name == other.name
                && *routing_key == other.routing_key
                && *eta == other.eta
                && *group_uuid == other.group_uuid
                && *group_task_count == other.group_task_count
                && *args == other.args
                && *headers == other.headers
                && *priority == other.priority
                && *immutable == other.immutable
                && *retry_count == other.retry_count
                && *retry_timeout == other.retry_timeout
                && *on_success == other.on_success
                && *on_error == other.on_error
                && *chord_callback == other.chord_callback
                && *broker_message_group_id == other.broker_message_group_id
                && *sqs_receipt_handle == other.sqs_receipt_handle
                && *stop_task_deletion_on_error == other.stop_task_deletion_on_error
                && *ignore_when_task_not_registered == other.ignore_when_task_not_registered
        })
    }
}

/// Formats nested signatures. `{:#?}` indents through one adapter per level, and a write at
/// depth N would pass through N of them (a recursion `grow` cannot reach), so under `{:#?}`
/// nested signatures are printed with `{:?}`, on one line.
struct Nested<'a, T>(&'a T);
impl<T: fmt::Debug> fmt::Debug for Nested<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{:?}", self.0)
        } else {
            fmt::Debug::fmt(self.0, f)
        }
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        grow(|| {
            let Signature {
                uuid,
                name,
                routing_key,
                eta,
                group_uuid,
                group_task_count,
                args,
                headers,
                priority,
                immutable,
                retry_count,
                retry_timeout,
                on_success,
                on_error,
                chord_callback,
                broker_message_group_id,
                sqs_receipt_handle,
                stop_task_deletion_on_error,
                ignore_when_task_not_registered,
            } = self;
            f.debug_struct("Signature")
                .field("uuid", uuid)
                .field("name", name)
                .field("routing_key", routing_key)
                .field("eta", eta)
                .field("group_uuid", group_uuid)
                .field("group_task_count", group_task_count)
                .field("args", args)
                .field("headers", headers)
                .field("priority", priority)
                .field("immutable", immutable)
                .field("retry_count", retry_count)
                .field("retry_timeout", retry_timeout)
                .field("on_success", &Nested(on_success))
                .field("on_error", &Nested(on_error))
                .field("chord_callback", &Nested(chord_callback))
                .field("broker_message_group_id", broker_message_group_id)
                .field("sqs_receipt_handle", sqs_receipt_handle)
                .field("stop_task_deletion_on_error", stop_task_deletion_on_error)
                .field(
                    "ignore_when_task_not_registered",
                    ignore_when_task_not_registered,
                )
                .finish()
        })
    }
}

go_struct! {
    /// A positional task argument: `{"Name":"","Type":"int64","Value":1}`.
    ///
    /// `Type` is a Go type name (see the [table](crate::value)); `Name` is ignored.
    #[derive(Debug, Clone, PartialEq, Default)]
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
    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct TaskResult {
        /// The Go type name of `value`.
        "Type" => pub type_name: String,
        /// The value.
        "Value" => pub value: Value,
    }
}

go_struct! {
    /// The state of a task as the result backend stores it (Go's `tasks.TaskState`).
    #[derive(Debug, Clone, PartialEq, Default)]
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
    #[derive(Debug, Clone, PartialEq, Default)]
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
///
/// Decoding accepts exactly what Go's `Time.UnmarshalJSON` accepts
/// (`time.Parse(time.RFC3339, s)`), converted to UTC, except times whose year in UTC falls
/// outside 0 to 9999: Go's `Time.MarshalJSON` cannot encode those, and neither can this type.
/// Encoding such a time (or a leap second, which chrono can hold and Go cannot) is an error,
/// never a different string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoTime(Option<DateTime<Utc>>);

/// Go's zero time, 0001-01-01T00:00:00Z, as seconds from the Unix epoch.
const GO_ZERO_UNIX: i64 = -62_135_596_800;

impl GoTime {
    /// The current time.
    pub fn now() -> GoTime {
        GoTime::from_datetime(Utc::now())
    }

    /// Wraps a UTC time (Go's zero instant, `0001-01-01T00:00:00Z`, is the zero time).
    pub fn from_datetime(t: DateTime<Utc>) -> GoTime {
        if t.timestamp() == GO_ZERO_UNIX && t.timestamp_subsec_nanos() == 0 {
            GoTime(None)
        } else {
            GoTime(Some(t))
        }
    }

    /// The time, or `None` for Go's zero time.
    pub fn datetime(&self) -> Option<DateTime<Utc>> {
        self.0
    }

    /// Whether this is Go's zero time.
    pub fn is_zero(&self) -> bool {
        self.0.is_none()
    }

    /// The wire form, as Go's `Time.MarshalJSON` writes a UTC time (`appendStrictRFC3339` in
    /// Go's `time/format_rfc3339.go`), or why there is none.
    ///
    /// The zero time (every state a worker records has it) is borrowed, not allocated.
    fn wire(&self) -> std::result::Result<std::borrow::Cow<'static, str>, String> {
        let Some(t) = self.0 else {
            return Ok(std::borrow::Cow::Borrowed("0001-01-01T00:00:00Z"));
        };
        if !(0..=9999).contains(&t.year()) {
            return Err(format!(
                "time {t:?}: year outside of range [0,9999] (as Go's Time.MarshalJSON)"
            ));
        }
        let nanos = t.nanosecond();
        if nanos >= 1_000_000_000 {
            return Err(format!(
                "time {t:?}: a leap second, which Go cannot represent"
            ));
        }
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
        Ok(std::borrow::Cow::Owned(out))
    }
}

impl fmt::Display for GoTime {
    /// The wire form; for a time the wire cannot carry, chrono's RFC 3339 form (`+10000-...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.wire(), self.0) {
            (Err(_), Some(t)) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            (Ok(wire), _) => f.write_str(&wire),
            (Err(_), None) => Ok(()),
        }
    }
}

impl Serialize for GoTime {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.wire() {
            Ok(wire) => s.serialize_str(&wire),
            Err(e) => Err(ser::Error::custom(e)),
        }
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
                let t =
                    parse_go_time(v).map_err(|e| E::custom(format!("invalid time `{v}`: {e}")))?;
                if !(0..=9999).contains(&t.year()) {
                    return Err(E::custom(format!(
                        "invalid time `{v}`: year outside of range [0,9999] in UTC"
                    )));
                }
                Ok(GoTime::from_datetime(t))
            }
        }
        d.deserialize_str(V)
    }
}

impl From<DateTime<Utc>> for GoTime {
    fn from(t: DateTime<Utc>) -> Self {
        GoTime::from_datetime(t)
    }
}

/// Parses a time exactly as Go's `time.Parse(time.RFC3339, s)` does, which is what
/// `Time.UnmarshalJSON` runs (`parseStrictRFC3339` in Go's `time/format_rfc3339.go`, whose extra
/// strictness is disabled, go.dev/issue/54580): its fast path `parseRFC3339` accepts a subset of
/// what the layout parser `parse` in `time/format.go` accepts, so this follows `parse` for the
/// layout `2006-01-02T15:04:05Z07:00`:
///
/// - `2006`: four digits, 0000-9999; `01` and `02`: two digits (month 1-12; the day is checked
///   against the month at the end); `T`, `-` and `:` exactly (no lowercase `t`);
/// - `15`: one or two digits (`getnum(value, false)`), 0-23; `04`, `05`: two digits, 0-59 (no
///   leap second);
/// - after the seconds, `.` or `,` and one or more digits: a fraction, truncated to
///   nanoseconds (`parseNanoseconds`);
/// - `Z07:00`: `Z` (not `z`), or a sign, two digits, `:`, two digits, hours up to 24 and
///   minutes up to 60 (Go tests `> 24` and `> 60`: "some people do write offsets of 24 hours
///   or 60 minutes");
/// - nothing after.
///
/// Go applies `Time.UnmarshalJSON` to the raw bytes between the quotes, without unescaping
/// them; serde hands us the unescaped string, so a time spelled with JSON escapes is accepted
/// here and not by Go.
fn parse_go_time(s: &str) -> std::result::Result<DateTime<Utc>, &'static str> {
    const BAD: &str = "not an RFC 3339 time";
    let b = s.as_bytes();
    let digit = |i: usize| {
        b.get(i)
            .filter(|c| c.is_ascii_digit())
            .map(|c| u32::from(c - b'0'))
    };
    let expect = |i: usize, c: u8| {
        if b.get(i) == Some(&c) {
            Ok(())
        } else {
            Err(BAD)
        }
    };
    // `getnum(value, true)`: exactly two digits.
    let two = |i: usize| match (digit(i), digit(i + 1)) {
        (Some(t), Some(u)) => Ok(t * 10 + u),
        _ => Err(BAD),
    };

    let year = (0..4).try_fold(0u32, |acc, i| digit(i).map(|d| acc * 10 + d).ok_or(BAD))?;
    expect(4, b'-')?;
    let month = two(5)?;
    if !(1..=12).contains(&month) {
        return Err("month out of range");
    }
    expect(7, b'-')?;
    let day = two(8)?;
    expect(10, b'T')?;
    // `getnum(value, false)`: one digit, or two if there are two.
    let (hour, mut i) = match (digit(11), digit(12)) {
        (Some(t), Some(u)) => (t * 10 + u, 13),
        (Some(u), None) => (u, 12),
        _ => return Err(BAD),
    };
    if hour >= 24 {
        return Err("hour out of range");
    }
    expect(i, b':')?;
    let minute = two(i + 1)?;
    if minute >= 60 {
        return Err("minute out of range");
    }
    expect(i + 3, b':')?;
    let second = two(i + 4)?;
    if second >= 60 {
        return Err("second out of range");
    }
    i += 6;

    let mut nanos = 0;
    if matches!(b.get(i), Some(b'.' | b',')) && digit(i + 1).is_some() {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        for k in 0..9 {
            nanos = nanos * 10
                + if k < digits {
                    digit(i + 1 + k).unwrap_or(0)
                } else {
                    0
                };
        }
        i += 1 + digits;
    }

    let offset = if b.get(i) == Some(&b'Z') {
        i += 1;
        0
    } else {
        let sign = match b.get(i) {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(BAD),
        };
        let hours = two(i + 1)?;
        expect(i + 3, b':')?;
        let minutes = two(i + 4)?;
        if hours > 24 || minutes > 60 {
            return Err("time zone offset out of range");
        }
        i += 6;
        sign * i64::from((hours * 60 + minutes) * 60)
    };
    if i != b.len() {
        return Err("extra text");
    }

    let date = i32::try_from(year)
        .ok()
        .and_then(|year| NaiveDate::from_ymd_opt(year, month, day))
        .ok_or("day out of range")?;
    date.and_hms_nano_opt(hour, minute, second, nanos)
        .map(|t| t.and_utc())
        .and_then(|t| t.checked_sub_signed(TimeDelta::seconds(offset)))
        .ok_or(BAD)
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

    /// Encodes to compact JSON, as published: the bytes Go's `json.Marshal` writes for the same
    /// signature (Go's float format, `<`, `>`, `&`, U+2028 and U+2029 escaped, empty nested
    /// `Headers` as Go's `SendChain` leaves them; see the [module docs](self)).
    ///
    /// Fails (with [`ErrorKind::Encode`](crate::ErrorKind::Encode)) for a signature a worker
    /// would refuse to decode; see [`validate`](Signature::validate).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        // Go's field names and zero values alone take ~330 bytes; start big enough for a
        // typical task, so the buffer is not regrown on the hot path.
        let mut out = Vec::with_capacity(512);
        to_go_writer(&mut out, self).map_err(|e| Error::encode(format!("signature: {e}")))?;
        Ok(out)
    }

    /// Checks that this signature can be encoded, and so that a worker will decode it: it
    /// nests at most [`MAX_NESTING`] levels deep, its argument and header values at most
    /// [`MAX_VALUE_NESTING`], and its times are ones Go can encode (years 0 to 9999 in UTC).
    ///
    /// [`to_json`](Signature::to_json), and so `Server::send`, fails for the same reasons with
    /// the same [`ErrorKind::Encode`](crate::ErrorKind::Encode) error; this runs the same
    /// checks without keeping the bytes.
    pub fn validate(&self) -> Result<()> {
        to_go_writer(std::io::sink(), self).map_err(|e| Error::encode(format!("signature: {e}")))
    }

    /// Decodes a message body.
    ///
    /// Signatures may nest as deep as Go accepts ([`MAX_NESTING`] levels); serde_json's own
    /// limit of 128 levels, which still applies when decoding with `serde_json::from_str`, is
    /// lifted here.
    pub fn from_json(body: &[u8]) -> Result<Signature> {
        // Validating the UTF-8 of the whole body at once is much cheaper than string by string.
        let text = std::str::from_utf8(body)
            .map_err(|e| Error::decode(format!("signature: not UTF-8: {e}")))?;
        // Nearly every message nests a few levels: parse the text in place, with serde_json's
        // recursion limit in force.
        let fast = serde_json::from_str::<Signature>(text);
        match fast {
            Ok(sig) => Ok(sig),
            Err(_) if json_depth(body) > SERDE_JSON_DEPTH => Self::from_deep_json(body),
            Err(e) => Err(Error::decode(format!("signature: {e}"))),
        }
    }

    /// Decodes a message nesting deeper than serde_json's recursion limit, within our own
    /// budget ([`MAX_NESTING`]; every level grows the stack as needed).
    ///
    /// It reads through `io::Read`, whose reader tracks the line and column as it goes: the
    /// in-place reader computes them by scanning the text up to the error, and an error deep
    /// down is dressed with a position once per level it passes on the way up, which would make
    /// a failing message of 4 MiB and 10,000 levels cost 40 GB of scanning.
    fn from_deep_json(body: &[u8]) -> Result<Signature> {
        let mut de = serde_json::Deserializer::from_reader(body);
        de.disable_recursion_limit();
        Signature::deserialize(&mut de)
            .and_then(|sig| de.end().map(|()| sig))
            .map_err(|e| Error::decode(format!("signature: {e}")))
    }
}

/// Levels of nesting serde_json decodes before its recursion limit (128) stops it; at or
/// below this, a failure of the in-place decoder is not the limit.
const SERDE_JSON_DEPTH: usize = 100;

/// The deepest nesting of arrays and objects in `json`, as Go's `encoding/json` scanner counts
/// it; only meaningful for valid JSON.
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // Skip the string, escapes included.
                while let Some(&c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
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

    /// Encodes to compact JSON, as a result backend stores it: the bytes Go's `json.Marshal`
    /// writes for the same state (see [`Signature::to_json`]).
    ///
    /// ```
    /// use machinery::wire::{State, TaskResult, TaskState};
    ///
    /// let mut state = TaskState::new("task_1", State::Success);
    /// state.results = Some(vec![TaskResult { type_name: "float64".into(), value: 8.0.into() }]);
    /// let json = String::from_utf8(state.to_json()?).unwrap();
    /// assert!(json.contains(r#""Results":[{"Type":"float64","Value":8}]"#));
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        to_go_writer(&mut out, self)
            .map_err(|e| Error::encode(format!("state of task {}: {e}", self.task_uuid)))?;
        Ok(out)
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

    /// The head of Go's `NewChain(add(2,2), add(5,6), multiply(4))` as `SendChain` publishes it:
    /// links nested in OnSuccess, nested RoutingKeys empty until a worker publishes them, nested
    /// Headers nil (`SendChainWithContext` writes `{}` there; that form decodes alike).
    const GO_CHAIN_HEAD: &str = r#"{"UUID":"task_1","Name":"add","RoutingKey":"machinery_task","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":2},{"Name":"","Type":"int64","Value":2}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":[{"UUID":"task_2","Name":"add","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":5},{"Name":"","Type":"int64","Value":6}],"Headers":null,"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":[{"UUID":"task_3","Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":4}],"Headers":null,"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}],"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}],"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;

    /// A member of Go's `NewChord(NewGroup(add(1,1), add(5,5)), multiply())`.
    const GO_CHORD_MEMBER: &str = r#"{"UUID":"task_a","Name":"add","RoutingKey":"machinery_task","ETA":"2026-11-29T20:17:52.337696883Z","GroupUUID":"group_g","GroupTaskCount":2,"Args":[{"Name":"","Type":"int64","Value":1},{"Name":"","Type":"int64","Value":1}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":{"UUID":"chord_c","Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":null,"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false},"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;

    fn round_trip(golden: &str) -> Signature {
        let sig = Signature::from_json(golden.as_bytes()).unwrap();
        let encoded = String::from_utf8(sig.to_json().unwrap()).unwrap();
        assert_eq!(encoded, golden, "re-encoding must reproduce Go's bytes");
        sig
    }

    /// The deepest nesting of arrays and objects in `json`, counted as Go's `encoding/json`
    /// scanner counts it (`pushParseState` in `encoding/json/scanner.go`).
    fn go_depth(json: &str) -> usize {
        let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
        for b in json.bytes() {
            match (in_str, esc, b) {
                (true, true, _) => esc = false,
                (true, false, b'\\') => esc = true,
                (true, false, b'"') => in_str = false,
                (true, false, _) => {}
                (false, _, b'"') => in_str = true,
                (false, _, b'[' | b'{') => {
                    depth += 1;
                    max = max.max(depth);
                }
                (false, _, b']' | b'}') => depth -= 1,
                _ => {}
            }
        }
        max
    }

    /// A Go-style chain of `links` links, each nested in the previous one's `OnSuccess`, as a
    /// Go producer encodes it. Every link but the last has an argument.
    fn chain_json(links: usize) -> String {
        let mut s = String::new();
        for i in 0..links {
            let last = i + 1 == links;
            s.push_str(&format!(r#"{{"UUID":"task_{i}","Name":"add","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":"#));
            if last {
                s.push_str("null");
            } else {
                s.push_str(&format!(r#"[{{"Name":"","Type":"int64","Value":{i}}}]"#));
            }
            // Go's SendChain sets only the first link's headers; nested ones stay nil.
            s.push_str(if i == 0 {
                r#","Headers":{}"#
            } else {
                r#","Headers":null"#
            });
            s.push_str(
                r#","Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":"#,
            );
            s.push_str(if last { "null" } else { "[" });
        }
        for i in (0..links).rev() {
            if i + 1 < links {
                s.push(']');
            }
            s.push_str(r#","OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#);
        }
        s
    }

    /// `depth` signatures, each the previous one's `ChordCallback`.
    fn callback_json(depth: usize) -> String {
        let encoded = Signature::default().to_json().unwrap();
        let empty = String::from_utf8(encoded).unwrap();
        let (head, tail) = empty.split_once(r#""ChordCallback":null"#).unwrap();
        let mut s = String::new();
        for _ in 1..depth {
            s.push_str(head);
            s.push_str(r#""ChordCallback":"#);
        }
        s.push_str(&empty);
        for _ in 1..depth {
            s.push_str(tail);
        }
        s
    }

    /// Runs `f` on a thread with a tokio worker's stack (2 MiB): a stack overflow aborts the
    /// whole test binary, so passing proves there is none.
    fn on_small_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    fn links(sig: &Signature) -> usize {
        let (mut n, mut link) = (1, sig);
        while let Some(next) = link.on_success.first() {
            n += 1;
            link = next;
        }
        n
    }

    /// Decodes, re-encodes, clones, compares, formats and drops `json` (one signature).
    fn exercise_deep(json: String) -> Signature {
        let sig = Signature::from_json(json.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(sig.to_json().unwrap()).unwrap(), json);
        sig.validate().unwrap();
        let copy = sig.clone();
        assert_eq!(copy, sig);
        assert!(format!("{copy:?}").len() > json.len() / 2);
        assert!(format!("{copy:#?}").starts_with("Signature {\n"));
        drop(copy);
        sig
    }

    #[test]
    fn a_chain_of_1000_links_works_on_a_worker_stack() {
        on_small_stack(|| {
            let sig = exercise_deep(chain_json(1000));
            assert_eq!(links(&sig), 1000);
            assert_eq!(sig.on_success[0].args[0].value, json!(1));
        });
    }

    #[test]
    fn nesting_is_bounded_as_in_go() {
        on_small_stack(|| {
            // Go's limit: 10,000 levels. A chain takes two per link ("OnSuccess":[{...}]); the
            // last link's `"Headers":null` does not nest, but its budget keeps room for `{}`.
            let longest = chain_json(5000);
            assert_eq!(go_depth(&longest), MAX_NESTING - 1);
            assert_eq!(links(&exercise_deep(longest)), 5000);
            let too_long = chain_json(5001);
            assert_eq!(go_depth(&too_long), MAX_NESTING + 1);
            let err = Signature::from_json(too_long.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Decode);
            assert!(err.message().contains("10000"), "{err}");

            // Chord callbacks take one level each; a chord callback's encoding holds
            // `"Headers":{}` one level down.
            let deepest = callback_json(MAX_NESTING - 1);
            assert_eq!(go_depth(&deepest), MAX_NESTING);
            exercise_deep(deepest);
            assert!(Signature::from_json(callback_json(MAX_NESTING).as_bytes()).is_err());
        });
    }

    #[test]
    fn encoding_refuses_what_a_worker_would_refuse() {
        on_small_stack(|| {
            let mut sig = Signature::from_json(chain_json(5000).as_bytes()).unwrap();
            let mut tail = &mut sig;
            while !tail.on_success.is_empty() {
                tail = &mut tail.on_success[0];
            }
            tail.args.push(encode_arg(&1i64).unwrap());
            // The last link's argument object now sits at level 10,001.
            let err = sig.to_json().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Encode);
            assert!(err.message().contains("10000"), "{err}");
            assert_eq!(sig.validate().unwrap_err().kind(), crate::ErrorKind::Encode);
        });
    }

    #[test]
    fn a_deep_failure_is_reported_from_the_bottom_of_a_chain() {
        on_small_stack(|| {
            // An error at the bottom of a maximal chain unwinds through 10,000 levels; its
            // position is read as the decoder goes (rescanning the text at each level took 17 s
            // in a debug build: examples/bench.rs has the deep-chain decode figures).
            let json = chain_json(5000);
            let bad = json.replace(
                r#""UUID":"task_4999","Name":"add""#,
                r#""UUID":"task_4999","Name":5"#,
            );
            assert_ne!(bad, json);
            let err = Signature::from_json(bad.as_bytes()).unwrap_err();
            assert!(err.message().contains("invalid type"), "{err}");
            let too_long = chain_json(5001);
            Signature::from_json(too_long.as_bytes()).unwrap_err();
        });
    }

    #[test]
    fn unknown_keys_and_values_are_bounded_too() {
        on_small_stack(|| {
            let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
            // Unknown keys may nest up to Go's limit (the signature is level 1) ...
            let ok = format!(r#"{{"Extra":{}}}"#, nested(MAX_NESTING - 1));
            assert_eq!(go_depth(&ok), MAX_NESTING);
            Signature::from_json(ok.as_bytes()).unwrap();
            let bad = format!(r#"{{"Extra":{}}}"#, nested(MAX_NESTING));
            assert!(Signature::from_json(bad.as_bytes()).is_err());
            // ... but values that are kept may nest only MAX_VALUE_NESTING levels.
            for (field, n, ok) in [
                ("Args", MAX_VALUE_NESTING, true),
                ("Args", MAX_VALUE_NESTING + 1, false),
                ("Headers", MAX_VALUE_NESTING, true),
                ("Headers", MAX_VALUE_NESTING + 1, false),
            ] {
                let json = if field == "Args" {
                    format!(r#"{{"Args":[{{"Type":"json","Value":{}}}]}}"#, nested(n))
                } else {
                    format!(r#"{{"Headers":{{"h":{}}}}}"#, nested(n))
                };
                let decoded = Signature::from_json(json.as_bytes());
                assert_eq!(decoded.is_ok(), ok, "{field} nested {n} deep");
                if let Ok(sig) = decoded {
                    sig.validate().unwrap();
                }
            }
            let mut sig = Signature::default();
            let mut deep = Value::Null;
            for _ in 0..=MAX_VALUE_NESTING {
                deep = Value::Array(vec![deep]);
            }
            sig.headers.insert("h".into(), deep);
            assert_eq!(sig.to_json().unwrap_err().kind(), crate::ErrorKind::Encode);
        });
    }

    #[test]
    fn strings_escape_what_go_escapes_and_nothing_else() {
        // Go: encoding/json encode.go appendString (HTML-safe): <, >, &, U+2028, U+2029. Other
        // characters starting with byte E2 (U+2020, U+20AC, U+202F) pass as they are; so does a
        // string of none, short or long.
        for (text, json) in [
            ("", "\"\""),
            (
                "plain and long enough for a chunk or two",
                "\"plain and long enough for a chunk or two\"",
            ),
            (
                "\u{2020}\u{20ac}\u{2028}\u{2029}\u{202f} <a>&b; 0123456789abcdef<",
                "\"\u{2020}\u{20ac}\\u2028\\u2029\u{202f} \\u003ca\\u003e\\u0026b; 0123456789abcdef\\u003c\"",
            ),
            ("\"\\\n<", "\"\\\"\\\\\\n\\u003c\""),
        ] {
            assert_eq!(to_go_string(text).unwrap(), json, "{text:?}");
            assert_eq!(serde_json::from_str::<String>(json).unwrap(), text);
        }
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

    /// What Go's `Time.UnmarshalJSON` accepts: `time.Parse(time.RFC3339, s)` (through
    /// `parseStrictRFC3339`, whose strict checks are disabled, go.dev/issue/54580), i.e. the
    /// fast path `parseRFC3339` (`time/format_rfc3339.go`) or else the layout parser `parse`
    /// (`time/format.go`: `getnum`, `parseNanoseconds`, the `stdISO8601ColonTZ` case).
    /// Rejected too: times whose year in UTC is outside 0-9999, which Go's `Time.MarshalJSON`
    /// refuses to encode ("year outside of range [0,9999]") and so could never be re-encoded
    /// here, where times are kept in UTC.
    #[test]
    fn times_parse_as_go_parses_them() {
        for (input, wire) in [
            ("2026-11-29T20:17:52Z", "2026-11-29T20:17:52Z"),
            // Any number of fraction digits; beyond nine they are truncated, not rounded.
            ("2026-11-29T20:17:52.100Z", "2026-11-29T20:17:52.1Z"),
            ("2026-11-29T20:17:52.000000000Z", "2026-11-29T20:17:52Z"),
            (
                "2026-11-29T20:17:52.1234567891Z",
                "2026-11-29T20:17:52.123456789Z",
            ),
            (
                "2026-11-29T20:17:52.99999999999Z",
                "2026-11-29T20:17:52.999999999Z",
            ),
            // `parse` also takes a comma before the fraction and a one-digit hour.
            ("2026-11-29T20:17:52,5Z", "2026-11-29T20:17:52.5Z"),
            ("2026-11-29T5:17:52Z", "2026-11-29T05:17:52Z"),
            // Offsets: hours up to 24 and minutes up to 60 ("some people do write offsets of
            // 24 hours or 60 minutes"); -00:00 is UTC.
            ("2026-11-29T21:17:52+01:00", "2026-11-29T20:17:52Z"),
            ("2026-11-29T20:17:52-00:00", "2026-11-29T20:17:52Z"),
            ("2026-11-29T20:17:52+24:00", "2026-11-28T20:17:52Z"),
            ("2026-11-29T20:17:52-24:60", "2026-11-30T21:17:52Z"),
            ("2026-11-29T20:17:52+23:60", "2026-11-28T20:17:52Z"),
            // The edges of years 0-9999, in UTC.
            ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
            ("0000-02-29T12:00:00Z", "0000-02-29T12:00:00Z"),
            ("0000-01-01T23:59:59+23:59", "0000-01-01T00:00:59Z"),
            (
                "9999-12-31T23:59:59.999999999Z",
                "9999-12-31T23:59:59.999999999Z",
            ),
            ("9999-12-31T00:00:00-23:59", "9999-12-31T23:59:00Z"),
            ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
            // Go's zero time is the zero instant, exactly.
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
            ("0001-01-01T01:00:00+01:00", "0001-01-01T00:00:00Z"),
            ("0001-01-01T00:00:00.5Z", "0001-01-01T00:00:00.5Z"),
        ] {
            let t: GoTime = serde_json::from_value(json!(input))
                .unwrap_or_else(|e| panic!("{input} must be accepted: {e}"));
            assert_eq!(serde_json::to_value(t).unwrap(), json!(wire), "{input}");
            assert_eq!(t.to_string(), wire);
            let zero = wire == "0001-01-01T00:00:00Z";
            assert_eq!(t.is_zero(), zero, "{input}");
        }
        for input in [
            "2026-11-29t20:17:52Z",
            "2026-11-29T20:17:52z",
            "2026-11-29 20:17:52Z",
            "2026-11-29T23:59:60Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T20:60:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-11-00T00:00:00Z",
            "2026-1-29T20:17:52Z",
            "2026-11-9T20:17:52Z",
            "2026-11-29T20:7:52Z",
            "2026-11-29T20:17:5Z",
            "2026-11-29T020:17:52Z",
            "226-11-29T20:17:52Z",
            "+2026-11-29T20:17:52Z",
            "-001-11-29T20:17:52Z",
            " 2026-11-29T20:17:52Z",
            "2026-11-29T20:17:52",
            "2026-11-29T20:17:52 Z",
            "2026-11-29T20:17:52.Z",
            "2026-11-29T20:17:52.5",
            "2026-11-29T20:17:52ZZ",
            "2026-11-29T20:17:52+0100",
            "2026-11-29T20:17:52+01",
            "2026-11-29T20:17:52+1:00",
            "2026-11-29T20:17:52+25:00",
            "2026-11-29T20:17:52+24:61",
            "2026-11-29T20:17:52*01:00",
            "2026-11-29T20:17:52+01:00:00",
            "9999-12-31T23:59:59-23:59",
            "0000-01-01T00:00:00+00:01",
            "２026-11-29T20:17:52Z",
            "",
        ] {
            assert!(
                serde_json::from_value::<GoTime>(json!(input)).is_err(),
                "{input:?} must be rejected"
            );
        }
    }

    #[test]
    fn times_that_cannot_be_encoded_are_encode_errors() {
        let far = NaiveDate::from_ymd_opt(10_000, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        let before = NaiveDate::from_ymd_opt(-1, 12, 31)
            .unwrap()
            .and_hms_opt(23, 59, 59)
            .unwrap()
            .and_utc();
        // chrono can hold a leap second; Go's time cannot.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        for t in [far, before, leap] {
            let time = GoTime::from_datetime(t);
            assert!(serde_json::to_string(&time).is_err(), "{t:?}");
            assert!(!time.to_string().is_empty());
            let mut sig = Signature::new("add");
            sig.eta = Some(time);
            assert_eq!(sig.to_json().unwrap_err().kind(), crate::ErrorKind::Encode);
            assert_eq!(sig.validate().unwrap_err().kind(), crate::ErrorKind::Encode);
            let state = TaskState {
                created_at: time,
                ..TaskState::default()
            };
            assert!(serde_json::to_vec(&state).is_err());
        }
        // Go's zero instant is the zero time however it is made.
        let zero = NaiveDate::from_ymd_opt(1, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        assert!(GoTime::from_datetime(zero).is_zero());
        assert_eq!(GoTime::from(zero), GoTime::default());
    }

    /// Asserts that `T` decoded from `json` (if it decodes) encodes to JSON that decodes equal,
    /// and that encoding is then stable byte for byte.
    fn assert_stable<T>(json: &str) -> Option<T>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let decoded: T = serde_json::from_str(json).ok()?;
        let encoded = serde_json::to_string(&decoded)
            .unwrap_or_else(|e| panic!("{json} decodes but does not encode: {e}"));
        let again: T = serde_json::from_str(&encoded).unwrap_or_else(|e| {
            panic!("{json} re-encodes to {encoded}, which does not decode: {e}")
        });
        assert_eq!(again, decoded, "{json} -> {encoded}");
        assert_eq!(serde_json::to_string(&again).unwrap(), encoded, "{json}");
        Some(decoded)
    }

    /// A value of Go type `type_name` (Rust type `T`), given as JSON: if it decodes, its
    /// re-encoding decodes to the same bits, both as an argument and as a result. Returns
    /// whether it decoded.
    fn assert_typed_stable<T>(type_name: &str, text: &str, bits: impl Fn(&T) -> Vec<u64>) -> bool
    where
        T: Serialize + serde::de::DeserializeOwned + 'static,
    {
        let arg_json = format!(r#"{{"Name":"","Type":"{type_name}","Value":{text}}}"#);
        let Some(arg) = assert_stable::<Arg>(&arg_json) else {
            panic!("{arg_json} must decode as an Arg");
        };
        let result_json = format!(r#"{{"Type":"{type_name}","Value":{text}}}"#);
        assert_stable::<TaskResult>(&result_json).unwrap();
        let Ok(value) = decode::<T>(&arg.type_name, &arg.value) else {
            return false;
        };
        let arg = encode_arg(&value).unwrap_or_else(|e| panic!("{type_name} {text}: {e}"));
        let arg: Arg = serde_json::from_str(&serde_json::to_string(&arg).unwrap()).unwrap();
        let back = decode::<T>(&arg.type_name, &arg.value)
            .unwrap_or_else(|e| panic!("{type_name} {text} re-encodes as {}: {e}", arg.value));
        assert_eq!(
            bits(&back),
            bits(&value),
            "{type_name} {text} -> {}",
            arg.value
        );
        let result = crate::value::encode_result(&value).unwrap();
        let result: TaskResult =
            serde_json::from_str(&serde_json::to_string(&result).unwrap()).unwrap();
        let back = decode::<T>(&result.type_name, &result.value).unwrap();
        assert_eq!(bits(&back), bits(&value), "{type_name} {text} as a result");
        true
    }

    const FLOATS: &[&str] = &[
        "0",
        "-0",
        "-0.0",
        "0.1",
        "1e-45",
        "-1e-45",
        "1.4e-45",
        "7e-46",
        "1e-40",
        "1e-38",
        "1.17549435e-38",
        "3.4028235e38",
        "3.4028236e38",
        "3.5e38",
        "16777217",
        "9007199254740993",
        "5e-324",
        "2.4703282292062328e-324",
        "2.225073858507201e-308",
        "2.2250738585072014e-308",
        "1.7976931348623157e308",
        "1e23",
        "8.41e21",
        "1e21",
        "0.30000000000000004",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "123456789012345678901234567890",
        "1e-400",
    ];

    const INTEGERS: &[&str] = &[
        "0",
        "-0",
        "1",
        "-1",
        "127",
        "128",
        "-128",
        "-129",
        "255",
        "256",
        "32767",
        "-32768",
        "65535",
        "2147483647",
        "-2147483648",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "1.0",
        "1e3",
        "-1e0",
    ];

    /// Every value that decodes re-encodes to a value that decodes equal: times, arguments
    /// and results of every Go type, and whole signatures.
    #[test]
    fn round_trips_are_stable() {
        for t in [
            "2026-11-29T20:17:52.337696883Z",
            "2026-11-29T20:17:52,5Z",
            "2026-11-29T5:17:52+24:00",
            "9999-12-31T23:59:59.999999999Z",
            "9999-12-31T23:59:59-23:59",
            "0000-01-01T00:00:00Z",
            "0000-01-01T00:00:00+00:01",
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00.000000001Z",
            "2026-11-29T23:59:60Z",
            "2026-11-29T20:17:52.1234567891234Z",
        ] {
            assert_stable::<GoTime>(&format!("{t:?}"));
            assert_stable::<Signature>(&format!(r#"{{"ETA":{t:?}}}"#));
            assert_stable::<TaskState>(&format!(r#"{{"CreatedAt":{t:?}}}"#));
        }

        // Beyond float64's range, serde_json refuses the whole message; Go (decoding with
        // UseNumber) would refuse only the argument's conversion.
        assert!(serde_json::from_str::<Arg>(r#"{"Type":"float64","Value":1E400}"#).is_err());

        let float = |f: &f64| vec![f.to_bits()];
        let float32 = |f: &f32| vec![u64::from(f.to_bits())];
        for text in FLOATS {
            assert!(assert_typed_stable::<f64>("float64", text, float), "{text}");
            // Past float32's range, a float32 is refused (Go would make it +Inf).
            let beyond_f32 = ["3.4028236e38", "3.5e38", "1.7976931348623157e308"];
            assert_eq!(
                assert_typed_stable::<f32>("float32", text, float32),
                !beyond_f32.contains(text),
                "{text}"
            );
            assert_typed_stable::<Vec<f64>>("[]float64", &format!("[{text},{text}]"), |v| {
                v.iter().map(|f| f.to_bits()).collect()
            });
            assert_typed_stable::<Vec<f32>>("[]float32", &format!("[{text}]"), |v| {
                v.iter().map(|f| u64::from(f.to_bits())).collect()
            });
            assert_typed_stable::<Value>("json", text, |v| vec![v.to_string().len() as u64]);
        }
        macro_rules! integers {
            ($($t:ty => $name:literal),*) => {$(
                for text in INTEGERS {
                    assert_typed_stable::<$t>($name, text, |v| vec![*v as u64]);
                    assert_typed_stable::<Vec<$t>>(
                        concat!("[]", $name),
                        &format!("[{text}]"),
                        |v| v.iter().map(|x| *x as u64).collect(),
                    );
                }
            )*};
        }
        integers!(i8 => "int8", i16 => "int16", i32 => "int32", i64 => "int64", isize => "int",
            u8 => "uint8", u16 => "uint16", u32 => "uint32", u64 => "uint64", usize => "uint");
        for text in ["true", "false", "null", "1"] {
            assert_typed_stable::<bool>("bool", text, |b| vec![u64::from(*b)]);
        }
        for text in [
            r#""""#,
            r#""a\u0000\"\\\/\n\u00fc\ud83d\ude00""#,
            "null",
            "[]",
            "[null]",
        ] {
            assert_typed_stable::<String>("string", text, |s| s.bytes().map(u64::from).collect());
            assert_typed_stable::<Vec<String>>("[]string", text, |v| vec![v.len() as u64]);
        }
        assert_typed_stable::<Vec<u8>>("[]byte", r#""aGk=""#, |v| {
            v.iter().map(|b| u64::from(*b)).collect()
        });

        // A whole signature, with a bit of everything.
        let sig = r#"{"uuid":"task_1","Name":"add","ETA":"9999-12-31T23:59:59,5-00:00",
            "Args":[{"Type":"float32","Value":1e-45},{"Type":"float64","Value":-0.0},
                {"Type":"uint64","Value":18446744073709551615},{"Type":"json","Value":{"a":[5e-324,{}]}}],
            "Headers":{"h":[1.5,"x",null,true,{"k":1e-45}]},"Priority":255,"RetryCount":-1,
            "OnSuccess":[{"Name":"next","ETA":"0001-01-01T00:00:00Z","Args":null,"OnSuccess":[]}],
            "OnError":[{"Name":"report","Headers":null}],
            "ChordCallback":{"Name":"cb","GroupTaskCount":9223372036854775807},
            "Unknown":[[[{"x":1}]]]}"#;
        let decoded = assert_stable::<Signature>(sig).unwrap();
        let encoded = decoded.to_json().unwrap();
        assert_eq!(Signature::from_json(&encoded).unwrap(), decoded);
        let state = r#"{"TaskUUID":"t","State":"SUCCESS","Results":[{"Type":"float64","Value":1e-45},
            {"Type":"float32","Value":3.5e38},{"Type":"json","Value":[[-0.0]]}],"CreatedAt":"0000-01-01T00:00:00Z","TTL":-5}"#;
        assert_stable::<TaskState>(state).unwrap();
        assert_stable::<TaskState>(r#"{"Results":[]}"#).unwrap();
        assert_stable::<GroupMeta>(
            r#"{"TaskUUIDs":["a"],"CreatedAt":"2026-11-29T20:17:52+24:00"}"#,
        )
        .unwrap();
    }

    #[test]
    fn every_arg_type() {
        fn check<T>(value: T, type_name: &str, json: Value)
        where
            T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug + 'static,
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
