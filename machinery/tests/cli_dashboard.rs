//! The real `machinery dashboard` subcommand: refused on a public address without a good
//! `DASHBOARD_TOKEN`, served on loopback until SIGTERM. Needs the `dashboard` feature, which
//! the `machinery-tests` crate turns on, so `cargo test --workspace` runs these. RabbitMQ and
//! Redis (DB 13) as in `tests/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn command() -> Command {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let base = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let (scheme, rest) = base.split_once("://").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_machinery"));
    command
        .env(
            "BROKER",
            std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        )
        .env(
            "RESULT_BACKEND",
            format!("{scheme}://{}/13", rest.split('/').next().unwrap()),
        )
        .env("DEFAULT_QUEUE", format!("clidash_{id}_tasks"))
        .env("AMQP_EXCHANGE", format!("clidash_{id}_exchange"))
        .env("AMQP_BINDING_KEY", format!("clidash_{id}_key"))
        .env_remove("DASHBOARD_TOKEN")
        .stdin(Stdio::null());
    command
}

#[test]
fn a_public_address_needs_a_good_token() {
    let refused = command()
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("not a loopback address: set DASHBOARD_TOKEN"),
        "{stderr}"
    );

    let weak = command()
        .env("DASHBOARD_TOKEN", "short")
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!weak.status.success());
    let stderr = String::from_utf8_lossy(&weak.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");
    assert!(
        !stderr.contains("short"),
        "the token is never echoed: {stderr}"
    );
}

#[test]
fn it_serves_on_loopback_until_sigterm() {
    let mut child = command()
        .args(["dashboard", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("machinery dashboard on http://")
        .and_then(|rest| rest.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("<h1>Overview</h1>"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}
