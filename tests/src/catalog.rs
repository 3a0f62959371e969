//! What catalog tests share: reading the catalog through the real
//! `skyferry-receiver catalog` commands, waiting for rows, and the Python interpreter with
//! pyarrow, polars and DuckDB.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::Pair;

/// The receiver's catalog settings for tests: night files written 200 ms after a row.
pub const FAST_CATALOG: &str = "\n[catalog]\nflush_delay = \"200ms\"\n";

/// `catalog query --format json --columns all` with `args`; every row, all versions.
pub fn rows(pair: &Pair, args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(pair.receiver_bin())
        .args(["catalog", "query", "--config"])
        .arg(pair.receiver_config_path())
        .args(["--format", "json", "--columns", "all"])
        .args(args)
        .output()
        .context("cannot run skyferry-receiver catalog query")?;
    if !out.status.success() {
        bail!(
            "catalog query {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "catalog query printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits until `rows(pair, ["--all-versions"])` satisfies `done`; returns those rows.
pub fn wait_rows(
    pair: &Pair,
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        // Before the first export there is no nights.arrow: the query fails meanwhile.
        if let Ok(r) = rows(pair, &["--all-versions"]) {
            if done(&r) {
                return Ok(r);
            }
            last = r;
        }
        if Instant::now() >= deadline {
            bail!(
                "the catalog did not reach the expected state within {timeout:?}; it has {} rows\n{}",
                last.len(),
                pair.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Python interpreter that has pyarrow, polars and duckdb: `$SKYFERRY_PYTHON`, else
/// `target/pyenv/bin/python` (what `.ci/run` creates). An error says how to get one.
pub fn python() -> Result<PathBuf> {
    let candidate = match std::env::var_os("SKYFERRY_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python"),
    };
    let ok = Command::new(&candidate)
        .args(["-c", "import pyarrow, polars, duckdb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "no Python with pyarrow, polars and duckdb at {} (set SKYFERRY_PYTHON, or create it: \
             python3 -m venv target/pyenv && target/pyenv/bin/pip install -r tests/python-requirements.txt; \
             .ci/run does this)",
            candidate.display()
        );
    }
    Ok(candidate)
}
