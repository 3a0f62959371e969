//! Flask + wget, the path skyferry replaces at the observatory: a Flask app
//! (`flask_server.py`, run by Flask's own threaded server) serves the source tree, and
//! one `wget` per file pulls it, as the far side does for each Redis notification.
//!
//! Flask comes from PyPI into a virtualenv of its own, `~/.cache/skyferry-bench/venv`
//! (`$XDG_CACHE_HOME` if set), made on first use; CI never needs it. Without python3,
//! pip or wget the bench skips this tool and says what is missing.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::redis::free_tcp_port;
use tempfile::TempDir;

const SERVER: &str = include_str!("flask_server.py");

/// The virtualenv's directory.
fn venv_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(cache.join("skyferry-bench/venv"))
}

/// The virtualenv's python with Flask importable, installing it if needed; `Err` is
/// the reason to skip Flask + wget.
pub fn ensure() -> std::result::Result<PathBuf, String> {
    let runs = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !runs(Command::new("wget").arg("--version")) {
        return Err("wget is not installed (apt-get install wget)".into());
    }
    let dir = venv_dir().ok_or("neither HOME nor XDG_CACHE_HOME is set")?;
    let python = dir.join("bin/python");
    let has_flask = |python: &Path| runs(Command::new(python).args(["-c", "import flask"]));
    if has_flask(&python) {
        return Ok(python);
    }
    println!("flask: installing Flask with pip into {} …", dir.display());
    let quiet = |cmd: &mut Command| -> std::result::Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(3).collect();
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ))
    };
    if !python.is_file() {
        quiet(Command::new("python3").args(["-m", "venv"]).arg(&dir)).map_err(|e| {
            format!("cannot make a virtualenv (python3 with venv needed, apt-get install python3-venv): {e}")
        })?;
    }
    quiet(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("flask"),
    )
    .map_err(|e| format!("pip cannot install Flask: {e}"))?;
    if has_flask(&python) {
        Ok(python)
    } else {
        Err(format!(
            "Flask installed into {} but does not import",
            dir.display()
        ))
    }
}

/// A running Flask server for one source tree; killed on drop.
pub struct FlaskServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl FlaskServer {
    /// Starts `flask_server.py root` on a free port and waits until it answers.
    pub fn start(python: &Path, root: &Path) -> Result<FlaskServer> {
        let dir = tempfile::Builder::new()
            .prefix("skyferry-bench-flask-")
            .tempdir()
            .context("cannot create a temporary directory for Flask")?;
        let script = dir.path().join("flask_server.py");
        fs::write(&script, SERVER).context("cannot write flask_server.py")?;
        let log = fs::File::create(dir.path().join("flask.log")).context("flask.log")?;
        let port = free_tcp_port()?;
        let child = Command::new(python)
            .arg(&script)
            .arg(root)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("flask.log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let mut server = FlaskServer { child, port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL of the file at `rel` (relative to the root), percent-encoded.
    pub fn url(&self, rel: &Path) -> String {
        let mut path = String::new();
        for byte in rel.to_string_lossy().bytes() {
            match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                    path.push(byte as char)
                }
                other => path.push_str(&format!("%{other:02X}")),
            }
        }
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("cannot check Flask")? {
                bail!(
                    "the Flask server exited at start ({status}): {}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the Flask server did not answer on port {} within 30 s: {}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ready(&self) -> bool {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        conn.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n").is_ok()
            && conn.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.")
            && answer.ends_with("ok")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("flask.log")).unwrap_or_default()
    }
}

impl Drop for FlaskServer {
    fn drop(&mut self) {
        let _ = self.child.kill(); // already gone is fine
        let _ = self.child.wait();
    }
}
