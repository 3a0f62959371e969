//! Rates, ETAs and sizes for people: the pure arithmetic and formatting behind
//! `status` and `replay show` (no clock reads: callers pass the time).

use std::collections::VecDeque;
use std::time::Duration;

/// A rate over a sliding window of readings of a growing total (bytes sent, bytes
/// done): the total's growth between the oldest reading in the window and the newest,
/// divided by the time between them. Unlike a smoothed rate it is exact for a steady
/// flow and forgets a burst once it leaves the window. Memory: at most `cap` readings.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: Duration,
    cap: usize,
    /// (seconds on the caller's clock, total), oldest first.
    readings: VecDeque<(f64, u64)>,
}

impl RateWindow {
    /// A window of `window`, keeping at most `cap` readings (at least 2).
    pub fn new(window: Duration, cap: usize) -> RateWindow {
        RateWindow {
            window,
            cap: cap.max(2),
            readings: VecDeque::new(),
        }
    }

    /// Records `total` at `at_s` (seconds on any monotonic clock). A total that went
    /// down (a counter reset, a cancelled replay) starts the window again.
    pub fn push(&mut self, at_s: f64, total: u64) {
        if self
            .readings
            .back()
            .is_some_and(|&(t, v)| v > total || at_s < t)
        {
            self.readings.clear();
        }
        self.readings.push_back((at_s, total));
        // Keep one reading at or before the window's start, so the window stays full.
        while self.readings.len() > 2
            && self
                .readings
                .get(1)
                .is_some_and(|&(t, _)| at_s - t >= self.window.as_secs_f64())
        {
            self.readings.pop_front();
        }
        while self.readings.len() > self.cap {
            self.readings.pop_front();
        }
    }

    /// Units per second over the window; `None` until two readings at least a tenth of a
    /// second apart.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, v0), &(t1, v1)) = (self.readings.front()?, self.readings.back()?);
        let secs = t1 - t0;
        (secs >= 0.1).then(|| v1.saturating_sub(v0) as f64 / secs)
    }
}

/// Seconds to move `remaining` bytes at `rate` bytes per second: 0 when nothing is
/// left, `None` when nothing moves (no rate, or zero).
pub fn eta_seconds(remaining: u64, rate: Option<f64>) -> Option<u64> {
    if remaining == 0 {
        return Some(0);
    }
    rate.filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| (remaining as f64 / r).ceil().min(u64::MAX as f64) as u64)
}

/// A size in decimal units with three significant digits: `0 B`, `999 B`, `1.50 kB`,
/// `24.0 MB`, `1.23 TB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 999.5 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    if v < 9.995 {
        format!("{v:.2} {unit}")
    } else if v < 99.95 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// A rate in bytes per second: `24.0 MB/s`, `-` when unknown.
pub fn rate(bytes_per_s: Option<f64>) -> String {
    match bytes_per_s {
        Some(r) if r.is_finite() && r >= 0.0 => format!("{}/s", bytes(r.round() as u64)),
        _ => "-".into(),
    }
}

/// A duration in its two largest units: `45s`, `12m 5s`, `3h 20m`, `9d 4h`.
pub fn duration(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let Some(i) = units.iter().position(|(u, _)| secs >= *u) else {
        return "0s".into();
    };
    let (big, big_name) = units[i];
    let mut out = format!("{}{big_name}", secs / big);
    if let Some(&(small, small_name)) = units.get(i + 1) {
        let rest = secs % big / small;
        if rest > 0 {
            out.push_str(&format!(" {rest}{small_name}"));
        }
    }
    out
}

/// An ETA for people: `3h 20m`, `0s` when done, `unknown` when nothing moves.
pub fn eta(secs: Option<u64>) -> String {
    secs.map_or_else(|| "unknown".into(), duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_growth_over_the_window() {
        let mut w = RateWindow::new(Duration::from_secs(10), 64);
        assert_eq!(w.rate(), None);
        w.push(0.0, 0);
        assert_eq!(w.rate(), None, "one reading is no rate");
        w.push(0.05, 100);
        assert_eq!(w.rate(), None, "too close together");
        for s in 1..=30u32 {
            w.push(f64::from(s), u64::from(s) * 1000);
        }
        assert_eq!(w.rate(), Some(1000.0), "steady 1000/s");
        // A burst, then nothing: it counts while in the window, then is forgotten.
        w.push(31.0, 101_000);
        assert_eq!(w.rate(), Some(8000.0), "(101000 - 21000) / 10 s");
        for s in 32..=45u32 {
            w.push(f64::from(s), 101_000);
        }
        assert_eq!(w.rate(), Some(0.0));
        // A total going down starts again.
        w.push(46.0, 5);
        assert_eq!(w.rate(), None);
    }

    #[test]
    fn the_window_holds_at_most_cap_readings() {
        let mut w = RateWindow::new(Duration::from_secs(3600), 4);
        for s in 0..100u32 {
            w.push(f64::from(s), u64::from(s) * 10);
        }
        assert_eq!(w.readings.len(), 4);
        assert_eq!(w.rate(), Some(10.0));
    }

    #[test]
    fn eta_is_remaining_over_rate_rounded_up() {
        assert_eq!(eta_seconds(0, None), Some(0), "nothing left: done");
        assert_eq!(eta_seconds(1, None), None);
        assert_eq!(eta_seconds(1, Some(0.0)), None);
        assert_eq!(eta_seconds(1, Some(f64::NAN)), None);
        assert_eq!(eta_seconds(1000, Some(1000.0)), Some(1));
        assert_eq!(eta_seconds(1001, Some(1000.0)), Some(2));
        assert_eq!(eta_seconds(u64::MAX, Some(1e-300)), Some(u64::MAX));
        assert_eq!(eta(Some(7200)), "2h");
        assert_eq!(eta(None), "unknown");
    }

    #[test]
    fn sizes_durations_and_rates_read_well() {
        let cases = [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1.00 kB"),
            (1499, "1.50 kB"),
            (24_000_000, "24.0 MB"),
            (999_499_999, "999 MB"),
            (999_500_000, "1.00 GB"),
            (1_230_000_000_000, "1.23 TB"),
            (u64::MAX, "18.4 EB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want, "{n}");
        }
        for (s, want) in [
            (0, "0s"),
            (45, "45s"),
            (60, "1m"),
            (725, "12m 5s"),
            (12_000, "3h 20m"),
            (86_400 * 9 + 3600 * 4 + 59, "9d 4h"),
        ] {
            assert_eq!(duration(s), want, "{s}");
        }
        assert_eq!(rate(Some(24e6)), "24.0 MB/s");
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(-1.0)), "-");
    }
}
