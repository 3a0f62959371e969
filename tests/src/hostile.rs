//! A hostile agent, for attack tests: a small QUIC client that authenticates with a
//! real agent certificate issued by the harness's CA, speaks the wire protocol through
//! `skyferry_common::protocol` (the same frames as the real agent), and then misbehaves:
//! idle streams, huge offers it never sends, offers that cannot fit the disk, and
//! connections that send without ever reading.
//!
//! It uses the workspace's own TLS setup (`skyferry_common::tls::client_config`: rustls
//! with the ring provider, ALPN `skyferry/1`), so the receiver cannot tell it from an
//! agent until it misbehaves. Every attack runs until its `stop` token is cancelled and
//! counts what it did in [`Tally`]; an attack whose connection is closed by the
//! receiver connects again, as a determined attacker would.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use skyferry_common::protocol::{AgentHeartbeat, Hello, Message, Offer, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;

use crate::pair::Identity;

/// DNS name in the harness's receiver certificate.
const SERVER_NAME: &str = "skyferry-receiver";

/// Counts of what the attacks did, for the test's report.
#[derive(Debug, Default)]
pub struct Tally {
    pub connections: AtomicU64,
    pub connect_failures: AtomicU64,
    pub streams: AtomicU64,
    pub offers: AtomicU64,
    pub bytes_sent: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} connections ({} failed), {} streams, {} offers, {} bytes sent",
            get(&self.connections),
            get(&self.connect_failures),
            get(&self.streams),
            get(&self.offers),
            get(&self.bytes_sent)
        )
    }
}

/// A hostile agent with the identity of agent `agent_id`. Create it inside a tokio
/// runtime.
pub struct Hostile {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    server: SocketAddr,
    agent_id: String,
    pub tally: Arc<Tally>,
}

impl Hostile {
    pub fn new(server: SocketAddr, ca: &Path, identity: &Identity, agent_id: &str) -> Result<Self> {
        let client = skyferry_common::tls::client_config(
            ca,
            &identity.cert,
            &identity.key,
            Duration::from_secs(5),
        )
        .context("hostile agent: TLS config")?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("hostile agent: QUIC endpoint")?;
        Ok(Hostile {
            endpoint,
            client,
            server,
            agent_id: agent_id.to_owned(),
            tally: Arc::new(Tally::default()),
        })
    }

    /// A connection after the TLS handshake, before any hello.
    pub async fn handshake(&self) -> Result<quinn::Connection> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), self.server, SERVER_NAME)
            .context("hostile agent: connect")?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .context("hostile agent: handshake timed out")?
            .context("hostile agent: handshake")?;
        Tally::add(&self.tally.connections, 1);
        Ok(conn)
    }

    /// A connection that said `Hello` and got `Welcome`. It then heartbeats every
    /// second on the control stream (so the receiver keeps it) and never reads the
    /// receiver's heartbeats.
    pub async fn connect(&self, stop: &CancellationToken) -> Result<quinn::Connection> {
        self.connect_lane(stop, None).await
    }

    /// [`Hostile::connect`] with `lane` in the hello, as an agent that stripes its files
    /// over several connections says which of them this is.
    pub async fn connect_lane(
        &self,
        stop: &CancellationToken,
        lane: Option<skyferry_common::protocol::Lane>,
    ) -> Result<quinn::Connection> {
        let conn = self.handshake().await?;
        let (mut send, mut recv) = conn.open_bi().await.context("hostile agent: control")?;
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent_id: self.agent_id.clone(),
            capabilities: 0,
            lane,
        });
        send_frame(&mut send, &hello).await?;
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header))
            .await
            .context("hostile agent: no welcome")?
            .context("hostile agent: no welcome")?;
        if header[4] != 0x02 {
            bail!(
                "hostile agent: the receiver answered the hello with frame type {:#04x}",
                header[4]
            );
        }
        let stop = stop.clone();
        let keep = conn.clone();
        tokio::spawn(async move {
            // Holds the control stream's receive side open, unread.
            let _unread = recv;
            let mut seq = 0;
            loop {
                seq += 1;
                let hb = Message::AgentHeartbeat(AgentHeartbeat {
                    node_load: None,
                    seq,
                    pending_files: 0,
                    pending_bytes: 0,
                    oldest_pending_age_s: 0,
                    send_rate_bps: 0,
                });
                if send_frame(&mut send, &hb).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = keep.closed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(conn)
    }

    /// Runs `attack` on a hello'd connection, connecting again whenever the receiver
    /// closes it, until `stop`.
    async fn persist<F, Fut>(&self, stop: &CancellationToken, mut attack: F)
    where
        F: FnMut(quinn::Connection) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        while !stop.is_cancelled() {
            match self.connect(stop).await {
                Ok(conn) => {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = attack(conn.clone()) => {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = conn.closed() => {}
                    }
                }
                Err(_) => {
                    Tally::add(&self.tally.connect_failures, 1);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Opens up to `count` file streams on one connection and sends each two bytes (half
    /// a frame header), then nothing: idle streams that hold whatever the receiver gives
    /// a stream. Streams the receiver closes are opened again.
    pub async fn idle_streams(&self, count: usize, stop: &CancellationToken) {
        let tally = self.tally.clone();
        self.persist(stop, |conn| {
            let tally = tally.clone();
            async move {
                let mut held: Vec<tokio::task::JoinHandle<()>> = Vec::with_capacity(count);
                loop {
                    held.retain(|h| !h.is_finished());
                    if held.len() >= count {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    if send.write_all(&[0, 0]).await.is_err() {
                        return;
                    }
                    Tally::add(&tally.streams, 1);
                    // Held open until the receiver ends it.
                    held.push(tokio::spawn(async move {
                        let _send = send;
                        let _ = recv.received_reset().await;
                    }));
                }
            }
        })
        .await
    }

    /// Keeps `count` offers of `size` bytes in chunks of `chunk_size` open, each on its
    /// own stream, never sending a chunk and never reading the receiver's answer; an
    /// offer whose stream the receiver ends is made again. One offer every `pace`.
    pub async fn held_offers(
        &self,
        count: usize,
        size: u64,
        chunk_size: u32,
        pace: Duration,
        stop: &CancellationToken,
    ) {
        let tally = self.tally.clone();
        let next = Arc::new(AtomicU64::new(0));
        self.persist(stop, |conn| {
            let (tally, next) = (tally.clone(), next.clone());
            async move {
                let mut held: Vec<tokio::task::JoinHandle<()>> = Vec::new();
                loop {
                    held.retain(|h| !h.is_finished());
                    if held.len() >= count {
                        tokio::time::sleep(pace).await;
                        continue;
                    }
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let offer = offer(&format!("attack/held-{n}.fits"), size, chunk_size, n);
                    if send_frame(&mut send, &offer).await.is_err() {
                        return;
                    }
                    Tally::add(&tally.streams, 1);
                    Tally::add(&tally.offers, 1);
                    // Wait (without reading) until the receiver ends the stream.
                    held.push(tokio::spawn(async move {
                        let _send = send;
                        let _ = recv.received_reset().await;
                    }));
                    tokio::time::sleep(pace).await;
                }
            }
        })
        .await
    }

    /// Opens a real file session (an offer of `size` bytes in 4 MiB chunks, answered
    /// `Resume`) and then keeps `count` stripe streams attached to it, each sending half
    /// of a 4 MiB chunk frame and then nothing, never reading; a stripe whose stream the
    /// receiver ends is attached again. One attach every `pace`.
    pub async fn held_stripes(
        &self,
        count: usize,
        size: u64,
        pace: Duration,
        stop: &CancellationToken,
    ) {
        let tally = self.tally.clone();
        let next = Arc::new(AtomicU64::new(0));
        self.persist(stop, |conn| {
            let (tally, next) = (tally.clone(), next.clone());
            async move {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let path = format!("attack/striped-{n}.fits");
                let Ok((answer, _session, _replies)) =
                    offer_with_chunks(&conn, &path, size, 4 << 20).await
                else {
                    return;
                };
                Tally::add(&tally.offers, 1);
                if !matches!(answer, Message::Resume(_)) {
                    tokio::time::sleep(pace).await;
                    return;
                }
                // A frame header for a 4 MiB chunk, and half of its body.
                let mut half = vec![0u8; 2 << 20];
                half[..4].copy_from_slice(&((4u32 << 20) + 42).to_be_bytes());
                half[4] = 0x12;
                let mut held: Vec<tokio::task::JoinHandle<()>> = Vec::new();
                loop {
                    held.retain(|h| !h.is_finished());
                    if held.len() >= count {
                        tokio::time::sleep(pace).await;
                        continue;
                    }
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    let attach =
                        Message::Attach(skyferry_common::protocol::Attach { path: path.clone() });
                    if send_frame(&mut send, &attach).await.is_err() {
                        return;
                    }
                    Tally::add(&tally.streams, 1);
                    let (tally, half) = (tally.clone(), half.clone());
                    held.push(tokio::spawn(async move {
                        if send.write_all(&half).await.is_ok() {
                            Tally::add(&tally.bytes_sent, half.len() as u64);
                        }
                        let _send = send;
                        let _ = recv.received_reset().await;
                    }));
                    tokio::time::sleep(pace).await;
                }
            }
        })
        .await
    }

    /// Offers a file of `size` bytes every `every` (reading the answer), e.g. one that
    /// fits `max_file_size` but not the receiver's disk.
    pub async fn repeated_offers(&self, size: u64, every: Duration, stop: &CancellationToken) {
        let tally = self.tally.clone();
        let next = Arc::new(AtomicU64::new(0));
        self.persist(stop, |conn| {
            let (tally, next) = (tally.clone(), next.clone());
            async move {
                loop {
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        return;
                    };
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let offer = offer(&format!("attack/oversize-{n}.fits"), size, 4 << 20, n);
                    if send_frame(&mut send, &offer).await.is_err() {
                        return;
                    }
                    Tally::add(&tally.streams, 1);
                    Tally::add(&tally.offers, 1);
                    let _ = tokio::time::timeout(every, recv.read_to_end(1 << 20)).await;
                    let _ = send.finish();
                    tokio::time::sleep(every).await;
                }
            }
        })
        .await
    }

    /// `count` connections at once, each of which opens `streams` streams and pushes
    /// `bytes_per_stream` bytes of junk on each without reading anything, and without
    /// ever saying hello (the control stream it opens stays silent). A connection the
    /// receiver closes (or refuses) is opened again.
    pub async fn unread_connections(
        self: &Arc<Self>,
        count: usize,
        streams: usize,
        bytes_per_stream: usize,
        stop: &CancellationToken,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (me, stop) = (self.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let Ok(conn) = me.handshake().await else {
                        Tally::add(&me.tally.connect_failures, 1);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = me.flood(&conn, streams, bytes_per_stream) => {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = conn.closed() => {}
                    }
                    // Eight connections, not a connection flood: a short pause after the
                    // receiver closed (or refused) one.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn flood(&self, conn: &quinn::Connection, streams: usize, bytes_per_stream: usize) {
        // Stream 0 (where the hello belongs) is opened but carries nothing until the
        // next stream's data makes it exist for the receiver.
        let Ok(_control) = conn.open_bi().await else {
            return;
        };
        let junk = vec![0x5a_u8; 64 << 10];
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                break;
            };
            Tally::add(&self.tally.streams, 1);
            let (junk, tally) = (junk.clone(), self.tally.clone());
            writers.spawn(async move {
                let _unread = recv;
                let mut sent = 0;
                while sent < bytes_per_stream {
                    if send.write_all(&junk).await.is_err() {
                        return;
                    }
                    sent += junk.len();
                    Tally::add(&tally.bytes_sent, junk.len() as u64);
                }
                // Hold the stream open: nothing is read on either side.
                let _ = send.stopped().await;
            });
        }
        while writers.join_next().await.is_some() {}
    }
}

/// An offer of `path` with a made-up hash (never sent, so never checked).
pub fn offer(path: &str, size: u64, chunk_size: u32, salt: u64) -> Message {
    Message::Offer(Offer {
        path: path.to_owned(),
        size,
        mtime_ns: 1_700_000_000_000_000_000 + salt as i64,
        file_hash: Some(*blake3::hash(&salt.to_be_bytes()).as_bytes()),
        chunk_size,
    })
}

/// Encodes one frame with the protocol's own codec and writes it.
pub async fn send_frame(send: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf)
        .with_context(|| format!("hostile agent: encoding a {}", msg.kind()))?;
    send.write_all(&buf)
        .await
        .with_context(|| format!("hostile agent: sending a {}", msg.kind()))
}

/// Offers `path` (`size` bytes, 64 KiB chunks) on a new stream of `conn` and returns the
/// receiver's first answer (`Resume`, `Reject`, `Ack`) with the stream, held open.
pub async fn offer_and_answer(
    conn: &quinn::Connection,
    path: &str,
    size: u64,
) -> Result<(
    Message,
    quinn::SendStream,
    skyferry_common::wire::FrameReader,
)> {
    offer_with_chunks(conn, path, size, 64 << 10).await
}

/// [`offer_and_answer`] with chunks of `chunk_size`.
pub async fn offer_with_chunks(
    conn: &quinn::Connection,
    path: &str,
    size: u64,
    chunk_size: u32,
) -> Result<(
    Message,
    quinn::SendStream,
    skyferry_common::wire::FrameReader,
)> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .context("hostile agent: open a stream")?;
    send_frame(&mut send, &offer(path, size, chunk_size, size)).await?;
    let mut reader =
        skyferry_common::wire::FrameReader::new(recv, skyferry_common::protocol::MAX_CONTROL_FRAME);
    let answer = tokio::time::timeout(Duration::from_secs(5), reader.read())
        .await
        .context("hostile agent: no answer to the offer within 5 s")?
        .context("hostile agent: reading the answer")?
        .context("hostile agent: the stream ended without an answer")?;
    Ok((answer, send, reader))
}
