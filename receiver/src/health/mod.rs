//! The storage state reported to agents in heartbeats: `full` when free space is below a
//! small reserve, and also for a while after a write failed with ENOSPC (free space alone
//! can look fine again the moment the failed file's partial is deleted, and an agent that
//! resumed at once would only fill the disk again).
//!
//! Only the filesystem itself decides: an offer that is refused because that one file
//! does not fit is answered on its own (`storage_full` for that file) and changes nothing
//! here, so that one agent offering an oversize file cannot pause the fleet.
//!
//! After an ENOSPC the state stays `full` until one of:
//! - free space covers the reserve plus what the failed file needed ("space returned");
//! - a file whose session started after the ENOSPC was stored ("a write succeeded");
//! - [`FULL_HOLD`] passed, so that agents probe again even when `statvfs` cannot see the
//!   limit (quotas).
//!
//! Pure: callers pass the clock and the free space in.

pub mod stall;

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use skyferry_common::protocol::StorageState;

/// Below this much free space the receiver reports its storage as full.
pub const FULL_BELOW: u64 = 16 << 20;

/// Longest time an ENOSPC alone keeps the state `full`.
pub const FULL_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Mark {
    /// When the latest ENOSPC happened, while it still counts.
    since: Option<Instant>,
    /// Bytes the failed files still needed (the largest since the mark was set).
    needed: u64,
    /// Bumped by every ENOSPC; sessions remember the value they started under.
    epoch: u64,
    /// The state last reported, to log changes once.
    reported: Option<StorageState>,
}

/// Shared by all sessions and heartbeats.
#[derive(Debug, Default)]
pub struct StorageHealth {
    mark: Mutex<Mark>,
}

impl StorageHealth {
    fn mark(&self) -> std::sync::MutexGuard<'_, Mark> {
        // Plain values: a panicking holder cannot leave them inconsistent.
        self.mark.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current epoch, taken by a session when it starts writing.
    pub fn epoch(&self) -> u64 {
        self.mark().epoch
    }

    /// A write failed with ENOSPC/EDQUOT; the file still needed `needed` bytes. Returns
    /// true when this starts a full period.
    pub fn note_full(&self, needed: u64, now: Instant) -> bool {
        let mut m = self.mark();
        let started = m.since.is_none();
        m.needed = if started {
            needed
        } else {
            m.needed.max(needed)
        };
        m.since = Some(now);
        m.epoch += 1;
        started
    }

    /// A file was stored; `started_epoch` is the epoch its session began under. Returns
    /// true when this ends a full period.
    pub fn note_stored(&self, started_epoch: u64) -> bool {
        let mut m = self.mark();
        if m.since.is_some() && started_epoch == m.epoch {
            m.since = None;
            return true;
        }
        false
    }

    /// The state to report with `free` bytes available.
    pub fn state(&self, free: Option<u64>, now: Instant) -> StorageState {
        let mut m = self.mark();
        if let Some(since) = m.since {
            let expired = now.saturating_duration_since(since) >= FULL_HOLD;
            let returned = free.is_some_and(|f| f >= FULL_BELOW.saturating_add(m.needed));
            if expired || returned {
                m.since = None;
            }
        }
        let state = match free {
            Some(f) if f < FULL_BELOW => StorageState::Full,
            _ if m.since.is_some() => StorageState::Full,
            _ => StorageState::Ok,
        };
        let previous = m.reported.replace(state);
        if previous != Some(state) {
            match state {
                StorageState::Full => tracing::warn!(
                    free_bytes = free.unwrap_or(0),
                    reserve_bytes = FULL_BELOW,
                    "storage full; heartbeats tell agents to pause"
                ),
                _ if previous.is_some() => tracing::info!(
                    free_bytes = free.unwrap_or(0),
                    "storage has room again; heartbeats tell agents to resume"
                ),
                _ => {}
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_reserve_alone_decides_without_enospc() {
        let h = StorageHealth::default();
        let now = Instant::now();
        assert_eq!(h.state(Some(FULL_BELOW - 1), now), StorageState::Full);
        assert_eq!(h.state(Some(FULL_BELOW), now), StorageState::Ok);
        assert_eq!(h.state(None, now), StorageState::Ok);
    }

    #[test]
    fn enospc_holds_full_until_space_returns() {
        let h = StorageHealth::default();
        let t0 = Instant::now();
        assert!(h.note_full(100 * MIB, t0));
        // Plenty above the reserve, but not enough for the file that failed.
        assert_eq!(h.state(Some(50 * MIB), t0), StorageState::Full);
        assert_eq!(
            h.state(Some(FULL_BELOW + 100 * MIB), t0 + Duration::from_secs(1)),
            StorageState::Ok
        );
        // Cleared for good: less space later is judged by the reserve only.
        assert_eq!(h.state(Some(50 * MIB), t0), StorageState::Ok);
    }

    #[test]
    fn enospc_hold_expires_so_that_agents_probe_again() {
        let h = StorageHealth::default();
        let t0 = Instant::now();
        h.note_full(100 * MIB, t0);
        assert_eq!(
            h.state(None, t0 + FULL_HOLD - Duration::from_secs(1)),
            StorageState::Full
        );
        assert_eq!(h.state(None, t0 + FULL_HOLD), StorageState::Ok);
    }

    #[test]
    fn only_a_file_started_after_the_enospc_clears_it() {
        let h = StorageHealth::default();
        let t0 = Instant::now();
        let before = h.epoch();
        h.note_full(MIB, t0);
        let after = h.epoch();
        assert!(
            !h.note_stored(before),
            "a file already in flight proves nothing"
        );
        assert_eq!(h.state(Some(FULL_BELOW), t0), StorageState::Full);
        assert!(h.note_stored(after));
        assert_eq!(h.state(Some(FULL_BELOW), t0), StorageState::Ok);
        // A second ENOSPC while full extends the mark and keeps the largest need.
        h.note_full(10 * MIB, t0);
        assert!(!h.note_full(MIB, t0));
        assert_eq!(h.state(Some(FULL_BELOW + 5 * MIB), t0), StorageState::Full);
    }
}
