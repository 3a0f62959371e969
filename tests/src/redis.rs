//! A real `redis-server` for tests: started on an ephemeral port in its own temporary
//! directory (no persistence), driven with `redis-cli`, killed when dropped. It can be
//! killed (SIGKILL) and restarted on the same port, and can serve TLS only.
//!
//! A machine without `redis-server` fails the test with the command that installs it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// TLS files for a server that accepts only TLS (`rediss://`), clients unauthenticated.
#[derive(Clone, Debug)]
pub struct RedisTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    tls: Option<RedisTls>,
    password: Option<String>,
}

impl RedisServer {
    /// A plain server on 127.0.0.1.
    pub fn start() -> Result<RedisServer> {
        RedisServer::start_with(None, None)
    }

    /// A server that requires `password` (and TLS when `tls` is given).
    pub fn start_with(tls: Option<RedisTls>, password: Option<&str>) -> Result<RedisServer> {
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("skyferry-redis-")
            .tempdir()
            .context("cannot create a temporary directory for redis")?;
        let mut server = RedisServer {
            child: None,
            port: free_tcp_port()?,
            dir,
            tls,
            password: password.map(str::to_owned),
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL the agent is given: `redis://127.0.0.1:<port>/0`, or
    /// `rediss://localhost:<port>/0` with TLS (the pair's receiver certificate names
    /// `localhost`), with the password if any.
    pub fn url(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        match self.tls {
            Some(_) => format!("rediss://{auth}localhost:{}/0", self.port),
            None => format!("redis://{auth}127.0.0.1:{}/0", self.port),
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(self.dir.path())
            .args(["--bind", "127.0.0.1 -::1", "--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path());
        match &self.tls {
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG") {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().context("cannot check redis-server")? {
                    bail!(
                        "redis-server exited at start ({status}); its log:\n{}",
                        std::fs::read_to_string(self.log_path()).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the server and everything it held (no persistence) are gone.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("redis-server is not running")
        };
        let _ = child.kill(); // fails only if it already exited
        child.wait().context("cannot reap redis-server")?;
        Ok(())
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("redis-server is still running");
        }
        self.spawn()
    }

    /// Runs `redis-cli` against the server with `args`; returns its raw output. A Redis
    /// error reply is an error.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"]);
        if let Some(t) = &self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&t.ca)
                .args(["--sni", "localhost"]);
        }
        if let Some(p) = &self.password {
            cmd.args(["--no-auth-warning", "-a", p]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run redis-cli (apt-get install redis-tools)")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || stdout.starts_with("ERR") || stdout.starts_with("NOAUTH") {
            bail!(
                "redis-cli {args:?} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// `PUBLISH channel message`; returns how many subscribers received it.
    pub fn publish(&self, channel: &str, message: &str) -> Result<u64> {
        let out = self.cli(&["PUBLISH", channel, message])?;
        out.trim()
            .parse()
            .with_context(|| format!("PUBLISH answered {out:?}"))
    }

    /// Number of subscribers (pattern subscriptions included) the server has.
    pub fn subscribers(&self, channel: &str) -> Result<u64> {
        let direct = self.cli(&["PUBSUB", "NUMSUB", channel])?;
        let direct: u64 = direct
            .lines()
            .nth(1)
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0);
        let patterns: u64 = self.cli(&["PUBSUB", "NUMPAT"])?.trim().parse().unwrap_or(0);
        Ok(direct + patterns)
    }

    /// `XADD stream * field value ...`; returns the entry id.
    pub fn xadd(&self, stream: &str, fields: &[(&str, &str)]) -> Result<String> {
        let mut args = vec!["XADD", stream, "*"];
        for (k, v) in fields {
            args.push(k);
            args.push(v);
        }
        Ok(self.cli(&args)?.trim().to_owned())
    }

    /// How many entries of `stream` are pending (delivered, not acknowledged) in `group`
    /// (`XPENDING`); 0 when the group does not exist yet.
    pub fn pending(&self, stream: &str, group: &str) -> Result<u64> {
        match self.cli(&["XPENDING", stream, group]) {
            Ok(out) => Ok(out
                .lines()
                .next()
                .unwrap_or("0")
                .trim()
                .parse()
                .unwrap_or(0)),
            Err(e) if format!("{e:#}").contains("NOGROUP") => Ok(0),
            Err(e) => Err(e),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // best effort: the test is over
            let _ = child.wait();
        }
    }
}

/// Fails with the install command when `redis-server` is missing.
pub fn ensure_installed() -> Result<()> {
    match Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "redis-server is not installed; install it with `apt-get install redis-server` \
             (.ci/run does this on CI)"
        ),
        Err(e) => Err(e).context("cannot run redis-server"),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a TCP socket on 127.0.0.1")?;
    Ok(l.local_addr()
        .context("cannot read the socket's address")?
        .port())
}

/// Reads `GET /metrics` from `addr` (`host:port`) and returns the value of the sample
/// whose line starts with `series` (e.g. `skyferry_agent_fs_overflows_total` or
/// `skyferry_agent_source_messages_total{source="redis_pubsub",outcome="malformed"}`);
/// 0 when absent.
pub fn metric(addr: &str, series: &str) -> Result<f64> {
    let text = crate::prom::http_get(addr, "/metrics")
        .with_context(|| format!("cannot read the metrics endpoint {addr}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(series) {
            if let Some(v) = rest.strip_prefix(' ') {
                return v
                    .trim()
                    .parse()
                    .with_context(|| format!("odd metric line {line:?}"));
            }
        }
    }
    Ok(0.0)
}

/// Path as a string for a message.
pub fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Starts a pair whose agent config has `extra` appended (e.g. `[[redis]]` tables,
/// `[metrics]`): creates it, writes the config, starts the receiver, waits until it
/// listens, starts the agent. `setup` runs before anything starts (e.g. to write files
/// that must exist before the agent's first rescan).
pub fn start_pair_with(
    opts: crate::PairOptions,
    extra: &str,
    setup: impl FnOnce(&crate::Pair) -> Result<()>,
) -> Result<crate::Pair> {
    let mut pair = crate::Pair::new(opts)?;
    pair.write_agent_config(|text| {
        text.push('\n');
        text.push_str(extra);
    })?;
    setup(&pair)?;
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    pair.start_agent()?;
    Ok(pair)
}

/// A `[metrics]` table on a free port, and the `host:port` to read it from.
pub fn metrics_table() -> Result<(String, String)> {
    let addr = format!("127.0.0.1:{}", free_tcp_port()?);
    Ok((format!("[metrics]\nlisten = \"{addr}\"\n"), addr))
}

/// Polls `cond` every 50 ms until it holds; fails after `timeout` with `what`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
