//! The UDP socket under both daemons' QUIC endpoints: large kernel buffers (and a record
//! of what the kernel granted), and segmentation offload (GSO) batches that the kernel
//! always accepts.
//!
//! Why the cap: quinn hands the socket up to 10 datagrams of the current path MTU in one
//! `sendmsg` with `UDP_SEGMENT`. Linux refuses a batch whose total exceeds one UDP
//! datagram (65 507 bytes of payload over IPv4) with `EMSGSIZE`, and quinn-udp drops such
//! a batch silently (it treats `EMSGSIZE` as a failed MTU probe). With jumbo-sized packets
//! (8952 bytes × 10 = 89 520) every full batch vanished: quinn counted the packets as lost
//! although no network dropped them, cut its congestion window, and black-hole detection
//! pinned the MTU at 1200 bytes. The socket here reports at most as many segments per
//! batch as fit under that total for the largest payload the endpoint may send.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Largest total payload of one GSO batch: one IPv4 UDP datagram (65 535 − 20 − 8).
pub const MAX_GSO_BATCH_BYTES: usize = 65_507;

/// Largest UDP payload either daemon sends or accepts: a 9000-byte MTU less IPv6 and UDP
/// headers.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

/// Largest UDP payload that crosses a path with a 1500-byte MTU (less IPv6 and UDP
/// headers): the default upper bound of path MTU discovery on a wide-area path.
pub const WAN_UDP_PAYLOAD: u16 = 1452;

/// Smallest UDP payload QUIC allows (RFC 9000 §14).
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// Kernel socket buffers asked for: a 10 Gbit/s burst is a few MB, far more than the
/// usual 208 KiB default. The kernel caps the request at `net.core.rmem_max` /
/// `net.core.wmem_max` (docs/operations.md says how to raise them).
pub const SOCKET_BUFFER: usize = 16 << 20;

/// GSO segments per batch for datagrams of at most `max_payload` bytes.
pub fn segments_for(max_payload: u16) -> usize {
    (MAX_GSO_BATCH_BYTES / usize::from(max_payload.max(MIN_UDP_PAYLOAD))).max(1)
}

/// Kernel buffer sizes: what was asked and what the kernel granted (Linux reports twice
/// the usable size; the figures here are as reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    pub requested: usize,
    pub recv: usize,
    pub send: usize,
}

impl Buffers {
    /// Whether the kernel granted much less than asked (Linux doubles a granted request,
    /// so a full grant reads as at least the request).
    pub fn capped(&self) -> bool {
        self.recv < self.requested || self.send < self.requested
    }

    /// Logs what the kernel granted, with a WARN naming the sysctls when it capped the
    /// request (a long fat path then loses throughput to socket-buffer drops).
    pub fn log(&self) {
        if self.capped() {
            tracing::warn!(
                requested = self.requested,
                recv = self.recv,
                send = self.send,
                "the kernel capped the UDP socket buffers; raise net.core.rmem_max and \
                 net.core.wmem_max to at least the requested size (docs/operations.md)"
            );
        } else {
            tracing::info!(recv = self.recv, send = self.send, "udp socket buffers");
        }
    }
}

/// A bound UDP socket for a quinn endpoint; see the module docs.
pub struct Socket {
    inner: Arc<dyn AsyncUdpSocket>,
    max_segments: AtomicUsize,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("inner", &self.inner)
            .field("max_segments", &self.max_segments.load(Ordering::Relaxed))
            .finish()
    }
}

impl Socket {
    /// Binds `addr` (dual-stack for a wildcard IPv6 address) with [`SOCKET_BUFFER`]-sized
    /// kernel buffers, for datagrams of at most `max_payload` bytes.
    pub fn bind(addr: SocketAddr, max_payload: u16) -> io::Result<(Arc<Socket>, Buffers)> {
        use socket2::{Domain, Protocol, Type};
        let socket =
            socket2::Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            // Accept IPv4-mapped peers too on a wildcard IPv6 socket.
            let _ = socket.set_only_v6(false);
        }
        // A refused size is not fatal: the kernel keeps its default, which is reported.
        // Above `rmem_max`/`wmem_max` a process with CAP_NET_ADMIN (root) may still force
        // the size: a receive buffer below the flow-control window overflows in bursts,
        // and those drops look like congestion to QUIC (halving the window on long links).
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        if socket.recv_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER);
        }
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        if socket.send_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER);
        }
        let buffers = Buffers {
            requested: SOCKET_BUFFER,
            recv: socket.recv_buffer_size().unwrap_or(0),
            send: socket.send_buffer_size().unwrap_or(0),
        };
        socket.bind(&addr.into())?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
        let inner = runtime.wrap_udp_socket(socket.into())?;
        let socket = Arc::new(Socket {
            inner,
            max_segments: AtomicUsize::new(1),
        });
        socket.set_max_payload(max_payload);
        Ok((socket, buffers))
    }

    /// Sizes GSO batches for datagrams of at most `max_payload` bytes (the upper bound of
    /// path MTU discovery of every connection on this socket).
    pub fn set_max_payload(&self, max_payload: u16) {
        self.max_segments
            .store(segments_for(max_payload), Ordering::Relaxed);
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner
            .max_transmit_segments()
            .min(self.max_segments.load(Ordering::Relaxed))
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_of_the_largest_datagrams_fits_in_one_udp_datagram() {
        for payload in [
            MIN_UDP_PAYLOAD,
            WAN_UDP_PAYLOAD,
            4000,
            MAX_UDP_PAYLOAD,
            65_000,
        ] {
            let n = segments_for(payload);
            assert!(n >= 1);
            assert!(
                n * usize::from(payload) <= MAX_GSO_BATCH_BYTES || n == 1,
                "{payload}"
            );
        }
        assert_eq!(segments_for(MAX_UDP_PAYLOAD), 7);
        assert!(
            segments_for(WAN_UDP_PAYLOAD) >= 10,
            "quinn's own cap of 10 stays the limit"
        );
    }
}
