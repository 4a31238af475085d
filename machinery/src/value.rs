//! How Rust values travel as Go-typed [`Arg`]s and [`TaskResult`]s.
//!
//! | Rust | Go `Type` |
//! |---|---|
//! | `bool` | `bool` |
//! | `i8`, `i16`, `i32`, `i64`, `isize` | `int8`, `int16`, `int32`, `int64`, `int` |
//! | `u8`, `u16`, `u32`, `u64`, `usize` | `uint8`, `uint16`, `uint32`, `uint64`, `uint` |
//! | `f32`, `f64` | `float32`, `float64` |
//! | `String` | `string` |
//! | `Vec<T>` for each `T` above | `[]T` (`[]byte` is accepted for `[]uint8`, as a base64 string too) |
//! | any other `Serialize + DeserializeOwned` type | `json` (Rust-to-Rust only) |
//!
//! Decoding is strict: the `Type` must be the one the task declares, an integer must be written
//! as an integer (`1`, not `1.0` or `1e0`) and fit its type, a `float32` must be within its
//! range, and a slice may be `null` (empty). Numbers are read correctly rounded, as Go reads
//! them (`float32` through `float64`, as Go's `json.Number.Float64` and `float32(x)` do), so
//! every value that decodes encodes back to the same value. NaN and infinities, which JSON
//! cannot carry, cannot be encoded.
//!
//! ```
//! use machinery::value::{decode, encode_arg, go_type_name};
//! use serde_json::json;
//!
//! assert_eq!(go_type_name::<Vec<i64>>(), "[]int64");
//! let arg = encode_arg(&3.5f64)?;
//! assert_eq!((arg.type_name.as_str(), &arg.value), ("float64", &json!(3.5)));
//! assert_eq!(decode::<i64>("int64", &json!(7))?, 7);
//! assert!(decode::<i64>("int64", &json!(1.0)).is_err());
//! assert!(decode::<u8>("uint8", &json!(300)).is_err());
//! assert!(decode::<i64>("int32", &json!(7)).is_err());
//! # Ok::<(), machinery::Error>(())
//! ```

use std::any::TypeId;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::wire::{Arg, TaskResult};

/// The `Type` used for values outside Go's type table: JSON, readable by Rust workers only.
pub const JSON_TYPE: &str = "json";

/// The Go type name that values of `T` travel under.
pub fn go_type_name<T: 'static>() -> &'static str {
    let id = TypeId::of::<T>();
    macro_rules! table {
        ($($t:ty => $name:literal, $slice:literal;)*) => {
            $(
                if id == TypeId::of::<$t>() {
                    return $name;
                }
                if id == TypeId::of::<Vec<$t>>() {
                    return $slice;
                }
            )*
        };
    }
    table! {
        f64 => "float64", "[]float64";
        i64 => "int64", "[]int64";
        String => "string", "[]string";
        bool => "bool", "[]bool";
        u64 => "uint64", "[]uint64";
        i32 => "int32", "[]int32";
        u32 => "uint32", "[]uint32";
        f32 => "float32", "[]float32";
        u8 => "uint8", "[]uint8";
        i8 => "int8", "[]int8";
        i16 => "int16", "[]int16";
        u16 => "uint16", "[]uint16";
        isize => "int", "[]int";
        usize => "uint", "[]uint";
    }
    JSON_TYPE
}

/// Whether a `Type` string from the wire names the Go type `expected`.
fn type_matches(expected: &str, got: &str) -> bool {
    expected == got
        || match expected {
            "uint8" => got == "byte",
            "[]uint8" => got == "[]byte",
            "int32" => got == "rune",
            "[]int32" => got == "[]rune",
            _ => false,
        }
}

/// Encodes a value as a Go-typed argument.
pub fn encode_arg<T: Serialize + 'static>(value: &T) -> Result<Arg> {
    let (type_name, value) = encode_value(value)?;
    Ok(Arg {
        name: String::new(),
        type_name: type_name.to_owned(),
        value,
    })
}

/// Encodes a value as a Go-typed task result.
pub fn encode_result<T: Serialize + 'static>(value: &T) -> Result<TaskResult> {
    let (type_name, value) = encode_value(value)?;
    Ok(TaskResult {
        type_name: type_name.to_owned(),
        value,
    })
}

fn encode_value<T: Serialize + 'static>(value: &T) -> Result<(&'static str, Value)> {
    let type_name = go_type_name::<T>();
    let value = serde_json::to_value(value)
        .map_err(|e| Error::encode(format!("cannot encode a `{type_name}` value: {e}")))?;
    // serde_json turns NaN and infinities into null, which would not decode as a float; Go's
    // encoding/json refuses to encode them (UnsupportedValueError in encoding/json/encode.go).
    let floats = matches!(type_name, "float32" | "float64" | "[]float32" | "[]float64");
    let non_finite = match &value {
        Value::Null => true,
        Value::Array(items) => items.iter().any(Value::is_null),
        _ => false,
    };
    if floats && non_finite {
        return Err(Error::encode(format!(
            "cannot encode a `{type_name}` value: NaN and infinities have no JSON form"
        )));
    }
    let value = if matches!(type_name, "float32" | "[]float32") {
        float32_digits(value)
    } else {
        value
    };
    Ok((type_name, value))
}

/// Holds each `float32` as the `f64` of its own shortest digits (`0.1f32` as `0.1`, not as
/// `0.10000000149011612`, its exact value), so that it is written as Go's `encoding/json`
/// writes a `float32` (`floatEncoder` with 32 bits). It reads back as the same `f32`.
fn float32_digits(value: Value) -> Value {
    let narrow = |v: Value| match v.as_f64() {
        Some(f) => (f as f32)
            .to_string()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(v, Value::Number),
        None => v,
    };
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(narrow).collect()),
        other => narrow(other),
    }
}

/// Decodes a value that arrived with Go type name `type_name` into `T`, strictly.
pub fn decode<T: DeserializeOwned + 'static>(type_name: &str, value: &Value) -> Result<T> {
    let expected = go_type_name::<T>();
    if !type_matches(expected, type_name) {
        return Err(Error::decode(format!(
            "expected type `{expected}`, got `{type_name}`"
        )));
    }
    let decoded = if expected.starts_with("[]") && value.is_null() {
        T::deserialize(&Value::Array(Vec::new()))
    } else if expected == "float32" || expected == "[]float32" {
        T::deserialize(&through_f64(expected, value)?)
    } else if expected == "[]uint8" {
        if let Value::String(b64) = value {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| Error::decode(format!("invalid base64 for `[]uint8`: {e}")))?;
            T::deserialize(&Value::Array(bytes.into_iter().map(Value::from).collect()))
        } else {
            T::deserialize(value)
        }
    } else {
        T::deserialize(value)
    };
    decoded.map_err(|e| Error::decode(format!("invalid `{expected}` value {}: {e}", Brief(value))))
}

/// Prepares numbers for a `float32`, as Go reads them: as a `float64` first (an integer too;
/// `json.Number.Float64`), then converted (`float32(x)`), which must stay finite. Other values
/// are left for `T::deserialize` to refuse.
fn through_f64(expected: &str, value: &Value) -> Result<Value> {
    let narrow = |v: &Value| match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if (f as f32).is_finite() => Ok(Value::from(f)),
            _ => Err(Error::decode(format!(
                "invalid `{expected}` value {}: out of range for float32",
                Brief(value)
            ))),
        },
        other => Ok(other.clone()),
    };
    match value {
        Value::Array(items) => items
            .iter()
            .map(narrow)
            .collect::<Result<_>>()
            .map(Value::Array),
        other => narrow(other),
    }
}

/// Decodes an argument into `T`.
pub fn decode_arg<T: DeserializeOwned + 'static>(arg: &Arg) -> Result<T> {
    decode(&arg.type_name, &arg.value)
}

/// Shows a value in an error message, cut short when long.
struct Brief<'a>(&'a Value);

impl std::fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.to_string();
        match s.char_indices().nth(64) {
            Some((i, _)) => write!(f, "{}...", &s[..i]),
            None => f.write_str(&s),
        }
    }
}

// ---- Checking Go-typed arguments built by hand (`Server::send_by_name`) ----

/// The `Type` names a Go worker understands (Go: `typesMap` in v2/tasks/reflect.go), and
/// [`JSON_TYPE`], which only Rust workers read.
pub const GO_TYPES: &[&str] = &[
    "bool",
    "int",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float32",
    "float64",
    "string",
    "[]bool",
    "[]int",
    "[]int8",
    "[]int16",
    "[]int32",
    "[]int64",
    "[]uint",
    "[]uint8",
    "[]uint16",
    "[]uint32",
    "[]uint64",
    "[]float32",
    "[]float64",
    "[]byte",
    "[]string",
    JSON_TYPE,
];

/// Checks an argument built by hand: its `Type` is one of [`GO_TYPES`] (exactly as Go spells
/// it) and its `Value` reads as that type, as strictly as a worker reads it. The error, of kind
/// [`ErrorKind::Encode`](crate::ErrorKind::Encode), names the type.
///
/// ```
/// use machinery::value::check_arg;
/// use machinery::wire::Arg;
/// use serde_json::json;
///
/// let arg = |t: &str, v| Arg { name: String::new(), type_name: t.into(), value: v };
/// assert!(check_arg(&arg("float64", json!(1))).is_ok());
/// assert!(check_arg(&arg("[]string", json!(["a", "b"]))).is_ok());
/// assert!(check_arg(&arg("float65", json!(1))).is_err()); // no such Go type
/// assert!(check_arg(&arg("int8", json!(300))).is_err()); // out of range
/// ```
pub fn check_arg(arg: &Arg) -> Result<()> {
    let t = arg.type_name.as_str();
    let v = &arg.value;
    macro_rules! check {
        ($($name:literal => $ty:ty),* $(,)?) => {
            match t {
                $( $name => decode::<$ty>(t, v).map(|_| ()), )*
                "" => return Err(Error::encode("an argument has no `Type`")),
                _ => {
                    return Err(Error::encode(format!(
                        "unknown Go type `{}` (expected one of {})",
                        t.chars().take(64).collect::<String>(),
                        GO_TYPES.join(", ")
                    )))
                }
            }
        };
    }
    let checked = check! {
        "bool" => bool, "int" => isize, "int8" => i8, "int16" => i16, "int32" => i32,
        "int64" => i64, "uint" => usize, "uint8" => u8, "uint16" => u16, "uint32" => u32,
        "uint64" => u64, "float32" => f32, "float64" => f64, "string" => String,
        "[]bool" => Vec<bool>, "[]int" => Vec<isize>, "[]int8" => Vec<i8>,
        "[]int16" => Vec<i16>, "[]int32" => Vec<i32>, "[]int64" => Vec<i64>,
        "[]uint" => Vec<usize>, "[]uint8" => Vec<u8>, "[]uint16" => Vec<u16>,
        "[]uint32" => Vec<u32>, "[]uint64" => Vec<u64>, "[]float32" => Vec<f32>,
        "[]float64" => Vec<f64>, "[]byte" => Vec<u8>, "[]string" => Vec<String>,
        "json" => Value,
    };
    checked.map_err(|e| Error::encode(e.message().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn number(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn float32_out_of_range_is_refused_not_infinite() {
        // Go reads a float32 argument with json.Number.Float64 and converts it; past
        // f32::MAX that gives +Inf, which no JSON can carry back (Go's encoding/json refuses
        // to encode it). It is a decode error here.
        for text in ["3.5e38", "-3.5e38", "3.4028236e38", "1e300"] {
            let err = decode::<f32>("float32", &number(text)).unwrap_err();
            assert!(err.message().contains("float32"), "{err}");
            assert!(decode::<Vec<f32>>("[]float32", &json!([1.0, number(text)])).is_err());
        }
        assert_eq!(
            decode::<f32>("float32", &number("3.4028235e38")).unwrap(),
            f32::MAX
        );
        // The smallest subnormal: 1e-45 rounds to it, as in Go.
        assert_eq!(
            decode::<f32>("float32", &number("1e-45"))
                .unwrap()
                .to_bits(),
            1
        );
    }

    #[test]
    fn float32_from_a_big_integer_rounds_as_go() {
        // Go converts through float64 (json.Number.Float64, then float32(x)): 2^60 + 2^36 + 1
        // first rounds to 2^60 + 2^36 (a float32 tie), then to even, 2^60.
        let n = (1u64 << 60) + (1 << 36) + 1;
        assert_eq!(
            decode::<f32>("float32", &json!(n)).unwrap(),
            (1u64 << 60) as f32
        );
    }

    #[test]
    fn floats_read_exactly() {
        // Correctly rounded, so that what is written reads back the same (serde_json's
        // default parser is off by an ulp on these).
        assert_eq!(
            decode::<f64>("float64", &number("1e-45")).unwrap(),
            "1e-45".parse::<f64>().unwrap()
        );
        assert_eq!(
            decode::<f64>("float64", &number("5e-324"))
                .unwrap()
                .to_bits(),
            1
        );
    }

    #[test]
    fn non_finite_floats_are_encode_errors() {
        // serde_json writes NaN and infinities as null, which would not decode as a float;
        // Go's encoding/json refuses to encode them (UnsupportedValueError).
        assert!(encode_arg(&f64::NAN).is_err());
        assert!(encode_arg(&f32::INFINITY).is_err());
        assert!(encode_result(&f64::NEG_INFINITY).is_err());
        assert!(encode_arg(&vec![1.0, f64::NAN]).is_err());
        assert!(encode_result(&vec![f32::NAN]).is_err());
        let err = encode_arg(&f64::NAN).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Encode);
        assert!(encode_arg(&-0.0f64).is_ok());
    }
}
