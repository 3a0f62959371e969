//! The systemd units and the daemons' side of `Type=notify`:
//! - `systemd-analyze verify` is clean and `systemd-analyze security --offline=true`
//!   rates both units at an exposure of 2.0 or less (skipped, saying so, only where
//!   systemd-analyze is not installed);
//! - with a fake `NOTIFY_SOCKET` (a unix datagram socket in the test's directory) and
//!   `WATCHDOG_USEC`, the real receiver and agent send READY=1 only once their ports are
//!   bound, STATUS= lines, WATCHDOG=1 at half the interval, RELOADING=1/READY=1 around the
//!   agent's SIGHUP, and STOPPING=1 at SIGTERM;
//! - a config error exits 64 without READY=1.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skyferry_tests::binaries::binary;
use skyferry_tests::{Pair, PairOptions};

const UNITS: [(&str, &str); 2] = [
    ("skyferry-agent.service", "skyferry-agent"),
    ("skyferry-receiver.service", "skyferry-receiver"),
];

/// The workspace's `systemd/` directory.
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian package `systemd`); \
             the units are not checked"
        );
    }
    found.then_some("systemd-analyze")
}

/// Copies of the shipped units in a temp dir, `ExecStart` pointing at the built binaries
/// (verify wants the executable to exist).
fn units_for_built_binaries() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut paths = Vec::new();
    for (unit, bin) in UNITS {
        let text = std::fs::read_to_string(units_dir().join(unit)).expect("read unit");
        let installed = format!("/usr/local/bin/{bin}");
        assert!(
            text.contains(&format!("ExecStart={installed} ")),
            "{unit} starts {installed}"
        );
        let built = binary(bin).expect("binary");
        let path = dir.path().join(unit);
        std::fs::write(
            &path,
            text.replace(&installed, &built.display().to_string()),
        )
        .expect("write unit");
        paths.push(path);
    }
    (dir, paths)
}

#[test]
fn systemd_analyze_verify_is_clean_for_both_units() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let (_dir, units) = units_for_built_binaries();
    let out = Command::new(tool)
        .arg("verify")
        .args(&units)
        .output()
        .expect("run systemd-analyze verify");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stdout}{stderr}",
        out.status
    );
}

#[test]
fn both_units_have_an_exposure_of_at_most_2() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let (_dir, units) = units_for_built_binaries();
    for unit in units {
        let out = Command::new(tool)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze security");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure line for {}:\n{text}", unit.display()));
        let level: f64 = line
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable exposure line {line:?}"));
        assert!(level <= 2.0, "{}: {line}\n{text}", unit.display());
    }
}

/// A fake service manager: the socket `NOTIFY_SOCKET` names, and every message received.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    /// (arrival, message) in order.
    received: Vec<(Instant, String)>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        Manager {
            socket,
            path,
            received: Vec::new(),
        }
    }

    /// `env NOTIFY_SOCKET=... WATCHDOG_USEC=...` to start a daemon through.
    fn wrapper(&self, watchdog: Duration) -> Vec<String> {
        vec![
            "env".into(),
            format!("NOTIFY_SOCKET={}", self.path.display()),
            format!("WATCHDOG_USEC={}", watchdog.as_micros()),
        ]
    }

    /// Receives until a message for which `wanted` holds (returned) or `timeout`;
    /// `on_each` sees every message as it arrives.
    fn wait_for(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
        mut on_each: impl FnMut(&str),
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                on_each(&msg);
                self.received.push((Instant::now(), msg.clone()));
                if wanted(&msg) {
                    return Some(msg);
                }
            }
        }
        None
    }

    /// Receives everything for `window`; returns how many WATCHDOG=1 pings came.
    fn count_pings(&mut self, window: Duration) -> usize {
        let start = self.received.len();
        self.wait_for(window, |_| false, |_| {});
        self.received[start..]
            .iter()
            .filter(|(_, m)| has(m, "WATCHDOG=1"))
            .count()
    }

    fn statuses(&self) -> Vec<&str> {
        self.received
            .iter()
            .flat_map(|(_, m)| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .collect()
    }

    fn log(&self) -> String {
        self.received
            .iter()
            .map(|(_, m)| m.replace('\n', " | "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

const WATCHDOG: Duration = Duration::from_secs(2);

/// Pings over a 6 s window at half of a 2 s watchdog: about 6; tolerant bounds, and far
/// from both "no pings" and "pings at the full interval" (3) or faster than asked.
fn assert_pings_at_half_the_interval(manager: &mut Manager, who: &str) {
    let pings = manager.count_pings(Duration::from_secs(6));
    assert!(
        (5..=8).contains(&pings),
        "{who}: {pings} WATCHDOG=1 pings in 6 s with WATCHDOG_USEC=2 s (expected ~6)\n{}",
        manager.log()
    );
}

#[test]
fn the_receiver_notifies_ready_after_binding_status_watchdog_and_stopping() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let mut manager = Manager::new(pair.dir());
    pair.set_receiver_wrapper(manager.wrapper(WATCHDOG));
    pair.start_receiver().expect("start receiver");

    let mut bound_at_ready = None;
    let ready = manager.wait_for(
        Duration::from_secs(20),
        |m| has(m, "READY=1"),
        |m| {
            if has(m, "READY=1") {
                bound_at_ready = Some(pair.receiver_port_bound().expect("read /proc/net/udp"));
            }
        },
    );
    assert!(
        ready.is_some(),
        "no READY=1 from the receiver\n{}\n{}",
        manager.log(),
        pair.diagnostics()
    );
    assert_eq!(
        bound_at_ready,
        Some(true),
        "the UDP port is bound when READY=1 arrives"
    );
    assert_pings_at_half_the_interval(&mut manager, "receiver");
    let statuses = manager.statuses();
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("agents connected; storage ok")),
        "STATUS lines with agents and storage: {statuses:?}"
    );

    let status = pair.stop_receiver().expect("stop receiver");
    assert!(status.success(), "receiver exit after SIGTERM: {status}");
    manager.wait_for(Duration::from_secs(1), |_| false, |_| {});
    assert!(
        manager.received.iter().any(|(_, m)| has(m, "STOPPING=1")),
        "STOPPING=1 at SIGTERM\n{}",
        manager.log()
    );
}

#[test]
fn the_agent_notifies_ready_status_watchdog_reloading_and_stopping() {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let manager_dir = pair.dir().to_path_buf();
    let mut manager = Manager::new(&manager_dir);
    pair.reconfigure(|o| o.agent_wrapper = manager.wrapper(WATCHDOG))
        .expect("wrapper");
    pair.write_agent_config(|c| {
        c.push_str(&format!(
            "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        ))
    })
    .expect("metrics config");
    pair.start_receiver().expect("start receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("start agent");

    let journal = pair.journal();
    let mut at_ready = None;
    let ready = manager.wait_for(
        Duration::from_secs(20),
        |m| has(m, "READY=1"),
        |m| {
            if has(m, "READY=1") {
                let metrics_bound =
                    std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_ok();
                at_ready = Some((metrics_bound, journal.is_file()));
            }
        },
    );
    assert!(
        ready.is_some(),
        "no READY=1 from the agent\n{}\n{}",
        manager.log(),
        pair.diagnostics()
    );
    assert_eq!(
        at_ready,
        Some((true, true)),
        "(metrics port bound, journal open) when READY=1 arrives"
    );
    assert_pings_at_half_the_interval(&mut manager, "agent");
    let statuses = manager.statuses();
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("connected to ") && s.contains("files (")),
        "STATUS lines with the connection and the backlog: {statuses:?}"
    );

    // SIGHUP (systemctl reload): RELOADING=1, then READY=1 again; the agent keeps running.
    let pid = pair.agent_pid().expect("agent pid").to_string();
    let sent = Command::new("kill").args(["-HUP", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -HUP");
    let mut reloading = false;
    let reloaded = manager.wait_for(
        Duration::from_secs(10),
        |m| has(m, "READY=1"),
        |m| reloading |= has(m, "RELOADING=1") && m.contains("MONOTONIC_USEC="),
    );
    assert!(
        reloading && reloaded.is_some(),
        "RELOADING=1 (with MONOTONIC_USEC) then READY=1 after SIGHUP\n{}",
        manager.log()
    );
    pair.ensure_alive().expect("the agent survives SIGHUP");

    let status = pair.stop_agent().expect("stop agent");
    assert!(status.success(), "agent exit after SIGTERM: {status}");
    manager.wait_for(Duration::from_secs(1), |_| false, |_| {});
    assert!(
        manager.received.iter().any(|(_, m)| has(m, "STOPPING=1")),
        "STOPPING=1 at SIGTERM\n{}",
        manager.log()
    );
}

#[test]
fn a_config_error_exits_64_without_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut manager = Manager::new(dir.path());
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[agent]\nid = \"Not Valid!\"\n").expect("write config");
    for bin in ["skyferry-agent", "skyferry-receiver"] {
        let out = Command::new(binary(bin).expect("binary"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &manager.path)
            .env("WATCHDOG_USEC", "2000000")
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        manager.wait_for(Duration::from_millis(300), |_| false, |_| {});
        assert!(
            manager.received.is_empty(),
            "{bin} sent nothing to the service manager: {}",
            manager.log()
        );
    }
}
