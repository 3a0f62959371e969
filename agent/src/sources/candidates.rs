//! When a file the watch (or a rescan) saw becomes ready to ship: the readiness rules of
//! [`super::fs`] as pure functions of what was seen and when, and the instant each
//! candidate next needs a look (a `stat`). The event loop sleeps until the earliest such
//! instant instead of polling on a fixed tick, so that a closed file is queued when its
//! quiet period ends, not up to one tick later.
//!
//! A candidate is ready once two looks agree on its size and mtime and its rule is due:
//! - closed after writing, or renamed into place: the quiet period passed since the last
//!   event;
//! - settling (found young by a rescan, in a directory that just appeared, or only its
//!   metadata changed): its mtime is `settle` old and the quiet period passed since the
//!   last event;
//! - being written with no close seen: its mtime is [`STALE_WRITER`] (or `settle`, if
//!   longer) old.
//!
//! The first look comes right after the event that made the candidate (or changed its
//! phase), the second when the rule is due; a look that finds the file changed is
//! repeated after `recheck`. No clock is read here: callers pass `now` (monotonic) and
//! `now_ns` (wall clock, for mtimes).

use std::time::{Duration, Instant};

/// A file the watch saw being written is shipped when it is closed; should the close event
/// be lost, once it has not changed for this long (or the root's `settle`, if longer).
pub const STALE_WRITER: Duration = Duration::from_secs(60);

/// What the watch last saw of a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Data was written and no close seen yet.
    Writing,
    /// Closed after writing or renamed into place: ready after the quiet period.
    Closed,
    /// Found young by a rescan, found in a directory that just appeared, or only its
    /// metadata changed: ready once settled and the watch saw nothing of it for the
    /// quiet period.
    Settling,
}

/// The durations the rules use, from the root's `[[watch]]` config.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub quiet_period: Duration,
    pub settle: Duration,
    /// How soon a look that found the file changed (or not yet due) is repeated.
    pub recheck: Duration,
}

impl Timing {
    pub fn new(quiet_period: Duration, settle: Duration) -> Timing {
        let quickest = settle.min(quiet_period);
        Timing {
            quiet_period,
            settle,
            recheck: (quickest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }

    fn stale(&self) -> Duration {
        self.settle.max(STALE_WRITER)
    }
}

/// One `stat` of a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Look {
    at: Instant,
    size: u64,
    mtime_ns: i64,
}

/// A file waiting to be ready.
#[derive(Clone, Debug)]
pub struct Candidate {
    phase: Phase,
    /// When the watch last reported a change of it (or it was found).
    since: Instant,
    /// The last look, if any since the event that asked for a fresh one.
    look: Option<Look>,
}

impl Candidate {
    pub fn new(phase: Phase, now: Instant) -> Candidate {
        Candidate {
            phase,
            since: now,
            look: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Data was written to it (no close yet). Its last look is kept: a writer produces
    /// events by the thousand, and nothing is due before the writer goes stale.
    pub fn written(&mut self, now: Instant) {
        self.phase = Phase::Writing;
        self.since = now;
    }

    /// Only its metadata changed (e.g. `cp -p` setting the mtime after the close): a
    /// closed file waits its quiet period again, from a fresh look.
    pub fn touched(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            self.since = now;
            self.look = None;
        }
    }

    /// Closed after writing, or renamed into place.
    pub fn closed(&mut self, now: Instant) {
        self.phase = Phase::Closed;
        self.since = now;
        self.look = None;
    }

    /// When its rule is due, given an mtime (from the last look, if any).
    fn due(&self, t: &Timing, mtime_ns: Option<i64>, now: Instant, now_ns: i64) -> Instant {
        // The instant the wall clock reads `at_ns`, or `now` if that has passed.
        let wall =
            |at_ns: i64| now + Duration::from_nanos(at_ns.saturating_sub(now_ns).max(0) as u64);
        let after = |d: Duration| mtime_ns.map(|m| m.saturating_add(d.as_nanos() as i64));
        match self.phase {
            Phase::Closed => self.since + t.quiet_period,
            Phase::Settling => {
                let quiet = self.since + t.quiet_period;
                after(t.settle).map_or(quiet, |s| quiet.max(wall(s)))
            }
            Phase::Writing => after(t.stale()).map_or(self.since + t.stale(), wall),
        }
    }

    /// When it needs its next look.
    pub fn next_look(&self, t: &Timing, now: Instant, now_ns: i64) -> Instant {
        match self.look {
            // A file being written needs no look before it could have gone stale.
            None if self.phase == Phase::Writing => self.since + t.stale(),
            None => self.since,
            Some(look) => self
                .due(t, Some(look.mtime_ns), now, now_ns)
                .max(look.at + t.recheck),
        }
    }

    /// Takes a look at it (its size and mtime now); true when it is ready to ship.
    pub fn observe(
        &mut self,
        size: u64,
        mtime_ns: i64,
        t: &Timing,
        now: Instant,
        now_ns: i64,
    ) -> bool {
        let unchanged = self
            .look
            .is_some_and(|l| l.size == size && l.mtime_ns == mtime_ns);
        let ready = unchanged && self.due(t, Some(mtime_ns), now, now_ns) <= now;
        self.look = Some(Look {
            at: now,
            size,
            mtime_ns,
        });
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        Timing::new(Duration::from_secs(1), Duration::from_secs(2))
    }

    /// Drives one candidate as the event loop does: look whenever it asks, until ready;
    /// the file has `size` and `mtime_ns` throughout. Returns when it was ready and how
    /// many looks it took.
    fn ship(
        mut c: Candidate,
        t: &Timing,
        start: Instant,
        start_ns: i64,
        mtime_ns: i64,
    ) -> (Duration, u32) {
        let mut looks = 0;
        let mut now = start;
        loop {
            let at = c.next_look(t, now, start_ns + (now - start).as_nanos() as i64);
            now = now.max(at);
            let now_ns = start_ns + (now - start).as_nanos() as i64;
            looks += 1;
            if c.observe(4_500_000, mtime_ns, t, now, now_ns) {
                return (now - start, looks);
            }
            assert!(looks < 1000, "never ready");
        }
    }

    #[test]
    fn a_closed_file_is_ready_exactly_when_its_quiet_period_ends() {
        let t = timing();
        let start = Instant::now();
        let start_ns = 1_700_000_000_000_000_000;
        let mut c = Candidate::new(Phase::Writing, start);
        c.written(start);
        c.closed(start);
        // A look right after the close, one when the quiet period is over: not a tick
        // (250 ms here) later.
        assert_eq!(ship(c, &t, start, start_ns, start_ns), (t.quiet_period, 2));
    }

    #[test]
    fn a_metadata_change_after_the_close_restarts_the_quiet_period() {
        let t = timing();
        let start = Instant::now();
        let start_ns = 1_700_000_000_000_000_000;
        let mut c = Candidate::new(Phase::Closed, start);
        assert!(!c.observe(10, start_ns, &t, start, start_ns));
        let later = start + 300 * MS;
        c.touched(later);
        assert_eq!(
            c.next_look(&t, later, start_ns),
            later,
            "a fresh look at once"
        );
        let (took, looks) = ship(c, &t, later, start_ns + 300_000_000, start_ns + 300_000_000);
        assert_eq!((took, looks), (t.quiet_period, 2));
    }

    #[test]
    fn a_changed_file_is_looked_at_again_after_recheck() {
        let t = timing();
        let start = Instant::now();
        let ns = 1_700_000_000_000_000_000;
        let mut c = Candidate::new(Phase::Closed, start);
        assert!(!c.observe(10, ns, &t, start, ns));
        let due = start + t.quiet_period;
        assert_eq!(c.next_look(&t, start, ns), due);
        // Grew without an event (events lost): not ready, and looked at again soon.
        assert!(!c.observe(20, ns + 1, &t, due, ns));
        assert_eq!(c.next_look(&t, due, ns), due + t.recheck);
        assert!(c.observe(20, ns + 1, &t, due + t.recheck, ns));
    }

    #[test]
    fn a_settling_file_waits_for_its_mtime_to_be_settle_old() {
        let t = timing();
        let start = Instant::now();
        let start_ns = 1_700_000_000_000_000_000;
        // Modified 500 ms before it was found: settled 1.5 s after.
        let c = Candidate::new(Phase::Settling, start);
        let (took, looks) = ship(c, &t, start, start_ns, start_ns - 500_000_000);
        assert_eq!((took, looks), (Duration::from_millis(1500), 2));
        // Old already: the quiet period decides.
        let c = Candidate::new(Phase::Settling, start);
        let (took, _) = ship(c, &t, start, start_ns, start_ns - 10_000_000_000);
        assert_eq!(took, t.quiet_period);
    }

    #[test]
    fn a_writer_that_never_closes_is_shipped_once_stale() {
        let t = timing();
        let start = Instant::now();
        let start_ns = 1_700_000_000_000_000_000;
        let mut c = Candidate::new(Phase::Writing, start);
        c.written(start);
        assert_eq!(
            c.next_look(&t, start, start_ns),
            start + STALE_WRITER,
            "no look while writing"
        );
        let (took, _) = ship(c, &t, start, start_ns, start_ns);
        assert!(
            took >= STALE_WRITER && took <= STALE_WRITER + t.recheck,
            "{took:?}"
        );
    }

    #[test]
    fn one_look_is_never_enough() {
        // Even long past every deadline, the first look only records the file.
        let t = timing();
        let start = Instant::now();
        let mut c = Candidate::new(Phase::Closed, start);
        let late = start + Duration::from_secs(100);
        assert!(!c.observe(1, 0, &t, late, 100_000_000_000));
        assert!(c.observe(1, 0, &t, late + t.recheck, 100_000_000_000));
    }
}
