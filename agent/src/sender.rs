//! The sender: one QUIC connection to the receiver (reconnected with capped exponential
//! backoff), the control stream with heartbeats both ways, and the dispatch of pending
//! files from the journal onto parallel streams; quinn's statistics of the connection are
//! copied into the metrics every second.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use skyferry_common::config::AgentConfig;
use skyferry_common::protocol::{
    AgentHeartbeat, Hello, Message, StorageState, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use skyferry_common::wire::{FrameReader, FrameWriter};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::journal::Journal;
use crate::metrics::{Metrics, QuicSample};
use crate::upload::{record, upload, UploadContext};

pub struct Sender {
    pub config: AgentConfig,
    /// The TLS identity, loaded and checked before the daemon started.
    pub client: quinn::ClientConfig,
    pub journal: Arc<Mutex<Journal>>,
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pub tally: Arc<crate::tally::Tally>,
    pub grace: Duration,
}

impl Sender {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let t = &self.config.transfer;
        let mut endpoint = skyferry_common::tls::endpoint(SocketAddr::from(([0u16; 8], 0)), None)
            .or_else(|_| skyferry_common::tls::endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), None))
            .context("opening a UDP socket")?;
        endpoint.set_default_client_config(self.client.clone());

        let mut backoff = t.reconnect_min;
        while !shutdown.is_cancelled() {
            match self.connect(&endpoint).await {
                Ok((conn, control)) => {
                    backoff = t.reconnect_min;
                    self.metrics.connects.inc();
                    self.metrics.connected.set(1);
                    let span = tracing::info_span!("conn", remote = %conn.remote_address());
                    let sampled = CancellationToken::new();
                    let sampler = tokio::spawn(sample_quic(
                        conn.clone(),
                        self.metrics.clone(),
                        sampled.clone(),
                    ));
                    let why = self
                        .connected(&conn, control, &shutdown)
                        .instrument(span)
                        .await;
                    self.metrics.connected.set(0);
                    sampled.cancel();
                    let _ = sampler.await; // it only copies numbers; a panic would show in the log
                    let path = conn.stats().path;
                    info!(
                        rtt = ?path.rtt,
                        cwnd = path.cwnd,
                        lost_packets = path.lost_packets,
                        congestion_events = path.congestion_events,
                        mtu = path.current_mtu,
                        "connection ended"
                    );
                    if shutdown.is_cancelled() {
                        conn.close(0u32.into(), b"agent shutting down");
                        break;
                    }
                    self.metrics.disconnects.inc();
                    warn!(reason = %why, "disconnected from the receiver; reconnecting");
                }
                Err(e) => {
                    warn!(error = format!("{e:#}"), retry_in = ?backoff, "cannot connect to the receiver");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(t.reconnect_max);
                }
            }
        }
        endpoint.wait_idle().await;
        Ok(())
    }

    /// Connects, authenticates and exchanges hello/welcome.
    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
    ) -> anyhow::Result<(quinn::Connection, (FrameReader, FrameWriter))> {
        let r = &self.config.receiver;
        let addr = tokio::net::lookup_host(&r.address)
            .await
            .with_context(|| format!("resolving {}", r.address))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", r.address))?;
        let conn = endpoint
            .connect(addr, &r.server_name)
            .context("starting the connection")?
            .await
            .map_err(|e| explain(e.to_string(), &r.address))?;
        let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv, MAX_CONTROL_FRAME);
        writer
            .send(&Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                agent_id: self.config.id.clone(),
                capabilities: 0,
            }))
            .await
            .context("sending hello")?;
        let reply = tokio::time::timeout(Duration::from_secs(10), reader.read())
            .await
            .context("no welcome from the receiver within 10s")?
            .map_err(|e| {
                let text = conn.close_reason().map_or(e.to_string(), |r| r.to_string());
                explain(text, &r.address)
            })?;
        match reply {
            Some(Message::Welcome(w)) => {
                info!(receiver = %w.receiver_id, addr = %addr, "connected");
                Ok((conn, (reader, writer)))
            }
            Some(Message::Refuse(r)) => {
                error!(code = %r.code, reason = %r.reason, "the receiver refused this agent");
                bail!("receiver refused this agent: {} ({})", r.reason, r.code)
            }
            Some(other) => bail!("receiver answered hello with a {} frame", other.kind()),
            None => bail!("receiver closed the control stream during hello"),
        }
    }

    /// Runs one connection until it is lost or shutdown; returns why it ended.
    async fn connected(
        &self,
        conn: &quinn::Connection,
        (reader, writer): (FrameReader, FrameWriter),
        shutdown: &CancellationToken,
    ) -> String {
        let lost = CancellationToken::new();
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat = tokio::spawn(
            heartbeat(
                reader,
                writer,
                self.journal.clone(),
                self.config.transfer.heartbeat_interval,
                lost.clone(),
                paused.clone(),
                self.metrics.clone(),
            )
            .in_current_span(),
        );
        let ctx = Arc::new(UploadContext {
            journal: self.journal.clone(),
            chunk_size: self.config.transfer.chunk_size,
            compression_level: self.config.transfer.compression_level,
            window: self.config.transfer.chunks_in_flight,
            metrics: self.metrics.clone(),
            tally: self.tally.clone(),
        });
        let parallel = self.config.transfer.parallel_files;
        let mut uploads = JoinSet::new();
        let why = loop {
            // Fill the free slots from the journal.
            if !paused.load(std::sync::atomic::Ordering::Relaxed) && uploads.len() < parallel {
                let journal = self.journal.clone();
                let want = parallel - uploads.len();
                let live_since = live_since_ns(self.config.transfer.live_window);
                let jobs = tokio::task::spawn_blocking(move || {
                    journal
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .claim(want, live_since)
                })
                .await;
                match jobs {
                    Ok(Ok(jobs)) => {
                        for job in jobs {
                            let (conn, ctx, metrics) =
                                (conn.clone(), ctx.clone(), self.metrics.clone());
                            let span = tracing::info_span!("file", path = %job.path);
                            uploads.spawn(
                                async move {
                                    metrics.files_in_flight.inc();
                                    let how = upload(&conn, &ctx, &job).await;
                                    metrics.files_in_flight.dec();
                                    let journal = ctx.journal.clone();
                                    let _ = tokio::task::spawn_blocking(move || {
                                        record(&journal, &job, &how)
                                    })
                                    .await;
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Ok(Err(e)) => error!(error = %e, "cannot read pending files from the journal"),
                    Err(e) => error!(error = %e, "journal task failed"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break "shutdown".to_string(),
                _ = lost.cancelled() => break "no heartbeat from the receiver for three intervals, or its control stream ended".to_string(),
                e = conn.closed() => break e.to_string(),
                Some(_) = uploads.join_next(), if !uploads.is_empty() => {}
                _ = self.wake.notified() => {}
                // Retries become due with time even when nothing new arrives.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        if shutdown.is_cancelled() && !uploads.is_empty() {
            info!(files = uploads.len(), grace = ?self.grace, "draining files in flight");
            let drained = tokio::time::timeout(self.grace, async {
                while uploads.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!("grace period over; unfinished files stay pending and resume next time");
            }
        }
        if lost.is_cancelled() {
            conn.close(2u32.into(), b"heartbeat lost");
        }
        uploads.shutdown().await;
        heartbeat.abort();
        // Interrupted uploads (aborted above) are still marked in flight: return them.
        let journal = self.journal.clone();
        let _ = tokio::task::spawn_blocking(move || {
            journal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .requeue_inflight()
        })
        .await;
        why
    }
}

/// How often quinn's statistics are copied into the metrics.
const QUIC_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Copies quinn's statistics of `conn` into the metrics every second until `done`, then
/// once more, so that the counters include the whole connection.
async fn sample_quic(conn: quinn::Connection, metrics: Arc<Metrics>, done: CancellationToken) {
    let mut last = QuicSample::default();
    let mut tick = tokio::time::interval(QUIC_SAMPLE_INTERVAL);
    loop {
        let end = tokio::select! {
            _ = done.cancelled() => true,
            _ = tick.tick() => false,
        };
        metrics
            .quic
            .observe(&mut last, QuicSample::from(&conn.stats()));
        if end {
            return;
        }
    }
}

/// Files modified after this instant are live (shipped before the backlog).
fn live_since_ns(window: Duration) -> i64 {
    skyferry_common::unix_time::now_ns().saturating_sub(window.as_nanos() as i64)
}

/// Sends the agent's heartbeat every interval and watches the receiver's: three missed
/// ones cancel `lost`. The receiver's storage state pauses or resumes dispatch.
async fn heartbeat(
    reader: FrameReader,
    mut writer: FrameWriter,
    journal: Arc<Mutex<Journal>>,
    interval: Duration,
    lost: CancellationToken,
    paused: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let read_task = tokio::spawn(async move {
        let mut reader = reader;
        while let Ok(Some(m)) = reader.read().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(interval);
    let mut last_heard = Instant::now();
    let mut seq = 0;
    let mut sent_before = metrics.bytes_sent.get();
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > interval * 3 {
                    warn!(silent_for = ?last_heard.elapsed(), "no heartbeat from the receiver for three intervals");
                    lost.cancel();
                    break;
                }
                seq += 1;
                let j = journal.clone();
                let counts = tokio::task::spawn_blocking(move || {
                    j.lock().unwrap_or_else(std::sync::PoisonError::into_inner).counts()
                })
                .await;
                let (pending_files, pending_bytes, oldest) = match counts {
                    Ok(Ok(c)) => (
                        c.get(crate::journal::State::Pending) + c.get(crate::journal::State::Inflight),
                        c.pending_bytes,
                        c.oldest_pending_ns,
                    ),
                    _ => (0, 0, None),
                };
                let now_ns = skyferry_common::unix_time::now_ns();
                let hb = AgentHeartbeat {
                    seq,
                    pending_files,
                    pending_bytes,
                    oldest_pending_age_s: oldest.map(|o| ((now_ns - o).max(0) / 1_000_000_000) as u64).unwrap_or(0),
                    send_rate_bps: {
                        let sent = metrics.bytes_sent.get();
                        let secs = last_tick.elapsed().as_secs_f64().max(0.001);
                        let rate = ((sent - sent_before) as f64 * 8.0 / secs) as u64;
                        sent_before = sent;
                        last_tick = Instant::now();
                        rate
                    },
                };
                if writer.send(&Message::AgentHeartbeat(hb)).await.is_err() {
                    break;
                }
            }
            msg = rx.recv() => match msg {
                Some(Message::ReceiverHeartbeat(hb)) => {
                    last_heard = Instant::now();
                    let full = hb.storage != StorageState::Ok;
                    let was = paused.swap(full, std::sync::atomic::Ordering::Relaxed);
                    if full && !was {
                        warn!(storage = ?hb.storage, free_bytes = hb.free_bytes, "receiver storage is not accepting writes; pausing sends");
                    } else if !full && was {
                        info!(free_bytes = hb.free_bytes, "receiver storage is back; resuming sends");
                    }
                }
                Some(other) => {
                    last_heard = Instant::now();
                    warn!(kind = other.kind(), "unexpected frame on the control stream; ignored");
                }
                None => {
                    warn!("the receiver closed the control stream");
                    lost.cancel();
                    break;
                }
            }
        }
    }
    read_task.abort();
}

/// Turns a failed handshake into a message an operator can act on. With TLS 1.3 the
/// receiver checks the agent's certificate after the agent's side of the handshake is
/// complete, so a refusal can surface while connecting or while waiting for the welcome.
fn explain(text: String, address: &str) -> anyhow::Error {
    let lower = text.to_lowercase();
    let hint = if lower.contains("certificate") || lower.contains("handshake failed") {
        "; the TLS handshake failed: either the receiver's certificate is not signed by the configured CA, or the receiver does not accept this agent's certificate (it must be issued by the receiver's CA: skyferry-receiver certs issue-agent)"
    } else if lower.contains("timed out") {
        "; no answer: is the receiver running and reachable over UDP?"
    } else {
        ""
    };
    anyhow!("connecting to {address}: {text}{hint}")
}
