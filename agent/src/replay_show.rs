//! What `replay show`, `replay list` and `status` print of a replay: one progress line
//! ([`Line`], also what the running agent writes into its state file for `status`), the
//! summary of a replay that ended ([`Summary`]), and `replay show --follow`, which
//! draws a progress bar on a terminal and prints plain lines every few seconds
//! elsewhere (a pipe, a log) until the replay ends.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::progress::{self, RateWindow};
use crate::replay::{Replay, ReplayState};

/// How often `--follow` reads the journal.
const POLL: Duration = Duration::from_secs(1);
/// How often `--follow` prints a plain line when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The window of the rates shown.
pub const RATE_WINDOW: Duration = Duration::from_secs(30);

/// A replay's progress in one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub id: i64,
    pub name: String,
    pub state: String,
    pub done_files: u64,
    pub queued_files: u64,
    pub inflight_files: u64,
    pub failed_files: u64,
    /// Bytes through (done or failed) and queued.
    pub done_bytes: u64,
    pub queued_bytes: u64,
    /// Bytes still to send (pending or in flight).
    pub remaining_bytes: u64,
    pub rate_bytes_per_second: Option<f64>,
    pub eta_seconds: Option<u64>,
}

impl Line {
    /// `rate`: bytes through per second, if known.
    pub fn of(r: &Replay, rate: Option<f64>) -> Line {
        let p = &r.progress;
        let remaining = p.pending_bytes + p.inflight_bytes;
        Line {
            id: r.id,
            name: r.name.clone(),
            state: r.state.name().into(),
            done_files: p.done_files,
            queued_files: r.queued_files,
            inflight_files: p.inflight_files,
            failed_files: p.failed_files,
            done_bytes: p.done_bytes + p.failed_bytes,
            queued_bytes: r.queued_bytes,
            remaining_bytes: remaining,
            rate_bytes_per_second: rate,
            eta_seconds: (r.state == ReplayState::Active)
                .then(|| progress::eta_seconds(remaining, rate))
                .flatten(),
        }
    }

    /// `replay 3 "2023" active: 1200/84000 files, 2 in flight, 0 failed; 2.40 GB / 168 GB,
    /// 95.0 MB/s, ETA 29m 10s`.
    /// Bytes of the whole replay: what it queued, or more when files grew since.
    pub fn total_bytes(&self) -> u64 {
        self.queued_bytes
            .max(self.done_bytes + self.remaining_bytes)
    }

    pub fn text(&self) -> String {
        let total = self.total_bytes();
        let mut out = format!(
            "replay {} {:?} {}: {}/{} files, {} in flight, {} failed; {} / {}",
            self.id,
            self.name,
            self.state,
            self.done_files,
            self.queued_files,
            self.inflight_files,
            self.failed_files,
            progress::bytes(self.done_bytes),
            progress::bytes(total),
        );
        if self.state == ReplayState::Active.name() {
            out.push_str(&format!(
                ", {}, ETA {}",
                progress::rate(self.rate_bytes_per_second),
                progress::eta(self.eta_seconds)
            ));
        }
        out
    }
}

/// The numbers of a replay's summary: what it sent, what the receiver already held,
/// what failed, and how long it took (so far, while it runs).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Whether the replay is over (done or cancelled): the numbers are final.
    pub over: bool,
    /// Done files the receiver took with data, and their bytes.
    pub files_sent: u64,
    pub bytes_sent: u64,
    /// Done files the receiver acknowledged without data: it already held them.
    pub files_present: u64,
    pub bytes_present: u64,
    pub files_failed: u64,
    pub bytes_failed: u64,
    /// Vanished or superseded before they were sent.
    pub files_gone: u64,
    pub files_queued: u64,
    pub bytes_queued: u64,
    /// Selected but already queued or done (without `--resend`).
    pub files_skipped: u64,
    /// From its creation to its end (or to `now`).
    pub duration_seconds: f64,
}

impl Summary {
    pub fn of(r: &Replay, now_ns: i64) -> Summary {
        let p = &r.progress;
        let end = r.finished_ns.unwrap_or(now_ns);
        Summary {
            over: matches!(r.state, ReplayState::Done | ReplayState::Cancelled),
            files_sent: p.done_files.saturating_sub(p.present_files),
            bytes_sent: p.done_bytes.saturating_sub(p.present_bytes),
            files_present: p.present_files,
            bytes_present: p.present_bytes,
            files_failed: p.failed_files,
            bytes_failed: p.failed_bytes,
            files_gone: p.gone_files,
            files_queued: r.queued_files,
            bytes_queued: r.queued_bytes,
            files_skipped: r.skipped_files,
            duration_seconds: (end.saturating_sub(r.created_ns).max(0) as f64 / 1e9 * 10.0).round()
                / 10.0,
        }
    }
}

/// The summary for people: a `summary:` line once the replay is over (`so far:`
/// before), what was queued, and the failures grouped by reason.
pub fn summary_text(r: &Replay, now_ns: i64) -> String {
    let s = Summary::of(r, now_ns);
    let took = progress::duration(s.duration_seconds as u64);
    let mut out = if s.over {
        format!("summary: {} after {took}; ", r.state.name())
    } else {
        format!("so far: {} for {took}; ", r.state.name())
    };
    out.push_str(&format!(
        "{} files sent ({} bytes, {}), {} already present at the receiver ({} bytes), \
         {} failed, {} vanished or superseded\n",
        s.files_sent,
        s.bytes_sent,
        progress::bytes(s.bytes_sent),
        s.files_present,
        s.bytes_present,
        s.files_failed,
        s.files_gone,
    ));
    out.push_str(&format!(
        "  queued {} files ({}), {} skipped (already queued or done)\n",
        s.files_queued,
        progress::bytes(s.bytes_queued),
        s.files_skipped,
    ));
    let shown: u64 = r.progress.failures.iter().map(|f| f.files).sum();
    for f in &r.progress.failures {
        out.push_str(&format!(
            "  failed {} file(s): {:?} (e.g. {:?})\n",
            f.files, f.reason, f.example
        ));
    }
    if shown < s.files_failed {
        out.push_str(&format!(
            "  failed {} more file(s) for other reasons\n",
            s.files_failed - shown
        ));
    }
    out
}

/// `replay show --json`: the replay (as `replay list --json`), its rate and ETA, and
/// its summary's numbers.
pub fn json(r: &Replay, rate: Option<f64>, now_ns: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    let line = Line::of(r, rate);
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "rate_bytes_per_second".into(),
            rate.map(|r| r.round()).into(),
        );
        obj.insert("eta_seconds".into(), line.eta_seconds.into());
        obj.insert(
            "summary".into(),
            serde_json::to_value(Summary::of(r, now_ns)).unwrap_or_default(),
        );
    }
    v
}

fn over(r: &Replay) -> bool {
    matches!(r.state, ReplayState::Done | ReplayState::Cancelled)
}

/// `replay show ID [--follow] [--json]`: writes the progress to `out` (with `--follow`
/// until the replay is over: a bar when `out` is the terminal, else a line every few
/// seconds), then the summary. `read` reads the replay afresh.
pub fn show(
    mut read: impl FnMut() -> Result<Replay, anyhow::Error>,
    follow: bool,
    json_out: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let now = skyferry_common::unix_time::now_ns;
    let started = Instant::now();
    let mut window = RateWindow::new(RATE_WINDOW, 64);
    let mut r = read()?;
    let through = |r: &Replay| r.progress.done_bytes + r.progress.failed_bytes;
    window.push(0.0, through(&r));
    if follow && !over(&r) {
        let bar = (!json_out && std::io::stdout().is_terminal()).then(|| progress_bar(&r));
        let mut printed: Option<Instant> = None;
        while !over(&r) {
            let rate = window.rate();
            match &bar {
                Some(bar) => draw(bar, &r, rate),
                None if printed.is_none_or(|p| p.elapsed() >= PLAIN_EVERY) => {
                    let line = if json_out {
                        json(&r, rate, now()).to_string()
                    } else {
                        Line::of(&r, rate).text()
                    };
                    writeln!(out, "{line}")?;
                    out.flush()?;
                    printed = Some(Instant::now());
                }
                None => {}
            }
            std::thread::sleep(POLL);
            r = read()?;
            window.push(started.elapsed().as_secs_f64(), through(&r));
        }
        if let Some(bar) = bar {
            draw(&bar, &r, window.rate());
            bar.finish();
        }
    }
    let rate = window.rate();
    if json_out {
        writeln!(out, "{}", json(&r, rate, now()))?;
    } else {
        writeln!(out, "{}", Line::of(&r, rate).text())?;
        write!(out, "{}", summary_text(&r, now()))?;
    }
    out.flush()?;
    Ok(())
}

/// The terminal bar of one replay: bytes through of bytes queued, then the rate, the
/// ETA and the files.
fn progress_bar(r: &Replay) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(r.queued_bytes);
    // The template is a constant known to parse; fall back to the default style anyway.
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("replay {} {:?}", r.id, r.name));
    bar
}

fn draw(bar: &indicatif::ProgressBar, r: &Replay, rate: Option<f64>) {
    let p = &r.progress;
    let line = Line::of(r, rate);
    bar.set_length(line.total_bytes());
    bar.set_position(line.done_bytes);
    // The rate and ETA of the journal's progress (indicatif's own would count from
    // the bar's start and call an unmoving bar's ETA 0s).
    bar.set_message(format!(
        "{}, ETA {}, {}/{} files, {} failed, {}",
        progress::rate(rate),
        progress::eta(line.eta_seconds),
        p.done_files,
        r.queued_files,
        p.failed_files,
        r.state.name()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{Failure, Progress};

    fn replay(state: ReplayState) -> Replay {
        Replay {
            id: 3,
            name: "2023".into(),
            created_ns: 1_000_000_000,
            finished_ns: (state == ReplayState::Done).then_some(76_000_000_000),
            state,
            selection: String::new(),
            max_rate: None,
            enqueued: true,
            queued_files: 10,
            queued_bytes: 10_000_000,
            skipped_files: 2,
            progress: Progress {
                pending_files: 2,
                pending_bytes: 2_000_000,
                inflight_files: 1,
                inflight_bytes: 1_000_000,
                done_files: 6,
                done_bytes: 6_000_000,
                present_files: 4,
                present_bytes: 4_000_000,
                failed_files: 1,
                failed_bytes: 1_000_000,
                gone_files: 0,
                failures: vec![Failure {
                    reason: "bad_path: \"..\"".into(),
                    files: 1,
                    example: "a/../b".into(),
                }],
            },
        }
    }

    #[test]
    fn the_summary_splits_sent_from_already_present_and_groups_failures() {
        let mut r = replay(ReplayState::Done);
        (r.progress.pending_files, r.progress.inflight_files) = (0, 0);
        let s = Summary::of(&r, 0);
        assert!(s.over);
        assert_eq!((s.files_sent, s.bytes_sent), (2, 2_000_000));
        assert_eq!((s.files_present, s.bytes_present), (4, 4_000_000));
        assert_eq!((s.files_failed, s.files_skipped), (1, 2));
        assert_eq!(s.duration_seconds, 75.0);
        let text = summary_text(&r, 0);
        assert!(
            text.starts_with(
                "summary: done after 1m 15s; 2 files sent (2000000 bytes, 2.00 MB), \
                 4 already present at the receiver (4000000 bytes), 1 failed"
            ),
            "{text}"
        );
        assert!(
            text.contains("failed 1 file(s): \"bad_path: \\\"..\\\"\" (e.g. \"a/../b\")"),
            "{text}"
        );
        // More failures than the reasons shown: the rest is counted.
        r.progress.failed_files = 5;
        assert!(summary_text(&r, 0).contains("failed 4 more file(s) for other reasons"));
    }

    #[test]
    fn a_running_replay_shows_so_far_its_rate_and_eta() {
        let r = replay(ReplayState::Active);
        let s = Summary::of(&r, 11_000_000_000);
        assert!(!s.over);
        assert_eq!(s.duration_seconds, 10.0, "until now");
        assert!(summary_text(&r, 11_000_000_000).starts_with("so far: active for 10s; "));
        let line = Line::of(&r, Some(1_000_000.0));
        assert_eq!(
            (line.done_bytes, line.remaining_bytes),
            (7_000_000, 3_000_000)
        );
        assert_eq!(line.eta_seconds, Some(3));
        assert_eq!(
            line.text(),
            "replay 3 \"2023\" active: 6/10 files, 1 in flight, 1 failed; 7.00 MB / 10.0 MB, \
             1.00 MB/s, ETA 3s"
        );
        assert_eq!(Line::of(&r, None).eta_seconds, None, "no rate, no ETA");
        // Paused: no ETA, whatever the rate was.
        let paused = Line::of(&replay(ReplayState::Paused), Some(1e6));
        assert_eq!(paused.eta_seconds, None);
        assert!(
            paused.text().ends_with("7.00 MB / 10.0 MB"),
            "{}",
            paused.text()
        );
        // The state file's line reads back as written.
        let back: Line = serde_json::from_value(serde_json::to_value(&line).unwrap()).unwrap();
        assert_eq!(back, line);
        let j = json(&r, Some(1e6), 11_000_000_000);
        assert_eq!(j["summary"]["files_present"], 4);
        assert_eq!(j["eta_seconds"], 3);
        assert_eq!(j["progress"]["done_files"], 6);
    }

    #[test]
    fn show_without_follow_prints_the_line_and_the_summary() {
        let r = replay(ReplayState::Done);
        let mut out = Vec::new();
        show(|| Ok(r.clone()), true, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert!(lines
            .next()
            .unwrap()
            .starts_with("replay 3 \"2023\" done: 6/10 files"));
        assert!(lines
            .next()
            .unwrap()
            .starts_with("summary: done after 1m 15s; "));
    }
}
