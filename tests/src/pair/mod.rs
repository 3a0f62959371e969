//! One skyferry agent and one receiver, as real child processes talking QUIC on 127.0.0.1,
//! in a temporary directory that holds everything they use:
//!
//! ```text
//! <tmp>/certs/          ca.pem ca.key receiver.pem receiver.key <agent id>.pem <agent id>.key
//! <tmp>/source/         the agent's watched tree (write files here)
//! <tmp>/storage/        the receiver's storage root; files land in storage/<agent id>/
//! <tmp>/agent/          the agent's journal
//! <tmp>/agent.toml      <tmp>/receiver.toml    configs, rewritten by `reconfigure` & co
//! <tmp>/agent.log       <tmp>/receiver.log     stdout+stderr, appended across restarts
//! ```
//!
//! The receiver's UDP port is chosen once and kept across restarts. With
//! [`PairOptions::via_relay`] the agent talks to a fault-injecting [`Relay`] in front of that
//! port instead (it too lives as long as the pair). Children are killed when
//! the [`Pair`] is dropped; the directory is removed too unless `SKYFERRY_KEEP_TMP` is set or
//! [`Pair::keep`] was called.

mod config;
mod daemon;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

pub use config::PairOptions;
use daemon::Daemon;

use crate::binaries::binary;
use crate::faults::{files_under, SeededRng};
use crate::relay::Relay;
use crate::tree::{self, TreeReport};

/// One of the two daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Agent,
    Receiver,
}

/// When [`Pair::kill_at`] kills: after a fixed delay, or at a seeded random moment in a
/// window.
#[derive(Clone, Copy, Debug)]
pub enum Moment {
    After(Duration),
    Random {
        seed: u64,
        earliest: Duration,
        latest: Duration,
    },
}

impl Moment {
    /// The delay this moment stands for.
    pub fn delay(self) -> Duration {
        match self {
            Moment::After(d) => d,
            Moment::Random {
                seed,
                earliest,
                latest,
            } => SeededRng::new(seed).between(earliest, latest),
        }
    }
}

/// Log lines shown in diagnostics.
const LOG_TAIL_LINES: usize = 30;

/// An agent's TLS identity: certificate and key files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An agent + receiver pair that can be started, stopped, killed and restarted. See the
/// module docs.
pub struct Pair {
    // Declared before `tmp`: fields drop in order, so the children die before their
    // directory is removed.
    agent: Daemon,
    receiver: Daemon,
    relay: Option<Relay>,
    tmp: TempDir,
    opts: PairOptions,
    port: u16,
    agent_identity: Identity,
}

impl Pair {
    /// Builds the binaries if needed, creates the directory, certificates and configs.
    /// Starts nothing.
    pub fn new(opts: PairOptions) -> Result<Pair> {
        let agent_bin = binary("skyferry-agent")?;
        let receiver_bin = binary("skyferry-receiver")?;
        let tmp = tempfile::Builder::new()
            .prefix("skyferry-pair-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let root = tmp.path().to_path_buf();
        for dir in ["certs", "source", "storage", "agent"] {
            fs::create_dir_all(root.join(dir))
                .with_context(|| format!("cannot create {}", root.join(dir).display()))?;
        }
        run(Command::new(&receiver_bin)
            .args(["certs", "init", "--out"])
            .arg(root.join("certs")))?;
        let agent_identity = issue_agent(&receiver_bin, &root.join("certs"), &opts.agent_id)?;
        let port = free_udp_port()?;
        let relay = if opts.via_relay {
            Some(Relay::start(
                SocketAddr::from(([127, 0, 0, 1], port)),
                opts.relay_seed,
            )?)
        } else {
            None
        };
        let pair = Pair {
            agent: Daemon::new(
                "agent",
                agent_bin,
                root.join("agent.toml"),
                root.join("agent.log"),
            ),
            receiver: Daemon::new(
                "receiver",
                receiver_bin,
                root.join("receiver.toml"),
                root.join("receiver.log"),
            ),
            relay,
            tmp,
            opts,
            port,
            agent_identity,
        };
        pair.write_receiver_config(|_| {})?;
        pair.write_agent_config(|_| {})?;
        Ok(pair)
    }

    /// [`Pair::new`], then starts the receiver, waits until it listens, and starts the agent.
    pub fn start(opts: PairOptions) -> Result<Pair> {
        let mut pair = Pair::new(opts)?;
        pair.start_receiver()?;
        pair.wait_receiver_listening(Duration::from_secs(10))?;
        pair.start_agent()?;
        Ok(pair)
    }

    // ---- paths and settings ----

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
    /// The agent's watched tree.
    pub fn source(&self) -> PathBuf {
        self.dir().join("source")
    }
    /// The receiver's storage root.
    pub fn storage(&self) -> PathBuf {
        self.dir().join("storage")
    }
    /// Where the receiver publishes this agent's files: `storage/<agent id>`.
    pub fn published(&self) -> PathBuf {
        self.storage().join(&self.opts.agent_id)
    }
    pub fn certs_dir(&self) -> PathBuf {
        self.dir().join("certs")
    }
    pub fn journal(&self) -> PathBuf {
        self.dir().join("agent/journal.sqlite")
    }
    pub fn agent_config_path(&self) -> PathBuf {
        self.dir().join("agent.toml")
    }
    pub fn receiver_config_path(&self) -> PathBuf {
        self.dir().join("receiver.toml")
    }
    pub fn agent_bin(&self) -> &Path {
        self.agent.bin()
    }
    pub fn receiver_bin(&self) -> &Path {
        self.receiver.bin()
    }
    /// The receiver's UDP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn options(&self) -> &PairOptions {
        &self.opts
    }
    /// The fault-injecting relay between agent and receiver, with
    /// [`PairOptions::via_relay`].
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }
    /// Where the agent sends: the relay if there is one, else the receiver.
    pub fn agent_target(&self) -> SocketAddr {
        match &self.relay {
            Some(r) => r.addr(),
            None => SocketAddr::from(([127, 0, 0, 1], self.port)),
        }
    }
    /// The receiver's partial files (bytes and chunk logs) for this pair's agent.
    pub fn partial_dir(&self) -> PathBuf {
        self.storage()
            .join(".skyferry/partial")
            .join(&self.opts.agent_id)
    }
    /// Every file in [`Pair::partial_dir`].
    pub fn partial_files(&self) -> Vec<PathBuf> {
        files_under(&self.partial_dir())
    }

    /// Keeps the temporary directory after the pair is dropped.
    pub fn keep(&mut self) {
        self.tmp.disable_cleanup(true);
    }

    // ---- identities ----

    pub fn agent_identity(&self) -> &Identity {
        &self.agent_identity
    }

    /// Makes the agent use `identity` and rewrites its config.
    pub fn set_agent_identity(&mut self, identity: Identity) -> Result<()> {
        self.agent_identity = identity;
        self.write_agent_config(|_| {})
    }

    /// A new agent identity `id`, signed by this pair's CA, in `certs/`.
    pub fn issue_agent_identity(&self, id: &str) -> Result<Identity> {
        issue_agent(self.receiver.bin(), &self.certs_dir(), id)
    }

    /// An agent identity `id` signed by a *different* CA (created in `foreign-ca/`), which
    /// the receiver must refuse.
    pub fn foreign_agent_identity(&self, id: &str) -> Result<Identity> {
        let ca_dir = self.dir().join("foreign-ca");
        run(Command::new(self.receiver.bin())
            .args(["certs", "init", "--out"])
            .arg(&ca_dir))?;
        issue_agent(self.receiver.bin(), &ca_dir, id)
    }

    // ---- processes ----

    pub fn start_receiver(&mut self) -> Result<()> {
        self.receiver.start()
    }
    /// Starts the receiver through `wrapper` (which must `exec` it, e.g. `env K=V`) from
    /// its next start on; empty for none.
    pub fn set_receiver_wrapper(&mut self, wrapper: Vec<String>) {
        self.receiver.set_wrapper(wrapper);
    }
    /// Waits until the receiver's UDP port is bound (seen in `/proc/net/udp`, so the harness
    /// never races the receiver for the port). Fails early if the receiver exits.
    pub fn wait_receiver_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !udp_port_bound(self.port)? {
            self.receiver.ensure_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "the receiver did not bind UDP port {} within {timeout:?}\n{}",
                    self.port,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
    /// Whether the receiver's UDP port is bound now (by any process).
    pub fn receiver_port_bound(&self) -> Result<bool> {
        udp_port_bound(self.port)
    }
    /// SIGKILL: no chance to clean up.
    pub fn kill_receiver(&mut self) -> Result<()> {
        self.receiver.kill()
    }
    /// SIGTERM, then waits up to 30 s for the receiver to drain and exit.
    pub fn stop_receiver(&mut self) -> Result<ExitStatus> {
        self.receiver.stop()
    }
    /// The receiver's exit status if it exited on its own; `None` while it runs.
    pub fn receiver_exit(&mut self) -> Result<Option<ExitStatus>> {
        self.receiver.exit()
    }

    pub fn start_agent(&mut self) -> Result<()> {
        self.agent.set_wrapper(self.opts.agent_wrapper.clone());
        self.agent.start()
    }
    /// SIGKILL: no chance to clean up.
    pub fn kill_agent(&mut self) -> Result<()> {
        self.agent.kill()
    }
    /// Stops the agent, then the receiver (SIGTERM each); an error unless both exit 0.
    pub fn stop_both(&mut self) -> Result<()> {
        for (name, status) in [
            ("agent", self.stop_agent()?),
            ("receiver", self.stop_receiver()?),
        ] {
            if !status.success() {
                bail!(
                    "the {name} exited with {status} after SIGTERM\n{}",
                    self.diagnostics()
                );
            }
        }
        Ok(())
    }
    /// SIGTERM, then waits up to 30 s for the agent to drain and exit.
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        self.agent.stop()
    }
    /// The agent's exit status if it exited on its own; `None` while it runs.
    pub fn agent_exit(&mut self) -> Result<Option<ExitStatus>> {
        self.agent.exit()
    }

    /// Starts `side` again (after a kill or stop); the receiver is waited for until it
    /// listens.
    pub fn restart(&mut self, side: Side) -> Result<()> {
        match side {
            Side::Agent => self.start_agent(),
            Side::Receiver => {
                self.start_receiver()?;
                self.wait_receiver_listening(Duration::from_secs(10))
            }
        }
    }

    /// SIGKILL for `side` at `moment` (counted from now). Fails if either daemon died on
    /// its own in the meantime, or if `side` is not running.
    pub fn kill_at(&mut self, side: Side, moment: Moment) -> Result<Duration> {
        let delay = moment.delay();
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline {
            self.ensure_alive()?;
            std::thread::sleep(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(20)),
            );
        }
        self.ensure_alive()?;
        match side {
            Side::Agent => self.kill_agent()?,
            Side::Receiver => self.kill_receiver()?,
        }
        Ok(delay)
    }

    /// SIGKILL for `side` as soon as `ready(self)` holds (polled every 10 ms), or fails
    /// after `timeout`.
    pub fn kill_when(
        &mut self,
        side: Side,
        timeout: Duration,
        mut ready: impl FnMut(&Pair) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            self.ensure_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "the moment to kill the {side:?} did not come within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match side {
            Side::Agent => self.kill_agent(),
            Side::Receiver => self.kill_receiver(),
        }
    }

    /// Fails if a started daemon exited on its own.
    pub fn ensure_alive(&mut self) -> Result<()> {
        let alive = self
            .agent
            .ensure_alive()
            .and_then(|()| self.receiver.ensure_alive());
        alive.map_err(|e| anyhow!("{e:#}\n{}", self.diagnostics()))
    }

    /// The agent's process id, while the harness runs it (e.g. to read `/proc/<pid>/status`).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.pid()
    }
    /// The receiver's process id, while the harness runs it.
    pub fn receiver_pid(&self) -> Option<u32> {
        self.receiver.pid()
    }

    /// `skyferry-agent status --json`: the journal's counts, e.g. `{"done": 84, ...}`.
    pub fn agent_status(&self) -> Result<serde_json::Value> {
        let output = run(Command::new(self.agent.bin())
            .args(["status", "--json", "--config"])
            .arg(self.agent_config_path()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("agent status printed no JSON object: {stdout:?}"))
    }

    /// `skyferry-receiver status --json`: the receiver's state file, e.g.
    /// `{"storage": "ok", "running": true, ...}`.
    pub fn receiver_status(&self) -> Result<serde_json::Value> {
        let output = run(Command::new(self.receiver_bin())
            .args(["status", "--json", "--config"])
            .arg(self.receiver_config_path()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("receiver status printed no JSON object: {stdout:?}"))
    }

    /// Waits until `cond` holds, polling and checking both daemons are alive; panics with
    /// `what` and both logs after `timeout` (for tests).
    pub fn wait_for(&mut self, timeout: Duration, what: &str, mut cond: impl FnMut(&Pair) -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        while !cond(self) {
            self.ensure_alive().expect("daemons alive");
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `status` until the journal has `done` rows (a file is visible in the tree a
    /// moment before its `Ack` reaches the agent: the receiver acknowledges after the
    /// rename, the inventory and the catalog row); returns the last status.
    pub fn wait_done(&self, done: u64, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.agent_status()?;
            if status["done"] == done || Instant::now() >= deadline {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent logged, over all its runs.
    pub fn agent_log(&self) -> Result<String> {
        self.agent.log()
    }
    /// Everything the receiver logged, over all its runs.
    pub fn receiver_log(&self) -> Result<String> {
        self.receiver.log()
    }
    pub fn agent_log_path(&self) -> &Path {
        self.agent.log_path()
    }
    pub fn receiver_log_path(&self) -> &Path {
        self.receiver.log_path()
    }

    /// The last lines of both logs, for error messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "{}\n{}",
            self.agent.log_tail(LOG_TAIL_LINES),
            self.receiver.log_tail(LOG_TAIL_LINES)
        )
    }

    // ---- waiting ----

    /// Waits until every source file is published with its size (see
    /// [`tree::wait_arrived`]). Fails early if a started daemon exits on its own; errors
    /// carry the tails of both logs.
    pub fn wait_arrived(&mut self, timeout: Duration) -> Result<()> {
        let (src, dst) = (self.source(), self.published());
        let (agent, receiver) = (&mut self.agent, &mut self.receiver);
        let waited = tree::wait_arrived_checking(&src, &dst, timeout, || {
            agent.ensure_alive()?;
            receiver.ensure_alive()
        });
        waited.map_err(|e| anyhow!("{e:#}\n{}", self.diagnostics()))
    }

    /// [`Pair::wait_arrived`], then compares both trees by content (see
    /// [`tree::wait_replicated`]).
    pub fn wait_replicated(&mut self, timeout: Duration) -> Result<TreeReport> {
        self.wait_arrived(timeout)?;
        tree::wait_replicated(&self.source(), &self.published(), Duration::ZERO)
            .map_err(|e| anyhow!("{e:#}\n{}", self.diagnostics()))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.agent.kill(); // an error only says it was not running
        let _ = self.receiver.kill();
        if std::env::var_os("SKYFERRY_KEEP_TMP").is_some() {
            self.keep();
            eprintln!(
                "skyferry: SKYFERRY_KEEP_TMP is set: kept {}",
                self.dir().display()
            );
        }
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP socket on 127.0.0.1")?;
    Ok(socket
        .local_addr()
        .context("cannot read the UDP socket's address")?
        .port())
}

/// Whether any socket is bound to UDP `port` (IPv4 or IPv6), per /proc/net/udp{,6}.
fn udp_port_bound(port: u16) -> Result<bool> {
    let suffix = format!(":{port:04X}");
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = match fs::read_to_string(table) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // no IPv6
            Err(e) => return Err(e).with_context(|| format!("cannot read {table}")),
        };
        // "  sl  local_address rem_address   st ..." then "0: 0100007F:B0E6 00000000:0000 07 ..."
        let bound = text
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(1))
            .any(|local| local.ends_with(&suffix));
        if bound {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs a command to completion; an error carries its exit status and stderr.
fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// `certs issue-agent`: identity `id` signed by the CA in `ca_dir`, written there too.
fn issue_agent(receiver_bin: &Path, ca_dir: &Path, id: &str) -> Result<Identity> {
    run(Command::new(receiver_bin)
        .args(["certs", "issue-agent", "--ca-dir"])
        .arg(ca_dir)
        .args(["--name", id, "--out"])
        .arg(ca_dir))?;
    let identity = Identity {
        cert: ca_dir.join(format!("{id}.pem")),
        key: ca_dir.join(format!("{id}.key")),
    };
    for file in [&identity.cert, &identity.key] {
        if !file.is_file() {
            bail!(
                "certs issue-agent --name {id} did not write {}",
                file.display()
            );
        }
    }
    Ok(identity)
}
