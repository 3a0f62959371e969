//! What the observability tests share: plain HTTP GETs (metrics endpoints, Prometheus's
//! API), the tools of the `prometheus` package, the metric names a scrape exports, and
//! the PromQL expressions of the shipped dashboards and alert rules.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `GET path` from `addr` (`host:port`) over HTTP/1.0; the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    http_get_accept(addr, path, None).map(|(_, body)| body)
}

/// `GET path` with an `Accept` header, if any: the answer's content type and body.
pub fn http_get_accept(addr: &str, path: &str, accept: Option<&str>) -> Result<(String, String)> {
    let mut conn =
        std::net::TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").as_bytes())?;
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .with_context(|| format!("reading the answer of {addr}{path}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{path}: no HTTP header in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{addr}{path}: {status}: {body}");
    }
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Ok((content_type, body.to_string()))
}

/// The path of `tool` (promtool, prometheus) if installed; otherwise `None` after saying
/// on stderr that the test is skipped and why.
pub fn tool(tool: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: `{tool}` is not installed (apt-get install prometheus; .ci/run does)"
        );
    }
    found
}

/// The metric names a scrape exports: every sample's name, and for each `# TYPE` the
/// names its samples take (`_total` of a counter, `_bucket`/`_count`/`_sum` of a
/// histogram, `_info` of an info), so that a family without a series yet still counts.
pub fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The `skyferry_*` metric names a PromQL expression uses.
pub fn promql_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("skyferry_") {
        let start = i + at;
        let before_ok = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The repository's root (the workspace), where grafana/ and prometheus/ are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The dashboards' files (grafana/dashboards/*.json), sorted.
pub fn dashboards() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every PromQL expression of a dashboard: each panel target's `expr` and each template
/// variable's query, with Grafana's own variables replaced by what Prometheus would get
/// (`$__rate_interval` by a duration, `$agent` by a regex matcher value).
pub fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_exprs(json, &mut out);
    out.into_iter().map(|e| grafana_to_promql(&e)).collect()
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map {
                match (k.as_str(), val) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    // A variable's query: `label_values(metric, label)` is Grafana's, the
                    // metric inside is PromQL.
                    ("query", serde_json::Value::String(s)) if s.starts_with("label_values(") => {
                        if let Some(inner) = s
                            .strip_prefix("label_values(")
                            .and_then(|r| r.rsplit_once(','))
                            .map(|(m, _)| m.to_string())
                        {
                            out.push(inner);
                        }
                    }
                    _ => collect_exprs(val, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$agent", "a.*")
}

/// Every `expr:` of a rules file (alerting and recording rules).
pub fn rule_exprs(yaml: &str) -> Vec<String> {
    // The rules are written with one `expr:` per rule, either inline or as a `|` / `>`
    // block; a real YAML parser is not needed for the files this repository ships.
    let mut out = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest == "|" || rest == ">" || rest == "|-" || rest == ">-" {
                let indent = line.len() - trimmed.len();
                let mut block = Vec::new();
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let t = l.trim_start();
                    if !t.is_empty() && l.len() - t.len() <= indent {
                        break;
                    }
                    block.push(t);
                    i += 1;
                }
                out.push(block.join(" ").trim().to_string());
                continue;
            }
            out.push(rest.trim_matches(['\'', '"']).to_string());
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_samples_and_types() {
        let text = "# TYPE a counter\n# TYPE h histogram\n# TYPE b info\ng{x=\"1\"} 2\n# EOF\n";
        let n = exported_names(text);
        for want in ["a_total", "h_bucket", "h_count", "h_sum", "b_info", "g"] {
            assert!(n.contains(want), "{want}: {n:?}");
        }
    }

    #[test]
    fn promql_names_are_whole_identifiers() {
        let n = promql_names(
            "rate(skyferry_a_total[1m]) / x_skyferry_b + skyferry_c{l=\"skyferry_d\"}",
        );
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        // A label value that happens to look like a name counts: harmless (it is checked
        // against the exported names like the rest).
        assert_eq!(n, ["skyferry_a_total", "skyferry_c", "skyferry_d"]);
    }

    #[test]
    fn rule_exprs_read_inline_and_block_expressions() {
        let y = "groups:\n  - rules:\n      - alert: A\n        expr: up == 0\n      - alert: B\n        expr: |\n          a\n            > 1\n        for: 1m\n";
        assert_eq!(rule_exprs(y), ["up == 0", "a > 1"]);
    }
}
