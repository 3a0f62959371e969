//! Reads the agent's `GET /metrics` (Prometheus text format) into numbers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result};

/// Every sample of the agent's metrics endpoint at `addr` (`host:port`), by series (the
/// name with its labels, e.g. `skyferry_agent_files_sent_total`).
pub fn scrape(addr: &str) -> Result<HashMap<String, f64>> {
    let mut conn = TcpStream::connect(addr)
        .with_context(|| format!("cannot connect to the agent's metrics at {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .with_context(|| format!("cannot read the agent's metrics at {addr}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

/// One series of a scrape; 0 when absent (a counter never touched).
pub fn get(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}
