//! A UDP relay that sits between the agent and the receiver on 127.0.0.1 and breaks the
//! link on command: drops a fraction of datagrams, delays them (each direction on its
//! own), duplicates them, caps the rate (a bottleneck with a bounded queue), or
//! black-holes everything (a partition) until healed.
//!
//! ```text
//! agent ──► relay.addr() ──(faults, up)──► receiver
//! agent ◄── relay.addr() ◄──(faults, down)── receiver   (one upstream socket per agent socket)
//! ```
//!
//! Plain threads and std sockets: one reads the agent side, one per agent socket reads the
//! receiver side, one delivers delayed datagrams in due order. Loss and duplication draw
//! from a [`SeededRng`] per direction, so a run is reproducible up to thread timing.
//! Faults change at any time through [`Relay::set_faults`] and friends; datagrams already
//! delayed are black-holed too if a partition starts before they are due.
//!
//! It copies every datagram in user space (twice through a channel when delayed): at high
//! rates it can be the bottleneck itself. Its threads are named `relay-up`, `relay-down`
//! and `relay-delay` so that a benchmark can read their CPU time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::faults::SeededRng;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Largest datagram relayed (above any QUIC payload).
const MAX_DATAGRAM: usize = 65_535;
/// Socket buffers asked of the kernel, so that bursts are not lost in the relay itself.
const SOCKET_BUFFER: usize = 32 << 20;

/// The faults applied to every datagram from now on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Fraction of datagrams dropped, in each direction (0.0 ..= 1.0).
    pub loss: f64,
    /// Fraction of datagrams sent twice, in each direction.
    pub duplicate: f64,
    /// Added delay from the agent to the receiver.
    pub delay_up: Duration,
    /// Added delay from the receiver to the agent.
    pub delay_down: Duration,
    /// Everything is dropped, both ways, including datagrams already delayed.
    pub partitioned: bool,
    /// A bottleneck in each direction: at most this many bits per second of UDP payload
    /// (0: no cap). Datagrams wait behind it (before their delay starts).
    pub rate_bps: u64,
    /// With `rate_bps`, the longest wait behind the cap: a datagram that would wait longer
    /// is dropped, as by a router's full queue (counted in `overflowed`). Zero: no limit.
    pub queue: Duration,
}

/// Which way a datagram travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Agent to receiver.
    Up = 0,
    /// Receiver to agent.
    Down = 1,
}

/// Datagram counts per direction (index with `Direction as usize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams read from the sender's side.
    pub received: [u64; 2],
    /// Datagrams sent on (a duplicate counts twice).
    pub forwarded: [u64; 2],
    /// Their UDP payload bytes.
    pub forwarded_bytes: [u64; 2],
    /// Dropped by the loss fault.
    pub dropped: [u64; 2],
    /// Sent a second time by the duplicate fault.
    pub duplicated: [u64; 2],
    /// Dropped because of a partition.
    pub blackholed: [u64; 2],
    /// Dropped because the queue behind the rate cap was full.
    pub overflowed: [u64; 2],
    /// Lost because the relay's own send failed (e.g. the receiver is not listening).
    pub send_failed: [u64; 2],
}

#[derive(Default)]
struct Counters {
    received: [AtomicU64; 2],
    forwarded: [AtomicU64; 2],
    forwarded_bytes: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    duplicated: [AtomicU64; 2],
    blackholed: [AtomicU64; 2],
    overflowed: [AtomicU64; 2],
    send_failed: [AtomicU64; 2],
}

struct Shared {
    faults: Mutex<Faults>,
    /// Agent sockets seen, in order of their first datagram.
    clients: Mutex<Vec<SocketAddr>>,
    /// Agent sockets whose datagrams are black-holed, both ways ([`Relay::cut`]).
    cut: Mutex<std::collections::HashSet<SocketAddr>>,
    counters: Counters,
    /// Per direction, when the rate-capped link has sent everything queued so far.
    link_free: Mutex<[Option<Instant>; 2]>,
    stop: AtomicBool,
}

impl Shared {
    fn faults(&self) -> Faults {
        // Faults are plain values: a panicking holder cannot leave them half-written.
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn cut_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<SocketAddr>> {
        self.cut.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, which: &[AtomicU64; 2], dir: Direction) {
        which[dir as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A datagram waiting for its delay to pass.
struct Delayed {
    due: Instant,
    seq: u64,
    dir: Direction,
    socket: Arc<UdpSocket>,
    /// `None`: the socket is connected to the destination.
    to: Option<SocketAddr>,
    data: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// A running relay; stops its threads when dropped.
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Listens on 127.0.0.1 (an ephemeral port) and forwards to `target`. `seed` drives
    /// the loss and duplication draws.
    pub fn start(target: SocketAddr, seed: u64) -> Result<Relay> {
        let front = Arc::new(udp_socket("127.0.0.1:0".parse()?)?);
        front
            .set_read_timeout(Some(POLL))
            .context("cannot set the relay's read timeout")?;
        let addr = front.local_addr().context("relay address")?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            clients: Mutex::new(Vec::new()),
            cut: Mutex::new(std::collections::HashSet::new()),
            counters: Counters::default(),
            link_free: Mutex::new([None; 2]),
            stop: AtomicBool::new(false),
        });
        let (delay_tx, delay_rx) = mpsc::channel::<Delayed>();
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("relay-delay".into())
                .spawn(move || deliver_delayed(&s, delay_rx))
                .context("cannot start the relay's delay thread")?,
        );
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("relay-up".into())
                .spawn(move || {
                    relay_up(&s, front, target, seed, delay_tx);
                })
                .context("cannot start the relay's agent-side thread")?,
        );
        Ok(Relay {
            addr,
            target,
            shared,
            threads,
        })
    }

    /// Where the agent must send (instead of the receiver's address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The receiver's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces all faults at once.
    pub fn set_faults(&self, faults: Faults) {
        *self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = faults;
    }

    fn edit(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// Drops `fraction` of the datagrams in each direction.
    pub fn set_loss(&self, fraction: f64) {
        self.edit(|f| f.loss = fraction);
    }

    /// Delays every datagram by `delay` in each direction (RTT grows by twice that).
    pub fn set_delay(&self, delay: Duration) {
        self.edit(|f| (f.delay_up, f.delay_down) = (delay, delay));
    }

    /// Delays datagrams by `up` towards the receiver and `down` towards the agent.
    pub fn set_delays(&self, up: Duration, down: Duration) {
        self.edit(|f| (f.delay_up, f.delay_down) = (up, down));
    }

    /// Sends `fraction` of the datagrams twice.
    pub fn set_duplicate(&self, fraction: f64) {
        self.edit(|f| f.duplicate = fraction);
    }

    /// Black-holes everything, both ways, until [`Relay::heal`].
    pub fn partition(&self) {
        self.edit(|f| f.partitioned = true);
    }

    /// Ends a partition (other faults stay).
    pub fn heal(&self) {
        self.edit(|f| f.partitioned = false);
    }

    /// Caps each direction at `bits_per_second` (0: no cap), dropping datagrams that would
    /// wait longer than `queue` behind it (zero: none dropped).
    pub fn set_rate(&self, bits_per_second: u64, queue: Duration) {
        self.edit(|f| (f.rate_bps, f.queue) = (bits_per_second, queue));
    }

    /// The agent sockets seen so far, in order of their first datagram (an agent with
    /// several connections has a socket per connection).
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.shared
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Black-holes everything from and to one agent socket (one connection's path) until
    /// [`Relay::uncut`]; the other sockets are untouched.
    pub fn cut(&self, client: SocketAddr) {
        self.shared.cut_set().insert(client);
    }

    /// Ends [`Relay::cut`] of `client`.
    pub fn uncut(&self, client: SocketAddr) {
        self.shared.cut_set().remove(&client);
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.set_faults(Faults::default());
    }

    /// Datagram counts so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counters;
        let read = |a: &[AtomicU64; 2]| [0, 1].map(|i| a[i].load(Ordering::Relaxed));
        RelayStats {
            received: read(&c.received),
            forwarded: read(&c.forwarded),
            forwarded_bytes: read(&c.forwarded_bytes),
            dropped: read(&c.dropped),
            duplicated: read(&c.duplicated),
            blackholed: read(&c.blackholed),
            overflowed: read(&c.overflowed),
            send_failed: read(&c.send_failed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join(); // a panicked relay thread already failed its datagrams
        }
    }
}

/// A UDP socket with large buffers (best effort: the kernel caps them at rmem_max, and
/// root may go above it, as the daemons do). A relay buffer that overflows in a burst
/// would drop datagrams the link never saw, counted by quinn as lost.
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .context("cannot create a UDP socket for the relay")?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    if socket.recv_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER);
    }
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    if socket.send_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER);
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind the relay to {addr}"))?;
    Ok(socket.into())
}

/// What the faults do with one datagram.
struct Plan {
    dir: Direction,
    /// How many copies to send (0: dropped).
    copies: u32,
    delay: Duration,
    rate_bps: u64,
    queue: Duration,
}

/// Draws the fate of one datagram travelling `dir` (and counts it received).
fn decide(shared: &Shared, rng: &mut SeededRng, dir: Direction, client: SocketAddr) -> Plan {
    shared.count(&shared.counters.received, dir);
    let f = shared.faults();
    let cut = shared.cut_set().contains(&client);
    let delay = match dir {
        Direction::Up => f.delay_up,
        Direction::Down => f.delay_down,
    };
    let mut plan = Plan {
        dir,
        copies: 1,
        delay,
        rate_bps: f.rate_bps,
        queue: f.queue,
    };
    if f.partitioned || cut {
        shared.count(&shared.counters.blackholed, dir);
        plan.copies = 0;
    } else if f.loss > 0.0 && rng.chance(f.loss) {
        shared.count(&shared.counters.dropped, dir);
        plan.copies = 0;
    } else if f.duplicate > 0.0 && rng.chance(f.duplicate) {
        shared.count(&shared.counters.duplicated, dir);
        plan.copies = 2;
    }
    plan
}

/// When a datagram of `len` bytes may leave through the rate cap, or `None` when the
/// queue behind the cap is full. Reserves its transmission time.
fn through_cap(shared: &Shared, plan: &Plan, len: usize, now: Instant) -> Option<Instant> {
    let mut free = shared
        .link_free
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let slot = &mut free[plan.dir as usize];
    let start = slot.map_or(now, |f| f.max(now));
    if !plan.queue.is_zero() && start - now > plan.queue {
        return None;
    }
    let done = start + Duration::from_secs_f64(len as f64 * 8.0 / plan.rate_bps as f64);
    *slot = Some(done);
    Some(done)
}

/// Sends now, or hands to the delay thread.
fn forward(
    shared: &Shared,
    plan: &Plan,
    socket: &Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: &[u8],
    delayed: &mpsc::Sender<Delayed>,
    seq: &mut u64,
) {
    let dir = plan.dir;
    for _ in 0..plan.copies {
        let now = Instant::now();
        let leaves = if plan.rate_bps == 0 {
            now
        } else {
            match through_cap(shared, plan, data.len(), now) {
                Some(t) => t,
                None => {
                    shared.count(&shared.counters.overflowed, dir);
                    continue;
                }
            }
        };
        let due = leaves + plan.delay;
        if due <= now {
            send(shared, dir, socket, to, data);
        } else {
            *seq += 1;
            let _ = delayed.send(Delayed {
                due,
                seq: *seq,
                dir,
                socket: socket.clone(),
                to,
                data: data.to_vec(),
            });
        }
    }
}

fn send(shared: &Shared, dir: Direction, socket: &UdpSocket, to: Option<SocketAddr>, data: &[u8]) {
    let sent = match to {
        Some(to) => socket.send_to(data, to),
        None => socket.send(data),
    };
    // A failed send (buffer full, receiver not listening) is a lost datagram, like on a
    // real link.
    match sent {
        Ok(n) => {
            shared.count(&shared.counters.forwarded, dir);
            shared.counters.forwarded_bytes[dir as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(_) => shared.count(&shared.counters.send_failed, dir),
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads what agents send and forwards it upstream, one upstream socket per agent socket
/// (so that a restarted agent is a new peer for the receiver, as on a real network).
fn relay_up(
    shared: &Arc<Shared>,
    front: Arc<UdpSocket>,
    target: SocketAddr,
    seed: u64,
    delayed: mpsc::Sender<Delayed>,
) {
    let mut rng = SeededRng::new(seed);
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut downs: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, client) = match front.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if timed_out(&e) => continue,
            // ICMP errors surface here as ECONNREFUSED on some kernels: ignore them.
            Err(_) => continue,
        };
        let upstream = match upstreams.get(&client) {
            Some(u) => u.clone(),
            None => {
                let Ok(u) = open_upstream(target) else {
                    continue;
                };
                let u = Arc::new(u);
                upstreams.insert(client, u.clone());
                shared
                    .clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(client);
                let (s, f, up, tx) = (shared.clone(), front.clone(), u.clone(), delayed.clone());
                let down_seed = seed ^ 0xD0D0_D0D0_D0D0_D0D0 ^ (downs.len() as u64);
                if let Ok(t) = std::thread::Builder::new()
                    .name("relay-down".into())
                    .spawn(move || relay_down(&s, up, f, client, down_seed, tx))
                {
                    downs.push(t);
                }
                u
            }
        };
        let plan = decide(shared, &mut rng, Direction::Up, client);
        forward(
            shared,
            &plan,
            &upstream,
            None,
            &buf[..n],
            &delayed,
            &mut seq,
        );
    }
    for t in downs {
        let _ = t.join();
    }
}

fn open_upstream(target: SocketAddr) -> Result<UdpSocket> {
    let u = udp_socket("127.0.0.1:0".parse()?)?;
    u.connect(target)
        .with_context(|| format!("cannot connect the relay to {target}"))?;
    u.set_read_timeout(Some(POLL))?;
    Ok(u)
}

/// Reads what the receiver answers one agent socket and forwards it back.
fn relay_down(
    shared: &Shared,
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    seed: u64,
    delayed: mpsc::Sender<Delayed>,
) {
    let mut rng = SeededRng::new(seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 1u64 << 62; // apart from the up direction's sequence numbers
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match upstream.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if timed_out(&e) => continue,
            // ECONNREFUSED while the receiver is down: keep listening for its return.
            Err(_) => continue,
        };
        let plan = decide(shared, &mut rng, Direction::Down, client);
        forward(
            shared,
            &plan,
            &front,
            Some(client),
            &buf[..n],
            &delayed,
            &mut seq,
        );
    }
}

/// Sends delayed datagrams when due, in due order; a partition that starts in the
/// meantime black-holes them.
fn deliver_delayed(shared: &Shared, incoming: mpsc::Receiver<Delayed>) {
    let mut queue: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse(d)| d.due <= now) {
            let Some(Reverse(d)) = queue.pop() else { break };
            if shared.faults().partitioned {
                shared.count(&shared.counters.blackholed, d.dir);
            } else {
                send(shared, d.dir, &d.socket, d.to, &d.data);
            }
        }
        let wait = queue
            .peek()
            .map(|Reverse(d)| d.due.saturating_duration_since(now))
            .unwrap_or(POLL)
            .min(POLL);
        match incoming.recv_timeout(wait) {
            Ok(d) => queue.push(Reverse(d)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if queue.is_empty() {
                    return;
                }
                std::thread::sleep(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server standing in for the receiver.
    fn echo() -> Result<(SocketAddr, Arc<AtomicBool>, JoinHandle<()>)> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(POLL))?;
        let addr = s.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        Ok((addr, stop, t))
    }

    fn client() -> Result<UdpSocket> {
        let c = UdpSocket::bind("127.0.0.1:0")?;
        c.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(c)
    }

    /// Sends `n` numbered datagrams and returns the numbers echoed back.
    fn round_trip(c: &UdpSocket, relay: SocketAddr, n: u32) -> Result<Vec<u32>> {
        for i in 0..n {
            c.send_to(&i.to_be_bytes(), relay)?;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(k) = c.recv(&mut buf) {
            if k == 4 {
                got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        Ok(got)
    }

    #[test]
    fn relays_both_ways_and_applies_loss_duplication_delay_and_partition() -> Result<()> {
        let (target, stop, server) = echo()?;
        let relay = Relay::start(target, 7)?;
        let c = client()?;

        assert_eq!(round_trip(&c, relay.addr(), 50)?.len(), 50, "clean link");

        relay.set_loss(0.5);
        let got = round_trip(&c, relay.addr(), 400)?.len();
        // Each round trip survives with probability 0.25.
        assert!((50..150).contains(&got), "{got} of 400 came back");
        relay.set_loss(0.0);

        relay.set_duplicate(1.0);
        let got = round_trip(&c, relay.addr(), 10)?;
        assert_eq!(got.len(), 40, "duplicated both ways: {got:?}");
        relay.set_duplicate(0.0);

        relay.set_delays(Duration::from_millis(100), Duration::from_millis(50));
        let start = Instant::now();
        c.send_to(b"ping", relay.addr())?;
        let mut buf = [0u8; 16];
        c.recv(&mut buf)?;
        assert!(start.elapsed() >= Duration::from_millis(150));
        relay.set_delay(Duration::ZERO);

        relay.partition();
        assert!(round_trip(&c, relay.addr(), 10)?.is_empty(), "partitioned");
        relay.heal();
        assert_eq!(round_trip(&c, relay.addr(), 10)?.len(), 10, "healed");

        let stats = relay.stats();
        assert_eq!(stats.blackholed[Direction::Up as usize], 10);
        assert!(stats.dropped[0] > 0 && stats.dropped[1] > 0, "{stats:?}");
        drop(relay);
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        Ok(())
    }

    #[test]
    fn a_rate_cap_spaces_datagrams_and_drops_what_overflows_its_queue() -> Result<()> {
        let (target, stop, server) = echo()?;
        let relay = Relay::start(target, 3)?;
        let c = client()?;
        // 8 Mbit/s: one 1000-byte datagram per millisecond; a queue of 20 ms.
        relay.set_rate(8_000_000, Duration::from_millis(20));
        let start = Instant::now();
        for i in 0..100u32 {
            let mut d = vec![0u8; 1000];
            d[..4].copy_from_slice(&i.to_be_bytes());
            c.send_to(&d, relay.addr())?;
        }
        let mut got = 0u64;
        let mut buf = [0u8; 2048];
        while let Ok(n) = c.recv(&mut buf) {
            assert_eq!(n, 1000);
            got += 1;
        }
        let stats = relay.stats();
        // About 21 fit (the one on the wire and 20 ms of queue); a burst faster than the
        // cap loses the rest.
        assert!(
            (15..=30).contains(&got),
            "{got} of 100 came back: {stats:?}"
        );
        assert_eq!(
            stats.overflowed[Direction::Up as usize],
            100 - got,
            "{stats:?}"
        );
        // They left at most one per millisecond (each way: the echo is capped as well).
        assert!(start.elapsed() >= Duration::from_millis(got - 1));
        relay.set_rate(0, Duration::ZERO);
        assert_eq!(round_trip(&c, relay.addr(), 100)?.len(), 100, "cap removed");
        drop(relay);
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        Ok(())
    }

    #[test]
    fn a_cut_silences_one_agent_socket_and_leaves_the_others() -> Result<()> {
        let (target, stop, server) = echo()?;
        let relay = Relay::start(target, 5)?;
        let (one, two) = (client()?, client()?);
        assert_eq!(round_trip(&one, relay.addr(), 5)?.len(), 5);
        assert_eq!(round_trip(&two, relay.addr(), 5)?.len(), 5);
        assert_eq!(relay.clients(), [one.local_addr()?, two.local_addr()?]);
        relay.cut(one.local_addr()?);
        assert!(round_trip(&one, relay.addr(), 5)?.is_empty(), "cut");
        assert_eq!(round_trip(&two, relay.addr(), 5)?.len(), 5, "not cut");
        relay.uncut(one.local_addr()?);
        assert_eq!(round_trip(&one, relay.addr(), 5)?.len(), 5, "uncut");
        drop(relay);
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        Ok(())
    }

    #[test]
    fn a_partition_swallows_datagrams_already_delayed() -> Result<()> {
        let (target, stop, server) = echo()?;
        let relay = Relay::start(target, 1)?;
        let c = client()?;
        relay.set_delay(Duration::from_millis(200));
        c.send_to(b"late", relay.addr())?;
        std::thread::sleep(Duration::from_millis(50));
        relay.partition();
        std::thread::sleep(Duration::from_millis(300));
        relay.heal();
        let mut buf = [0u8; 16];
        assert!(c.recv(&mut buf).is_err(), "nothing came back");
        assert_eq!(relay.stats().blackholed[Direction::Up as usize], 1);
        drop(relay);
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        Ok(())
    }
}
