//! The small JSON file a running daemon rewrites every second for its `status` command
//! (the agent's beside its journal, the receiver's under `<storage_root>/.skyferry/`):
//! written to a temporary name and renamed, so a reader sees a whole file or the
//! previous one. The file carries the writer's pid and the time it was written; a reader
//! tells a stopped daemon from a slow writer (the receiver's may wait on stalled storage)
//! by whether that pid still runs this program.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::protocol::{NodeLoadSummary, StorageState};

/// The state is older than this: the writer is not keeping up (or gone).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Writes `state` (an object) with `written_at_unix_s` and `pid` added, atomically.
/// Blocking: call off the runtime.
pub fn write(path: &Path, mut state: Value) -> std::io::Result<()> {
    if let Value::Object(o) = &mut state {
        o.insert("written_at_unix_s".into(), unix_s(SystemTime::now()).into());
        o.insert("pid".into(), std::process::id().into());
    }
    let tmp = tmp_path(path);
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&tmp, path)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A node-load summary as JSON (ratios in percent; absent parts are null).
pub fn node_load_json(l: &NodeLoadSummary) -> Value {
    let pct = |bp: Option<u16>| bp.map(|v| f64::from(v) / 100.0);
    json!({
        "steal_percent": pct(l.steal_bp),
        "pressure_cpu_some_avg10_percent": pct(l.pressure_cpu_bp),
        "pressure_io_some_avg10_percent": pct(l.pressure_io_bp),
        "load1": l.load1_centi.map(|v| f64::from(v) / 100.0),
    })
}

/// `ok`, `stalled` or `full`.
pub fn storage_name(s: StorageState) -> &'static str {
    match s {
        StorageState::Ok => "ok",
        StorageState::Stalled => "stalled",
        StorageState::Full => "full",
    }
}

/// `steal 0.1%, psi cpu 0.0% io 2.5%, load1 0.52` from [`node_load_json`] (`-` where
/// the node has no value).
pub fn load_text(l: &Value) -> String {
    let v = |k: &str| l[k].as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    format!(
        "steal {}%, psi cpu {}% io {}%, load1 {}",
        v("steal_percent"),
        v("pressure_cpu_some_avg10_percent"),
        v("pressure_io_some_avg10_percent"),
        l["load1"]
            .as_f64()
            .map_or("-".into(), |x| format!("{x:.2}")),
    )
}

pub fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

/// A state file as read back.
#[derive(Debug, Clone)]
pub struct Read {
    pub state: Value,
    /// How old the state is.
    pub age: Duration,
    /// The pid that wrote it runs a program named `program` (the daemon is up).
    pub running: bool,
}

/// Reads the state file; `program` is the daemon's executable name.
pub fn read(path: &Path, program: &str) -> Result<Read, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let state: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a state file: {e}", path.display()))?;
    let written = state["written_at_unix_s"].as_f64().unwrap_or(0.0);
    let age = Duration::from_secs_f64((unix_s(SystemTime::now()) - written).max(0.0));
    let running = state["pid"].as_u64().is_some_and(|pid| runs(pid, program));
    Ok(Read {
        state,
        age,
        running,
    })
}

/// Whether process `pid` runs `program` (its `comm`, cut at 15 bytes by the kernel).
fn runs(pid: u64, program: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| {
        let c = c.trim_end();
        !c.is_empty() && program.starts_with(c)
    })
}

/// A one-line verdict for the human status: running (with the state's age) or not.
pub fn verdict(r: &Read, what: &str) -> String {
    let at = r.state["written_at_unix_s"].as_f64().unwrap_or(0.0);
    let when = humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at.max(0.0)),
    );
    match (r.running, r.age > STALE_AFTER) {
        (true, false) => format!("{what} running (state {:.1} s old)", r.age.as_secs_f64()),
        (true, true) => format!(
            "{what} running, but its state is {:.0} s old (last at {when}): it may be blocked",
            r.age.as_secs_f64()
        ),
        (false, _) => format!("{what} not running (last state at {when})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_state_reads_back_as_running_and_a_dead_pid_as_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write(&p, serde_json::json!({"connection": "connected"})).unwrap();
        assert!(!dir.path().join("state.json.tmp").exists());
        // This test binary's own comm is its name: check against that.
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let r = read(&p, me.trim_end()).unwrap();
        assert!(r.running && r.age < STALE_AFTER, "{r:?}");
        assert_eq!(r.state["connection"], "connected");
        assert!(verdict(&r, "agent").starts_with("agent running"));
        let r = read(&p, "skyferry-none").unwrap();
        assert!(!r.running);
        assert!(
            verdict(&r, "agent").starts_with("agent not running (last state at 20"),
            "{}",
            verdict(&r, "agent")
        );
        std::fs::write(&p, "{").unwrap();
        assert!(read(&p, "x").unwrap_err().contains("is not a state file"));
    }
}
