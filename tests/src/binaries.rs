//! Locates the daemon binaries for the profile the current executable was built with,
//! and rebuilds them once per process so that tests, the demo and the benchmark never
//! run stale binaries.
//!
//! The target directory is derived from `current_exe`: a test runs as
//! `<target>/<profile>/deps/<name>-<hash>`, a binary as `<target>/<profile>/<name>`. This
//! follows `CARGO_TARGET_DIR` and `--target-dir` without reading them.
//!
//! `SKYFERRY_BIN_DIR=<dir>` skips the build and takes the binaries from `<dir>` instead,
//! e.g. to run the harness against installed packages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// The packages built before any binary is handed out.
const PACKAGES: [&str; 2] = ["skyferry-agent", "skyferry-receiver"];

/// Path of the binary `name` (e.g. `"skyferry-agent"`), freshly built for the current
/// profile. The first call runs `cargo build`; later calls reuse its outcome.
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SKYFERRY_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        if !path.is_file() {
            bail!(
                "SKYFERRY_BIN_DIR is set, but {} is not a file",
                path.display()
            );
        }
        return Ok(path);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let profile_dir = BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))?;
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "binary {name:?} not found at {} after building {}",
            path.display(),
            PACKAGES.join(", ")
        );
    }
    Ok(path)
}

/// The `<target>/<profile>` directory the current executable lives in.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the current executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("executable {} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir
            .parent()
            .with_context(|| format!("{} has no parent directory", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Cargo profile for a profile directory name: `debug` is the `dev` profile, custom
/// profiles use their own name.
fn cargo_profile(dir_name: &str) -> &str {
    match dir_name {
        "debug" => "dev",
        other => other,
    }
}

/// Builds the daemons into the current target directory; returns the profile directory.
fn build() -> Result<PathBuf> {
    let profile_dir = profile_dir()?;
    let (target_dir, dir_name) = split_profile_dir(&profile_dir)?;
    let profile = cargo_profile(&dir_name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--profile", profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    // Build the whole workspace's binaries rather than just the two packages: cargo
    // unifies features over the packages it builds, and a narrower selection than the
    // surrounding `cargo build`/`cargo test --workspace` would rebuild half the
    // dependency tree with other features each time the two alternate.
    cmd.args(["--workspace", "--bins"]);
    // Cargo sets CARGO_MANIFEST_DIR, CARGO_PKG_* and friends for the test or binary that
    // runs us. Build scripts watch some of them (ring reruns on CARGO_MANIFEST_DIR), so
    // passing them on would make this build and the surrounding one rebuild each other's
    // dependencies every time. Keep only the variables that configure cargo itself.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        let cargo_set = key_str.starts_with("CARGO_")
            && !matches!(&*key_str, "CARGO_HOME" | "CARGO_TARGET_DIR")
            && !key_str.starts_with("CARGO_BUILD_")
            && !key_str.starts_with("CARGO_PROFILE_")
            && !key_str.starts_with("CARGO_REGISTRIES_")
            && !key_str.starts_with("CARGO_NET_");
        if cargo_set || key_str == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().with_context(|| {
        format!(
            "cannot run {:?} to build the daemons (set CARGO to the cargo binary)",
            cargo
        )
    })?;
    if !status.success() {
        bail!(
            "building {} (profile {profile}, target dir {}) failed with {status}; \
             see the compiler output above",
            PACKAGES.join(" and "),
            target_dir.display()
        );
    }
    Ok(profile_dir)
}

fn split_profile_dir(profile_dir: &Path) -> Result<(PathBuf, String)> {
    let name = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("odd profile directory {}", profile_dir.display()))?;
    let target = profile_dir
        .parent()
        .with_context(|| format!("{} has no target directory", profile_dir.display()))?;
    Ok((target.to_path_buf(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_map_to_cargo_profiles() {
        assert_eq!(cargo_profile("debug"), "dev");
        assert_eq!(cargo_profile("release"), "release");
        assert_eq!(cargo_profile("bench-lto"), "bench-lto");
    }

    #[test]
    fn test_executables_resolve_to_their_profile_dir() -> Result<()> {
        let dir = profile_dir()?;
        let (_, name) = split_profile_dir(&dir)?;
        assert!(name == "debug" || name == "release", "unexpected {name}");
        Ok(())
    }
}
