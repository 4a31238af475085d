//! Task arguments on the command line: `TYPE:VALUE` with Go's type names, or a JSON object.

use machinery::wire::Arg;
use machinery::Error;

use crate::usage;
use serde_json::Value;

/// Reads argument `i`:
///
/// - `{"Type": "int64", "Value": 3}`: Go's wire form, as JSON;
/// - `string:VALUE`: the rest as it is;
/// - `TYPE:VALUE` for any other Go type: `VALUE` as JSON (`int64:3`, `bool:true`,
///   `[]string:["a","b"]`, `float64:1.5`, `json:{"a":1}`).
///
/// The type and value are checked against Go's types by the caller.
pub(crate) fn parse_arg(i: usize, text: &str) -> Result<Arg, Error> {
    let n = i + 1;
    if text.trim_start().starts_with('{') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| usage(format!("argument {n} is not valid JSON: {e}")))?;
        return serde_json::from_value(value).map_err(|e| {
            usage(format!(
                "argument {n} must be {{\"Type\": ..., \"Value\": ...}}: {e}"
            ))
        });
    }
    let Some((type_name, raw)) = text.split_once(':') else {
        return Err(usage(format!(
            "argument {n} (`{text}`) must be TYPE:VALUE (such as int64:3 or string:hello) or a JSON object"
        )));
    };
    let value = if type_name == "string" {
        Value::String(raw.to_owned())
    } else {
        serde_json::from_str(raw).map_err(|e| {
            usage(format!(
                "argument {n}: `{raw}` is not a JSON value for type {type_name}: {e}"
            ))
        })?
    };
    Ok(Arg {
        name: String::new(),
        type_name: type_name.to_owned(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_values() {
        let a = parse_arg(0, "int64:3").unwrap();
        assert_eq!((a.type_name.as_str(), a.value), ("int64", json!(3)));
        let a = parse_arg(0, "string:a:b c").unwrap();
        assert_eq!(a.value, json!("a:b c"));
        let a = parse_arg(0, r#"[]string:["x","y"]"#).unwrap();
        assert_eq!(a.value, json!(["x", "y"]));
        let a = parse_arg(0, r#"{"Type":"float64","Value":1.5}"#).unwrap();
        assert_eq!(a.type_name, "float64");
        assert!(parse_arg(0, "3").is_err());
        assert!(parse_arg(0, "int64:three").is_err());
    }
}
