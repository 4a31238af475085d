//! Go Machinery's YAML config files (Go: v2/config/file.go `NewFromYaml`, the `yaml:` tags in
//! v2/config/config.go), read as Go's yaml.v2 reads them.
//!
//! yaml-rust2's parser gives the events; they are built here into a small tree whose scalars
//! keep their text and whether they were plain (unquoted). Each key then resolves its scalar
//! the way yaml.v2 does for the Go field's type: YAML 1.1 booleans (`yes`, `on`, ...), integers
//! in any base, any scalar's text for a string, `null` for the zero value.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::{AmqpConfig, Config, RedisConfig};
use crate::error::{Error, Result};

/// The largest config file read: 1 MiB. (Go reads the first 1000 bytes and drops the rest.)
const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// The most nodes a document may have once its aliases are expanded.
const MAX_NODES: usize = 100_000;

impl Config {
    /// Reads Go Machinery's YAML config (Go's `config.NewFromYaml`) over the defaults, without
    /// the environment; see [`from_yaml_file`](Self::from_yaml_file) for the keys.
    ///
    /// ```
    /// use machinery::Config;
    ///
    /// let config = Config::from_yaml_str(
    ///     "broker: amqp://guest:guest@localhost:5672/\n\
    ///      default_queue: jobs\n\
    ///      amqp:\n  prefetch_count: 10\n  queue_declare_args:\n    x-max-priority: 10\n",
    /// )?;
    /// assert_eq!(config.default_queue, "jobs");
    /// assert_eq!(config.amqp.prefetch_count, 10);
    /// assert_eq!(config.amqp.exchange, "machinery_exchange"); // Go's default
    /// assert_eq!(config.amqp.queue_declare_args["x-max-priority"], 10);
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn from_yaml_str(yaml: &str) -> Result<Config> {
        let config = from_yaml(yaml)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads Go Machinery's YAML config file, then the environment over it (Go's names, as
    /// [`from_env`](Self::from_env) reads them), and validates the result.
    ///
    /// The keys are Go's: `broker`, `lock`, `multiple_broker_separator`, `default_queue`,
    /// `result_backend`, `results_expire_in`, `no_unix_signals`; in `amqp:` `exchange`,
    /// `exchange_type`, `binding_key`, `prefetch_count`, `queue_declare_args`,
    /// `queue_binding_args`, `auto_delete`, `delayed_queue`; and the `redis:` block of
    /// [`RedisConfig`]. Keys left out keep Go's defaults. Unknown keys are ignored, as Go
    /// ignores them, and logged at debug level; a value of the wrong type is an error naming
    /// its key. The file may be at most 1 MiB.
    ///
    /// ```no_run
    /// use machinery::Config;
    ///
    /// // config.yml as Go Machinery reads it; BROKER=... in the environment wins.
    /// let config = Config::from_yaml_file("config.yml")?;
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Config> {
        Config::from_yaml_file_with_lookup(path, |name| std::env::var(name).ok())
    }

    /// Like [`from_yaml_file`](Self::from_yaml_file), reading variables through `lookup`.
    ///
    /// ```
    /// use machinery::Config;
    ///
    /// let path = std::env::temp_dir().join("machinery-doc-config.yml");
    /// std::fs::write(&path, "broker: memory://from-file\ndefault_queue: file_queue\n")?;
    /// let config = Config::from_yaml_file_with_lookup(&path, |name| {
    ///     (name == "DEFAULT_QUEUE").then(|| "env_queue".to_owned())
    /// })?;
    /// assert_eq!(config.broker, "memory://from-file");
    /// assert_eq!(config.default_queue, "env_queue");
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_yaml_file_with_lookup(
        path: impl AsRef<Path>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let path = path.as_ref();
        let text = read_file(path)?;
        let mut config = from_yaml(&text)
            .map_err(|e| Error::config(format!("{}: {}", path.display(), e.message())))?;
        config.apply_env(&lookup)?;
        config.validate()?;
        tracing::debug!(path = %path.display(), "read the YAML config");
        Ok(config)
    }
}

fn read_file(path: &Path) -> Result<String> {
    let cannot = |e: std::io::Error| {
        Error::config(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(Error::config(format!(
            "the config file {} is larger than {MAX_FILE_SIZE} bytes",
            path.display()
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::config(format!("the config file {} is not UTF-8", path.display())))
}

/// The document over the defaults, not validated.
fn from_yaml(text: &str) -> Result<Config> {
    let mut config = Config::default();
    if let Some(root) = load(text)? {
        apply(&root, &mut config)?;
    }
    Ok(config)
}

/// A YAML node: scalars keep their text, and whether they were plain (not quoted, no `!!str`).
#[derive(Debug, Clone)]
enum Node {
    Scalar { text: String, plain: bool },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// The first document of `text` (yaml.v2's `Unmarshal` reads only the first), or `None` when
/// it is empty.
fn load(text: &str) -> Result<Option<Node>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| Error::config(format!("invalid YAML: {e}")))?;
    if let Some(message) = builder.error {
        return Err(Error::config(message));
    }
    Ok(builder.doc)
}

enum Frame {
    Seq(Vec<Node>),
    /// The entries, and the key waiting for its value.
    Map(Vec<(Node, Node)>, Option<Node>),
}

/// Builds [`Node`]s from the parser's events, expanding aliases within [`MAX_NODES`].
#[derive(Default)]
struct Builder {
    /// Open collections: the frame, its anchor, its size so far.
    stack: Vec<(Frame, usize, usize)>,
    /// Anchored nodes and their sizes.
    anchors: std::collections::HashMap<usize, (Node, usize)>,
    nodes: usize,
    doc: Option<Node>,
    error: Option<String>,
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        if let Err(message) = self.event(event, mark) {
            self.error = Some(message);
        }
    }
}

impl Builder {
    fn event(&mut self, event: Event, mark: Marker) -> std::result::Result<(), String> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                let string_tag = matches!(
                    &tag,
                    Some(Tag { handle, suffix }) if handle == "tag:yaml.org,2002:" && suffix == "str"
                );
                let plain = style == TScalarStyle::Plain && !string_tag;
                self.add(Node::Scalar { text, plain }, 1, anchor, mark)
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Frame::Seq(Vec::new()), anchor, 1));
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Frame::Map(Vec::new(), None), anchor, 1));
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((frame, anchor, size)) = self.stack.pop() else {
                    return Err("invalid YAML: unbalanced collection".to_owned());
                };
                let node = match frame {
                    Frame::Seq(items) => Node::Seq(items),
                    Frame::Map(entries, _) => Node::Map(entries),
                };
                // The collection's members were counted as they came.
                self.nodes = self.nodes.saturating_sub(size.saturating_sub(1));
                self.add(node, size, anchor, mark)
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(format!(
                        "invalid YAML: unknown alias at line {}",
                        mark.line()
                    ));
                };
                if self.nodes.saturating_add(*size) > MAX_NODES {
                    return Err(format!(
                        "invalid YAML: its aliases expand to more than {MAX_NODES} nodes"
                    ));
                }
                let (node, size) = (node.clone(), *size);
                self.add(node, size, 0, mark)
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => Ok(()),
        }
    }

    /// Adds a finished node of `size` nodes to the open collection (or as the document).
    fn add(
        &mut self,
        node: Node,
        size: usize,
        anchor: usize,
        mark: Marker,
    ) -> std::result::Result<(), String> {
        self.nodes = self.nodes.saturating_add(size);
        if self.nodes > MAX_NODES {
            return Err(format!(
                "invalid YAML: more than {MAX_NODES} nodes (with aliases expanded)"
            ));
        }
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let Some((frame, _, total)) = self.stack.last_mut() else {
            if self.doc.is_none() {
                self.doc = Some(node);
            }
            return Ok(());
        };
        *total = total.saturating_add(size);
        match frame {
            Frame::Seq(items) => items.push(node),
            Frame::Map(entries, pending) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    // yaml.v2 refuses a key given twice ("mapping key ... already defined").
                    if let Node::Scalar { text, .. } = &key {
                        let twice = entries
                            .iter()
                            .any(|(k, _)| matches!(k, Node::Scalar { text: t, .. } if t == text));
                        if twice {
                            return Err(format!(
                                "invalid YAML: key `{text}` is given twice (line {})",
                                mark.line()
                            ));
                        }
                    }
                    entries.push((key, node));
                }
            },
        }
        Ok(())
    }
}

/// Where a value sits, for messages: `amqp.prefetch_count`.
fn path(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

fn describe(node: &Node) -> String {
    match node {
        Node::Scalar { text, .. } => {
            let short: String = text.chars().take(40).collect();
            format!("`{short}`")
        }
        Node::Seq(_) => "a list".to_owned(),
        Node::Map(_) => "a mapping".to_owned(),
    }
}

fn wrong(key: &str, expected: &str, node: &Node) -> Error {
    Error::config(format!(
        "config key `{key}` must be {expected}, got {}",
        describe(node)
    ))
}

/// The entries of a mapping, `None` for null (yaml.v2 leaves Go's zero value: for a block,
/// machinery keeps the defaults).
fn mapping<'a>(node: &'a Node, key: &str) -> Result<Option<&'a [(Node, Node)]>> {
    match node {
        Node::Map(entries) => Ok(Some(entries)),
        n if is_null(n) => Ok(None),
        other => Err(wrong(key, "a mapping", other)),
    }
}

fn key_text<'a>(key: &'a Node, section: &str) -> Result<&'a str> {
    match key {
        Node::Scalar { text, .. } => Ok(text),
        other => Err(Error::config(format!(
            "config {}: keys must be scalars, got {}",
            if section.is_empty() {
                "document".to_owned()
            } else {
                format!("section `{section}`")
            },
            describe(other)
        ))),
    }
}

fn ignored(section: &str, key: &str, why: &'static str) {
    tracing::debug!(config.key = %path(section, key), why, "ignored a key of the YAML config");
}

fn apply(root: &Node, config: &mut Config) -> Result<()> {
    let Some(entries) = mapping(root, "the document").map_err(|_| {
        Error::config(format!(
            "the document of a YAML config must be a mapping of keys, got {}",
            describe(root)
        ))
    })?
    else {
        return Ok(());
    };
    for (key, value) in entries {
        let key = key_text(key, "")?;
        match key {
            "broker" => config.broker = string(value, key)?,
            "lock" => config.lock = optional(string(value, key)?),
            "multiple_broker_separator" => {
                config.multiple_broker_separator = optional(string(value, key)?);
            }
            "default_queue" => config.default_queue = string(value, key)?,
            "result_backend" => config.result_backend = string(value, key)?,
            "results_expire_in" => config.results_expire_in = integer(value, key)?,
            "no_unix_signals" => config.no_unix_signals = boolean(value, key)?,
            "amqp" => {
                if let Some(entries) = mapping(value, key)? {
                    amqp(entries, &mut config.amqp)?;
                }
            }
            "redis" => {
                if let Some(entries) = mapping(value, key)? {
                    redis(entries, &mut config.redis)?;
                }
            }
            "sqs" | "dynamodb" | "tlsconfig" => {
                ignored("", key, "Go's key for what machinery does not have");
            }
            _ => ignored("", key, "unknown key (Go ignores it too)"),
        }
    }
    Ok(())
}

fn amqp(entries: &[(Node, Node)], amqp: &mut AmqpConfig) -> Result<()> {
    const S: &str = "amqp";
    for (key, value) in entries {
        let key = key_text(key, S)?;
        let at = path(S, key);
        match key {
            "exchange" => amqp.exchange = string(value, &at)?,
            "exchange_type" => amqp.exchange_type = string(value, &at)?,
            "binding_key" => amqp.binding_key = string(value, &at)?,
            "prefetch_count" => amqp.prefetch_count = integer(value, &at)?,
            "queue_declare_args" => amqp.queue_declare_args = table(value, &at)?,
            "queue_binding_args" => amqp.queue_binding_args = table(value, &at)?,
            "auto_delete" => amqp.auto_delete = boolean(value, &at)?,
            "delayed_queue" => amqp.delayed_queue = string(value, &at)?,
            _ => ignored(S, key, "unknown key (Go ignores it too)"),
        }
    }
    Ok(())
}

fn redis(entries: &[(Node, Node)], redis: &mut RedisConfig) -> Result<()> {
    const S: &str = "redis";
    for (key, value) in entries {
        let key = key_text(key, S)?;
        let at = path(S, key);
        let secs = |v: &Node| integer(v, &at).map(Duration::from_secs);
        let millis = |v: &Node| integer(v, &at).map(Duration::from_millis);
        match key {
            "max_idle" => redis.max_idle = integer(value, &at)?,
            "max_active" => redis.max_active = integer(value, &at)?,
            // Go's tag for `IdleTimeout` is `max_idle_timeout`.
            "max_idle_timeout" => redis.idle_timeout = secs(value)?,
            "wait" => redis.wait = boolean(value, &at)?,
            "read_timeout" => redis.read_timeout = secs(value)?,
            "write_timeout" => redis.write_timeout = secs(value)?,
            "connect_timeout" => redis.connect_timeout = secs(value)?,
            "normal_tasks_poll_period" => redis.normal_tasks_poll_period = millis(value)?,
            "delayed_tasks_poll_period" => redis.delayed_tasks_poll_period = millis(value)?,
            "delayed_tasks_key" => redis.delayed_tasks_key = string(value, &at)?,
            "client_name" => redis.client_name = string(value, &at)?,
            "master_name" => redis.master_name = string(value, &at)?,
            "cluster_enabled" => redis.cluster_enabled = boolean(value, &at)?,
            "sentinel_password" => redis.sentinel_password = string(value, &at)?,
            _ => ignored(S, key, "unknown key (Go ignores it too)"),
        }
    }
    Ok(())
}

fn optional(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// YAML 1.1's null, as yaml.v2 resolves it (an empty value too).
fn is_null(node: &Node) -> bool {
    matches!(node, Node::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

/// A string key: any scalar, as written (yaml.v2 sets a string field to the node's text);
/// null is Go's zero value, the empty string.
fn string(node: &Node, key: &str) -> Result<String> {
    match node {
        n if is_null(n) => Ok(String::new()),
        Node::Scalar { text, .. } => Ok(text.clone()),
        other => Err(wrong(key, "a string", other)),
    }
}

/// A YAML 1.1 boolean (yaml.v2's resolve table); null is `false`.
fn boolean(node: &Node, key: &str) -> Result<bool> {
    match node {
        n if is_null(n) => Ok(false),
        Node::Scalar { text, plain: true } => match text.as_str() {
            "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
                Ok(true)
            }
            "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False"
            | "FALSE" => Ok(false),
            _ => Err(wrong(key, "a boolean", node)),
        },
        other => Err(wrong(key, "a boolean", other)),
    }
}

/// An integer (plain, in any base Go's `strconv.ParseInt(s, 0, 64)` reads) that fits `T`;
/// null is 0.
fn integer<T: TryFrom<i64> + Default>(node: &Node, key: &str) -> Result<T> {
    if is_null(node) {
        return Ok(T::default());
    }
    let n = match node {
        Node::Scalar { text, plain: true } => parse_int(text),
        _ => None,
    }
    .ok_or_else(|| wrong(key, "an integer", node))?;
    T::try_from(n).map_err(|_| {
        Error::config(format!(
            "config key `{key}`: {n} is out of range for a `{}`",
            std::any::type_name::<T>()
        ))
    })
}

/// yaml.v2's integers: an optional sign, `0x`, `0o`, `0b` or a leading `0` (octal), `_`
/// separators.
fn parse_int(text: &str) -> Option<i64> {
    let clean: String = text.chars().filter(|&c| c != '_').collect();
    let (negative, digits) = match clean.as_bytes().first()? {
        b'-' => (true, &clean[1..]),
        b'+' => (false, &clean[1..]),
        _ => (false, clean.as_str()),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(hex) = lower.strip_prefix("0x") {
        (16, hex)
    } else if let Some(oct) = lower.strip_prefix("0o") {
        (8, oct)
    } else if let Some(bin) = lower.strip_prefix("0b") {
        (2, bin)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if body.is_empty() || body.starts_with(['+', '-']) {
        return None;
    }
    let magnitude = i128::from_str_radix(body, radix).ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// A table of AMQP arguments (Go's `map[string]interface{}`); null is empty.
fn table(node: &Node, key: &str) -> Result<Map<String, Value>> {
    match node {
        n if is_null(n) => Ok(Map::new()),
        Node::Map(entries) => entries
            .iter()
            .map(|(k, v)| Ok((key_text(k, key)?.to_owned(), to_json(v, key)?)))
            .collect(),
        other => Err(wrong(key, "a mapping", other)),
    }
}

/// A value as yaml.v2 decodes it into `interface{}`: plain scalars resolved (null, boolean,
/// integer, float), quoted ones strings.
fn to_json(node: &Node, key: &str) -> Result<Value> {
    Ok(match node {
        n if is_null(n) => Value::Null,
        Node::Scalar { text, plain: false } => Value::String(text.clone()),
        Node::Scalar { text, plain: true } => {
            if let Ok(b) = boolean(node, key) {
                Value::Bool(b)
            } else if let Some(n) = parse_int(text) {
                Value::from(n)
            } else if let Some(f) = text
                .replace('_', "")
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && !text.contains(['i', 'I', 'n', 'N']))
                .and_then(Number::from_f64)
            {
                Value::Number(f)
            } else {
                Value::String(text.clone())
            }
        }
        Node::Seq(items) => Value::Array(
            items
                .iter()
                .map(|item| to_json(item, key))
                .collect::<Result<_>>()?,
        ),
        Node::Map(_) => Value::Object(table(node, key)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_read_as_go_reads_them() {
        for (text, n) in [
            ("10", 10),
            ("-3", -3),
            ("+4", 4),
            ("0x1F", 31),
            ("0o17", 15),
            ("017", 15),
            ("0b101", 5),
            ("1_000", 1000),
            ("0", 0),
        ] {
            assert_eq!(parse_int(text), Some(n), "{text}");
        }
        for text in ["", "-", "1.5", "abc", "0x", "--1", "99999999999999999999"] {
            assert_eq!(parse_int(text), None, "{text}");
        }
    }

    #[test]
    fn table_values_resolve_as_yaml_v2() {
        let root = load("a: 10\nb: '10'\nc: 1.5\nd: yes\ne: ~\nf: [1, x]\ng: .inf\n")
            .unwrap()
            .unwrap();
        let t = table(&root, "t").unwrap();
        assert_eq!(
            Value::Object(t),
            serde_json::json!({"a": 10, "b": "10", "c": 1.5, "d": true, "e": null, "f": [1, "x"], "g": ".inf"})
        );
    }

    #[test]
    fn only_the_first_document_is_read() {
        let root = load("a: 1\n---\nb: 2\n").unwrap().unwrap();
        let Node::Map(entries) = root else { panic!() };
        assert_eq!(entries.len(), 1);
    }
}
