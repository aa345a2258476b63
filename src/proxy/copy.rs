//! Moving bytes between two TCP sockets, both directions, with half-close and an idle timeout.
//!
//! On Linux each direction uses splice(2) through a pipe: socket → pipe → socket, so payload
//! bytes never enter user space. The pipe is made lazily on the first readable event, so an idle
//! connection costs no pipe (two fds and kernel buffers each). Elsewhere, or if splice is refused
//! (`EINVAL`), a buffered copy does the same job.
//!
//! Half-close: when one side sends FIN, the other side's write half is shut down and the opposite
//! direction keeps flowing until it ends too. An error in either direction ends both.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::clock;

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// One side failed (reset, broken pipe).
    Error,
}

/// Bytes moved downstream→upstream and upstream→downstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub up: u64,
    pub down: u64,
}

/// Largest chunk moved per splice call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// Proxy until both directions close, the idle timeout passes, or an error.
pub async fn bidirectional(
    downstream: &TcpStream,
    upstream: &TcpStream,
    idle: Option<Duration>,
) -> (Outcome, Transferred) {
    let activity = AtomicU64::new(clock::now_ms());
    let up = one_way(downstream, upstream, &activity);
    let down = one_way(upstream, downstream, &activity);
    let both = async { tokio::join!(up, down) };
    tokio::select! {
        (u, d) = both => {
            let outcome = if u.is_ok() && d.is_ok() { Outcome::Closed } else { Outcome::Error };
            let t = Transferred { up: *u.as_ref().unwrap_or(&0), down: *d.as_ref().unwrap_or(&0) };
            (outcome, t)
        }
        _ = idle_watch(idle, &activity) => (Outcome::Idle, Transferred::default()),
    }
}

/// Resolves once no byte moved for `idle`; never resolves without an idle timeout.
async fn idle_watch(idle: Option<Duration>, activity: &AtomicU64) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let idle_ms = idle.as_millis() as u64;
    loop {
        let last = activity.load(Ordering::Relaxed);
        let deadline = last + idle_ms;
        let now = clock::now_ms();
        if now >= deadline {
            return;
        }
        // Sleep until the earliest moment the connection could be idle, not on a fixed tick.
        tokio::time::sleep(Duration::from_millis(deadline - now)).await;
    }
}

/// Copy `from` → `to` until EOF (then shut down `to`'s write half) or an error.
async fn one_way(from: &TcpStream, to: &TcpStream, activity: &AtomicU64) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        match splice_one_way(from, to, activity).await {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
            other => return other,
        }
    }
    buffered_one_way(from, to, activity).await
}

#[cfg(target_os = "linux")]
async fn splice_one_way(from: &TcpStream, to: &TcpStream, activity: &AtomicU64) -> io::Result<u64> {
    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};

    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut pipe = None;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let (pipe_r, pipe_w) = match &pipe {
            Some(p) => p,
            None => pipe.insert(pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?),
        };
        let n = match from.try_io(Interest::READABLE, || {
            splice(from, None, &*pipe_w, None, CHUNK, flags).map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&*pipe_r, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        activity.store(clock::now_ms(), Ordering::Relaxed);
    }
}

/// Portable copy through a user-space buffer; allocated on first data, like the pipe.
async fn buffered_one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &AtomicU64,
) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf.resize(16 * 1024, 0);
        }
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(total);
        }
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        activity.store(clock::now_ms(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> (p1 | p2) <-> server
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&p1, &p2, None).await });
        let payload = vec![7u8; 300_000];
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), payload.len());
        // The other direction still works after the client's FIN.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let (outcome, t) = proxy.await.unwrap();
        assert_eq!(outcome, Outcome::Closed);
        assert_eq!(
            t,
            Transferred {
                up: 300_000,
                down: 5
            }
        );
    }

    #[tokio::test]
    async fn idle_timeout_ends_connection() {
        let (_client, p1) = pair().await;
        let (p2, _server) = pair().await;
        let started = std::time::Instant::now();
        let (outcome, _) = bidirectional(&p1, &p2, Some(Duration::from_millis(200))).await;
        assert_eq!(outcome, Outcome::Idle);
        assert!(started.elapsed() >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn buffered_fallback_copies() {
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let activity = AtomicU64::new(0);
        let copy = async { buffered_one_way(&p1, &p2, &activity).await.unwrap() };
        let io = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let (n, got) = tokio::join!(copy, io);
        assert_eq!(n, 5);
        assert_eq!(got, b"hello");
    }
}
