//! A private sshd on 127.0.0.1, so the benchmark can run `rsync -a` over ssh the way people
//! actually replicate files, without touching the system's ssh setup: its own host key,
//! authorized key, config and port, all in a temporary directory.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::run;
use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// Absolute path required: sshd re-executes itself.
const SSHD: &str = "/usr/sbin/sshd";
const PACKAGES: &str = "rsync openssh-server openssh-client";

/// Whether rsync, ssh, ssh-keygen and sshd are installed; if not and we are root, tries
/// `apt-get install`. Returns a reason to skip rsync when they are still missing.
pub fn ensure_tools() -> Option<String> {
    if tools_present() {
        return None;
    }
    if is_root() {
        println!("rsync/ssh/sshd missing: installing {PACKAGES} with apt-get…");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(PACKAGES.split(' '))
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status(); // retried below
            install();
        }
        if tools_present() {
            return None;
        }
    }
    Some(format!(
        "rsync, ssh or sshd missing: apt-get install -y {PACKAGES}"
    ))
}

fn tools_present() -> bool {
    let runs = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    runs("rsync", "--version")
        && runs("ssh", "-V")
        && runs("ssh-keygen", "-?")
        && Path::new(SSHD).is_file()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A running private sshd; killed on drop.
pub struct Sshd {
    dir: TempDir,
    port: u16,
    user: String,
    child: Child,
}

impl Sshd {
    pub fn start() -> Result<Sshd> {
        let dir = tempfile::Builder::new()
            .prefix("skyferry-bench-sshd-")
            .tempdir()
            .context("cannot create a temporary directory for sshd")?;
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key)))?;
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .context("cannot write authorized_keys")?;
        let port = free_tcp_port()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
             AuthorizedKeysFile {}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n",
            d.join("host_key").display(),
            d.join("sshd.pid").display(),
            d.join("authorized_keys").display(),
        );
        fs::write(d.join("sshd_config"), config).context("cannot write sshd_config")?;
        // Debian's sshd refuses to start without its privilege separation directory.
        let _ = fs::create_dir_all("/run/sshd"); // if this fails, sshd's own error says so
        let log = fs::File::create(d.join("sshd.log")).context("cannot create sshd.log")?;
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {SSHD}"))?;
        let user = String::from_utf8_lossy(&run(Command::new("id").arg("-un"))?.stdout)
            .trim()
            .to_string();
        let sshd = Sshd {
            dir,
            port,
            user,
            child,
        };
        sshd.wait_ready()?;
        Ok(sshd)
    }

    /// The listening sshd; the per-connection processes are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ssh command line for `rsync -e`.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -p {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            self.port,
            self.key().display()
        )
    }

    /// `user@127.0.0.1:` prefix of a remote path.
    pub fn remote(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user, path.display())
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{} {}@127.0.0.1 true",
                    self.ssh_command(),
                    self.user
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default();
                bail!(
                    "private sshd on 127.0.0.1:{} did not accept ssh within 10 s: {log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill(); // already gone is fine
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("cannot bind a TCP port on 127.0.0.1")?;
    Ok(listener
        .local_addr()
        .context("cannot read the TCP port")?
        .port())
}
