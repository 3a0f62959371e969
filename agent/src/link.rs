//! How busy the link is, as the uploads see it: the time they spend blocked handing data
//! to QUIC (flow or congestion control), which drives `transfer.compression = "auto"`
//! ([`skyferry_common::compress::AutoCompress`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use skyferry_common::compress::{AutoCompress, Mode};
use tracing::info;

/// Length of one measurement interval.
const INTERVAL: Duration = Duration::from_secs(1);

/// Shared by all uploads of the agent.
#[derive(Debug)]
pub struct LinkMeter {
    mode: Mode,
    blocked_ns: AtomicU64,
    compress: AtomicBool,
    /// Start of the current interval, blocked time at its start, the decision.
    interval: Mutex<(Instant, u64, AutoCompress)>,
}

impl LinkMeter {
    pub fn new(mode: Mode) -> LinkMeter {
        LinkMeter {
            mode,
            blocked_ns: AtomicU64::new(0),
            compress: AtomicBool::new(mode == Mode::Zstd),
            interval: Mutex::new((Instant::now(), 0, AutoCompress::default())),
        }
    }

    /// An upload waited this long for QUIC to take a frame.
    pub fn note_blocked(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.blocked_ns.fetch_add(ns, Ordering::Relaxed);
        if self.mode == Mode::Auto {
            self.maybe_decide(Instant::now());
        }
    }

    /// Whether the next chunk should be compressed.
    pub fn compress_now(&self) -> bool {
        if self.mode == Mode::Auto {
            self.maybe_decide(Instant::now());
        }
        self.compress.load(Ordering::Relaxed)
    }

    fn maybe_decide(&self, now: Instant) {
        let Ok(mut guard) = self.interval.try_lock() else {
            return; // another upload is deciding
        };
        let (start, blocked_at_start, auto) = &mut *guard;
        let elapsed = now.duration_since(*start);
        if elapsed < INTERVAL {
            return;
        }
        let blocked = self.blocked_ns.load(Ordering::Relaxed);
        let fraction = (blocked - *blocked_at_start) as f64 / elapsed.as_nanos() as f64;
        let was = auto.is_on();
        let on = auto.handle_interval(fraction);
        if on != was {
            info!(
                blocked_fraction = format!("{fraction:.2}"),
                compress = on,
                "compression auto: the {} is the bottleneck",
                if on { "link" } else { "CPU or disk" }
            );
        }
        self.compress.store(on, Ordering::Relaxed);
        *start = now;
        *blocked_at_start = blocked;
    }
}
