//! The service manager's side of a daemon's life (systemd's `Type=notify`): `READY=1`
//! once the daemon can do its job, `STATUS=` lines, `RELOADING=1` around a reload,
//! `STOPPING=1` at shutdown, and `WATCHDOG=1` pings from a task that proves the runtime
//! still makes progress.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op; the watchdog runs only
//! when `WATCHDOG_USEC` is set (for this process: `WATCHDOG_PID`, if set, must be ours).
//! Messages go to the socket named by `NOTIFY_SOCKET` (a filesystem path, as systemd
//! sets it: `/run/systemd/notify`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Sends state changes to the service manager. Cheap to clone; a no-op without
/// `NOTIFY_SOCKET`.
#[derive(Clone, Debug)]
pub struct Notifier {
    enabled: bool,
    /// A failed send is logged once, not at every status refresh.
    warned: Arc<AtomicBool>,
}

impl Notifier {
    /// Active when `NOTIFY_SOCKET` is set (the process runs under a service manager that
    /// wants notifications).
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True when messages are sent somewhere.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Start-up (or a reload) is complete: the daemon does its job from now on.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A one-line summary of the daemon's state (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// A reload has begun; [`Notifier::ready`] ends it. Carries the monotonic time, as
    /// systemd 253+ requires with `RELOADING=1`.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading"),
            ]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
        }
    }

    /// Shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// One watchdog ping.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
                tracing::warn!(
                    socket = ?socket,
                    error = %e,
                    "cannot notify the service manager (NOTIFY_SOCKET); systemd will not see this daemon's state"
                );
            }
        }
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends; `None` when no watchdog is asked for (or `WATCHDOG_USEC` is 0).
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Pings every `period` while `probe` keeps completing: each round runs one `probe`
/// (e.g. a round trip through the blocking pool that takes the journal's lock) and pings
/// only if it finished within `period`. A probe that hangs is not started again until it
/// has finished, and no ping is sent meanwhile, so a wedged runtime, an exhausted
/// blocking pool or a stuck journal lets the watchdog fire (systemd then aborts and
/// restarts the daemon). A tick that comes late (a stalled timer) is not made up for.
/// Returns when `stop` is cancelled.
pub async fn run_watchdog<P, F>(
    period: Duration,
    mut probe: P,
    mut ping: impl FnMut(),
    stop: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The probe of an earlier round that has not finished yet.
    let mut pending: Option<tokio::task::JoinHandle<()>> = None;
    let mut stuck_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut handle = match pending.take() {
            Some(h) => h,
            None => tokio::spawn(probe()),
        };
        let finished = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(period, &mut handle) => r.is_ok(),
        };
        if finished {
            if let Some(since) = stuck_since.take() {
                tracing::warn!(
                    stuck_for = ?since.elapsed(),
                    "watchdog: the liveness check completes again; pinging"
                );
            }
            ping();
        } else {
            if stuck_since.is_none() {
                stuck_since = Some(tokio::time::Instant::now());
                tracing::error!(
                    waited = ?period,
                    "watchdog: the liveness check (runtime, blocking pool, journal) did not complete; not pinging, systemd will restart the daemon if it stays stuck"
                );
            }
            pending = Some(handle);
        }
    }
}

/// Sends `STATUS=` with what `status` returns, every `period`, until `stop`.
pub async fn refresh_status<S, F>(
    notifier: Notifier,
    period: Duration,
    mut status: S,
    stop: CancellationToken,
) where
    S: FnMut() -> F,
    F: Future<Output = String>,
{
    if !notifier.enabled() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let line = tokio::select! {
            _ = stop.cancelled() => return,
            line = status() => line,
        };
        notifier.status(&line);
    }
}

/// Bytes per second as a short human figure: "0 B/s", "850 kB/s", "120 MB/s", "1.2 GB/s".
pub fn rate(bytes: u64, over: Duration) -> String {
    let secs = over.as_secs_f64();
    let per_sec = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
    format!("{}/s", size(per_sec as u64))
}

/// A byte count as a short human figure in SI units: "0 B", "12 kB", "3.4 GB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn sizes_and_rates_read_as_people_write_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1000), "1.0 kB");
        assert_eq!(size(3_400_000_000), "3.4 GB");
        assert_eq!(size(120_000_000), "120 MB");
        assert_eq!(size(u64::MAX), "18447 PB");
        assert_eq!(rate(240_000_000, Duration::from_secs(2)), "120 MB/s");
        assert_eq!(rate(5, Duration::ZERO), "0 B/s");
    }

    /// A probe that hangs stops the pings (so that systemd's watchdog fires); once it
    /// completes, pings resume. Real time with short periods: the probe runs on a thread
    /// outside the runtime, which a paused clock would not wait for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_probe_stops_the_pings_until_it_completes() {
        let period = Duration::from_millis(40);
        let pings = Arc::new(AtomicUsize::new(0));
        let hang = Arc::new(AtomicBool::new(false));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let stop = CancellationToken::new();
        let task = {
            let (pings, hang, stop) = (pings.clone(), hang.clone(), stop.clone());
            tokio::spawn(run_watchdog(
                period,
                move || {
                    let (hang, rx) = (hang.clone(), release_rx.clone());
                    async move {
                        let _ = tokio::task::spawn_blocking(move || {
                            if hang.load(Ordering::SeqCst) {
                                let _ = rx.lock().map(|rx| rx.recv());
                            }
                        })
                        .await;
                    }
                },
                move || {
                    pings.fetch_add(1, Ordering::SeqCst);
                },
                stop,
            ))
        };
        tokio::time::sleep(period * 6).await;
        let healthy = pings.load(Ordering::SeqCst);
        assert!(healthy >= 3, "pings while the probe completes: {healthy}");

        hang.store(true, Ordering::SeqCst);
        // The round in progress may still ping once.
        tokio::time::sleep(period * 2).await;
        let at_hang = pings.load(Ordering::SeqCst);
        tokio::time::sleep(period * 8).await;
        assert_eq!(
            pings.load(Ordering::SeqCst),
            at_hang,
            "no ping while the probe hangs"
        );

        hang.store(false, Ordering::SeqCst);
        release_tx.send(()).unwrap();
        tokio::time::sleep(period * 6).await;
        assert!(
            pings.load(Ordering::SeqCst) >= at_hang + 3,
            "pings resume once the probe completes"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier {
            enabled: false,
            warned: Arc::new(AtomicBool::new(false)),
        };
        n.ready("x");
        n.status("y");
        n.reloading();
        n.stopping("z");
        n.watchdog();
        assert!(!n.warned.load(Ordering::Relaxed));
    }
}
