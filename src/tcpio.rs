//! TCP socket I/O for the data path, as direct system calls.
//!
//! tokio's `TcpStream` reads and writes through std, and std through glibc's `recv` and `send`,
//! which are thread-cancellation points: glibc switches asynchronous cancellation on and off
//! (an atomic read-modify-write each) around every call. meshgate never cancels threads, and
//! a proxied small message costs two receives and two sends, so here the calls are made by
//! rustix (`linux_raw`: the `syscall` instruction, nothing around it). The sockets stay
//! tokio's: readiness comes from its event loop, and an `EAGAIN` clears it through
//! [`TcpStream::try_io`] as tokio's own calls do.
//!
//! [`RawTcp`] is a `TcpStream` whose `AsyncRead`/`AsyncWrite` use these calls: the transport
//! under TLS (rustls reads and writes records through it) and HTTP/2.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// `recv(2)` into the spare capacity of `buf` (there must be some); its length grows by what
/// was read. A would-block is `ErrorKind::WouldBlock`: call it inside `try_io`.
#[inline]
pub(crate) fn recv_spare(s: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    debug_assert!(buf.capacity() > buf.len());
    let (n, _) = rustix::net::recv(s, rustix::buffer::spare_capacity(buf), RecvFlags::empty())?;
    Ok(n)
}

/// `send(2)` of `data` (no `SIGPIPE`). A would-block is `ErrorKind::WouldBlock`: call it
/// inside `try_io`.
#[inline]
pub(crate) fn send(s: &TcpStream, data: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(s, data, SendFlags::NOSIGNAL)?)
}

/// Receive once `s` is readable: `recv` reads up to `want` bytes and returns how many (0 =
/// EOF).
///
/// A read shorter than `want` proves the receive queue drained, so it also clears the read
/// readiness, with the readiness tick taken *before* the read, as tokio itself does on
/// `EAGAIN` (bytes arriving meanwhile still wake the task): the next read waits in the event
/// loop instead of costing a `recv` that fails with `EAGAIN`, one system call less per message.
pub(crate) fn poll_recv(
    s: &TcpStream,
    cx: &mut Context<'_>,
    want: usize,
    mut recv: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        let mut got = 0;
        let read = s.try_io(Interest::READABLE, || {
            got = recv()?;
            if got > 0 && got < want {
                // Drained: clear the readiness.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        match read {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                // Our own marker from above (a bare `ErrorKind`, nothing on the heap): forgotten,
                // not dropped. Since the global allocator is meshgate's ([`crate::heap`]), the
                // drop's code for boxed errors is inlined here and cost ~20 instructions per read
                // (callgrind `l4`: 3,198 → 3,158 per request).
                std::mem::forget(e);
                return Poll::Ready(Ok(got));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Send once `s` is writable: `send` writes and returns how many bytes went out; a
/// would-block clears the write readiness and waits again.
pub(crate) fn poll_send(
    s: &TcpStream,
    cx: &mut Context<'_>,
    mut send: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_write_ready(cx))?;
        match s.try_io(Interest::WRITABLE, &mut send) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Write all of `data`, waiting for writability through the socket's own writer waker slot
/// (no waiter node in the future; only one future may wait on a socket's write side). Kept
/// apart from [`poll_send`]: a `poll_fn` around it makes the idle L4 pair's future larger.
pub(crate) async fn write_all(to: &TcpStream, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
        match to.try_io(Interest::WRITABLE, || send(to, &data[off..])) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A `TcpStream` whose `AsyncRead` and `AsyncWrite` are direct system calls; a short read
/// clears the read readiness ([`poll_recv`]).
#[derive(Debug)]
pub struct RawTcp(pub TcpStream);

impl AsyncRead for RawTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &self.0;
        let want = buf.remaining();
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        // Free after the first call: rustls reads into an initialized buffer.
        let dst = buf.initialize_unfilled();
        let got = ready!(poll_recv(s, cx, want, || {
            Ok(rustix::net::recv(s, &mut *dst, RecvFlags::empty())?.0)
        }))?;
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RawTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_send(&self.0, cx, || send(&self.0, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_send(&self.0, cx, || Ok(rustix::io::writev(&self.0, bufs)?))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.0).shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Bytes cross both ways through `RawTcp` (plain and vectored writes), a large write is
    /// completed across would-blocks, and shutdown delivers EOF.
    #[tokio::test]
    async fn raw_tcp_moves_bytes_and_ends() {
        let (a, b) = pair().await;
        let (mut a, mut b) = (RawTcp(a), RawTcp(b));
        a.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let n = b
            .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .await
            .unwrap();
        assert_eq!(n, 4);
        let mut got = [0u8; 4];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        // More than the socket buffers hold: the writer must wait for the reader.
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&big).await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut all = Vec::new();
        b.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), expect.len());
        assert!(all == expect);
        drop(writer.await.unwrap());
    }

    /// `recv_spare` and `write_all` on plain tokio sockets; EOF reads 0.
    #[tokio::test]
    async fn recv_spare_and_write_all() {
        async fn recv(s: &TcpStream) -> (usize, Vec<u8>) {
            let mut buf = Vec::with_capacity(16);
            loop {
                s.readable().await.unwrap();
                match s.try_io(Interest::READABLE, || recv_spare(s, &mut buf)) {
                    Ok(n) => return (n, buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let (a, b) = pair().await;
        write_all(&a, b"xyz").await.unwrap();
        let (n, buf) = recv(&b).await;
        assert_eq!((n, &buf[..]), (3, &b"xyz"[..]));
        drop(a);
        assert_eq!(recv(&b).await.0, 0);
    }
}
