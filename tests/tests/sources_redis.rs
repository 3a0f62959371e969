//! Redis sources end to end: a real `redis-server` on an ephemeral port, the real agent and
//! receiver. Every file is stored exactly once whatever Redis does: bursts repeated three
//! times, a consumer killed before acknowledging, Redis killed mid-burst, bad messages.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skyferry_tests::faults::{content, must_write as write_atomic};
use skyferry_tests::redis::{metric, metrics_table, start_pair_with, wait_until, RedisServer};
use skyferry_tests::{Pair, PairOptions};

const CHANNEL: &str = "tomoe:files";

/// No older version was moved aside on the receiver: nothing was stored twice.
fn no_old_versions(pair: &Pair) -> bool {
    let dir = pair.storage().join(".skyferry/versions");
    skyferry_tests::tree::list_files(&dir).is_ok_and(|files| files.is_empty())
}

/// An 84-sensor exposure: `exp<id>/det<nn>.fits`, absolute paths.
fn write_exposure(source: &Path, exposure: u32) -> Vec<PathBuf> {
    (0..84)
        .map(|det| {
            let p = source.join(format!("exp{exposure:04}/det{det:02}.fits"));
            write_atomic(
                &p,
                &content(2000 + det * 37, u64::from(exposure * 100 + det as u32)),
            );
            p
        })
        .collect()
}

fn pubsub_table(url: &str, format: &str) -> String {
    format!(
        "[[redis]]\nurl = \"{url}\"\nchannel = \"{CHANNEL}\"\nformat = \"{format}\"\n\
         reconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
    )
}

fn opts() -> PairOptions {
    PairOptions {
        parallel_files: 16,
        ..PairOptions::default()
    }
}

/// Waits until the agent is subscribed (Redis counts its subscription).
fn wait_subscribed(redis: &RedisServer, pair: &Pair) {
    wait_until(Duration::from_secs(20), "the agent to subscribe", || {
        Ok(redis.subscribers(CHANNEL)? >= 1)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

/// Stored exactly once: identical trees, every row done, no row superseded, and no
/// older version moved aside on the receiver.
fn assert_stored_exactly_once(pair: &mut Pair, files: u64) {
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication");
    report.ensure_identical().expect("identical trees");
    assert_eq!(report.files as u64, files);
    let status = pair
        .wait_done(files, Duration::from_secs(10))
        .expect("status");
    assert_eq!(status["done"], files, "journal: {status}");
    assert_eq!(status["superseded"], 0, "journal: {status}");
    assert_eq!(status["pending"], 0, "journal: {status}");
    assert!(
        no_old_versions(pair),
        "no file was stored twice (no older version kept)"
    );
}

fn status(pair: &Pair, state: &str) -> u64 {
    pair.agent_status().expect("status")[state]
        .as_u64()
        .unwrap_or(0)
}

fn recorded(addr: &str, source: &str) -> f64 {
    metric(
        addr,
        &format!(
            "skyferry_agent_source_messages_total{{source=\"{source}\",outcome=\"recorded\"}}"
        ),
    )
    .expect("metrics")
}

#[test]
fn pubsub_burst_of_an_exposure_published_three_times_is_stored_once() {
    let redis = RedisServer::start().expect("redis");
    let (metrics, addr) = metrics_table().expect("port");
    let extra = format!("{}{metrics}", pubsub_table(&redis.url(), "path"));
    let mut pair = start_pair_with(opts(), &extra, |_| Ok(())).expect("pair");
    wait_subscribed(&redis, &pair);

    let files = write_exposure(&pair.source(), 1);
    for round in 0..3 {
        // Out of order from one round to the next.
        let mut order = files.clone();
        if round == 1 {
            order.reverse();
        }
        for f in &order {
            redis
                .publish(CHANNEL, &f.to_string_lossy())
                .expect("publish");
        }
    }
    assert_stored_exactly_once(&mut pair, 84);
    wait_until(Duration::from_secs(10), "252 recorded messages", || {
        Ok(recorded(&addr, "redis_pubsub") >= 252.0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

#[test]
fn json_messages_with_a_relative_path_and_bad_messages_are_reported_and_counted() {
    let redis = RedisServer::start().expect("redis");
    let (metrics, addr) = metrics_table().expect("port");
    let extra = format!("{}{metrics}", pubsub_table(&redis.url(), "json"));
    let mut pair = start_pair_with(opts(), &extra, |_| Ok(())).expect("pair");
    wait_subscribed(&redis, &pair);

    let outside = pair.dir().join("outside.fits");
    fs::write(&outside, b"not under the root").expect("write");
    let bad = [
        ("{not json".to_string(), "malformed"),
        (r#"{"file": "x.fits"}"#.to_string(), "malformed"),
        (
            format!(r#"{{"path": {:?}}}"#, outside.to_string_lossy()),
            "outside_roots",
        ),
        (
            r#"{"path": "../outside.fits"}"#.to_string(),
            "outside_roots",
        ),
        (r#"{"path": "night/missing.fits"}"#.to_string(), "not_found"),
    ];
    for (msg, _) in &bad {
        redis.publish(CHANNEL, msg).expect("publish");
    }
    // The agent keeps working: a good message after the bad ones.
    write_atomic(&pair.source().join("night/ok.fits"), &content(5000, 9));
    redis
        .publish(CHANNEL, r#"{"path": "night/ok.fits", "exposure_id": 17}"#)
        .expect("publish");
    assert_stored_exactly_once(&mut pair, 1);

    let counter = |outcome: &str| {
        metric(
            &addr,
            &format!(
                "skyferry_agent_source_messages_total{{source=\"redis_pubsub\",outcome=\"{outcome}\"}}"
            ),
        )
        .expect("metrics")
    };
    wait_until(Duration::from_secs(10), "the good message counted", || {
        Ok(counter("recorded") >= 1.0)
    })
    .expect("recorded");
    assert_eq!(counter("malformed"), 2.0);
    assert_eq!(counter("outside_roots"), 2.0);
    assert_eq!(counter("not_found"), 1.0);
    let log = pair.agent_log().expect("log");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("ignoring a redis message"))
        .collect();
    assert_eq!(
        warnings.len(),
        bad.len(),
        "one WARN per bad message:\n{log}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("night/missing.fits") && l.contains("no such file")),
        "the WARN quotes the message and says why:\n{log}"
    );
    assert!(
        pair.agent_exit().expect("exit").is_none(),
        "agent still runs"
    );
}

#[test]
fn redis_killed_and_restarted_mid_burst_loses_nothing_and_duplicates_nothing() {
    let mut redis = RedisServer::start().expect("redis");
    let (metrics, addr) = metrics_table().expect("port");
    let extra = format!("{}{metrics}", pubsub_table(&redis.url(), "path"));
    let mut pair = start_pair_with(opts(), &extra, |_| Ok(())).expect("pair");
    wait_subscribed(&redis, &pair);

    let files = write_exposure(&pair.source(), 2);
    for f in &files[..30] {
        redis
            .publish(CHANNEL, &f.to_string_lossy())
            .expect("publish");
    }
    redis.kill().expect("kill redis");
    // Published while Redis is down: those notifications never exist.
    let more = write_exposure(&pair.source(), 3);
    std::thread::sleep(Duration::from_millis(500));
    redis.restart().expect("restart redis");
    wait_subscribed(&redis, &pair);
    for f in files[30..].iter().chain(&more) {
        redis
            .publish(CHANNEL, &f.to_string_lossy())
            .expect("publish");
    }
    assert_stored_exactly_once(&mut pair, 168);
    let reconnects = metric(
        &addr,
        "skyferry_agent_source_reconnects_total{source=\"redis_pubsub\"}",
    )
    .expect("metrics");
    assert!(reconnects >= 1.0, "reconnects counted: {reconnects}");
    let log = pair.agent_log().expect("log");
    assert!(
        log.contains("redis unavailable; reconnecting"),
        "the outage is logged:\n{log}"
    );
    assert!(
        log.contains("redis pub/sub reconnected"),
        "a rescan was requested on reconnect:\n{log}"
    );
}

#[test]
fn stream_entries_read_but_not_acknowledged_by_a_killed_agent_are_shipped_after_restart() {
    let redis = RedisServer::start().expect("redis");
    let (metrics, addr) = metrics_table().expect("port");
    let extra = format!(
        "[[redis]]\nurl = \"{}\"\nstream = \"tomoe:stream\"\ngroup = \"archive\"\n\
         path_field = \"file\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n{metrics}",
        redis.url()
    );
    let mut pair = start_pair_with(opts(), &extra, |_| Ok(())).expect("pair");
    wait_until(
        Duration::from_secs(20),
        "the agent to read the stream",
        || Ok(pair.agent_log()?.contains("reading redis stream")),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));

    // Hold the journal's write lock: the agent reads entries but cannot record them, so
    // it cannot acknowledge them either. Then kill it.
    let lock = rusqlite::Connection::open(pair.journal()).expect("open journal");
    lock.busy_timeout(Duration::from_secs(10)).expect("timeout");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("lock the journal");
    let files = write_exposure(&pair.source(), 4);
    for f in &files {
        let rel = f.strip_prefix(pair.source()).expect("under source");
        redis
            .xadd(
                "tomoe:stream",
                &[("file", &rel.to_string_lossy()), ("exposure", "4")],
            )
            .expect("xadd");
    }
    // The agent reads a first batch, then blocks recording it.
    wait_until(
        Duration::from_secs(20),
        "entries read but not acknowledged",
        || Ok(redis.pending("tomoe:stream", "archive")? >= 1),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    pair.kill_agent().expect("kill -9 agent");
    lock.execute_batch("ROLLBACK").expect("unlock");
    drop(lock);
    let pending = redis.pending("tomoe:stream", "archive").expect("xpending");
    assert!(pending >= 1, "the killed agent left its entries pending");
    assert_eq!(
        status(&pair, "done") + status(&pair, "pending"),
        0,
        "nothing was journaled"
    );

    pair.start_agent().expect("restart agent");
    assert_stored_exactly_once(&mut pair, 84);
    wait_until(Duration::from_secs(20), "no pending entries", || {
        Ok(redis.pending("tomoe:stream", "archive")? == 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    assert!(recorded(&addr, "redis_stream") >= 84.0);
}

#[test]
fn rediss_with_a_password_works() {
    // The pair's receiver certificate names "localhost"; Redis serves it over TLS.
    let pair_for_certs = Pair::new(opts()).expect("pair");
    let certs = pair_for_certs.certs_dir();
    let tls = skyferry_tests::redis::RedisTls {
        cert: certs.join("receiver.pem"),
        key: certs.join("receiver.key"),
        ca: certs.join("ca.pem"),
    };
    let redis = RedisServer::start_with(Some(tls), Some("s3cret")).expect("redis over TLS");
    let (metrics, addr) = metrics_table().expect("port");
    let extra = format!(
        "[[redis]]\nurl = \"{}\"\nca = \"{}\"\nchannel = \"{CHANNEL}\"\n{metrics}",
        redis.url(),
        certs.join("ca.pem").display()
    );
    let mut pair = start_pair_with(opts(), &extra, |_| Ok(())).expect("pair");
    wait_subscribed(&redis, &pair);
    let f = pair.source().join("tls/a.fits");
    write_atomic(&f, &content(3000, 3));
    redis
        .publish(CHANNEL, &f.to_string_lossy())
        .expect("publish");
    assert_stored_exactly_once(&mut pair, 1);
    wait_until(Duration::from_secs(10), "the message recorded", || {
        Ok(recorded(&addr, "redis_pubsub") >= 1.0)
    })
    .expect("recorded over TLS");
    let log = pair.agent_log().expect("log");
    assert!(
        !log.contains("s3cret"),
        "the password never reaches the log"
    );
}
