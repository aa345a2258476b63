//! Batched UDP socket I/O for the data path: the DNS server and the L4 UDP proxy.
//!
//! What tokio's `UdpSocket` does not give:
//! - **Readable-only registration** ([`read_only`], for the UDP proxy's sockets). tokio registers
//!   every socket for edge-triggered `EPOLLOUT` as well, and a UDP socket signals it each time
//!   the kernel frees a sent datagram: every burst of sends woke the thread once more, for
//!   nothing (two `epoll_wait` per batch under `strace`). Sends here never wait for writability: a UDP send
//!   buffer drains on its own as datagrams are delivered, and a full one means drop (or, for
//!   DNS answers, retry a few times).
//! - **Batches** ([`RecvBatch`], [`send_batch`]): on Linux one `recvmmsg` takes up to a batch of
//!   datagrams off a socket and one `sendmmsg` sends a batch, instead of one system call per
//!   datagram. Elsewhere they fall back to one call per datagram.
//! - **A blocking batch receive** ([`RecvBatch::recv_wait`]) for a thread of its own (the DNS
//!   server's UDP workers): it waits in `recvmmsg` itself, so a batch costs one system call to
//!   receive instead of a readiness wait and a receive.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use nix::sys::socket::SockaddrStorage;

/// Most datagrams taken or sent per system call.
pub const MAX_BATCH: usize = 32;

/// A UDP socket in the event loop for READABLE only.
pub type ReadOnlyUdp = AsyncFd<std::net::UdpSocket>;

/// Register `udp` (non-blocking) with the current runtime's event loop for READABLE only.
#[allow(unsafe_code)]
pub fn read_only(udp: std::net::UdpSocket) -> io::Result<ReadOnlyUdp> {
    // SAFETY: the `UdpSocket` owns its descriptor: it stays open, and the same, until the
    // `AsyncFd` (which owns the socket and is never given another) drops it.
    unsafe { AsyncFd::register_with_interest(udp, Interest::READABLE) }.map_err(|e| e.into())
}

/// One received datagram's length, sender and whether it was cut short by its slot.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    /// `None` for a datagram without an IP sender address (it cannot be answered).
    pub peer: Option<SocketAddr>,
    pub truncated: bool,
}

/// Receive slots for up to [`MAX_BATCH`] datagrams and what the last [`RecvBatch::recv`] took.
/// Allocated once; receiving allocates nothing. Large slots cost address space, not memory:
/// the kernel touches only the pages a datagram fills.
pub struct RecvBatch {
    input: Box<[u8]>,
    slot: usize,
    received: Vec<Received>,
}

impl RecvBatch {
    /// `slots` (at most [`MAX_BATCH`]) slots of `slot` bytes each.
    pub fn new(slots: usize, slot: usize) -> RecvBatch {
        let slots = slots.clamp(1, MAX_BATCH);
        RecvBatch {
            input: vec![0; slots * slot].into_boxed_slice(),
            slot,
            received: Vec::with_capacity(slots),
        }
    }

    fn slots(&self) -> usize {
        self.input.len() / self.slot
    }

    /// Datagrams taken by the last `recv`.
    pub fn len(&self) -> usize {
        self.received.len()
    }

    /// Whether the last `recv` took nothing.
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// Datagram `i` of the last `recv` (its bytes, cut to the slot) and what was received.
    pub fn get(&self, i: usize) -> (&[u8], Received) {
        let r = self.received[i];
        let at = i * self.slot;
        (&self.input[at..at + r.len], r)
    }

    /// Take datagrams off the socket without waiting, until the slots are full: how many when
    /// they are, `WouldBlock` when the batch is short, with what was taken (maybe nothing) in
    /// the batch. So the caller, in `AsyncFdReadyGuard::try_io`, clears the socket's readiness
    /// after a short batch: the queue was empty when `recvmmsg` stopped, and the next datagram
    /// sets the readiness again, without a `recvmmsg` spent to learn `EAGAIN` on every wake-up.
    /// `recvmmsg` stops early only on an error, which is returned when nothing was taken.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, udp: &std::net::UdpSocket) -> io::Result<usize> {
        let taken = self.recvmmsg(udp, nix::sys::socket::MsgFlags::MSG_DONTWAIT)?;
        if taken < self.slots() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Wait (on a *blocking* socket, up to its read timeout) for at least one datagram, then
    /// take what else is queued, up to the slots, without waiting more: `recvmmsg` with
    /// `MSG_WAITFORONE`. One system call per batch where a readiness wait costs two
    /// (`epoll_wait`, then `recvmmsg`). `WouldBlock`/`TimedOut` when the timeout passed empty.
    #[cfg(target_os = "linux")]
    pub fn recv_wait(&mut self, udp: &std::net::UdpSocket) -> io::Result<usize> {
        self.recvmmsg(udp, nix::sys::socket::MsgFlags::MSG_WAITFORONE)
    }

    /// One `recvmmsg` into the slots: how many datagrams it took (an error only when none).
    #[cfg(target_os = "linux")]
    fn recvmmsg(
        &mut self,
        udp: &std::net::UdpSocket,
        flags: nix::sys::socket::MsgFlags,
    ) -> io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        let (n, slot) = (self.slots(), self.slot);
        self.received.clear();
        let mut slots = self.input.chunks_exact_mut(slot);
        let mut iovs: [[IoSliceMut<'_>; 1]; MAX_BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(slots.next().unwrap_or(&mut []))]);
        // Made per call: nix's headers hold raw pointers, so they are not `Send` and cannot live
        // in a task's future across an `.await` (two small allocations per batch).
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, None);
        let msgs = recvmmsg(
            udp.as_raw_fd(),
            &mut headers,
            iovs[..n].iter_mut(),
            flags,
            None,
        )?;
        for msg in msgs {
            self.received.push(Received {
                len: msg.bytes.min(slot),
                peer: msg.address.as_ref().and_then(to_socket_addr),
                truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
            });
        }
        Ok(self.received.len())
    }

    /// Elsewhere: one blocking `recv_from`, a batch of one.
    #[cfg(not(target_os = "linux"))]
    pub fn recv_wait(&mut self, udp: &std::net::UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let slot = self.slot;
        let (len, peer) = udp.recv_from(&mut self.input[..slot])?;
        self.received.push(Received {
            len: len.min(slot),
            peer: Some(peer),
            truncated: false,
        });
        Ok(1)
    }

    /// Elsewhere: `recv_from` until the socket is empty or the slots full.
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, udp: &std::net::UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let slot = self.slot;
        for s in self.input.chunks_exact_mut(slot) {
            let (len, peer) = match udp.recv_from(s) {
                Err(e) if !self.received.is_empty() && e.kind() != io::ErrorKind::WouldBlock => {
                    return Err(io::ErrorKind::WouldBlock.into())
                }
                r => r?,
            };
            self.received.push(Received {
                len: len.min(slot),
                peer: Some(peer),
                truncated: false,
            });
        }
        Ok(self.received.len())
    }
}

/// The sender of a received datagram; `None` for an empty or non-IP address.
#[cfg(target_os = "linux")]
fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    use nix::sys::socket::SockaddrLike;
    if a.len() == 0 {
        return None;
    }
    a.as_sockaddr_in()
        .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(*a)))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|a| SocketAddr::from(std::net::SocketAddrV6::from(*a)))
        })
}

/// No destination addresses: a batch on a connected socket.
pub const CONNECTED: [Option<SockaddrStorage>; MAX_BATCH] = [const { None }; MAX_BATCH];

/// Send `datagrams[i]` to `to[i]` (`None`: the connected peer) with one `sendmmsg`, at most
/// [`MAX_BATCH`], without waiting: how many the kernel took (it stops at the first that fails;
/// that error is returned when it is the first; a full send buffer is `WouldBlock`).
#[cfg(target_os = "linux")]
pub fn send_batch(
    fd: RawFd,
    datagrams: &[[IoSlice<'_>; 1]],
    to: &[Option<SockaddrStorage>],
) -> io::Result<usize> {
    use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, MultiHeaders};
    let count = datagrams.len().min(to.len()).min(MAX_BATCH);
    if count == 0 {
        return Ok(0);
    }
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(count, None);
    let none: [ControlMessage<'_>; 0] = [];
    let sent = sendmmsg(
        fd,
        &mut headers,
        &datagrams[..count],
        &to[..count],
        none,
        // Never wait, whatever the socket's mode (the DNS socket blocks in its receives).
        MsgFlags::MSG_DONTWAIT,
    )?;
    Ok(sent.count())
}

/// Elsewhere: one `send`/`send_to` per datagram.
#[cfg(not(target_os = "linux"))]
pub fn send_batch(
    fd: RawFd,
    datagrams: &[[IoSlice<'_>; 1]],
    to: &[Option<SockaddrStorage>],
) -> io::Result<usize> {
    use nix::sys::socket::{send, sendto, MsgFlags};
    let mut sent = 0;
    for (d, a) in datagrams.iter().zip(to) {
        let r = match a {
            Some(a) => sendto(fd, &d[0], a, MsgFlags::MSG_DONTWAIT),
            None => send(fd, &d[0], MsgFlags::MSG_DONTWAIT),
        };
        match r {
            Ok(_) => sent += 1,
            Err(e) if sent == 0 => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn batch_round_trip_keeps_order_sizes_and_senders() {
        let (a, b) = pair();
        let b_addr = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1 + i as usize * 97]).collect();
        let to: Vec<Option<SockaddrStorage>> = vec![Some(SockaddrStorage::from(b_addr)); 40];
        let mut sent = 0;
        while sent < payloads.len() {
            let iovs: Vec<[IoSlice<'_>; 1]> =
                payloads[sent..].iter().map(|p| [IoSlice::new(p)]).collect();
            let n = send_batch(a.as_raw_fd(), &iovs, &to[sent..]).unwrap();
            assert!((1..=MAX_BATCH).contains(&n));
            sent += n;
        }
        let mut batch = RecvBatch::new(MAX_BATCH, 4096);
        assert_eq!(batch.recv(&b).unwrap(), MAX_BATCH, "a full batch first");
        let short = batch.recv(&b);
        assert_eq!(short.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(batch.len(), 8, "the rest, marked short");
        let (d, r) = batch.get(7);
        assert_eq!(d, &payloads[39][..]);
        assert_eq!(r.peer, Some(a.local_addr().unwrap()));
        assert!(!r.truncated);
        assert_eq!(
            batch.recv(&b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(batch.is_empty());
    }

    #[test]
    fn datagram_beyond_its_slot_is_marked_truncated() {
        let (a, b) = pair();
        a.send_to(&[7u8; 3000], b.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4, 1024);
        let _ = batch.recv(&b);
        let (d, r) = batch.get(0);
        assert_eq!(d.len(), 1024);
        assert!(r.truncated);
    }

    #[test]
    fn connected_socket_batch_needs_no_addresses() {
        let (a, b) = pair();
        a.connect(b.local_addr().unwrap()).unwrap();
        let msgs = [b"one".as_slice(), b"two", b"three"];
        let iovs: Vec<[IoSlice<'_>; 1]> = msgs.iter().map(|m| [IoSlice::new(m)]).collect();
        assert_eq!(send_batch(a.as_raw_fd(), &iovs, &CONNECTED).unwrap(), 3);
        let mut batch = RecvBatch::new(8, 64);
        let _ = batch.recv(&b);
        let got: Vec<&[u8]> = (0..batch.len()).map(|i| batch.get(i).0).collect();
        assert_eq!(got, msgs);
    }

    /// The blocking receive takes what is queued once the first datagram is there, and comes
    /// back empty-handed at the socket's read timeout.
    #[test]
    fn blocking_batch_receive_takes_the_queue_and_times_out() {
        let (a, b) = pair();
        b.set_nonblocking(false).unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        for i in 0..3u8 {
            a.send_to(&[i; 5], b.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::new(8, 64);
        assert_eq!(batch.recv_wait(&b).unwrap(), 3);
        assert_eq!(batch.get(2).0, &[2u8; 5][..]);
        assert_eq!(batch.get(0).1.peer, Some(a.local_addr().unwrap()));
        let started = std::time::Instant::now();
        let e = batch.recv_wait(&b).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(40));
        assert!(batch.is_empty());
    }
}
