//! State shared by the accept loop, every connection and every file session: the
//! configuration, storage, health, metrics, the (agent, path) claims, and what each agent
//! holds of the receiver (connections, file slots, bytes in flight). Its own module so
//! that `server` and `session` both use it without importing each other.
//!
//! Fairness: a file session holds one of the agent's own slots *and* one of the global
//! `max_concurrent_files`. An agent at its own cap is refused at once (`busy`), so it
//! never takes more of the global slots than its cap, and the rest stay for the others;
//! below its cap it waits its turn for a global slot (first come, first served).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use skyferry_common::config::ReceiverConfig;
use skyferry_common::node_load::sampler::Latest;
use skyferry_common::protocol::{max_data_frame, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use skyferry_common::protocol::{NodeLoadSummary, StorageState};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::health::stall::StallWatch;
use crate::health::StorageHealth;
use crate::lanes::{Displaced, Instance, LiveLanes};
use crate::metrics::Metrics;
use crate::storage::Storage;

/// State shared by all connections.
pub struct Shared {
    pub config: ReceiverConfig,
    pub storage: Arc<Storage>,
    pub health: StorageHealth,
    /// Storage stalls (`health.stall_after`), decided by `health::stall::watchdog`.
    pub stall: StallWatch,
    /// The latest node-load sample (`skyferry_common::node_load::sampler::run`).
    pub node_load: Latest,
    /// Free bytes at the last `statvfs`, for heartbeats while stalled (when `statvfs`
    /// itself may hang).
    last_free: AtomicU64,
    /// The state of the last heartbeat (0 ok, 1 stalled, 2 full), for `status`.
    last_state: std::sync::atomic::AtomicU8,
    /// Agents connected and their last heartbeats, for `status`.
    pub seen: crate::status::AgentsSeen,
    pub metrics: Metrics,
    /// The catalog, unless `catalog.enabled = false`.
    pub catalog: Option<Arc<Catalog>>,
    /// `limits.max_concurrent_files`, over all agents.
    pub file_slots: Arc<Semaphore>,
    /// File sessions that take chunks from stripe streams too.
    pub stripes: crate::stripe::Stripes,
    busy: Mutex<HashSet<(Arc<str>, String)>>,
    agents: Mutex<HashMap<Arc<str>, AgentState>>,
    /// Connections per peer certificate (DER), while they last.
    per_certificate: Mutex<HashMap<Arc<[u8]>, usize>>,
    connections: AtomicUsize,
    next_generation: AtomicU64,
    /// Per refusal reason: when a WARN was last logged, and how many were not since.
    throttle: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

/// What one agent id holds, over all its connections.
struct AgentState {
    files: Arc<Semaphore>,
    /// Units of [`BYTES_UNIT`].
    bytes: Arc<Semaphore>,
    /// Its live connections: the lanes of its newest instance ([`crate::lanes`]).
    live: LiveLanes<LiveConnection>,
}

/// A live connection of an agent, which a newer instance of the same agent id (or a
/// newer connection of the same lane) supersedes.
#[derive(Clone)]
pub struct LiveConnection {
    pub generation: u64,
    pub conn: quinn::Connection,
    /// Cancelled once the connection's file sessions have all ended (their claims and
    /// slots are released).
    pub finished: CancellationToken,
}

/// Bytes in flight are counted in KiB (semaphore permits are `u32`).
const BYTES_UNIT: u64 = 1024;

/// Frames one stream of a file session (its own, or a stripe) holds at most: the one
/// the session's worker verifies and the next one, read or queued for the worker. Each
/// stream counts its own (session.rs, `StreamFrames`), so that no stream waits for room
/// that another holds.
pub const FRAMES_PER_STREAM: usize = 2;

/// Frame memory one file session may hold: its own stream's frames plus two decoded
/// chunks (one verified, the one before it being written: see `Work::run` in
/// session.rs).
pub fn session_bytes(chunk_size: u32) -> u64 {
    let cs = chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
    FRAMES_PER_STREAM as u64 * max_data_frame(cs) as u64 + 2 * u64::from(cs)
}

/// Frame memory one stripe stream may hold: its frames (the session's worker decodes
/// into its own buffers).
pub fn stripe_bytes(chunk_size: u32) -> u64 {
    let cs = chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
    FRAMES_PER_STREAM as u64 * max_data_frame(cs) as u64
}

/// Why a file stream did not get a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The agent holds `limits.max_files_per_agent` sessions.
    AgentFiles { cap: usize },
    /// The agent's sessions hold `limits.max_bytes_in_flight_per_agent`.
    AgentBytes { needed: u64, cap: u64 },
    /// No global slot came free within the wait.
    ReceiverBusy { slots: usize, waited: Duration },
}

impl SlotRefusal {
    /// Metric label (a fixed set).
    pub fn label(&self) -> &'static str {
        match self {
            SlotRefusal::AgentFiles { .. } => "agent_files",
            SlotRefusal::AgentBytes { .. } => "agent_bytes",
            SlotRefusal::ReceiverBusy { .. } => "receiver_busy",
        }
    }
}

impl std::fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotRefusal::AgentFiles { cap } => write!(
                f,
                "this agent already has {cap} files in progress (limits.max_files_per_agent); retry when one ends"
            ),
            SlotRefusal::AgentBytes { needed, cap } => write!(
                f,
                "this agent's files in progress hold its {cap} bytes in flight (limits.max_bytes_in_flight_per_agent; this file needs {needed}); retry when one ends"
            ),
            SlotRefusal::ReceiverBusy { slots, waited } => write!(
                f,
                "receiver busy: all {slots} file slots stayed in use for {waited:?} (limits.max_concurrent_files)"
            ),
        }
    }
}

/// A file session's hold on the agent's and the global slots; released on drop.
pub struct Slot {
    _agent: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// One open connection, counted in the totals; uncounted on drop.
pub struct ConnectionGuard {
    shared: Arc<Shared>,
    certificate: Option<Arc<[u8]>>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(cert) = self.certificate.take() {
            let mut map = lock(&self.shared.per_certificate);
            if let Some(n) = map.get_mut(&cert) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&cert);
                }
            }
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain maps and
/// counters, each changed in one step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks (agent, path) as being received; released on drop.
pub struct BusyGuard<'a> {
    shared: &'a Shared,
    key: (Arc<str>, String),
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.shared.busy_set().remove(&self.key);
    }
}

impl Shared {
    pub fn new(config: ReceiverConfig, storage: Storage) -> Shared {
        let mut metrics = Metrics::default();
        // The storage times its operations into the exported histogram.
        metrics.storage.latency = storage.ops().latency().clone();
        metrics.precreate();
        Shared {
            file_slots: Arc::new(Semaphore::new(config.max_concurrent_files)),
            stall: StallWatch::new(config.health.stall_after),
            config,
            storage: Arc::new(storage),
            health: StorageHealth::default(),
            metrics,
            node_load: Latest::default(),
            last_free: AtomicU64::new(0),
            last_state: std::sync::atomic::AtomicU8::new(0),
            seen: crate::status::AgentsSeen::default(),
            catalog: None,
            stripes: crate::stripe::Stripes::default(),
            busy: Mutex::new(HashSet::new()),
            agents: Mutex::new(HashMap::new()),
            per_certificate: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            next_generation: AtomicU64::new(1),
            throttle: Mutex::new(HashMap::new()),
        }
    }

    /// The storage state for a heartbeat, with the free bytes: `stalled` while the
    /// watchdog says so (without a `statvfs`, which may hang on stalled storage), else
    /// `full` or `ok` from free space ([`crate::health`]). Blocking: call off the runtime.
    pub fn storage_state(&self) -> (StorageState, u64) {
        let state = if self.stall.current().is_some() {
            StorageState::Stalled
        } else {
            let free = self.storage.free_bytes();
            if let Some(f) = free {
                self.last_free.store(f, Ordering::Relaxed);
            }
            self.health.state(free, Instant::now())
        };
        self.metrics.health.state(state);
        self.last_state.store(state.as_u8(), Ordering::Relaxed);
        (state, self.last_free.load(Ordering::Relaxed))
    }

    /// The state of the last heartbeat sent (ok before any).
    pub fn last_state(&self) -> StorageState {
        StorageState::from_u8(self.last_state.load(Ordering::Relaxed)).unwrap_or(StorageState::Ok)
    }

    /// The node-load summary of the latest sample.
    pub fn node_load(&self) -> NodeLoadSummary {
        self.node_load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|s| s.summary())
            .unwrap_or_default()
    }

    /// With `catalog`: files are acknowledged once their row is written.
    pub fn with_catalog(mut self, catalog: Arc<Catalog>) -> Shared {
        self.catalog = Some(catalog);
        self
    }

    fn busy_set(&self) -> MutexGuard<'_, HashSet<(Arc<str>, String)>> {
        lock(&self.busy)
    }

    /// Claims a path so that two streams never write the same partial at once.
    pub fn claim(&self, agent: &Arc<str>, path: &str) -> Option<BusyGuard<'_>> {
        let key = (agent.clone(), path.to_owned());
        let inserted = self.busy_set().insert(key.clone());
        // Lazily: a guard built for a path that is already claimed would, when dropped,
        // release the other holder's claim (and take the lock while it is still held).
        inserted.then(|| BusyGuard { shared: self, key })
    }

    /// Counts a new connection, or `None` when `limits.max_connections` are open.
    pub fn admit_connection(self: &Arc<Self>) -> Option<ConnectionGuard> {
        let max = self.config.peer_limits.max_connections;
        let admitted = self
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| ConnectionGuard {
            shared: self.clone(),
            certificate: None,
        })
    }

    /// Counts the connection against its peer certificate; `Err(open)` when that
    /// certificate already has `limits.max_connections_per_agent` connections.
    pub fn admit_certificate(
        &self,
        guard: &mut ConnectionGuard,
        certificate: Arc<[u8]>,
    ) -> Result<(), usize> {
        let max = self.config.peer_limits.max_connections_per_agent;
        let mut map = lock(&self.per_certificate);
        let n = map.entry(certificate.clone()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        guard.certificate = Some(certificate);
        Ok(())
    }

    /// A number that orders connections (newer is larger).
    pub fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes `conn` (lane `lane` of `instance`) one of the agent's live connections and
    /// returns those it supersedes ([`crate::lanes`]).
    pub fn make_live(
        &self,
        agent: &Arc<str>,
        instance: Instance,
        lane: u16,
        conn: LiveConnection,
    ) -> Displaced<LiveConnection> {
        let mut agents = lock(&self.agents);
        let state = self.agent_state(&mut agents, agent);
        state.live.admit(instance, lane, conn.generation, conn)
    }

    /// Agent ids with at least one live connection.
    pub fn agents_connected(&self) -> usize {
        lock(&self.agents)
            .values()
            .filter(|a| !a.live.is_empty())
            .count()
    }

    /// Forgets `generation` as one of the agent's live connections (if it still is).
    pub fn connection_ended(&self, agent: &Arc<str>, generation: u64) {
        let mut agents = lock(&self.agents);
        if let Some(state) = agents.get_mut(agent) {
            state.live.remove(generation);
        }
    }

    fn agent_state<'m>(
        &self,
        agents: &'m mut HashMap<Arc<str>, AgentState>,
        agent: &Arc<str>,
    ) -> &'m mut AgentState {
        let limits = &self.config.peer_limits;
        // One entry per agent id that ever connected: ids are names in certificates
        // signed by the deployment's CA, so the map is as small as the fleet.
        agents.entry(agent.clone()).or_insert_with(|| AgentState {
            files: Arc::new(Semaphore::new(limits.max_files_per_agent)),
            bytes: Arc::new(Semaphore::new(
                (limits.max_bytes_in_flight_per_agent / BYTES_UNIT).min(u64::from(u32::MAX))
                    as usize,
            )),
            live: LiveLanes::default(),
        })
    }

    /// Takes a slot for a file session of `agent` with chunks of `chunk_size`: one of the
    /// agent's own (refused at once when it holds its cap of files or bytes), then one of
    /// the global slots (waiting up to `wait` for one to come free).
    pub async fn acquire_slot(
        &self,
        agent: &Arc<str>,
        chunk_size: u32,
        wait: Duration,
    ) -> Result<Slot, SlotRefusal> {
        let limits = &self.config.peer_limits;
        let (files, bytes) = {
            let mut agents = lock(&self.agents);
            let state = self.agent_state(&mut agents, agent);
            (state.files.clone(), state.bytes.clone())
        };
        let refused_files = |_: TryAcquireError| SlotRefusal::AgentFiles {
            cap: limits.max_files_per_agent,
        };
        let agent_permit = files.try_acquire_owned().map_err(refused_files)?;
        let needed = session_bytes(chunk_size);
        let units = needed.div_ceil(BYTES_UNIT).min(u64::from(u32::MAX)) as u32;
        let bytes_permit =
            bytes
                .try_acquire_many_owned(units)
                .map_err(|_| SlotRefusal::AgentBytes {
                    needed,
                    cap: limits.max_bytes_in_flight_per_agent,
                })?;
        let busy = || SlotRefusal::ReceiverBusy {
            slots: self.config.max_concurrent_files,
            waited: wait,
        };
        let global = match tokio::time::timeout(wait, self.file_slots.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            // Timed out, or the semaphore was closed (never done): busy either way.
            Ok(Err(_)) | Err(_) => return Err(busy()),
        };
        Ok(Slot {
            _agent: agent_permit,
            _bytes: bytes_permit,
            _global: global,
        })
    }

    /// The frame memory of a stripe stream (two of its largest frames) from the agent's
    /// `limits.max_bytes_in_flight_per_agent`, refused at once when it does not fit.
    pub fn acquire_stripe_bytes(
        &self,
        agent: &Arc<str>,
        chunk_size: u32,
    ) -> Result<OwnedSemaphorePermit, SlotRefusal> {
        let bytes = {
            let mut agents = lock(&self.agents);
            self.agent_state(&mut agents, agent).bytes.clone()
        };
        let needed = stripe_bytes(chunk_size);
        let units = needed.div_ceil(BYTES_UNIT).min(u64::from(u32::MAX)) as u32;
        bytes
            .try_acquire_many_owned(units)
            .map_err(|_| SlotRefusal::AgentBytes {
                needed,
                cap: self.config.peer_limits.max_bytes_in_flight_per_agent,
            })
    }

    /// Whether a WARN for refusals of kind `reason` may be logged now: at most one per
    /// 10 s per reason, so that an attack cannot flood the log. Returns how many were
    /// not logged since the last one.
    pub fn warn_allowed(&self, reason: &'static str, now: Instant) -> Option<u64> {
        let mut t = lock(&self.throttle);
        match t.get_mut(reason) {
            Some((last, skipped)) if now.duration_since(*last) < WARN_EVERY => {
                *skipped = skipped.saturating_add(1);
                None
            }
            Some(entry) => {
                let skipped = entry.1;
                *entry = (now, 0);
                Some(skipped)
            }
            None => {
                t.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

/// At most one WARN per refusal reason this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Shared` over a temporary storage, with `limits` as the `[limits]` table.
    fn shared_with(limits: &str) -> (tempfile::TempDir, Shared) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = format!(
            "[receiver]\nlisten = \"127.0.0.1:7443\"\nstorage_root = \".\"\n\
             ca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n[limits]\n{limits}\n"
        );
        let config = ReceiverConfig::from_table(&text.parse().unwrap(), dir.path()).unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        (dir, Shared::new(config, storage))
    }

    const CHUNK: u32 = 4 << 20;

    #[tokio::test(start_paused = true)]
    async fn an_agent_at_its_cap_is_refused_at_once_and_leaves_slots_for_the_others() {
        let (_dir, shared) = shared_with("max_concurrent_files = 4\nmax_files_per_agent = 2");
        let (hostile, good): (Arc<str>, Arc<str>) = (Arc::from("hostile"), Arc::from("good"));
        let wait = Duration::from_secs(60);
        let held: Vec<Slot> = vec![
            shared.acquire_slot(&hostile, CHUNK, wait).await.unwrap(),
            shared.acquire_slot(&hostile, CHUNK, wait).await.unwrap(),
        ];
        let started = tokio::time::Instant::now();
        let refused = shared.acquire_slot(&hostile, CHUNK, wait).await.err();
        assert_eq!(refused, Some(SlotRefusal::AgentFiles { cap: 2 }));
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        // The other agent gets the two global slots the first one could not take.
        let a = shared.acquire_slot(&good, CHUNK, wait).await.unwrap();
        let b = shared.acquire_slot(&good, CHUNK, wait).await.unwrap();
        drop((a, b, held));
        assert!(shared.acquire_slot(&hostile, CHUNK, wait).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_receiver_makes_a_stream_wait_its_turn_then_answers_busy() {
        let (_dir, shared) = shared_with("max_concurrent_files = 1");
        let (one, two): (Arc<str>, Arc<str>) = (Arc::from("one"), Arc::from("two"));
        let wait = Duration::from_secs(60);
        let held = shared.acquire_slot(&one, CHUNK, wait).await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = shared.acquire_slot(&two, CHUNK, wait).await.err();
        assert_eq!(
            refused,
            Some(SlotRefusal::ReceiverBusy {
                slots: 1,
                waited: wait
            })
        );
        assert_eq!(started.elapsed(), wait);
        // A slot freed while waiting goes to the waiter.
        let shared = Arc::new(shared);
        let s = shared.clone();
        let waiter = tokio::spawn(async move { s.acquire_slot(&two, CHUNK, wait).await.is_ok() });
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_in_flight_bound_an_agent_with_large_chunks() {
        let (_dir, shared) = shared_with("max_bytes_in_flight_per_agent = \"200 MiB\"");
        let agent: Arc<str> = Arc::from("kiso");
        let wait = Duration::from_secs(60);
        let big = 16 << 20; // each session reserves two 16 MiB frames and two chunks: ~64.3 MiB
        let held: Vec<Slot> = vec![
            shared.acquire_slot(&agent, big, wait).await.unwrap(),
            shared.acquire_slot(&agent, big, wait).await.unwrap(),
            shared.acquire_slot(&agent, big, wait).await.unwrap(),
        ];
        let refused = shared.acquire_slot(&agent, big, wait).await.err();
        assert!(
            matches!(refused, Some(SlotRefusal::AgentBytes { cap, .. }) if cap == 200 << 20),
            "{refused:?}"
        );
        // Smaller chunks still fit in what is left.
        assert!(shared.acquire_slot(&agent, 64 << 10, wait).await.is_ok());
        drop(held);
    }

    #[test]
    fn refusal_warnings_are_throttled_per_reason() {
        let (_dir, shared) = shared_with("");
        let t0 = Instant::now();
        assert_eq!(shared.warn_allowed("offer_timeout", t0), Some(0));
        assert_eq!(
            shared.warn_allowed("offer_timeout", t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            shared.warn_allowed("offer_timeout", t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            shared.warn_allowed("agent_files", t0),
            Some(0),
            "per reason"
        );
        assert_eq!(
            shared.warn_allowed("offer_timeout", t0 + Duration::from_secs(11)),
            Some(2),
            "the next WARN says how many were not logged"
        );
    }

    #[test]
    fn connections_are_capped_in_total_and_per_certificate() {
        let (_dir, shared) = shared_with("max_connections = 3\nmax_connections_per_agent = 2");
        let shared = Arc::new(shared);
        let cert: Arc<[u8]> = Arc::from(&b"agent-a"[..]);
        let mut a1 = shared.admit_connection().unwrap();
        let mut a2 = shared.admit_connection().unwrap();
        let mut a3 = shared.admit_connection().unwrap();
        assert!(shared.admit_connection().is_none(), "total cap");
        shared.admit_certificate(&mut a1, cert.clone()).unwrap();
        shared.admit_certificate(&mut a2, cert.clone()).unwrap();
        assert_eq!(shared.admit_certificate(&mut a3, cert.clone()), Err(2));
        drop(a1);
        assert!(
            shared.admit_connection().is_some(),
            "a closed connection frees its place"
        );
        shared.admit_certificate(&mut a3, cert).unwrap();
    }

    #[test]
    fn a_contested_claim_is_refused_and_leaves_the_holder_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let text = r#"
            [receiver]
            listen = "127.0.0.1:7443"
            storage_root = "."
            ca = "ca.pem"
            cert = "r.pem"
            key = "r.key"
        "#;
        let file = dir.path().join("receiver.toml");
        std::fs::write(&file, text).expect("write config");
        let config = ReceiverConfig::load(&file).expect("config");
        let storage = Storage::open(dir.path()).expect("storage");
        let shared = Shared::new(config, storage);
        let agent: Arc<str> = Arc::from("kiso");
        let held = shared.claim(&agent, "a.fits").expect("first claim");
        assert!(shared.claim(&agent, "a.fits").is_none(), "busy");
        assert!(shared.claim(&agent, "a.fits").is_none(), "still busy");
        drop(held);
        assert!(shared.claim(&agent, "a.fits").is_some(), "free again");
    }
}
