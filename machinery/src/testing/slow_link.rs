//! A TCP link to a real server that adds latency on command: the slow broker of a fault test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Chunks in flight per direction before the reading side waits (back pressure).
const IN_FLIGHT: usize = 256;

/// A proxy on `127.0.0.1` in front of a TCP server (RabbitMQ, Redis) that holds every chunk of
/// bytes, in both directions, for a latency set on command: each byte reaches the other side
/// that long after it was sent, in order, as over a slow network or from a broker that answers
/// late. A latency set while bytes are in flight applies to the bytes read after it (bytes
/// read before it still go first, in order). A read error ends the connection as a clean
/// close. Every connection through the link ends when it is dropped.
///
/// ```
/// use std::time::{Duration, Instant};
/// use machinery::testing::SlowLink;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// // An echo server stands for the broker.
/// let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let target = server.local_addr()?;
/// tokio::spawn(async move {
///     let (mut socket, _) = server.accept().await?;
///     let (mut read, mut write) = socket.split();
///     tokio::io::copy(&mut read, &mut write).await
/// });
/// let link = SlowLink::start(target).await?;
/// link.set_latency(Duration::from_millis(50));
/// let mut client = tokio::net::TcpStream::connect(link.addr()).await?;
/// let sent = Instant::now();
/// client.write_all(b"ping").await?;
/// let mut echo = [0u8; 4];
/// client.read_exact(&mut echo).await?;
/// assert_eq!(&echo, b"ping");
/// assert!(sent.elapsed() >= Duration::from_millis(100)); // 50 ms there, 50 ms back
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SlowLink {
    addr: SocketAddr,
    latency_us: Arc<AtomicU64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    /// Listens on a free port of `127.0.0.1` and forwards each connection to `target`, with no
    /// latency until [`set_latency`](Self::set_latency).
    pub async fn start(target: SocketAddr) -> std::io::Result<SlowLink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let latency_us = Arc::new(AtomicU64::new(0));
        let latency = latency_us.clone();
        let accepting = tokio::spawn(async move {
            // Dropped with this task: every connection's pumps are aborted with it.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let latency = latency.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return; // The client sees its connection closed.
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, latency.clone()),
                        pump(server_read, client_write, latency),
                    );
                });
            }
        });
        Ok(SlowLink {
            addr,
            latency_us,
            accepting,
        })
    }

    /// The address to connect to instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds every chunk read from now on for `one_way` before passing it on, in each
    /// direction: a request and its answer take twice `one_way` more than before.
    pub fn set_latency(&self, one_way: Duration) {
        let us = u64::try_from(one_way.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::SeqCst);
    }

    /// The one-way latency set last.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    /// let link = machinery::testing::SlowLink::start(target).await?;
    /// assert_eq!(link.latency(), Duration::ZERO);
    /// link.set_latency(Duration::from_millis(30));
    /// assert_eq!(link.latency(), Duration::from_millis(30));
    /// # Ok(())
    /// # }
    /// ```
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::SeqCst))
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies one direction of a connection, each chunk due `latency` after it was read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Arc<AtomicU64>) {
    let (chunks, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reading = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let hold = Duration::from_micros(latency.load(Ordering::SeqCst));
            let chunk = (Instant::now() + hold, buf[..n].to_vec());
            if chunks.send(chunk).await.is_err() {
                break;
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}
