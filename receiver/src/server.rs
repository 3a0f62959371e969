//! The QUIC server: accepts agents (mutual TLS, then hello), keeps the control stream
//! with heartbeats, and hands each file stream to a session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use skyferry_common::config::validate_agent_id;
use skyferry_common::protocol::{
    ErrorCode, Lane, Message, ReceiverHeartbeat, ReceiverNode, Refuse, StorageState, Welcome,
    MAX_CONTROL_FRAME, MAX_LANES, PROTOCOL_VERSION,
};
use skyferry_common::tls;
use skyferry_common::wire::{FrameReader, FrameWriter};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::lanes::{Displaced, Instance};
use crate::metrics::AgentLabels;
use crate::shared::{ConnectionGuard, LiveConnection, Shared};

pub use skyferry_common::protocol::{
    CLOSE_HEARTBEAT_LOST, CLOSE_REFUSED, CLOSE_SHUTDOWN, CLOSE_SUPERSEDED,
};

/// How long a new connection waits for the file sessions of the connection it
/// supersedes to end (and release their claims) before it serves its own streams.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// How long a refused connection stays open for the agent to receive the `Refuse` frame
/// (docs/protocol.md §2) before it is closed.
const REFUSE_WAIT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown`, then drains open sessions for up to `grace`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let Some(counted) = shared.admit_connection() else {
                    shared.metrics.connection_refused("max_connections");
                    if let Some(suppressed) = shared.warn_allowed("max_connections", Instant::now()) {
                        warn!(%remote, max = shared.config.peer_limits.max_connections, suppressed,
                              "connection refused: limits.max_connections are open");
                    }
                    incoming.refuse();
                    continue;
                };
                let span = tracing::info_span!("conn", %remote);
                tracker.spawn(connection(incoming, counted, shared.clone(), shutdown.clone()).instrument(span));
            }
        }
    }
    info!("shutting down: no new connections; draining file sessions");
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(grace = ?grace, "grace period over; closing remaining connections");
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"receiver shutting down");
    endpoint.wait_idle().await;
}

async fn connection(
    incoming: quinn::Incoming,
    mut counted: ConnectionGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            shared.metrics.handshakes_failed.inc();
            let view = tls::Viewpoint::Receiver {
                ca: &shared.config.ca,
            };
            warn!(reason = %tls::handshake_failure(&e, &view), "agent handshake failed");
            return;
        }
    };
    // Counted per certificate from here on, before the hello: one agent cannot hold more
    // than its share of connections, whatever it sends or withholds.
    if let Some(certificate) = peer_certificate(&conn) {
        if let Err(open) = shared.admit_certificate(&mut counted, certificate) {
            shared.metrics.connection_refused("agent_connections");
            let refuse = Refuse {
                code: ErrorCode::Busy,
                reason: format!(
                    "this agent already has {open} connections open (limits.max_connections_per_agent)"
                ),
            };
            if let Some(suppressed) = shared.warn_allowed("agent_connections", Instant::now()) {
                warn!(reason = refuse.reason, suppressed, "connection refused");
            }
            // Before the hello there is no control stream: the close reason is the refusal.
            conn.close(CLOSE_REFUSED.into(), refuse.close_reason().as_bytes());
            return;
        }
    }
    let (agent, lane, reader, writer) = match hello(&conn, &shared).await {
        Ok(a) => a,
        Err(refusal) => {
            shared.metrics.handshakes_failed.inc();
            warn!(code = %refusal.refuse.code, reason = %refusal.refuse.reason, "agent refused");
            refusal.deliver(&conn).await;
            return;
        }
    };
    shared.metrics.connections.inc();
    let generation = shared.next_generation();
    let finished = CancellationToken::new();
    // Cancelled when this function returns, i.e. after every file session has ended.
    let _finished = finished.clone().drop_guard();
    let instance = match lane {
        Some(l) => Instance::Laned(l.instance),
        None => Instance::Single(generation),
    };
    let displaced = shared.make_live(
        &agent,
        instance,
        lane.map_or(0, |l| l.index),
        LiveConnection {
            generation,
            conn: conn.clone(),
            finished,
        },
    );
    let streams = TaskTracker::new();
    let lost = CancellationToken::new();
    shared.seen.connected(&agent);
    let control = tokio::spawn(
        control_loop(shared.clone(), agent.clone(), reader, writer, lost.clone()).in_current_span(),
    );
    supersede(&shared, &agent, &conn, displaced, &shutdown).await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = lost.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(crate::session::serve(shared.clone(), agent.clone(), send, recv).in_current_span());
                }
                Err(e) => {
                    info!(agent = %agent, reason = %e, "agent disconnected");
                    break;
                }
            }
        }
    }
    streams.close();
    streams.wait().await;
    control.abort();
    if lost.is_cancelled() {
        conn.close(CLOSE_HEARTBEAT_LOST.into(), b"heartbeat lost");
    }
    shared.connection_ended(&agent, generation);
    shared.seen.disconnected(&agent);
    shared.metrics.connections.dec();
}

/// The end-entity certificate the agent presented (already verified against the CA).
fn peer_certificate(conn: &quinn::Connection) -> Option<Arc<[u8]>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|c| Arc::from(c.as_ref()))
}

/// A newer connection of `agent` displaced older ones: after a crash or restart the
/// older instance's connections are dead but not yet timed out, or two agents run with
/// one id (each of these is counted and a WARN names the id); or the agent dialled one of
/// its lanes again (its path died; an INFO). Either way the newer one wins: the displaced
/// connections are closed at once, and their file sessions are given up to
/// [`TAKEOVER_WAIT`] to end, so that their per-file claims are free when this
/// connection's streams are served (instead of answering `busy` until they time out).
async fn supersede(
    shared: &Shared,
    agent: &str,
    conn: &quinn::Connection,
    displaced: Displaced<LiveConnection>,
    shutdown: &CancellationToken,
) {
    let (older, reason): (Vec<LiveConnection>, &[u8]) = match displaced {
        Displaced::Nothing => return,
        Displaced::SameLane(previous) => {
            info!(
                agent = %agent,
                previous = %previous.conn.remote_address(),
                new = %conn.remote_address(),
                "agent dialled one of its lanes again; closing that lane's previous connection"
            );
            (
                vec![previous],
                b"superseded by a newer connection of the same lane",
            )
        }
        Displaced::OtherInstance(older) => {
            shared
                .metrics
                .connections_superseded
                .get_or_create(&AgentLabels {
                    agent: agent.to_owned(),
                })
                .inc();
            let previous: Vec<String> = older
                .iter()
                .map(|p| p.conn.remote_address().to_string())
                .collect();
            warn!(
                agent = %agent,
                previous = ?previous,
                new = %conn.remote_address(),
                "agent connected again while its previous connections were open; closing them \
                 (superseded). If this repeats, two agents are running with the same agent id"
            );
            (
                older,
                b"superseded by a newer connection of the same agent id",
            )
        }
    };
    for previous in &older {
        previous.conn.close(CLOSE_SUPERSEDED.into(), reason);
    }
    let all_finished = async {
        for previous in &older {
            previous.finished.cancelled().await;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = all_finished => {}
        _ = tokio::time::sleep(TAKEOVER_WAIT) => {
            warn!(agent = %agent, waited = ?TAKEOVER_WAIT,
                  "file sessions of the superseded connection are still running; their files answer busy until they end");
        }
    }
}

/// Why a hello failed: the refusal, and the control stream when there is one to carry
/// it to the agent.
struct Refusal {
    refuse: Refuse,
    writer: Option<FrameWriter>,
}

impl Refusal {
    /// A failure the agent gets no `Refuse` frame for (no usable control stream, or no
    /// hello): only the close reason tells it.
    fn without_frame(reason: impl Into<String>) -> Refusal {
        Refusal {
            refuse: Refuse {
                code: ErrorCode::Protocol,
                reason: reason.into(),
            },
            writer: None,
        }
    }

    /// Sends the `Refuse` frame and finishes the control stream, waits until the agent
    /// has the frame (acknowledged it, or closed the connection after reading it) for at
    /// most [`REFUSE_WAIT`], then closes the connection with code 1 and
    /// `"<code>: <reason>"` as close reason, for an agent that did not get the frame.
    /// Closing at once would discard the frame before it left.
    async fn deliver(self, conn: &quinn::Connection) {
        if let Some(mut writer) = self.writer {
            let refuse = Message::Refuse(self.refuse.clone());
            let _ = tokio::time::timeout(REFUSE_WAIT, async {
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = async {
                        if writer.send(&refuse).await.is_ok() {
                            writer.finish_delivered(REFUSE_WAIT).await;
                        }
                    } => {}
                }
            })
            .await;
        }
        conn.close(CLOSE_REFUSED.into(), self.refuse.close_reason().as_bytes());
    }
}

/// The first stream carries the hello; the agent id it claims must be a name in its
/// (already CA-verified) certificate. Returns the agent id, its lane (if it said) and
/// the control stream.
async fn hello(
    conn: &quinn::Connection,
    shared: &Shared,
) -> Result<(Arc<str>, Option<Lane>, FrameReader, FrameWriter), Refusal> {
    let (send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| Refusal::without_frame("no hello within 10s"))?
        .map_err(|e| Refusal::without_frame(format!("connection lost before hello: {e}")))?;
    let mut reader = FrameReader::new(recv, MAX_CONTROL_FRAME);
    let writer = FrameWriter::new(send);
    writer.set_priority(skyferry_common::wire::CONTROL_PRIORITY);
    let msg = tokio::time::timeout(Duration::from_secs(10), reader.read())
        .await
        .map_err(|_| Refusal::without_frame("no hello within 10s"))?
        .map_err(|e| Refusal::without_frame(format!("bad hello: {e}")))?;
    let Some(Message::Hello(h)) = msg else {
        return Err(Refusal::without_frame("the first frame was not a hello"));
    };
    let refuse = |writer, code, reason| Refusal {
        refuse: Refuse { code, reason },
        writer: Some(writer),
    };
    if h.version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {} is not supported (this receiver speaks {PROTOCOL_VERSION})",
            h.version
        );
        return Err(refuse(writer, ErrorCode::VersionMismatch, reason));
    }
    let cert = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned());
    let named = cert.is_some_and(|c| tls::certificate_names(&c, &h.agent_id));
    if validate_agent_id(&h.agent_id).is_err() || !named {
        let reason = format!(
            "agent id {:?} is not the name in the agent's certificate",
            h.agent_id
        );
        return Err(refuse(writer, ErrorCode::Unauthorized, reason));
    }
    if let Some(Err(e)) = h.lane.map(|l| l.check(MAX_LANES)) {
        return Err(refuse(writer, ErrorCode::Protocol, format!("hello: {e}")));
    }
    let mut writer = writer;
    writer
        .send(&Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            receiver_id: shared.config.id.clone(),
            heartbeat_interval_ms: shared.config.heartbeat_interval.as_millis() as u32,
        }))
        .await
        .map_err(|e| Refusal::without_frame(format!("connection lost during hello: {e}")))?;
    match h.lane {
        Some(l) => info!(agent = %h.agent_id, instance = format!("{:016x}", l.instance),
                         lane = l.index, lanes = l.count, "agent connected"),
        None => info!(agent = %h.agent_id, "agent connected"),
    }
    Ok((Arc::from(h.agent_id), h.lane, reader, writer))
}

/// Heartbeats on the control stream: ours every interval, with the storage state; the
/// agent's are expected at its interval, and three missed ones mean it is gone.
async fn control_loop(
    shared: Arc<Shared>,
    agent: Arc<str>,
    mut reader: FrameReader,
    mut writer: FrameWriter,
    lost: CancellationToken,
) {
    let interval = shared.config.heartbeat_interval;
    writer.set_timeout(Some(interval * 3));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let deadline = interval * 3;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Silence during a storage stall (or just after) is ours: the agent's
                // heartbeats wait for flow-control credit behind file data we do not
                // read (see `StallWatch::stalled_within`).
                if shared.stall.stalled_within(deadline, std::time::Instant::now()) {
                    last_heard = tokio::time::Instant::now();
                }
                if last_heard.elapsed() > deadline {
                    warn!(agent = %agent, silent_for = ?last_heard.elapsed(), "no heartbeat from agent for three intervals; closing the connection");
                    lost.cancel();
                    return;
                }
                seq += 1;
                // statvfs can block on stalled storage: keep it off the runtime.
                let s = shared.clone();
                let (storage, free_bytes) = tokio::task::spawn_blocking(move || s.storage_state())
                    .await
                    .unwrap_or((StorageState::Ok, 0));
                let node = ReceiverNode {
                    load: shared.node_load(),
                    stalled_since_s: shared.stall.current().map_or(0, |s| {
                        s.since.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
                    }),
                };
                let hb = Message::ReceiverHeartbeat(ReceiverHeartbeat { seq, storage, free_bytes, node: Some(node) });
                if let Err(e) = writer.send(&hb).await {
                    // An agent that does not read its control stream is as good as gone.
                    warn!(agent = %agent, error = %e, "cannot send a heartbeat to the agent; closing the connection");
                    lost.cancel();
                    return;
                }
            }
            msg = reader.read() => match msg {
                Ok(Some(Message::AgentHeartbeat(hb))) => {
                    last_heard = tokio::time::Instant::now();
                    shared.metrics.agent_heartbeat(&agent);
                    shared.seen.heartbeat(&agent, &hb);
                    tracing::debug!(agent = %agent, pending_files = hb.pending_files, pending_bytes = hb.pending_bytes, "agent heartbeat");
                }
                Ok(Some(other)) => {
                    warn!(agent = %agent, kind = other.kind(), "unexpected frame on the control stream; ignored");
                    last_heard = tokio::time::Instant::now();
                }
                Ok(None) | Err(_) => {
                    // Without a control stream there are no heartbeats: end the connection
                    // rather than leave a half-dead one.
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
