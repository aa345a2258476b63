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
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// `recv(2)` into the spare capacity of `buf` (there must be some); its length grows by what
/// was read. A would-block is `ErrorKind::WouldBlock`: call it inside `try_io`.
#[inline]
pub(crate) fn recv_spare(s: impl AsFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    debug_assert!(buf.capacity() > buf.len());
    let (n, _) = rustix::net::recv(s, rustix::buffer::spare_capacity(buf), RecvFlags::empty())?;
    Ok(n)
}

/// `send(2)` of `data` (no `SIGPIPE`). A would-block is `ErrorKind::WouldBlock`: call it
/// inside `try_io`.
#[inline]
pub(crate) fn send(s: impl AsFd, data: &[u8]) -> io::Result<usize> {
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

/// Read into the spare capacity of `buf` (there must be some); 0 = EOF. A short read clears
/// the read readiness ([`poll_recv`]): one syscall less per message.
pub(crate) async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_some(stream, cx, buf)).await
}

/// [`read_some`] for `poll` code (a response body read by hyper).
pub(crate) fn poll_read_some(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<usize>> {
    let spare = buf.capacity() - buf.len();
    debug_assert!(spare > 0);
    poll_recv(stream, cx, spare, || recv_spare(stream, buf))
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

/// A client connection that joins the event loop only when it first has to wait, as HAProxy
/// does ("speculative I/O"): a request that is already in the socket when the connection is
/// accepted is read, and its response written, by plain system calls, so a connection that
/// closes without ever waiting (one request per connection) costs no `epoll_ctl` (`ADD` when
/// a socket is registered, `DEL` when it is dropped): 2 of its ~9 system calls.
#[derive(Debug)]
pub struct LazyTcp(Sock);

#[derive(Debug)]
enum Sock {
    /// Not in the event loop yet.
    Raw(std::net::TcpStream),
    Registered(TcpStream),
    /// Its registration failed: the socket is closed.
    Gone,
}

impl From<std::net::TcpStream> for LazyTcp {
    /// A socket not registered yet; it must be non-blocking.
    fn from(s: std::net::TcpStream) -> LazyTcp {
        LazyTcp(Sock::Raw(s))
    }
}

impl From<TcpStream> for LazyTcp {
    fn from(s: TcpStream) -> LazyTcp {
        LazyTcp(Sock::Registered(s))
    }
}

/// A TCP congestion control algorithm's name, as `setsockopt(TCP_CONGESTION)` takes it: 1 to
/// 15 characters of `[A-Za-z0-9_-]` (`cubic`, `reno`, `bbr`, …). Whether the kernel has it is
/// checked when it is put to use ([`set_upstream_congestion`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct CongestionControl(Box<str>);

impl CongestionControl {
    pub fn new(name: &str) -> Result<CongestionControl, String> {
        let ok = (1..=15).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(CongestionControl(name.into()))
        } else {
            Err(format!(
                "`{name}` is not a congestion control name (1 to 15 of A-Z a-z 0-9 _ -); \
                 the kernel offers: {}",
                available_congestion()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for CongestionControl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        CongestionControl::new(&name).map_err(serde::de::Error::custom)
    }
}

/// The sysctl `net.ipv4.NAME`, trimmed ("(unknown)" if unreadable).
fn net_ipv4(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(unknown)".to_owned())
}

/// `net.ipv4.tcp_congestion_control`: what new sockets get.
pub fn kernel_congestion() -> String {
    net_ipv4("tcp_congestion_control")
}

/// `net.ipv4.tcp_available_congestion_control`, for error messages.
fn available_congestion() -> String {
    net_ipv4("tcp_available_congestion_control")
}

/// The congestion control of connections to endpoints (`upstream_congestion`); empty: the
/// kernel's default.
static UPSTREAM_CONGESTION: arc_swap::ArcSwapOption<CongestionControl> =
    arc_swap::ArcSwapOption::const_empty();

/// Use `cc` for the connections [`connect_upstream`] opens from now on (start-up; tests). The
/// kernel must accept it: tried on a throwaway socket first, so a module that is not loaded, or
/// one an unprivileged process may not pick (`net.ipv4.tcp_allowed_congestion_control`), is an
/// error here and not a silent fallback on every connection.
pub fn set_upstream_congestion(cc: Option<&CongestionControl>) -> io::Result<()> {
    if let Some(cc) = cc {
        let probe = TcpSocket::new_v4()?;
        rustix::net::sockopt::set_tcp_congestion(&probe, cc.as_str()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "upstream_congestion: the kernel refused `{}`: {e}; available: {}; allowed \
                     without CAP_NET_ADMIN: {}",
                    cc.as_str(),
                    available_congestion(),
                    net_ipv4("tcp_allowed_congestion_control")
                ),
            )
        })?;
    }
    UPSTREAM_CONGESTION.store(cc.cloned().map(std::sync::Arc::new));
    Ok(())
}

/// A TCP connection to an endpoint, with the configured congestion control
/// ([`set_upstream_congestion`]). Without one it is `TcpStream::connect`: the same system calls.
pub async fn connect_upstream(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = {
        let guard = UPSTREAM_CONGESTION.load();
        let Some(cc) = guard.as_deref() else {
            drop(guard);
            return TcpStream::connect(addr).await;
        };
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Checked at start; should the kernel refuse it now (a module unloaded since), the
        // connection still goes out, with the kernel's default.
        let _ = rustix::net::sockopt::set_tcp_congestion(&socket, cc.as_str());
        socket
    };
    socket.connect(addr).await
}

fn gone() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl LazyTcp {
    /// Not in the event loop yet.
    pub fn is_raw(&self) -> bool {
        matches!(self.0, Sock::Raw(_))
    }

    /// The socket in the event loop (registered now if it was not).
    #[inline]
    pub fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if !matches!(self.0, Sock::Registered(_)) {
            self.register()?;
        }
        match &mut self.0 {
            Sock::Registered(s) => Ok(s),
            _ => unreachable!("registered above"),
        }
    }

    /// Once per connection at most, and not at all for most of those that close after one
    /// request: out of line.
    /// Called only when not registered: raw, or gone after a failed registration.
    #[cold]
    #[inline(never)]
    fn register(&mut self) -> io::Result<()> {
        debug_assert!(!matches!(self.0, Sock::Registered(_)));
        let Sock::Raw(raw) = std::mem::replace(&mut self.0, Sock::Gone) else {
            return Err(gone());
        };
        self.0 = Sock::Registered(TcpStream::from_std(raw)?);
        Ok(())
    }

    /// [`LazyTcp::registered`], by value.
    pub fn into_registered(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        match self.0 {
            Sock::Registered(s) => Ok(s),
            _ => Err(gone()),
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match &self.0 {
            Sock::Raw(s) => s.set_nodelay(on),
            Sock::Registered(s) => s.set_nodelay(on),
            Sock::Gone => Err(gone()),
        }
    }

    /// Read into the spare capacity of `buf` (there must be some) without waiting:
    /// `WouldBlock` if nothing is there. On a registered socket, through `try_io`.
    pub(crate) fn try_recv_spare(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match &self.0 {
            Sock::Raw(s) => recv_spare(s, buf),
            Sock::Registered(s) => s.try_io(Interest::READABLE, || recv_spare(s, buf)),
            Sock::Gone => Err(gone()),
        }
    }

    /// Read into the spare capacity of `buf` (there must be some), waiting if need be (the
    /// socket is registered then); 0 = EOF.
    pub(crate) async fn recv_some(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        if let Sock::Raw(s) = &self.0 {
            match recv_spare(s, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
        read_some(self.registered()?, buf).await
    }

    /// Write all of `data`: by plain `send`s while they take it all, then (registered) waiting
    /// for writability as [`write_all`].
    pub(crate) async fn send_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut off = 0;
        if let Sock::Raw(s) = &self.0 {
            while off < data.len() {
                match send(s, &data[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if off == data.len() {
                return Ok(());
            }
        }
        write_all(self.registered()?, &data[off..]).await
    }
}

impl AsyncWrite for LazyTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Sock::Raw(s) = &self.0 {
            match send(s, data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
        }
        let s = &*self.registered()?;
        poll_send(s, cx, || send(s, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = match &self.0 {
            Sock::Raw(s) => socket2::SockRef::from(s),
            Sock::Registered(s) => socket2::SockRef::from(s),
            Sock::Gone => return Poll::Ready(Err(gone())),
        };
        Poll::Ready(s.shutdown(Shutdown::Write))
    }
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

    /// `upstream_congestion` reaches the sockets `connect_upstream` opens, and unset leaves them
    /// on the kernel's default; a name the kernel lacks is refused with the available ones.
    /// (The only test that sets it: others connecting meanwhile just get `reno`.)
    #[tokio::test]
    async fn upstream_congestion_is_set_on_connections_to_endpoints() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let kernel_default = kernel_congestion();
        let kernel_default = kernel_default.as_str();
        // `reno` is always built in; pick `cubic` if the default is already `reno`.
        let name = if kernel_default == "reno" {
            "cubic"
        } else {
            "reno"
        };
        let cc = CongestionControl::new(name).unwrap();

        set_upstream_congestion(Some(&cc)).unwrap();
        let (s, _) = tokio::join!(connect_upstream(addr), l.accept());
        let set = rustix::net::sockopt::tcp_congestion(s.unwrap()).unwrap();
        set_upstream_congestion(None).unwrap();
        let (s, _) = tokio::join!(connect_upstream(addr), l.accept());
        let unset = rustix::net::sockopt::tcp_congestion(s.unwrap()).unwrap();
        assert_eq!((set.as_str(), unset.as_str()), (name, kernel_default));

        let err = set_upstream_congestion(Some(&CongestionControl::new("nosuchcc").unwrap()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nosuchcc") && err.contains("available: "),
            "{err}"
        );
        assert!(
            UPSTREAM_CONGESTION.load().is_none(),
            "a refused name is not kept"
        );
    }

    #[test]
    fn congestion_names_are_checked() {
        for good in ["cubic", "bbr", "dctcp", "scalable_tcp-2"] {
            assert_eq!(CongestionControl::new(good).unwrap().as_str(), good);
        }
        for bad in ["", "cu bic", "a/b", "sixteen-chars-xx", "bbr\n"] {
            assert!(CongestionControl::new(bad).is_err(), "{bad:?}");
        }
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

    /// A `LazyTcp` stays out of the event loop while the bytes are there to read and the
    /// socket takes what is sent; it joins the loop to wait for bytes not sent yet, and then
    /// gets them.
    #[tokio::test]
    async fn lazy_tcp_registers_only_to_wait() {
        let l = crate::listener::bind_tcp("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let addr = l.get_ref().local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"first").await.unwrap();
        // Loopback delivers in the sender's system call, unless softirqs are deferred to
        // ksoftirqd on a loaded machine: a moment for that.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (raw, _) = crate::listener::accept(&l).await.unwrap();
        let mut lazy = LazyTcp::from(raw);
        // Already there: read without waiting.
        let mut buf = Vec::with_capacity(64);
        assert_eq!(lazy.recv_some(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf[..], b"first");
        assert!(lazy.is_raw(), "bytes already there need no registration");
        lazy.send_all(b"answer").await.unwrap();
        AsyncWriteExt::write_all(&mut lazy, b"!").await.unwrap();
        assert!(
            lazy.is_raw(),
            "a send the socket takes needs no registration"
        );
        let mut got = [0u8; 7];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer!");
        // Nothing there: `try_recv_spare` says so, and `recv_some` waits in the event loop.
        buf.clear();
        let e = lazy.try_recv_spare(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let later = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            client.write_all(b"later").await.unwrap();
            client
        });
        assert_eq!(lazy.recv_some(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf[..], b"later");
        assert!(!lazy.is_raw(), "waiting registered it");
        let mut client = later.await.unwrap();
        lazy.send_all(b"bye").await.unwrap();
        AsyncWriteExt::shutdown(&mut lazy).await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..], b"bye");
        let s = lazy.into_registered().unwrap();
        assert_eq!(s.peer_addr().unwrap(), client.local_addr().unwrap());
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
