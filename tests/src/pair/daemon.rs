//! One daemon child process (agent or receiver): started with `run --config`, its stdout and
//! stderr appended to a log file, stopped with SIGTERM (via the `kill` command: no unsafe
//! code) or killed with SIGKILL, restartable any number of times.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a daemon may take to drain and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

pub(super) struct Daemon {
    /// "agent" or "receiver", for messages.
    name: &'static str,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// A command the daemon is started through (`exec`ing it, so that its pid is the
    /// daemon's), e.g. `setpriv ...`; empty for none.
    wrapper: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    pub(super) fn new(name: &'static str, bin: PathBuf, config: PathBuf, log: PathBuf) -> Daemon {
        Daemon {
            name,
            bin,
            config,
            log,
            wrapper: Vec::new(),
            child: None,
        }
    }

    /// Starts the daemon through `wrapper` (see the field) from the next start on.
    pub(super) fn set_wrapper(&mut self, wrapper: Vec<String>) {
        self.wrapper = wrapper;
    }

    pub(super) fn bin(&self) -> &Path {
        &self.bin
    }

    /// Process id while started by the harness (it may have exited since).
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub(super) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts `<bin> run --config <config>`, with RUST_LOG=info unless the environment
    /// sets it.
    pub(super) fn start(&mut self) -> Result<()> {
        // A child that exited on its own may be restarted.
        if self.child.is_some() && self.exit()?.is_none() {
            bail!("the {} is already running", self.name);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        writeln!(
            log,
            "==== harness: {} run --config {} ====",
            self.bin.display(),
            self.config.display()
        )
        .with_context(|| format!("cannot write {}", self.log.display()))?;
        let stderr = log
            .try_clone()
            .with_context(|| format!("cannot reopen {}", self.log.display()))?;
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start the {} ({})", self.name, self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no chance to clean up.
    pub(super) fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("the {} is not running", self.name)
        };
        let _ = child.kill(); // fails only if it already exited; wait() reaps it either way
        child
            .wait()
            .with_context(|| format!("cannot reap the {}", self.name))?;
        Ok(())
    }

    /// SIGTERM, then waits up to 30 s for the daemon to drain and exit.
    pub(super) fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit()? {
            self.child = None;
            bail!(
                "the {} had already exited ({status}) before SIGTERM",
                self.name
            );
        }
        let Some(mut child) = self.child.take() else {
            bail!("the {} is not running", self.name)
        };
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        if !sent.as_ref().is_ok_and(|s| s.success()) {
            let _ = child.kill(); // don't leave it behind; the error below is the report
            let _ = child.wait();
            bail!("`kill -TERM {pid}` for the {} failed: {sent:?}", self.name);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("cannot check the {}", self.name))?
            {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill(); // it is hung: the error below is the report
        let _ = child.wait();
        bail!(
            "the {} did not exit within {STOP_GRACE:?} of SIGTERM; killed it",
            self.name
        )
    }

    /// The exit status if the daemon was started and has exited since; `None` while it runs
    /// or if it was never started (or was stopped or killed by the harness).
    pub(super) fn exit(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("cannot check the {}", self.name)),
            None => Ok(None),
        }
    }

    /// Fails if the daemon was started and has exited on its own since.
    pub(super) fn ensure_alive(&mut self) -> Result<()> {
        match self.exit()? {
            Some(status) => bail!("the {} exited unexpectedly ({status})", self.name),
            None => Ok(()),
        }
    }

    pub(super) fn log(&self) -> Result<String> {
        let bytes =
            fs::read(&self.log).with_context(|| format!("cannot read {}", self.log.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The last `lines` lines of the log, headed by the log's path.
    pub(super) fn log_tail(&self, lines: usize) -> String {
        match self.log() {
            Ok(log) => {
                let all: Vec<&str> = log.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!(
                    "--- {} log ({}), last lines ---\n{tail}",
                    self.name,
                    self.log.display()
                )
            }
            Err(e) => format!("--- {} log: {e:#}", self.name),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.kill(); // best effort: the test is over
        }
    }
}
