//! Wall-clock times as signed nanoseconds since the Unix epoch: the unit of file mtimes
//! on the wire (`Offer.mtime_ns`), in the journal and in the inventory. One definition, so
//! that the agent's and the receiver's idea of "the same mtime" cannot drift apart.
//! (The pure protocol never reads the clock; these are for the I/O edges.)

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in nanoseconds since the epoch; 0 for times before it (or unrepresentable).
pub fn ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    ns(SystemTime::now())
}

/// A file's mtime in nanoseconds since the epoch (0 if the platform has none).
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified().map(ns).unwrap_or(0)
}
