//! The running receiver's state for `skyferry-receiver status`: every second a JSON
//! file at `receiver.state_file` (see `skyferry_common::state_file`) with the agents
//! connected and their last heartbeats, the storage state, the stall history and the
//! node load.
//!
//! By default the file is on the storage (`<storage_root>/.skyferry/state.json`): while
//! the storage is stalled its write waits (on its own blocking thread, one at a time),
//! and `status` then says the receiver runs but its state is old. Off the storage (the
//! shipped systemd setup puts it in the runtime directory) it stays current through a
//! stall and shows it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use skyferry_common::protocol::{AgentHeartbeat, StorageState};
use skyferry_common::state_file::unix_s;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// What the receiver knows of one agent id.
#[derive(Debug, Default, Clone)]
struct Seen {
    connections: usize,
    last_heartbeat: Option<(AgentHeartbeat, SystemTime)>,
}

/// Agents by id: connections and last heartbeat (ids are validated certificate names).
#[derive(Debug, Default)]
pub struct AgentsSeen {
    agents: Mutex<BTreeMap<String, Seen>>,
}

impl AgentsSeen {
    fn with(&self, agent: &str, f: impl FnOnce(&mut Seen)) {
        let mut a = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        f(a.entry(agent.to_owned()).or_default());
    }

    pub fn connected(&self, agent: &str) {
        self.with(agent, |s| s.connections += 1);
    }

    pub fn disconnected(&self, agent: &str) {
        self.with(agent, |s| s.connections = s.connections.saturating_sub(1));
    }

    pub fn heartbeat(&self, agent: &str, hb: &AgentHeartbeat) {
        self.with(agent, |s| {
            s.last_heartbeat = Some((hb.clone(), SystemTime::now()))
        });
    }

    fn json(&self) -> Value {
        let a = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        a.iter()
            .map(|(id, s)| {
                let hb = s.last_heartbeat.as_ref().map(|(hb, at)| {
                    json!({
                        "at_unix_s": unix_s(*at),
                        "pending_files": hb.pending_files,
                        "pending_bytes": hb.pending_bytes,
                        "oldest_pending_age_seconds": hb.oldest_pending_age_s,
                        "send_rate_bits_per_second": hb.send_rate_bps,
                        "node_load": hb.node_load.as_ref().map(skyferry_common::state_file::node_load_json),
                    })
                });
                (id.clone(), json!({ "connections": s.connections, "last_heartbeat": hb }))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

fn snapshot(shared: &Shared) -> Value {
    let state = if shared.stall.current().is_some() {
        StorageState::Stalled
    } else {
        shared.last_state()
    };
    let stalls: Vec<Value> = shared
        .stall
        .history()
        .iter()
        .map(|s| {
            json!({
                "operation": s.kind.as_str(),
                "since_unix_s": unix_s(s.since),
                "duration_seconds": s.lasted.map(|d| d.as_secs_f64()),
            })
        })
        .collect();
    json!({
        "agents": shared.seen.json(),
        "storage": skyferry_common::state_file::storage_name(state),
        "stalls": stalls,
        "node_load": skyferry_common::state_file::node_load_json(&shared.node_load()),
    })
}

/// Rewrites the state file every second until `shutdown`; a write that hangs on stalled
/// storage delays the next one, nothing else.
pub async fn publish(shared: Arc<Shared>, shutdown: CancellationToken) {
    let path = shared.config.state_file.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (state, p) = (snapshot(&shared), path.clone());
        let written =
            tokio::task::spawn_blocking(move || skyferry_common::state_file::write(&p, state));
        let written = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = written => w,
        };
        match written {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the status state file");
                }
            }
            Err(_) => return,
        }
    }
}

/// `skyferry-receiver status`: the state file, as JSON (with `running` and
/// `state_age_seconds`) or as text.
pub fn report(state_file: &std::path::Path, as_json: bool) -> Result<String, String> {
    use std::fmt::Write as _;
    let r = skyferry_common::state_file::read(state_file, "skyferry-receiver")
        .map_err(|e| format!("{e} (has the receiver run with this config?)"))?;
    if as_json {
        let mut s = r.state.clone();
        s["running"] = r.running.into();
        s["state_age_seconds"] = ((r.age.as_secs_f64() * 10.0).round() / 10.0).into();
        return Ok(format!("{s}\n"));
    }
    let s = &r.state;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{}",
        skyferry_common::state_file::verdict(&r, "receiver")
    );
    let _ = writeln!(out, "storage     {}", s["storage"].as_str().unwrap_or("-"));
    let now = unix_s(SystemTime::now());
    match s["agents"].as_object() {
        Some(agents) if !agents.is_empty() => {
            for (id, a) in agents {
                let hb = &a["last_heartbeat"];
                let last = hb["at_unix_s"].as_f64().map_or("no heartbeat".into(), |t| {
                    format!("heartbeat {:.0} s ago", (now - t).max(0.0))
                });
                let _ = writeln!(
                    out,
                    "agent {id:?}: {} connection(s), {last}, {} files / {} MB pending",
                    a["connections"].as_u64().unwrap_or(0),
                    hb["pending_files"].as_u64().unwrap_or(0),
                    hb["pending_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                );
            }
        }
        _ => {
            let _ = writeln!(out, "agents      none seen");
        }
    }
    let stalls = s["stalls"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if stalls.is_empty() {
        let _ = writeln!(out, "stalls      none");
    }
    for st in stalls {
        let since = st["since_unix_s"].as_f64().unwrap_or(0.0);
        let since = crate::health::stall::rfc3339(
            SystemTime::UNIX_EPOCH + Duration::from_secs_f64(since.max(0.0)),
        );
        let _ = match st["duration_seconds"].as_f64() {
            Some(d) => writeln!(
                out,
                "stall       {since}, {d:.1} s ({})",
                st["operation"].as_str().unwrap_or("-")
            ),
            None => writeln!(
                out,
                "stall       {since}, ongoing ({})",
                st["operation"].as_str().unwrap_or("-")
            ),
        };
    }
    let _ = writeln!(
        out,
        "node load   {}",
        skyferry_common::state_file::load_text(&s["node_load"])
    );
    Ok(out)
}
