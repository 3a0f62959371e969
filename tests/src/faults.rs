//! Helpers for fault-injection tests: a seeded RNG (reproducible kill moments and loss
//! patterns), deterministic file contents, run-size knobs from the environment, and a
//! small size-limited filesystem (tmpfs) to fill the receiver's storage, and a loop-mounted
//! ext4 that can be frozen (storage stalls).
//!
//! Every seed a test draws from is printed, so a failing run can be replayed with
//! `SKYFERRY_SEED=<seed>`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// SplitMix64: tiny, fast, and good enough to pick moments and drop datagrams.
#[derive(Clone, Debug)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0.0..1.0`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A duration uniform in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(self.below(span + 1))
    }

    /// `len` pseudo-random bytes (incompressible).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// The seed for a test: `SKYFERRY_SEED` if set, else `default`; printed either way.
pub fn seed(test: &str, default: u64) -> u64 {
    let seed = std::env::var("SKYFERRY_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default);
    eprintln!("{test}: seed {seed} (replay with SKYFERRY_SEED={seed})");
    seed
}

/// A count from the environment variable `var`, else `default`.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Deterministic bytes: half compressible ramp, half noise, like a FITS frame.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if (i / 4096) % 2 == 0 {
                (i / 97) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// Writes like an analysis pipeline: a hidden temporary name, then renamed into place.
/// [`write_atomic`] for tests: panics naming the path if the write fails.
pub fn must_write(path: &Path, data: &[u8]) {
    write_atomic(path, data).unwrap_or_else(|e| panic!("writing {}: {e:#}", path.display()));
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// Every file under `dir` (recursively), for checks on the receiver's partial files.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// A tmpfs mounted for the duration of a test; lazily unmounted on drop (the receiver may
/// still hold files open on it).
pub struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes at `at` (an existing, empty directory). `Ok(None)`
    /// with the reason when this machine cannot (not root, no mount permission in a
    /// container): the caller skips its test.
    pub fn mount(at: &Path, size: u64) -> Result<Option<Tmpfs>> {
        let uid = Command::new("id").arg("-u").output();
        let root = uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            eprintln!("skipped: mounting a size-limited tmpfs needs root");
            return Ok(None);
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("skyferry-test")
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(Tmpfs { at: at.to_owned() })),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs at {} ({}): {}",
                    at.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                Ok(None)
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                Ok(None)
            }
        }
    }

    /// Grows (or shrinks) the filesystem.
    pub fn resize(&self, size: u64) -> Result<()> {
        let status = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.at)
            .status()
            .context("cannot run mount")?;
        if !status.success() {
            bail!("remounting {} with size {size} failed", self.at.display());
        }
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// An ext4 filesystem on a loop device, mounted for the duration of a test, that can be
/// frozen (`fsfreeze`). Drop ALWAYS unfreezes, unmounts (lazily: a daemon may still hold
/// files) and detaches, also when the test panics; and while frozen, a detached
/// `sleep; fsfreeze -u` process unfreezes it even if the test process is killed.
pub struct LoopExt4 {
    at: PathBuf,
    device: String,
    /// The unfreeze safety net while frozen.
    thaw: Option<std::process::Child>,
}

impl LoopExt4 {
    /// Creates a sparse `size`-byte image at `image`, formats it and mounts it at `at` (an
    /// existing, empty directory). `Ok(None)` with the reason printed when this machine
    /// cannot (not root, no loop devices): the caller skips its test.
    pub fn mount(image: &Path, at: &Path, size: u64) -> Result<Option<LoopExt4>> {
        let uid = Command::new("id").arg("-u").output();
        if !uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0") {
            eprintln!("skipped: loop-mounting an ext4 image needs root");
            return Ok(None);
        }
        for tool in ["losetup", "mkfs.ext4", "fsfreeze"] {
            if Command::new(tool).arg("--version").output().is_err() {
                eprintln!("skipped: {tool} is not installed");
                return Ok(None);
            }
        }
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating the image {}", image.display()))?;
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(image)
            .output()
            .context("cannot run mkfs.ext4")?;
        if !mkfs.status.success() {
            bail!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&mkfs.stderr)
            );
        }
        let attach = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .context("cannot run losetup")?;
        if !attach.status.success() {
            eprintln!(
                "skipped: no loop device for {}: {}",
                image.display(),
                String::from_utf8_lossy(&attach.stderr).trim()
            );
            return Ok(None);
        }
        let device = String::from_utf8_lossy(&attach.stdout).trim().to_owned();
        let mounted = Command::new("mount").arg(&device).arg(at).output();
        match mounted {
            Ok(o) if o.status.success() => Ok(Some(LoopExt4 {
                at: at.to_owned(),
                device,
                thaw: None,
            })),
            other => {
                let _ = Command::new("losetup").arg("-d").arg(&device).status();
                match other {
                    Ok(o) => eprintln!(
                        "skipped: cannot mount {device} at {}: {}",
                        at.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    Err(e) => eprintln!("skipped: cannot run mount: {e}"),
                }
                Ok(None)
            }
        }
    }

    /// The loop device, e.g. `/dev/loop3`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// `fsfreeze -f`: every write to the filesystem blocks until [`LoopExt4::thaw`]. A
    /// detached process thaws it after `at_most` should this test process die first.
    pub fn freeze(&mut self, at_most: Duration) -> Result<()> {
        let net = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep {}; exec fsfreeze -u \"$0\" 2>/dev/null",
                at_most.as_secs().max(1)
            ))
            .arg(&self.at)
            .stdin(std::process::Stdio::null())
            // Its own process group, so that ending it ends its `sleep` too.
            .process_group(0)
            .spawn()
            .context("cannot start the unfreeze safety net")?;
        self.thaw = Some(net);
        let status = Command::new("fsfreeze")
            .arg("-f")
            .arg(&self.at)
            .status()
            .context("cannot run fsfreeze")?;
        if !status.success() {
            bail!("fsfreeze -f {} failed ({status})", self.at.display());
        }
        Ok(())
    }

    /// `fsfreeze -u`.
    pub fn thaw(&mut self) -> Result<()> {
        let status = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.at)
            .status()
            .context("cannot run fsfreeze")?;
        stop_safety_net(self.thaw.take());
        if !status.success() {
            bail!("fsfreeze -u {} failed ({status})", self.at.display());
        }
        Ok(())
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        // Unfreeze first whatever the state (an error just means it was not frozen).
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.at)
            .stderr(std::process::Stdio::null())
            .status();
        stop_safety_net(self.thaw.take());
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        // With a lazy unmount the device may still be busy: autoclear detaches it then.
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Ends the unfreeze safety net (the shell and its `sleep`: its process group).
fn stop_safety_net(net: Option<std::process::Child>) {
    if let Some(mut net) = net {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", net.id()))
            .status();
        let _ = net.wait();
    }
}

/// Resident memory of a process in bytes (`VmRSS` of /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Values of `key=<value>` fields on log lines that contain `message`, e.g. the
/// `chunks_sent` of every "stored" line of the agent.
pub fn log_fields<'a>(log: &'a str, message: &str, key: &str) -> Vec<&'a str> {
    let needle = format!(" {key}=");
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let start = l.find(&needle)? + needle.len();
            let rest = &l[start..];
            Some(rest.split_whitespace().next().unwrap_or(""))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rng_is_reproducible_and_roughly_uniform() {
        let (mut a, mut b) = (SeededRng::new(42), SeededRng::new(42));
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let hits = (0..10_000).filter(|_| a.chance(0.05)).count();
        assert!((350..650).contains(&hits), "{hits}");
        let d = a.between(Duration::from_millis(10), Duration::from_millis(20));
        assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
        assert_eq!(a.bytes(13).len(), 13);
    }

    #[test]
    fn log_fields_finds_values_on_matching_lines() {
        let log = "x INFO stored path=a chunks_sent=3 ok\nx INFO other chunks_sent=9\nstored chunks_sent=4";
        assert_eq!(log_fields(log, "stored", "chunks_sent"), ["3", "4"]);
    }
}
