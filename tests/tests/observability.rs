//! Metrics as SREs consume them: both daemons' `/metrics` pass `promtool check metrics`
//! during a transfer, a real Prometheus scrapes both, every PromQL expression of the
//! shipped dashboards and alert rules parses and names only metrics that exist, and the
//! alert rules pass their `promtool test rules` unit tests.
//!
//! Each test skips, saying so, when the `prometheus` package's binaries are missing (CI
//! installs them).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use skyferry_tests::faults::{content, write_atomic};
use skyferry_tests::prom::{
    dashboard_exprs, dashboards, exported_names, http_get, http_get_accept, promql_names,
    repo_root, rule_exprs, tool,
};
use skyferry_tests::redis::{free_tcp_port, wait_until};
use skyferry_tests::{Pair, PairOptions};

/// The names helper metrics of the storage state and node load (implemented beside this
/// work, under exactly these names): the dashboards and rules may use them before a
/// daemon of this build exports them.
const NODE_AND_STATE_METRICS: &[&str] = &[
    "skyferry_receiver_storage_state",
    "skyferry_receiver_storage_stalled_since_timestamp_seconds",
    "skyferry_receiver_storage_free_bytes",
    "skyferry_agent_node_cpu_steal_seconds_total",
    "skyferry_receiver_node_cpu_steal_seconds_total",
    "skyferry_agent_node_pressure_cpu_waiting_seconds_total",
    "skyferry_agent_node_pressure_io_waiting_seconds_total",
    "skyferry_agent_node_pressure_memory_waiting_seconds_total",
    "skyferry_agent_node_pressure_cpu_stalled_seconds_total",
    "skyferry_agent_node_pressure_io_stalled_seconds_total",
    "skyferry_agent_node_pressure_memory_stalled_seconds_total",
    "skyferry_receiver_node_pressure_cpu_waiting_seconds_total",
    "skyferry_receiver_node_pressure_io_waiting_seconds_total",
    "skyferry_receiver_node_pressure_memory_waiting_seconds_total",
    "skyferry_receiver_node_pressure_cpu_stalled_seconds_total",
    "skyferry_receiver_node_pressure_io_stalled_seconds_total",
    "skyferry_receiver_node_pressure_memory_stalled_seconds_total",
    "skyferry_agent_node_load1",
    "skyferry_agent_node_load5",
    "skyferry_agent_node_load15",
    "skyferry_receiver_node_load1",
    "skyferry_receiver_node_load5",
    "skyferry_receiver_node_load15",
    "skyferry_receiver_node_disk_io_now",
    "skyferry_receiver_node_disk_write_time_seconds_total",
    "skyferry_receiver_node_disk_writes_completed_total",
];

/// The Accept header of Prometheus's scrapes (2.x).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A pair with `[metrics] listen` on both daemons; returns it with the agent's and the
/// receiver's `host:port`.
fn pair_with_metrics() -> Result<(Pair, String, String)> {
    let agent_addr = format!("127.0.0.1:{}", free_tcp_port()?);
    let receiver_addr = format!("127.0.0.1:{}", free_tcp_port()?);
    let mut pair = Pair::new(PairOptions {
        // Heartbeats every 200 ms, so that both last-seen gauges move during the test.
        heartbeat_interval: "200ms".into(),
        ..PairOptions::default()
    })?;
    let table = |a: &str| format!("\n[metrics]\nlisten = \"{a}\"\n");
    pair.write_agent_config(|t| t.push_str(&table(&agent_addr)))?;
    pair.write_receiver_config(|t| t.push_str(&table(&receiver_addr)))?;
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    pair.start_agent()?;
    Ok((pair, agent_addr, receiver_addr))
}

/// Writes a 2 MB file into the source every 100 ms until stopped: a transfer is always
/// in progress while the test looks.
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(source: &Path) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, dir) = (stop.clone(), source.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let path = dir.join(format!("feed/{:03}/det{i:04}.fits", i / 100));
                let _ = write_atomic(&path, &content(2_000_000, i));
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `promtool check metrics` of `text`: Ok when it has nothing at all to say.
fn promtool_check_metrics(promtool: &Path, what: &str, text: &str) -> Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "promtool check metrics on the {what}'s /metrics ({}):\n{said}",
            out.status
        );
    }
    Ok(())
}

/// A value of the scrape `text` (the first sample whose line starts with `series `).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn both_daemons_metrics_are_lint_free_during_a_transfer_and_cover_the_dashboards_and_rules() {
    let Some(promtool) = tool("promtool", "promtool check metrics") else {
        return;
    };
    let (mut pair, agent, receiver) = pair_with_metrics().expect("pair");
    let feeder = Feeder::start(&pair.source());
    // Mid-transfer: the receiver has stored some files and keeps receiving.
    wait_until(Duration::from_secs(60), "files stored", || {
        let r = http_get(&receiver, "/metrics")?;
        Ok(sample(&r, "skyferry_receiver_files_stored_total").unwrap_or(0.0) >= 3.0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    // Without an Accept header: the Prometheus text format, which promtool reads.
    let a = http_get(&agent, "/metrics").expect("agent metrics");
    let r = http_get(&receiver, "/metrics").expect("receiver metrics");
    // What Prometheus asks for: OpenMetrics.
    for addr in [&agent, &receiver] {
        let (ct, om) = http_get_accept(addr, "/metrics", Some(PROMETHEUS_ACCEPT)).expect("get");
        assert_eq!(
            ct,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
    drop(feeder);

    promtool_check_metrics(&promtool, "agent", &a).unwrap_or_else(|e| panic!("{e:#}\n{a}"));
    promtool_check_metrics(&promtool, "receiver", &r).unwrap_or_else(|e| panic!("{e:#}\n{r}"));

    // The series an SRE graphs, there and wired to the real work.
    for (text, series) in [
        (&a, "skyferry_agent_sent_bytes_total"),
        (&a, "skyferry_agent_files_sent_total"),
        (&a, "skyferry_agent_heartbeat_last_received_timestamp_seconds"),
        (&a, "skyferry_agent_connects_total"),
        (&r, "skyferry_receiver_received_bytes_total"),
        (&r, "skyferry_receiver_files_stored_total"),
        (
            &r,
            "skyferry_receiver_storage_operation_duration_seconds_count{operation=\"write\"}",
        ),
        (
            &r,
            "skyferry_receiver_storage_operation_duration_seconds_count{operation=\"fsync\"}",
        ),
        (
            &r,
            "skyferry_receiver_storage_operation_duration_seconds_count{operation=\"rename\"}",
        ),
        (
            &r,
            "skyferry_receiver_storage_operation_duration_seconds_count{operation=\"catalog_commit\"}",
        ),
        (&r, "skyferry_receiver_storage_free_bytes"),
    ] {
        let v = sample(text, series).unwrap_or(0.0);
        assert!(v > 0.0, "{series} is {v} during a transfer:\n{text}");
    }
    // Known-in-advance series are exported as 0 from the start.
    for (text, series) in [
        (
            &a,
            "skyferry_agent_files_rejected_total{reason=\"hash_mismatch\"}",
        ),
        (&a, "skyferry_agent_queue_files{class=\"backlog\"}"),
        (
            &r,
            "skyferry_receiver_files_rejected_total{reason=\"bad_path\"}",
        ),
    ] {
        assert!(sample(text, series).is_some(), "{series} missing:\n{text}");
    }
    // Per agent: the label value is the agent's id.
    assert!(
        r.contains("skyferry_receiver_agent_heartbeat_last_received_timestamp_seconds{agent="),
        "no agent heartbeat timestamp:\n{r}"
    );
    assert!(a.contains("skyferry_agent_build_info{version="), "{a}");
    assert!(r.contains("skyferry_receiver_build_info{version="), "{r}");

    // Every metric the dashboards and rules use is exported (or is one of the storage
    // state / node load names implemented beside this), so that they cannot drift.
    let mut exported = exported_names(&a);
    exported.extend(exported_names(&r));
    exported.extend(NODE_AND_STATE_METRICS.iter().map(|s| s.to_string()));
    let mut used = BTreeSet::new();
    for file in dashboards().expect("dashboards") {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read dashboard"))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for e in dashboard_exprs(&json) {
            used.extend(promql_names(&e).into_iter().map(|n| (n, file.clone())));
        }
    }
    let rules = repo_root().join("prometheus/alerts.yml");
    for e in rule_exprs(&std::fs::read_to_string(&rules).expect("read rules")) {
        used.extend(promql_names(&e).into_iter().map(|n| (n, rules.clone())));
    }
    assert!(used.len() > 20, "too few metric names found: {used:?}");
    let unknown: Vec<String> = used
        .iter()
        .filter(|(n, _)| !exported.contains(n))
        .map(|(n, f)| format!("{n} (in {})", f.display()))
        .collect();
    assert!(
        unknown.is_empty(),
        "used by dashboards or rules but exported by neither daemon:\n{}",
        unknown.join("\n")
    );
    pair.stop_both().expect("stop");
}

/// A Prometheus server on a free port, scraping `targets` (job name, `host:port`) every
/// second; killed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &Path, targets: &[(&str, &str)]) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let addr = format!("127.0.0.1:{}", free_tcp_port()?);
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start prometheus")?;
        Ok(Prometheus {
            child,
            addr,
            _dir: dir,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the result vector as (labels, value) pairs.
    fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>> {
        let body = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let results = v["data"]["result"]
            .as_array()
            .with_context(|| format!("odd answer to {promql:?}: {body}"))?;
        Ok(results
            .iter()
            .filter_map(|r| {
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_both_daemons_and_sees_the_throughput() {
    let Some(bin) = tool("prometheus", "real Prometheus scrape") else {
        return;
    };
    let (mut pair, agent, receiver) = pair_with_metrics().expect("pair");
    let prom = Prometheus::start(
        &bin,
        &[("skyferry-agent", &agent), ("skyferry-receiver", &receiver)],
    )
    .expect("prometheus");
    let feeder = Feeder::start(&pair.source());
    let up = |job: &str| -> Result<bool> {
        Ok(prom
            .query(&format!("up{{job=\"{job}\"}}"))?
            .iter()
            .any(|(_, v)| *v == 1.0))
    };
    wait_until(Duration::from_secs(60), "up == 1 for both daemons", || {
        Ok(up("skyferry-agent").unwrap_or(false) && up("skyferry-receiver").unwrap_or(false))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", prom.log(), pair.diagnostics()));
    let rate = |q: &str| -> f64 {
        prom.query(q)
            .ok()
            .and_then(|r| r.first().map(|(_, v)| *v))
            .unwrap_or(0.0)
    };
    let received = "rate(skyferry_receiver_received_bytes_total[5s])";
    let sent = "rate(skyferry_agent_sent_bytes_total[5s])";
    wait_until(
        Duration::from_secs(60),
        "non-zero throughput in Prometheus",
        || Ok(rate(received) > 0.0 && rate(sent) > 0.0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", prom.log(), pair.diagnostics()));
    eprintln!(
        "prometheus sees {:.0} B/s received, {:.0} B/s sent",
        rate(received),
        rate(sent)
    );
    drop(feeder);
    pair.stop_both().expect("stop");
}

#[test]
fn every_promql_expression_of_the_dashboards_and_rules_parses() {
    let Some(promtool) = tool("promtool", "promtool check rules") else {
        return;
    };
    let mut exprs = Vec::new();
    for file in dashboards().expect("dashboards") {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read"))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let found = dashboard_exprs(&json);
        assert!(!found.is_empty(), "{}: no expressions", file.display());
        exprs.extend(found);
    }
    let rules = std::fs::read_to_string(repo_root().join("prometheus/alerts.yml")).expect("rules");
    exprs.extend(rule_exprs(&rules));
    // Each expression as a recording rule: promtool parses every one and names the bad.
    let mut wrapped = String::from("groups:\n  - name: every_expression\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(e).expect("quote");
        wrapped.push_str(&format!(
            "      - record: expr_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("wrapped.yml");
    std::fs::write(&file, &wrapped).expect("write");
    for f in [
        file.as_path(),
        repo_root().join("prometheus/alerts.yml").as_path(),
    ] {
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(f)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool check rules {}:\n{}{}\n{wrapped}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_fires_and_stays_quiet_in_its_unit_tests() {
    let Some(promtool) = tool("promtool", "promtool test rules") else {
        return;
    };
    let dir = repo_root().join("prometheus");
    let out = Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Each alert of the rules has a test that expects it firing and one that expects it
    // not firing (exp_alerts empty).
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).expect("tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in alerts {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_labels")),
            "{alert}: no test where it fires"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no test where it stays quiet"
        );
    }
}

#[test]
fn a_taken_metrics_port_stops_either_daemon_at_start_with_a_message_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let table = format!("\n[metrics]\nlisten = \"{addr}\"\n");
    pair.write_receiver_config(|t| t.push_str(&table))
        .expect("config");
    pair.write_agent_config(|t| t.push_str(&table))
        .expect("config");
    let wanted = format!("cannot listen for metrics on {addr} (metrics.listen)");
    pair.start_receiver().expect("start receiver");
    let mut status = None;
    wait_until(Duration::from_secs(20), "the receiver to exit", || {
        status = pair.receiver_exit()?;
        Ok(status.is_some())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    let status = status.expect("exited");
    let log = pair.receiver_log().unwrap_or_default();
    assert!(!status.success(), "receiver exited {status}");
    assert!(
        log.contains(&wanted),
        "receiver log lacks {wanted:?}:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    pair.start_agent().expect("start agent");
    let mut status = None;
    wait_until(Duration::from_secs(20), "the agent to exit", || {
        status = pair.agent_exit()?;
        Ok(status.is_some())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    let status = status.expect("exited");
    let log = pair.agent_log().unwrap_or_default();
    assert!(!status.success(), "agent exited {status}");
    assert!(log.contains(&wanted), "agent log lacks {wanted:?}:\n{log}");
    drop(taken);
}
