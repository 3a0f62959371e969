//! Bandwidth caps at the application layer: token buckets on chunk sends, one for all
//! traffic (`transfer.max_rate`), one per class (`[transfer.rates]`) and one per replay
//! with `--max-rate`; and the byte budget of backlog and replay chunks in flight
//! (`transfer.bulk_in_flight`). The caps are re-read on SIGHUP ([`Pacer::configure`]),
//! and schedules follow the local time of `agent.timezone`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Timelike;
use skyferry_common::config::{AgentConfig, ClassRates, RateSchedule};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::journal::Class;

/// A token bucket that may go into debt: a taker of `n` bytes takes them at once and
/// waits until the debt is paid at `rate`, so that concurrent takers queue up in order.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Tokens a full bucket holds: a quarter second of the rate (a short burst only).
const BURST: f64 = 0.25;

impl Bucket {
    pub fn new(now: Instant) -> Bucket {
        Bucket {
            tokens: 0.0,
            last: now,
        }
    }

    /// Takes `n` bytes at `rate` bytes per second at `now`; how long to wait before
    /// sending them.
    pub fn take(&mut self, n: u64, rate: u64, now: Instant) -> Duration {
        let rate = rate.max(1) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate * BURST);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

struct Caps {
    all: RateSchedule,
    classes: ClassRates,
    tz: chrono_tz::Tz,
}

struct State {
    caps: Caps,
    all: Bucket,
    class: [Bucket; 3],
    /// Per replay: its cap and bucket.
    replays: HashMap<i64, (u64, Bucket)>,
}

/// What uploads share to keep within the caps.
pub struct Pacer {
    state: Mutex<State>,
    bulk: Arc<Semaphore>,
    bulk_capacity: u32,
}

/// The QUIC stream priority of a file's stream: live above backlog and replays, both
/// below the control stream ([`skyferry_common::wire::CONTROL_PRIORITY`]).
pub fn priority(c: Class) -> i32 {
    match c {
        Class::Live => 1,
        Class::Backlog | Class::Replay => 0,
    }
}

fn class_index(c: Class) -> usize {
    match c {
        Class::Live => 0,
        Class::Backlog => 1,
        Class::Replay => 2,
    }
}

impl Pacer {
    pub fn new(config: &AgentConfig) -> Pacer {
        let now = Instant::now();
        let t = &config.transfer;
        let bulk_capacity = u32::try_from(t.bulk_in_flight).unwrap_or(u32::MAX);
        Pacer {
            state: Mutex::new(State {
                caps: Caps {
                    all: t.max_rate.clone(),
                    classes: t.rates.clone(),
                    tz: config.timezone,
                },
                all: Bucket::new(now),
                class: [Bucket::new(now), Bucket::new(now), Bucket::new(now)],
                replays: HashMap::new(),
            }),
            bulk: Arc::new(Semaphore::new(bulk_capacity as usize)),
            bulk_capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Swaps in the caps of a reloaded config (SIGHUP); takes effect with the next chunk.
    pub fn configure(&self, config: &AgentConfig) {
        let mut s = self.lock();
        s.caps = Caps {
            all: config.transfer.max_rate.clone(),
            classes: config.transfer.rates.clone(),
            tz: config.timezone,
        };
    }

    /// The caps of the active replays that have one (read from the journal each claim).
    pub fn set_replay_rates(&self, rates: &[(i64, u64)]) {
        let mut s = self.lock();
        let now = Instant::now();
        s.replays.retain(|id, _| rates.iter().any(|(r, _)| r == id));
        for (id, rate) in rates {
            s.replays
                .entry(*id)
                .and_modify(|e| e.0 = *rate)
                .or_insert((*rate, Bucket::new(now)));
        }
    }

    /// Waits until `bytes` of a chunk of class `class` (of replay `replay`) may be sent.
    pub async fn pace(&self, class: Class, replay: Option<i64>, bytes: u64) {
        let wait = {
            let mut s = self.lock();
            let now = Instant::now();
            let minute = {
                let local = chrono::Utc::now().with_timezone(&s.caps.tz);
                (local.hour() * 60 + local.minute()) as u16
            };
            let all = s.caps.all.at(minute);
            let mine = match class {
                Class::Live => s.caps.classes.live.at(minute),
                Class::Backlog => s.caps.classes.backlog.at(minute),
                Class::Replay => s.caps.classes.replay.at(minute),
            };
            let mut wait = Duration::ZERO;
            if let Some(rate) = all {
                wait = wait.max(s.all.take(bytes, rate, now));
            }
            if let Some(rate) = mine {
                wait = wait.max(s.class[class_index(class)].take(bytes, rate, now));
            }
            if let Some((rate, bucket)) = replay.and_then(|r| s.replays.get_mut(&r)) {
                let rate = *rate;
                wait = wait.max(bucket.take(bytes, rate, now));
            }
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// For a backlog or replay chunk: a share of `transfer.bulk_in_flight`, held until
    /// the receiver acknowledges the chunk. Live chunks need none (`None`).
    pub async fn bulk_budget(&self, class: Class, bytes: u64) -> Option<OwnedSemaphorePermit> {
        if class == Class::Live {
            return None;
        }
        // A chunk larger than the whole budget goes alone.
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .min(self.bulk_capacity);
        self.bulk.clone().acquire_many_owned(n).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_lets_a_quarter_second_burst_through_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        // Empty at start: the first megabyte at 1 MB/s waits a second.
        assert_eq!(b.take(1_000_000, 1_000_000, t0), Duration::from_secs(1));
        // Idle for ten seconds: only a quarter second of credit.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(b.take(250_000, 1_000_000, t1), Duration::ZERO);
        assert!(b.take(1, 1_000_000, t1) > Duration::ZERO);
    }

    proptest! {
        /// Whatever the chunk sizes, what was sent by time T is at most rate × T plus
        /// the burst, and a sender that always waits keeps up with the rate.
        #[test]
        fn sends_keep_to_the_rate(sizes in proptest::collection::vec(1u64..5_000_000, 1..200),
                                  rate in 1_000u64..100_000_000) {
            let t0 = Instant::now();
            let mut b = Bucket::new(t0);
            let mut now = t0;
            let mut sent = 0u64;
            for n in &sizes {
                let wait = b.take(*n, rate, now);
                now += wait;
                sent += n;
                let allowed = rate as f64 * (now - t0).as_secs_f64() + rate as f64 * BURST;
                prop_assert!(sent as f64 <= allowed + 1.0, "sent {sent} by {:?}", now - t0);
            }
            // No credit given away: the total time is what the rate takes for them.
            let need = sent as f64 / rate as f64;
            prop_assert!(((now - t0).as_secs_f64() - need).abs() < 1e-3);
        }
    }
}
