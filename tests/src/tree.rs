//! Compares a source tree with its replica: which files are missing, extra, or differ
//! (by BLAKE3 of the content), and waits until a replica is complete.
//!
//! The receiver publishes a file by renaming it into place, so a published file that has
//! the source's size is complete; waiting therefore polls sizes cheaply and hashes once.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often [`wait_arrived`] looks at the trees.
const POLL: Duration = Duration::from_millis(50);
/// How many paths an error message lists.
const SHOWN: usize = 10;

/// Outcome of comparing a source tree with a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeReport {
    /// Regular files in the source tree.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// In the source, not in the replica.
    pub missing: Vec<PathBuf>,
    /// In the replica, not in the source.
    pub extra: Vec<PathBuf>,
    /// In both, with different content.
    pub differing: Vec<PathBuf>,
}

impl TreeReport {
    /// Both trees hold exactly the same files with the same content.
    pub fn is_identical(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.differing.is_empty()
    }

    /// An error describing every difference, unless the trees are identical.
    pub fn ensure_identical(&self) -> Result<()> {
        if self.is_identical() {
            return Ok(());
        }
        bail!("trees differ: {self}")
    }
}

impl fmt::Display for TreeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} files, {} bytes", self.files, self.bytes)?;
        for (what, paths) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("differing", &self.differing),
        ] {
            if !paths.is_empty() {
                write!(f, "; {} {what}: {}", paths.len(), list(paths))?;
            }
        }
        Ok(())
    }
}

/// Up to [`SHOWN`] paths, comma-separated, with "…" if there are more.
fn list(paths: &[PathBuf]) -> String {
    let mut shown: Vec<String> = paths
        .iter()
        .take(SHOWN)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > SHOWN {
        shown.push("…".into());
    }
    shown.join(", ")
}

/// BLAKE3 of a file's content, read in 1 MiB pieces.
pub fn blake3_file(path: &Path) -> Result<[u8; 32]> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(*hasher.finalize().as_bytes()),
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

/// Every regular file under `root` (symlinks are not followed), by path relative to `root`,
/// with its size. A missing `root` is an empty tree.
pub fn list_files(root: &Path) -> Result<BTreeMap<PathBuf, u64>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel_dir) = dirs.pop() {
        let dir = root.join(&rel_dir);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let rel = rel_dir.join(entry.file_name());
            // A file may vanish between listing and stat (temporary files being renamed).
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                dirs.push(rel);
            } else if file_type.is_file() {
                if let Ok(meta) = entry.metadata() {
                    files.insert(rel, meta.len());
                }
            }
        }
    }
    Ok(files)
}

/// Compares every regular file under `src` with the one at the same relative path under
/// `dst`, by size and BLAKE3.
pub fn compare_trees(src: &Path, dst: &Path) -> Result<TreeReport> {
    let source = list_files(src)?;
    let mut replica = list_files(dst)?;
    let mut report = TreeReport {
        files: source.len(),
        bytes: source.values().sum(),
        ..TreeReport::default()
    };
    for (rel, size) in source {
        match replica.remove(&rel) {
            None => report.missing.push(rel),
            Some(dst_size) if dst_size != size => report.differing.push(rel),
            Some(_) if blake3_file(&src.join(&rel))? != blake3_file(&dst.join(&rel))? => {
                report.differing.push(rel)
            }
            Some(_) => {}
        }
    }
    report.extra = replica.into_keys().collect();
    Ok(report)
}

/// Waits until every file under `src` exists under `dst` with the same size. On timeout the
/// error lists what is still missing.
pub fn wait_arrived(src: &Path, dst: &Path, timeout: Duration) -> Result<()> {
    wait_arrived_checking(src, dst, timeout, || Ok(()))
}

/// [`wait_arrived`], giving up early as soon as `check` fails (e.g. a daemon died).
pub fn wait_arrived_checking(
    src: &Path,
    dst: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let replica = list_files(dst)?;
        let missing: Vec<PathBuf> = list_files(src)?
            .into_iter()
            .filter(|(rel, size)| replica.get(rel) != Some(size))
            .map(|(rel, _)| rel)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        check().with_context(|| {
            format!(
                "gave up waiting with {} files still missing ({})",
                missing.len(),
                list(&missing)
            )
        })?;
        if Instant::now() >= deadline {
            bail!(
                "after {timeout:?}, {} of the files under {} are not (completely) under {}: {}",
                missing.len(),
                src.display(),
                dst.display(),
                list(&missing)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `dst` holds every file of `src`, then compares both trees by content. Fails
/// on timeout, or if any file is missing or differs; extra files are only reported.
pub fn wait_replicated(src: &Path, dst: &Path, timeout: Duration) -> Result<TreeReport> {
    wait_arrived(src, dst, timeout)?;
    let report = compare_trees(src, dst)?;
    if !report.missing.is_empty() || !report.differing.is_empty() {
        bail!(
            "{} was not replicated to {}: {report}",
            src.display(),
            dst.display()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &[u8]) -> Result<()> {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().context("no parent")?)?;
        Ok(fs::write(path, content)?)
    }

    #[test]
    fn reports_missing_extra_and_differing_files() -> Result<()> {
        let (src, dst) = (tempfile::tempdir()?, tempfile::tempdir()?);
        write(src.path(), "a/same.fits", b"same")?;
        write(dst.path(), "a/same.fits", b"same")?;
        write(src.path(), "a/b/missing.fits", b"0123")?;
        write(src.path(), "changed.fits", b"abcd")?;
        write(dst.path(), "changed.fits", b"abce")?;
        write(src.path(), "short.fits", b"abcd")?;
        write(dst.path(), "short.fits", b"abc")?;
        write(dst.path(), "extra.fits", b"x")?;

        let report = compare_trees(src.path(), dst.path())?;
        assert_eq!(report.files, 4);
        assert_eq!(report.bytes, 16);
        assert_eq!(report.missing, [PathBuf::from("a/b/missing.fits")]);
        assert_eq!(report.extra, [PathBuf::from("extra.fits")]);
        assert_eq!(
            report.differing,
            [PathBuf::from("changed.fits"), PathBuf::from("short.fits")]
        );
        assert!(report.ensure_identical().is_err());
        assert!(wait_replicated(src.path(), dst.path(), Duration::from_millis(100)).is_err());
        Ok(())
    }

    #[test]
    fn identical_trees_replicate_and_missing_ones_time_out() -> Result<()> {
        let (src, dst) = (tempfile::tempdir()?, tempfile::tempdir()?);
        write(src.path(), "n/x.fits", b"payload")?;
        let err = wait_arrived(
            src.path(),
            &dst.path().join("absent"),
            Duration::from_millis(100),
        )
        .err()
        .context("an empty replica cannot have arrived")?;
        assert!(format!("{err:#}").contains("n/x.fits"), "{err:#}");

        write(dst.path(), "n/x.fits", b"payload")?;
        let report = wait_replicated(src.path(), dst.path(), Duration::from_secs(1))?;
        assert!(report.is_identical());
        assert_eq!((report.files, report.bytes), (1, 7));
        Ok(())
    }

    #[test]
    fn blake3_of_a_file_matches_the_one_shot_hash() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        write(dir.path(), "big", &content)?;
        assert_eq!(
            blake3_file(&dir.path().join("big"))?,
            *blake3::hash(&content).as_bytes()
        );
        Ok(())
    }
}
