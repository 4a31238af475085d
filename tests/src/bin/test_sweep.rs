//! Deletes the queues and exchanges that test runs left on the local RabbitMQ (`tests/run.sh`
//! runs it before and after the tests).
//!
//! The integration tests declare a queue, an exchange and often a dead-letter queue per test,
//! named `test_<tag>_<12 hex>_...` (`tests/tests/common`), `cli_<tag>_<12 hex>_...` and
//! `clidash_<12 hex>_...` (`machinery/tests`). A test that fails or is killed leaves them, and
//! so does every test whose worker declared more than the test deletes. Hundreds of them slowed
//! the broker by several percent while idle, and every benchmark run against it.
//!
//! Only names of that shape are touched. A queue with a consumer is left alone (and deleted
//! `if_unused`, so one that gains a consumer meanwhile is kept); an exchange is deleted
//! `if_unused` (no bindings left), after the queues. Lists come from the local `rabbitmqctl`
//! (60 s at most), deletes go over AMQP (`AMQP_URL`, by default the tests' broker), and only
//! when that URL is on this machine: a broker elsewhere may serve another machine's run. Best
//! effort: anything that fails is reported and skipped, and the exit status is 0.

use std::process::Command;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// Whether `name` is one the tests generate: a known prefix, and a segment of 12 lowercase hex
/// digits (the per-test id) between underscores.
fn is_test_name(name: &str) -> bool {
    let known = ["test_", "cli_", "clidash_"]
        .iter()
        .any(|prefix| name.starts_with(prefix));
    known
        && name.split('_').any(|segment| {
            segment.len() == 12
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Whether `url` names this machine (the broker the local `rabbitmqctl` lists).
fn is_local(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// The virtual host `url` names (percent-decoded; `/` when it names none).
fn vhost(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let Some((_, path)) = rest.split_once('/') else {
        return "/".into();
    };
    if path.is_empty() {
        return "/".into();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rows `rabbitmqctl <args>` prints for `vhost`, split on tabs; `None` if it cannot be run
/// or fails.
fn rabbitmqctl(vhost: &str, args: &[&str]) -> Option<Vec<Vec<String>>> {
    let out = match Command::new("rabbitmqctl")
        .args(["-q", "--timeout", "60", "-p", vhost])
        .args(args)
        .arg("--no-table-headers")
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("sweep: cannot run rabbitmqctl: {e}");
            return None;
        }
    };
    if !out.status.success() {
        eprintln!(
            "sweep: rabbitmqctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.split('\t').map(str::to_owned).collect())
            .collect(),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    if !is_local(&url) {
        eprintln!("sweep: the tests' broker is not on this machine; nothing swept");
        return;
    }
    let vhost = vhost(&url);
    let (Some(queues), Some(exchanges)) = (
        rabbitmqctl(&vhost, &["list_queues", "name", "consumers"]),
        rabbitmqctl(&vhost, &["list_exchanges", "name"]),
    ) else {
        eprintln!("sweep: nothing swept");
        return;
    };
    let queues: Vec<&str> = queues
        .iter()
        .filter(|row| row.get(1).is_some_and(|consumers| consumers == "0"))
        .filter_map(|row| row.first().map(String::as_str))
        .filter(|name| is_test_name(name))
        .collect();
    let exchanges: Vec<&str> = exchanges
        .iter()
        .filter_map(|row| row.first().map(String::as_str))
        .filter(|name| is_test_name(name))
        .collect();
    if queues.is_empty() && exchanges.is_empty() {
        return;
    }
    let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("sweep: cannot connect to RabbitMQ: {e}");
            return;
        }
    };
    let (mut deleted_queues, mut deleted_exchanges) = (0, 0);
    // A refused delete closes its channel: one channel per delete.
    for queue in queues {
        let Ok(channel) = connection.create_channel().await else {
            break;
        };
        let options = QueueDeleteOptions {
            if_unused: true,
            ..QueueDeleteOptions::default()
        };
        if channel.queue_delete(queue.into(), options).await.is_ok() {
            deleted_queues += 1;
            let _ = channel.close(200, "swept".into()).await;
        }
    }
    for exchange in exchanges {
        let Ok(channel) = connection.create_channel().await else {
            break;
        };
        let options = ExchangeDeleteOptions {
            if_unused: true,
            ..ExchangeDeleteOptions::default()
        };
        if channel
            .exchange_delete(exchange.into(), options)
            .await
            .is_ok()
        {
            deleted_exchanges += 1;
            let _ = channel.close(200, "swept".into()).await;
        }
    }
    let _ = connection.close(200, "swept".into()).await;
    eprintln!(
        "sweep: deleted {deleted_queues} queues and {deleted_exchanges} exchanges left by test runs"
    );
}

#[cfg(test)]
mod tests {
    use super::{is_local, is_test_name, vhost};

    #[test]
    fn the_vhost_is_read_from_the_url() {
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost("amqp://127.0.0.1:5672/"), "/");
        assert_eq!(vhost("amqp://127.0.0.1:5672"), "/");
        assert_eq!(vhost("amqp://localhost/tests?heartbeat=10"), "tests");
        assert_eq!(vhost("amqp://localhost/a%2Fb"), "a/b");
        assert_eq!(vhost("amqp://localhost/100%"), "100%");
        assert_eq!(vhost("amqp://localhost/a%+fb"), "a%+fb");
    }

    #[test]
    fn only_a_broker_on_this_machine_is_swept() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://localhost",
            "amqps://u:p@[::1]:5671/vhost",
            "amqp://u:p@localhost:5672",
        ] {
            assert!(is_local(url), "{url}");
        }
        for url in [
            "amqp://guest:guest@rabbit.internal:5672/%2f",
            "amqp://10.0.0.5",
            "amqp://u:127.0.0.1@example.com",
            "amqp://localhost.example.com",
        ] {
            assert!(!is_local(url), "{url}");
        }
    }

    #[test]
    fn only_the_names_tests_generate_are_swept() {
        for name in [
            "test_revoke_redis_d3793c8ee1c1_tasks",
            "test_metrics_015c22726338_tasks.dead_letter",
            "test_revoke_bad_uuid_554d0f661feb_exchange",
            "cli_dlq_187fff311731_tasks.dead_letter",
            "clidash_798f221b828f_tasks",
        ] {
            assert!(is_test_name(name), "{name}");
        }
        for name in [
            "machinery_tasks",
            "test_tasks",
            "test_orders_tasks",
            "test_x_D3793C8EE1C1_tasks",
            "bench_rss_1234",
            "orders_d3793c8ee1c1_tasks",
            "delay.100.test_x_d3793c8ee1c1_exchange.test_x_d3793c8ee1c1_key",
            "test_x_d3793c8ee1c_tasks",
        ] {
            assert!(!is_test_name(name), "{name}");
        }
    }
}
