//! A Redis server for the benchmarks: a private `redis-server` on a free 127.0.0.1 port
//! (no persistence), or the one `REDIS_URL` names.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The Redis server measured: a private one, or `REDIS_URL`'s.
pub struct RedisServer {
    pub url: String,
    addr: String,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer, Box<dyn std::error::Error>> {
        if let Ok(url) = std::env::var("REDIS_URL") {
            let addr = url
                .trim_start_matches("redis://")
                .trim_end_matches('/')
                .rsplit('@')
                .next()
                .unwrap_or("127.0.0.1:6379")
                .to_owned();
            return Ok(RedisServer {
                url,
                addr,
                child: None,
            });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server (or set REDIS_URL): {e}"))?;
        let server = RedisServer {
            url: format!("redis://127.0.0.1:{port}/"),
            addr: format!("127.0.0.1:{port}"),
            child: Some(child),
        };
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while server.stat("total_commands_processed").is_err() {
            if std::time::Instant::now() > give_up {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// A counter from `INFO stats`, over a plain socket (the `INFO` is counted by the next).
    pub fn stat(&self, name: &str) -> Result<u64, Box<dyn std::error::Error>> {
        let mut stream = TcpStream::connect(&self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"INFO stats\r\n")?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            reply.extend_from_slice(&chunk[..n]);
            let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let len: usize = String::from_utf8_lossy(&reply[1..end]).parse()?;
            if reply.len() >= end + 2 + len + 2 {
                break;
            }
        }
        String::from_utf8_lossy(&reply)
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no {name} in INFO stats").into())
    }

    /// The private server's process id (none for `REDIS_URL`'s).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
