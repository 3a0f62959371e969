//! QUIC transport settings and endpoints for both ends.
//!
//! The receiver's endpoint keeps two things stable across restarts of the process so
//! that an agent notices a restart at once (docs/protocol.md §2, "Receiver restarts"):
//! its stateless-reset key, derived from the receiver's TLS key file, and connection ids
//! that a new process recognises as not its own. An agent still sending on a connection
//! of the previous process then gets a stateless reset in answer to its next packet
//! instead of silence until three heartbeats have passed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::PeerLimits;
use crate::udp;

use super::TlsError;

/// QUIC transport tuned for a long fat pipe (10 Gbit/s × 15 ms ≈ 19 MB in flight): the
/// connection window covers the bandwidth-delay product with headroom, and so does each
/// stream's, so that one file alone can fill the link. Path MTU discovery climbs up to
/// `max_udp_payload` bytes per datagram (see [`crate::udp`] for the defaults).
pub fn transport(heartbeat: Duration, max_udp_payload: u16) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW as u32));
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Three missed heartbeats close the connection at the QUIC level too.
    let idle = heartbeat * 3;
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(heartbeat));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.clamp(udp::MIN_UDP_PAYLOAD, udp::MAX_UDP_PAYLOAD));
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The receiver's transport: [`transport`] with the windows and stream limit sized from
/// `limits`, so that what peers can make the receiver buffer is bounded by configuration
/// whatever they send: at most `limits.receive_window` of unread data per connection
/// (each stream at most 32 MiB of it) and `limits.max_streams_per_connection` streams.
/// The receiver only sends small frames (acknowledgements, `Resume`, heartbeats), so its
/// send window is small too. docs/protocol.md ("Limits and timeouts") gives the bound.
pub fn receiver_transport(heartbeat: Duration, limits: &PeerLimits) -> quinn::TransportConfig {
    let mut t = transport(heartbeat, udp::MAX_UDP_PAYLOAD);
    let window = limits.receive_window.min(u64::from(u32::MAX));
    t.max_concurrent_bidi_streams(limits.max_streams_per_connection.into());
    t.receive_window(quinn::VarInt::from_u32(window as u32));
    t.stream_receive_window(quinn::VarInt::from_u32(window.min(STREAM_WINDOW) as u32));
    t.send_window(RECEIVER_SEND_WINDOW);
    // No unreliable datagrams are used: accept none rather than buffer them.
    t.datagram_receive_buffer_size(None);
    t
}

/// Largest stream receive window (either side): one file's bandwidth-delay product at
/// 10 Gbit/s × 15 ms (19 MB) with headroom.
const STREAM_WINDOW: u64 = 32 << 20;

/// Receiver's send window per connection (bytes sent and not yet acknowledged).
const RECEIVER_SEND_WINDOW: u64 = 2 << 20;

/// A bound QUIC endpoint and the socket under it.
pub struct Bound {
    pub endpoint: quinn::Endpoint,
    /// Lets the owner resize GSO batches when it changes the MTU upper bound.
    pub socket: Arc<udp::Socket>,
    /// What the kernel granted for the socket buffers (for the daemon to log).
    pub buffers: udp::Buffers,
}

/// Context of the BLAKE3 key derivation for the stateless-reset key. A new context (v2)
/// would give every receiver a new key; a receiver restarted with another context
/// version is then not recognised by agents of the previous one until they time out.
const RESET_KEY_CONTEXT: &str = "skyferry stateless reset key v1";

/// Length of the connection ids the receiver issues.
const CID_LEN: usize = 8;

/// The stateless-reset key of a receiver whose TLS private key file holds `key_file`:
/// the same file gives the same key in every process, and nobody who lacks the file can
/// forge a reset for its connections. Rotating the TLS key rotates this key too.
pub fn reset_key(key_file: &[u8]) -> ring::hmac::Key {
    let secret = blake3::derive_key(RESET_KEY_CONTEXT, key_file);
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
}

/// An agent's QUIC endpoint on `addr` (normally an ephemeral port), sending GSO batches
/// sized for datagrams of up to `max_udp_payload` bytes (resizable through
/// [`Bound::socket`]).
pub fn client_endpoint(addr: SocketAddr, max_udp_payload: u16) -> std::io::Result<Bound> {
    let config = base_config(quinn::EndpointConfig::default())?;
    endpoint(config, None, addr, max_udp_payload)
}

/// The receiver's QUIC endpoint on `addr`, serving `server`. `key_file` is the receiver's
/// TLS private key file: its bytes seed the stateless-reset key ([`reset_key`]).
///
/// Connection ids are random ([`quinn_proto::RandomConnectionIdGenerator`], 8 bytes) rather
/// than quinn's default, which hashes them with a key drawn at start-up: a restarted
/// process would find the previous one's ids invalid and drop their packets without a
/// reset. Random ids from different processes collide with probability 2^-64 per pair.
pub fn server_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    key_file: &Path,
) -> Result<Bound, TlsError> {
    let key = std::fs::read(key_file).map_err(|error| TlsError::Read {
        path: key_file.to_owned(),
        error,
    })?;
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key(&key)));
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CID_LEN)));
    let listen = |error| TlsError::Listen { addr, error };
    let config = base_config(config).map_err(listen)?;
    endpoint(config, Some(server), addr, udp::MAX_UDP_PAYLOAD).map_err(listen)
}

/// What both ends share: jumbo-capable payload size accepted.
fn base_config(mut config: quinn::EndpointConfig) -> std::io::Result<quinn::EndpointConfig> {
    config
        .max_udp_payload_size(udp::MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(config)
}

fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
    max_udp_payload: u16,
) -> std::io::Result<Bound> {
    let (socket, buffers) = udp::Socket::bind(addr, max_udp_payload)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(config, server, socket.clone(), runtime)?;
    Ok(Bound {
        endpoint,
        socket,
        buffers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{client_config, init_ca, issue_agent, server_config};

    #[test]
    fn the_reset_key_depends_on_the_key_file_only() {
        let sign = |file: &[u8]| {
            ring::hmac::sign(&reset_key(file), b"connection id")
                .as_ref()
                .to_vec()
        };
        assert_eq!(sign(b"key A"), sign(b"key A"));
        assert_ne!(sign(b"key A"), sign(b"key B"));
    }

    /// A receiver's connection, then the receiver dies without a word and a new one
    /// listens on its port, deriving its reset key from the same key file or from
    /// another one. Returns how the agent's connection ended.
    async fn restart(same_key_file: bool) -> quinn::ConnectionError {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), &["skyferry-receiver".into()]).unwrap();
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, "another receiver's key").unwrap();
        let (agent_cert, agent_key) = issue_agent(dir.path(), "kiso-01", dir.path()).unwrap();
        // One-second heartbeats: the idle timeout (the fallback) is 3 s.
        let beat = Duration::from_secs(1);
        let (ca, cert, key) = (
            files.ca_cert.clone(),
            files.receiver_cert.clone(),
            files.receiver_key.clone(),
        );
        let server = move || server_config(&ca, &cert, &key, beat).unwrap();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));

        // The first process, on a runtime of its own: dropping that runtime before the
        // endpoint and connection handles ends it like kill -9 does, with no packet sent.
        let (listening, addr) = tokio::sync::oneshot::channel();
        let (crash, crashed) = tokio::sync::oneshot::channel::<()>();
        let (first_server, first_key) = (server.clone(), files.receiver_key.clone());
        let first = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let handles = rt.block_on(async move {
                let endpoint = server_endpoint(any, first_server(), &first_key)
                    .unwrap()
                    .endpoint;
                listening.send(endpoint.local_addr().unwrap()).unwrap();
                let conn = endpoint.accept().await.unwrap().await.unwrap();
                let _ = crashed.await;
                (endpoint, conn)
            });
            drop(rt);
            drop(handles);
        });
        let addr = addr.await.unwrap();
        let mut client = client_endpoint(any, udp::MAX_UDP_PAYLOAD).unwrap().endpoint;
        client.set_default_client_config(
            client_config(&files.ca_cert, &agent_cert, &agent_key, beat).unwrap(),
        );
        let conn = client
            .connect(addr, "skyferry-receiver")
            .unwrap()
            .await
            .unwrap();
        crash.send(()).unwrap();
        tokio::task::spawn_blocking(move || first.join().unwrap())
            .await
            .unwrap();

        let key_of_new = if same_key_file {
            &files.receiver_key
        } else {
            &other_key
        };
        let _second = server_endpoint(addr, server(), key_of_new)
            .unwrap()
            .endpoint;
        // The agent's next packet (this, or an acknowledgement or keep-alive the
        // connection sends by itself) goes to the new process.
        if let Ok(mut send) = conn.open_uni().await {
            let _ = send.write_all(b"anyone there?").await;
        }
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_receiver_resets_the_connections_of_its_previous_process() {
        let ended = restart(true).await;
        assert!(matches!(ended, quinn::ConnectionError::Reset), "{ended:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_from_a_receiver_without_the_key_is_ignored() {
        // Its token does not match: the agent waits for the idle timeout.
        let ended = restart(false).await;
        assert!(
            matches!(ended, quinn::ConnectionError::TimedOut),
            "{ended:?}"
        );
    }
}
