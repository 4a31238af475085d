//! `Config::from_yaml_*`: Go Machinery's YAML keys (Go: v2/config/config.go, v2/config/file.go).

use std::path::PathBuf;
use std::time::Duration;

use machinery::{Config, ErrorKind};
use serde_json::json;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Go's own `v2/config/testconfig.yml` gives the values Go's `TestNewFromYaml` asserts
/// (v2/config/file_test.go), and Go's defaults (`defaultCnf` in v2/config/config.go) for the
/// keys it leaves out.
#[test]
fn go_testconfig_reads_as_in_go() {
    let path = data("go_testconfig.yml");
    // The file's `exchange_type: exchange_type` is no exchange type: Go fails only when it
    // declares the exchange, we fail when we read the configuration, naming the value.
    let err = Config::from_yaml_file_with_lookup(&path, no_env).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("`exchange_type`"), "{err}");

    // The environment overrides the file: with a valid exchange type, every other value is
    // Go's.
    let c = Config::from_yaml_file_with_lookup(&path, |name| {
        (name == "AMQP_EXCHANGE_TYPE").then(|| "topic".to_owned())
    })
    .unwrap();
    assert_eq!(c.amqp.exchange_type, "topic");
    // assert.Equal(t, "broker", cnf.Broker) ... in Go's TestNewFromYaml:
    assert_eq!(c.broker, "broker");
    assert_eq!(c.default_queue, "default_queue");
    assert_eq!(c.result_backend, "result_backend");
    assert_eq!(c.results_expire_in, 123456);
    assert_eq!(c.amqp.exchange, "exchange");
    assert_eq!(c.amqp.binding_key, "binding_key");
    // Go: assert.Equal(t, 10, cnf.AMQP.QueueDeclareArgs["x-max-priority"]) (an int, not "10").
    assert_eq!(
        c.amqp.queue_declare_args.get("x-max-priority"),
        Some(&json!(10))
    );
    assert_eq!(
        c.amqp.queue_binding_args.get("x-match"),
        Some(&json!("any"))
    );
    assert_eq!(
        c.amqp.queue_binding_args.get("image-type"),
        Some(&json!("png"))
    );
    assert_eq!(c.amqp.prefetch_count, 123);
    assert_eq!(c.redis.max_idle, 12);
    assert_eq!(c.redis.max_active, 123);
    assert_eq!(c.redis.idle_timeout, Duration::from_secs(456));
    assert!(!c.redis.wait);
    assert_eq!(c.redis.read_timeout, Duration::from_secs(17));
    assert_eq!(c.redis.write_timeout, Duration::from_secs(19));
    assert_eq!(c.redis.connect_timeout, Duration::from_secs(21));
    assert_eq!(
        c.redis.normal_tasks_poll_period,
        Duration::from_millis(1001)
    );
    assert_eq!(c.redis.delayed_tasks_poll_period, Duration::from_millis(23));
    assert_eq!(c.redis.delayed_tasks_key, "delayed_tasks_key");
    assert_eq!(c.redis.master_name, "master_name");
    assert!(c.no_unix_signals);
    // Keys the file leaves out keep Go's zero values or defaults (defaultCnf).
    assert_eq!(c.lock, None);
    assert_eq!(c.multiple_broker_separator, None);
    assert!(!c.amqp.auto_delete);
    assert_eq!(c.amqp.delayed_queue, "");
    assert!(!c.redis.cluster_enabled);
    assert_eq!(c.redis.sentinel_password, "");
}

/// Keys left out keep Go's defaults (`defaultCnf`), also inside a block that sets only some
/// of its keys: yaml.v2 decodes into the default `AMQPConfig` and `RedisConfig`.
#[test]
fn missing_keys_keep_go_defaults() {
    let c =
        Config::from_yaml_str("broker: memory://yaml-defaults\namqp:\n  exchange: ex\n").unwrap();
    assert_eq!(c.broker, "memory://yaml-defaults");
    assert_eq!(c.amqp.exchange, "ex");
    assert_eq!(c.default_queue, "machinery_tasks");
    assert_eq!(c.results_expire_in, 3600);
    assert_eq!(c.amqp.exchange_type, "direct");
    assert_eq!(c.amqp.binding_key, "machinery_task");
    assert_eq!(c.amqp.prefetch_count, 3);
    assert_eq!(c.redis.max_idle, 3);
    assert_eq!(c.redis.idle_timeout, Duration::from_secs(240));
    assert_eq!(c.redis.read_timeout, Duration::from_secs(15));
    assert_eq!(c.redis.write_timeout, Duration::from_secs(15));
    assert_eq!(c.redis.connect_timeout, Duration::from_secs(15));
    assert_eq!(
        c.redis.normal_tasks_poll_period,
        Duration::from_millis(1000)
    );
    assert_eq!(
        c.redis.delayed_tasks_poll_period,
        Duration::from_millis(500)
    );
    // An empty document is all defaults.
    assert_eq!(Config::from_yaml_str("").unwrap(), Config::default());
    assert_eq!(Config::from_yaml_str("---\n").unwrap(), Config::default());
}

#[test]
fn lock_and_separator_are_read_from_file_and_env() {
    let yaml = "broker: memory://yaml-lock\nlock: redis://127.0.0.1:6379/1\nmultiple_broker_separator: ','\n";
    let c = Config::from_yaml_str(yaml).unwrap();
    assert_eq!(c.lock.as_deref(), Some("redis://127.0.0.1:6379/1"));
    assert_eq!(c.multiple_broker_separator.as_deref(), Some(","));
    // Go's env name for the separator is spelled MULTIPLE_BROKEN_SEPARATOR (config.go).
    let path = std::env::temp_dir().join(format!("machinery-yaml-{}.yml", std::process::id()));
    std::fs::write(&path, yaml).unwrap();
    let c = Config::from_yaml_file_with_lookup(&path, |name| match name {
        "LOCK" => Some("redis://other:6379/2".into()),
        "MULTIPLE_BROKEN_SEPARATOR" => Some(";".into()),
        _ => None,
    })
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(c.lock.as_deref(), Some("redis://other:6379/2"));
    assert_eq!(c.multiple_broker_separator.as_deref(), Some(";"));
}

/// Environment variables (Go's names, as `Config::from_env` reads them) win over the file.
#[test]
fn env_overrides_the_file() {
    let c = Config::from_yaml_file_with_lookup(data("go_testconfig.yml"), |name| match name {
        "BROKER" => Some("memory://yaml-env".into()),
        "DEFAULT_QUEUE" => Some("env_queue".into()),
        "AMQP_EXCHANGE_TYPE" => Some("direct".into()),
        "AMQP_PREFETCH_COUNT" => Some("7".into()),
        "AMQP_QUEUE_BINDING_ARGS" => Some("x-match:all".into()),
        "RESULTS_EXPIRE_IN" => Some("60".into()),
        "NO_UNIX_SIGNALS" => Some("false".into()),
        "AMQP_AUTO_DELETE" => Some("true".into()),
        "AMQP_DELAYED_QUEUE" => Some("delayed".into()),
        "REDIS_READ_TIMEOUT" => Some("3".into()),
        "REDIS_MASTER_NAME" => Some("env_master".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(c.broker, "memory://yaml-env");
    assert_eq!(c.default_queue, "env_queue");
    assert_eq!(c.amqp.prefetch_count, 7);
    assert_eq!(c.results_expire_in, 60);
    assert!(!c.no_unix_signals);
    assert!(c.amqp.auto_delete);
    assert_eq!(c.amqp.delayed_queue, "delayed");
    assert_eq!(c.redis.read_timeout, Duration::from_secs(3));
    assert_eq!(c.redis.master_name, "env_master");
    // A table from the environment replaces the file's, as envconfig does.
    assert_eq!(c.amqp.queue_binding_args.len(), 1);
    assert_eq!(
        c.amqp.queue_binding_args.get("x-match"),
        Some(&json!("all"))
    );
    // What the environment leaves alone stays as the file says.
    assert_eq!(c.amqp.exchange, "exchange");
    assert_eq!(c.redis.write_timeout, Duration::from_secs(19));
}

#[test]
fn wrong_type_is_an_error_naming_the_key() {
    for (yaml, key) in [
        ("amqp:\n  prefetch_count: many\n", "amqp.prefetch_count"),
        ("amqp:\n  prefetch_count: '3'\n", "amqp.prefetch_count"),
        ("amqp:\n  prefetch_count: 70000\n", "amqp.prefetch_count"),
        ("results_expire_in: [1]\n", "results_expire_in"),
        ("results_expire_in: -1\n", "results_expire_in"),
        ("no_unix_signals: maybe\n", "no_unix_signals"),
        ("broker: {a: b}\n", "broker"),
        ("amqp: [1, 2]\n", "amqp"),
        (
            "amqp:\n  queue_declare_args: 5\n",
            "amqp.queue_declare_args",
        ),
        ("redis:\n  read_timeout: soon\n", "redis.read_timeout"),
        ("redis:\n  wait: 1.5\n", "redis.wait"),
        ("- just\n- a list\n", "the document"),
    ] {
        let err = Config::from_yaml_str(yaml).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{yaml}");
        assert!(
            err.message().contains(&format!("`{key}`")) || err.message().contains(key),
            "{yaml}: {err}"
        );
    }
}

#[test]
fn invalid_yaml_is_an_error() {
    let err = Config::from_yaml_str("broker: [unclosed\n").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("YAML"), "{err}");
    // yaml.v2 refuses a key given twice.
    let err = Config::from_yaml_str("broker: a\nbroker: b\n").unwrap_err();
    assert!(err.message().contains("broker"), "{err}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let path = data("no_such_config.yml");
    let err = Config::from_yaml_file_with_lookup(&path, no_env).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("no_such_config.yml"), "{err}");
    assert!(Config::from_yaml_file(&path).is_err());
}

/// Unknown keys are ignored, as Go's `yaml.Unmarshal` (not `UnmarshalStrict`) ignores them;
/// machinery logs each at debug level. Go's keys for brokers and backends machinery does not
/// have (`sqs`, `dynamodb`) are ignored the same way.
#[test]
fn unknown_keys_are_ignored_as_in_go() {
    let c = Config::from_yaml_str(
        "broker: memory://yaml-unknown\nno_such_key: 1\namqp:\n  nope: x\nredis:\n  idle_timeout: 5\nsqs:\n  receive_wait_time_seconds: 1\n",
    )
    .unwrap();
    assert_eq!(c.broker, "memory://yaml-unknown");
    // `idle_timeout` is not Go's key (Go's is `max_idle_timeout`): the default stays.
    assert_eq!(c.redis.idle_timeout, Duration::from_secs(240));
}

/// yaml.v2 reads YAML 1.1: `yes`/`no`/`on`/`off` are booleans; `null` or an empty value sets
/// Go's zero value.
#[test]
fn yaml_1_1_booleans_and_nulls_as_in_go() {
    let c = Config::from_yaml_str(
        "broker: memory://yaml-bools\nno_unix_signals: yes\nredis:\n  wait: on\n",
    )
    .unwrap();
    assert!(c.no_unix_signals);
    assert!(c.redis.wait);
    let c = Config::from_yaml_str(
        "broker: memory://yaml-nulls\nresults_expire_in:\nredis:\n  max_idle: ~\n",
    )
    .unwrap();
    assert_eq!(c.results_expire_in, 0);
    assert_eq!(c.redis.max_idle, 0);
    // A scalar for a string key is taken as written (yaml.v2 sets the node's text).
    let c = Config::from_yaml_str("broker: memory://yaml-text\ndefault_queue: 0x10\n").unwrap();
    assert_eq!(c.default_queue, "0x10");
}

/// Aliases that expand without bound are refused instead of exhausting memory.
#[test]
fn alias_bomb_is_refused() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        yaml.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let err = Config::from_yaml_str(&yaml).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("alias"), "{err}");
}
