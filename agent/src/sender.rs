//! The sender: `transfer.connections` QUIC connections (lanes) to the receiver, each with
//! its own UDP socket, reconnected on its own with capped exponential backoff; per lane
//! the control stream with heartbeats both ways and the dispatch of pending files from
//! the journal onto parallel streams; quinn's statistics of each connection are copied
//! into the metrics every second.
//!
//! Files are striped over the lanes, a whole file on one lane: `transfer.parallel_files`
//! bounds the files in flight over all lanes, and a lane takes at most its share
//! (`parallel_files / connections`, rounded up), so that the files spread over the
//! congestion windows. A lane that is lost returns only its own files to the queue; the
//! other lanes keep sending and pick them up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use skyferry_common::config::AgentConfig;
use skyferry_common::protocol::{
    AgentHeartbeat, Hello, Lane, Message, Refuse, StorageState, CLOSE_HEARTBEAT_LOST,
    CLOSE_REFUSED, CLOSE_SHUTDOWN, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use skyferry_common::tls::{handshake_failure, Viewpoint};
use skyferry_common::udp;
use skyferry_common::wire::{FrameReader, FrameWriter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    /// Every lane's live connection (for uploads that stripe over them).
    pub lanes: Arc<crate::stripes::LaneTable>,
    pub pace: Arc<crate::pace::Pacer>,
}

impl Sender {
    /// Runs every lane until `shutdown`; fails only when a lane cannot open its socket.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let count = this.config.transfer.connections.max(1);
        // Tells the receiver which connections belong together (docs/protocol.md §2).
        let instance = instance_number();
        let slots = Arc::new(Semaphore::new(this.config.transfer.parallel_files));
        // Backlog and replays never take the last `live_slots` slots.
        let t = &this.config.transfer;
        let bulk_slots = Arc::new(Semaphore::new(
            t.parallel_files.saturating_sub(t.live_slots).max(1),
        ));
        let wakes: Vec<Arc<Notify>> = (0..count).map(|_| Arc::new(Notify::new())).collect();
        let mut lanes = JoinSet::new();
        for (index, wake) in (0..count).zip(&wakes) {
            let lane = Lane {
                instance,
                index,
                count,
            };
            let dispatch = Dispatch {
                slots: slots.clone(),
                bulk_slots: bulk_slots.clone(),
                share: this
                    .config
                    .transfer
                    .parallel_files
                    .div_ceil(usize::from(count)),
                wake: wake.clone(),
            };
            let span = tracing::info_span!("lane", lane = index);
            lanes.spawn(
                this.clone()
                    .lane(lane, dispatch, shutdown.clone())
                    .instrument(span),
            );
        }
        // Sources wake one waiter; every lane may have a free slot for the new files.
        let fan_out = {
            let (wake, wakes) = (this.wake.clone(), wakes.clone());
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    for w in &wakes {
                        w.notify_one();
                    }
                }
            })
        };
        let mut failure = None;
        while let Some(joined) = lanes.join_next().await {
            let error = match joined {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => anyhow!("a sender lane failed: {e}"),
            };
            failure.get_or_insert(error);
            shutdown.cancel();
        }
        fan_out.abort();
        // No lane runs any more: files still marked in flight (aborted after the grace)
        // return to the queue.
        let journal = this.journal.clone();
        let _ =
            tokio::task::spawn_blocking(move || lock_journal(&journal).requeue_inflight()).await;
        failure.map_or(Ok(()), Err)
    }

    /// One lane: its own socket and connection, reconnected until `shutdown`.
    async fn lane(
        self: Arc<Self>,
        lane: Lane,
        dispatch: Dispatch,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let t = &self.config.transfer;
        let bound = skyferry_common::tls::client_endpoint(
            SocketAddr::from(([0u16; 8], 0)),
            udp::WAN_UDP_PAYLOAD,
        )
        .or_else(|_| {
            skyferry_common::tls::client_endpoint(
                SocketAddr::from(([0, 0, 0, 0], 0)),
                udp::WAN_UDP_PAYLOAD,
            )
        })
        .context("opening a UDP socket")?;
        if lane.index == 0 {
            bound.buffers.log();
        }
        let (endpoint, socket) = (bound.endpoint, bound.socket);

        let mut backoff = t.reconnect_min;
        while !shutdown.is_cancelled() {
            match self.connect(&endpoint, &socket, lane).await {
                Ok((conn, control)) => {
                    backoff = t.reconnect_min;
                    self.metrics.connects.inc();
                    self.metrics.connected.inc();
                    let span = tracing::info_span!("conn", remote = %conn.remote_address());
                    let sampled = CancellationToken::new();
                    let sampler = tokio::spawn(sample_quic(
                        conn.clone(),
                        self.metrics.clone(),
                        sampled.clone(),
                        lane.index == 0,
                    ));
                    self.lanes.set(lane.index, Some(conn.clone()));
                    let why = self
                        .connected(&conn, lane.index, control, &dispatch, &shutdown)
                        .instrument(span)
                        .await;
                    self.lanes.set(lane.index, None);
                    self.metrics.connected.dec();
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
                        conn.close(CLOSE_SHUTDOWN.into(), b"agent shutting down");
                        break;
                    }
                    self.metrics.disconnects.inc();
                    warn!(reason = %why, "disconnected from the receiver; reconnecting");
                }
                Err(e) => {
                    match e {
                        // An operator must act (certificate, agent id, protocol version):
                        // retrying changes nothing until then.
                        ConnectFailure::Refused { refuse, via } => error!(
                            code = %refuse.code, reason = ?refuse.reason, via, retry_in = ?backoff,
                            "the receiver refused this agent"
                        ),
                        ConnectFailure::Other(e) => warn!(
                            error = format!("{e:#}"), retry_in = ?backoff,
                            "cannot connect to the receiver"
                        ),
                    }
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

    /// How this agent explains a failed handshake or connection.
    fn viewpoint(&self) -> Viewpoint<'_> {
        Viewpoint::Agent {
            server_name: &self.config.receiver.server_name,
            ca: &self.config.receiver.ca,
        }
    }

    /// Connects, authenticates and exchanges hello/welcome.
    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        socket: &udp::Socket,
        lane: Lane,
    ) -> Result<(quinn::Connection, (FrameReader, FrameWriter)), ConnectFailure> {
        let r = &self.config.receiver;
        let addr = tokio::net::lookup_host(&r.address)
            .await
            .with_context(|| format!("resolving {}", r.address))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", r.address))?;
        // The MTU upper bound of this connection, and GSO batches sized to match.
        let t = &self.config.transfer;
        let max_payload = t.max_udp_payload.unwrap_or(if addr.ip().is_loopback() {
            udp::MAX_UDP_PAYLOAD
        } else {
            udp::WAN_UDP_PAYLOAD
        });
        socket.set_max_payload(max_payload);
        let mut client = self.client.clone();
        client.transport_config(Arc::new(skyferry_common::tls::transport(
            t.heartbeat_interval,
            max_payload,
        )));
        let conn = endpoint
            .connect_with(client, addr, &r.server_name)
            .context("starting the connection")?
            .await
            .map_err(|e| {
                anyhow!(
                    "connecting to {}: {}",
                    r.address,
                    handshake_failure(&e, &self.viewpoint())
                )
            })?;
        // With TLS 1.3 the receiver checks this agent's certificate after our side of
        // the handshake is done: a refusal of it, like any refusal of the hello, shows
        // as the connection's end while the hello is under way.
        let ended = |doing: &str, e: &dyn std::fmt::Display| self.ended(&conn, doing, e);
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ended("opening the control stream", &e))?;
        let mut writer = FrameWriter::new(send);
        writer.set_priority(skyferry_common::wire::CONTROL_PRIORITY);
        let mut reader = FrameReader::new(recv, MAX_CONTROL_FRAME);
        writer
            .send(&Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                agent_id: self.config.id.clone(),
                capabilities: 0,
                lane: Some(lane),
            }))
            .await
            .map_err(|e| ended("sending hello", &e))?;
        let reply = tokio::time::timeout(Duration::from_secs(10), reader.read())
            .await
            .map_err(|_| anyhow!("no welcome from {} within 10s", r.address))?
            .map_err(|e| ended("waiting for the welcome", &e))?;
        match reply {
            Some(Message::Welcome(w)) => {
                info!(receiver = ?w.receiver_id, addr = %addr, "connected");
                Ok((conn, (reader, writer)))
            }
            Some(Message::Refuse(refuse)) => {
                // The receiver keeps the connection open until we have the frame.
                conn.close(CLOSE_REFUSED.into(), b"refusal received");
                Err(ConnectFailure::Refused {
                    refuse,
                    via: "refuse frame",
                })
            }
            Some(other) => {
                Err(anyhow!("receiver answered hello with a {} frame", other.kind()).into())
            }
            None => Err(ended(
                "waiting for the welcome",
                &"the control stream ended",
            )),
        }
    }

    /// Why the connection failed while `doing` something during the hello: its close
    /// reason when it is closed (a refusal in it is recovered), else `error`.
    fn ended(
        &self,
        conn: &quinn::Connection,
        doing: &str,
        error: &dyn std::fmt::Display,
    ) -> ConnectFailure {
        let address = &self.config.receiver.address;
        match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == CLOSE_REFUSED.into() =>
            {
                match Refuse::from_close_reason(&close.reason) {
                    Some(refuse) => ConnectFailure::Refused {
                        refuse,
                        via: "close reason",
                    },
                    None => ConnectFailure::Other(anyhow!(
                        "connecting to {address}: the receiver refused this agent (reason {:?})",
                        String::from_utf8_lossy(&close.reason)
                    )),
                }
            }
            Some(reason) => ConnectFailure::Other(anyhow!(
                "connecting to {address}: {}",
                handshake_failure(&reason, &self.viewpoint())
            )),
            None => ConnectFailure::Other(anyhow!("connecting to {address}: {doing}: {error}")),
        }
    }

    /// Runs one connection until it is lost or shutdown; returns why it ended.
    async fn connected(
        &self,
        conn: &quinn::Connection,
        lane: u16,
        (reader, writer): (FrameReader, FrameWriter),
        dispatch: &Dispatch,
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
            link: Arc::new(crate::link::LinkMeter::new(
                match self.config.transfer.compression_level {
                    0 => skyferry_common::compress::Mode::Off,
                    _ => self.config.transfer.compression,
                },
            )),
            window: self.config.transfer.chunks_in_flight(),
            metrics: self.metrics.clone(),
            tally: self.tally.clone(),
            buffers: Arc::new(crate::buffers::ChunkBuffers::new(POOLED_BUFFERS)),
            lanes: self.lanes.clone(),
            lane,
            pace: self.pace.clone(),
        });
        let mut uploads = Uploads::default();
        let why = loop {
            // Fill this lane's free slots from the journal, within the agent's total.
            let permits = if paused.load(std::sync::atomic::Ordering::Relaxed) {
                Vec::new()
            } else {
                dispatch.take(uploads.len())
            };
            if !permits.is_empty() {
                let journal = self.journal.clone();
                let want = permits.len();
                let mut bulk_permits = dispatch.take_bulk(want);
                let bulk = bulk_permits.len();
                let live_since = live_since_ns(self.config.transfer.live_window);
                let jobs = tokio::task::spawn_blocking(move || {
                    let mut j = lock_journal(&journal);
                    let rates = j.replay_rates()?;
                    Ok::<_, crate::journal::JournalError>((
                        j.claim_classes(want, bulk, live_since)?,
                        rates,
                    ))
                })
                .await;
                match jobs {
                    Ok(Ok((jobs, rates))) => {
                        self.pace.set_replay_rates(&rates);
                        // Permits beyond the jobs claimed are dropped, i.e. returned.
                        for (job, permit) in jobs.into_iter().zip(permits) {
                            let bulk_permit = match job.class {
                                crate::journal::Class::Live => None,
                                _ => bulk_permits.pop(),
                            };
                            let (conn, ctx, metrics) =
                                (conn.clone(), ctx.clone(), self.metrics.clone());
                            let span = tracing::info_span!("file", path = %job.path);
                            let id = job.id;
                            let task = async move {
                                let _permit = (permit, bulk_permit);
                                metrics.files_in_flight.inc();
                                let how = upload(&conn, &ctx, &job).await;
                                metrics.files_in_flight.dec();
                                let journal = ctx.journal.clone();
                                let done = matches!(
                                    how,
                                    crate::journal::Finish::Done | crate::journal::Finish::Present
                                );
                                let recorded = tokio::task::spawn_blocking(move || {
                                    record(&journal, &job, &how)
                                })
                                .await;
                                if done && matches!(recorded, Ok(true)) {
                                    metrics.files_done.inc();
                                }
                            };
                            uploads.spawn(id, task.instrument(span));
                        }
                    }
                    Ok(Err(e)) => error!(error = %e, "cannot read pending files from the journal"),
                    Err(e) => error!(error = %e, "journal task failed"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break "shutdown".to_string(),
                // The control stream also ends when the connection does (a stateless reset,
                // a close): then the connection's own reason is the one to report.
                _ = lost.cancelled() => break match conn.close_reason() {
                    Some(e) => handshake_failure(&e, &self.viewpoint()),
                    None => "no heartbeat from the receiver for three intervals, or its control stream ended".to_string(),
                },
                e = conn.closed() => break handshake_failure(&e, &self.viewpoint()),
                true = uploads.join_next(), if !uploads.is_empty() => {}
                _ = dispatch.wake.notified() => {}
                // Retries become due with time even when nothing new arrives.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        if shutdown.is_cancelled() && !uploads.is_empty() {
            info!(files = uploads.len(), grace = ?self.grace, "draining files in flight");
            let drained =
                tokio::time::timeout(self.grace, async { while uploads.join_next().await {} })
                    .await;
            if drained.is_err() {
                warn!("grace period over; unfinished files stay pending and resume next time");
            }
        }
        if lost.is_cancelled() {
            conn.close(CLOSE_HEARTBEAT_LOST.into(), b"heartbeat lost");
        }
        // Uploads on a closed connection end at once and record themselves (requeued);
        // the rest are aborted and returned to the queue here. Only this lane's files:
        // the other lanes' stay in flight.
        let aborted = uploads.abort_all().await;
        heartbeat.abort();
        if !aborted.is_empty() {
            let journal = self.journal.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut j = lock_journal(&journal);
                for id in aborted {
                    if let Err(e) = j.requeue_if_inflight(id) {
                        error!(error = %e, "cannot return an interrupted file to the queue");
                    }
                }
            })
            .await;
        }
        why
    }
}

/// Chunk buffers a connection keeps for reuse (16 × 4 MiB chunks at most while idle).
const POOLED_BUFFERS: usize = 16;

/// What a lane needs to take files: the agent-wide slots (`transfer.parallel_files`),
/// its own share of them, and its wake-up when sources queue new files.
struct Dispatch {
    slots: Arc<Semaphore>,
    /// The slots backlog and replay files may use (`parallel_files - live_slots`).
    bulk_slots: Arc<Semaphore>,
    share: usize,
    wake: Arc<Notify>,
}

impl Dispatch {
    /// Slots for as many new files as this lane (holding `held`) may start now.
    fn take(&self, held: usize) -> Vec<OwnedSemaphorePermit> {
        let want = self.share.saturating_sub(held);
        std::iter::from_fn(|| self.slots.clone().try_acquire_owned().ok())
            .take(want)
            .collect()
    }
}

impl Dispatch {
    /// Up to `want` of the slots backlog and replays may use.
    fn take_bulk(&self, want: usize) -> Vec<OwnedSemaphorePermit> {
        std::iter::from_fn(|| self.bulk_slots.clone().try_acquire_owned().ok())
            .take(want)
            .collect()
    }
}

/// A lane's upload tasks, with the journal id of each file.
#[derive(Default)]
struct Uploads {
    set: JoinSet<()>,
    jobs: HashMap<tokio::task::Id, i64>,
}

impl Uploads {
    fn spawn(&mut self, job: i64, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.jobs.insert(handle.id(), job);
    }

    fn len(&self) -> usize {
        self.set.len()
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Waits for one upload to end; `false` when there are none.
    async fn join_next(&mut self) -> bool {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => {
                self.jobs.remove(&id);
                true
            }
            Some(Err(e)) => {
                if e.is_panic() {
                    error!(error = %e, "an upload task panicked");
                }
                // A panicked task recorded nothing: its file is returned by
                // `abort_all`, like an aborted one.
                true
            }
            None => false,
        }
    }

    /// Aborts what is still running and returns the journal ids of the files whose
    /// upload did not record its end.
    async fn abort_all(mut self) -> Vec<i64> {
        self.set.abort_all();
        while let Some(joined) = self.set.join_next_with_id().await {
            if let Ok((id, ())) = joined {
                self.jobs.remove(&id);
            }
        }
        self.jobs.into_values().collect()
    }
}

/// A number for this agent process, different for every start (and from any other
/// process with the same agent id): from the kernel's random source, else from the
/// process id and the clock.
fn instance_number() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(&skyferry_common::unix_time::now_ns().to_le_bytes());
        bytes.copy_from_slice(&h.finalize().as_bytes()[..8]);
    }
    u64::from_le_bytes(bytes)
}

pub(crate) fn lock_journal(journal: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    journal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often quinn's statistics are copied into the metrics.
const QUIC_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Copies quinn's statistics of `conn` into the metrics every second until `done`, then
/// once more, so that the counters include the whole connection. The gauges (RTT,
/// congestion window, MTU) come from one lane only: with `gauges` false, only counters.
async fn sample_quic(
    conn: quinn::Connection,
    metrics: Arc<Metrics>,
    done: CancellationToken,
    gauges: bool,
) {
    let mut last = QuicSample::default();
    let mut tick = tokio::time::interval(QUIC_SAMPLE_INTERVAL);
    loop {
        let end = tokio::select! {
            _ = done.cancelled() => true,
            _ = tick.tick() => false,
        };
        metrics
            .quic
            .observe(&mut last, QuicSample::from(&conn.stats()), gauges);
        if end {
            return;
        }
    }
}

/// Files modified after this instant are live (shipped before the backlog).
pub(crate) fn live_since_ns(window: Duration) -> i64 {
    skyferry_common::unix_time::now_ns().saturating_sub(window.as_nanos() as i64)
}

/// Sends the agent's heartbeat every interval and watches the receiver's: three missed
/// ones cancel `lost`. The receiver's storage state pauses or resumes dispatch.
async fn heartbeat(
    reader: FrameReader,
    writer: FrameWriter,
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
    // Our heartbeats go out from their own task: a send can wait for the connection's
    // flow-control credit (a receiver whose storage stalls stops reading file streams,
    // and their data fills the connection window), and meanwhile the receiver's
    // heartbeats (its `stalled`) must still be read. One waits at most; a beat that
    // finds it waiting is skipped.
    let (beat_tx, mut beat_rx) = tokio::sync::mpsc::channel::<AgentHeartbeat>(1);
    let write_task = tokio::spawn(async move {
        let mut writer = writer;
        while let Some(hb) = beat_rx.recv().await {
            if writer.send(&Message::AgentHeartbeat(hb)).await.is_err() {
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
                    node_load: Some(metrics.health.node_summary()),
                };
                match beat_tx.try_send(hb) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!("the previous heartbeat is still waiting for flow-control credit; skipping this one");
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            msg = rx.recv() => match msg {
                Some(Message::ReceiverHeartbeat(hb)) => {
                    last_heard = Instant::now();
                    metrics
                        .heartbeat_received
                        .set(skyferry_common::unix_time::now_ns() as f64 / 1e9);
                    metrics.health.receiver_state(hb.storage, hb.node.map_or(0, |n| n.stalled_since_s));
                    *metrics.health.last_receiver.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some((hb.clone(), std::time::SystemTime::now()));
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
    write_task.abort();
}

/// Why a connection attempt failed.
enum ConnectFailure {
    /// The receiver refused this agent (a `Refuse` frame, or its close reason).
    Refused { refuse: Refuse, via: &'static str },
    /// Anything else: unreachable, TLS, a broken hello.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ConnectFailure {
    fn from(e: anyhow::Error) -> Self {
        ConnectFailure::Other(e)
    }
}
