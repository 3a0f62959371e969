//! Redis sources: notifications that a file is ready, as the observatory's analysis system
//! sends them today.
//!
//! - **Pub/sub** (`SUBSCRIBE`/`PSUBSCRIBE`): fire and forget. What is published while the
//!   agent is not subscribed is lost, so every reconnect asks the filesystem sources for a
//!   rescan of the roots.
//! - **Streams** (`XREADGROUP` in a consumer group): an entry is acknowledged (`XACK`) only
//!   after the journal has committed its file, so a crash at any point leaves it pending.
//!   At startup (and after every reconnect) the consumer first re-reads its own pending
//!   entries, after taking over (`XAUTOCLAIM`) entries that other consumers left pending
//!   for longer than `claim_idle`.
//!
//! A bad message (malformed, outside the roots, not there, filtered) is logged at WARN
//! with the message, counted in `skyferry_agent_source_messages_total`, and dropped (for
//! streams: acknowledged, it will never get better; the filesystem watch still sees a file
//! that appears later). When Redis is unreachable the source retries with capped
//! exponential backoff while the filesystem watch keeps working.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use skyferry_common::config::{RedisConfig, RedisMode};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::message::{path_from_payload, plain_path, resolve};
use super::{record, Context};
use crate::journal::{Discovered, Durability};

/// Entries per `XREADGROUP`, and pub/sub messages handled per journal transaction.
const BATCH: usize = 256;
/// How long one `XREADGROUP` blocks waiting for entries.
const STREAM_BLOCK: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of a bad message quoted in the log.
const QUOTE_CHARS: usize = 200;

/// Runs one Redis source until shutdown, reconnecting as needed.
pub async fn run(cfg: RedisConfig, ctx: Arc<Context>, shutdown: CancellationToken) {
    let kind = kind(&cfg);
    let client = match client(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            error!(source = %cfg.name, url = %cfg.redacted_url(), error = %e,
                "cannot use this redis source; fix the config and restart (the filesystem watch keeps running)");
            return;
        }
    };
    let mut backoff = cfg.reconnect_min;
    let mut attempts = 0u64;
    loop {
        let mut established = false;
        let ended = match &cfg.mode {
            RedisMode::PubSub { channel, pattern } => {
                pubsub(
                    &cfg,
                    &client,
                    &ctx,
                    &shutdown,
                    (channel, *pattern),
                    attempts > 0,
                    &mut established,
                )
                .await
            }
            RedisMode::Stream {
                stream,
                group,
                consumer,
                claim_idle,
            } => {
                let s = StreamSpec {
                    stream,
                    group,
                    consumer,
                    claim_idle: *claim_idle,
                };
                streams(&cfg, &client, &ctx, &shutdown, &s, &mut established).await
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        attempts += 1;
        if established {
            backoff = cfg.reconnect_min;
        }
        let why = ended.err().unwrap_or_else(|| "ended".into());
        ctx.metrics
            .source_reconnects
            .get_or_create(&crate::metrics::SourceKindLabels { source: kind })
            .inc();
        warn!(source = %cfg.name, url = %cfg.redacted_url(), error = %why, retry_in = ?backoff,
            "redis unavailable; reconnecting (the filesystem watch keeps running)");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.reconnect_max);
    }
}

fn kind(cfg: &RedisConfig) -> &'static str {
    match cfg.mode {
        RedisMode::PubSub { .. } => "redis_pubsub",
        RedisMode::Stream { .. } => "redis_stream",
    }
}

/// The client for the URL; a `ca` replaces the system roots for `rediss://`.
async fn client(cfg: &RedisConfig) -> Result<Client, String> {
    let url = cfg.url.as_str();
    let client = match &cfg.ca {
        Some(ca) => {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|e| format!("cannot read CA {}: {e}", ca.display()))?;
            Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => Client::open(url),
    };
    // The error text never contains the password, only the kind of problem.
    client.map_err(|e| format!("bad redis URL: {e}"))
}

/// One message, as received.
struct Item {
    /// Stream entry id (acknowledged once handled); `None` for pub/sub.
    id: Option<String>,
    /// The message text for the log.
    quote: String,
    /// The path it names, or why it is malformed.
    path: Result<String, String>,
}

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut q: String = text.chars().take(QUOTE_CHARS).collect();
    if text.chars().count() > QUOTE_CHARS {
        q.push('…');
    }
    q
}

/// Resolves, records and counts a batch. `Ok` once the journal committed every accepted
/// file (or there was none): the caller may then acknowledge all the items.
async fn handle(cfg: &RedisConfig, ctx: &Context, items: Vec<Item>) -> Result<(), String> {
    if items.is_empty() {
        return Ok(());
    }
    let kind = kind(cfg);
    let rules = ctx.rules.current();
    // stat() may block (slow storage): off the runtime.
    let checked = tokio::task::spawn_blocking(move || {
        items
            .into_iter()
            .map(|item| {
                let outcome = match &item.path {
                    Ok(p) => resolve(&rules, p).map_err(|r| (r.label(), r.to_string())),
                    Err(e) => Err(("malformed", e.clone())),
                };
                (item, outcome)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| format!("path check task failed: {e}"))?;
    let mut files: Vec<Discovered> = Vec::new();
    for (item, outcome) in &checked {
        match outcome {
            Ok(d) => files.push(d.clone()),
            Err((label, why)) => {
                ctx.metrics.source_message(kind, label);
                warn!(source = %cfg.name, message = %item.quote, id = item.id.as_deref().unwrap_or(""),
                    reason = %why, "ignoring a redis message: {why}");
            }
        }
    }
    let n = files.len();
    // Streams acknowledge the entries once this returns: that needs the commit on disk.
    // A pub/sub message is gone either way; a rescan finds its file again.
    let sync = match cfg.mode {
        RedisMode::Stream { .. } => Durability::Durable,
        RedisMode::PubSub { .. } => Durability::Lazy,
    };
    let new = record(ctx, files, sync).await?;
    for _ in 0..n {
        ctx.metrics.source_message(kind, "recorded");
    }
    debug!(source = %cfg.name, messages = checked.len(), recorded = n, new, "redis messages handled");
    Ok(())
}

/// One pub/sub session: subscribe, then handle messages until the connection drops.
async fn pubsub(
    cfg: &RedisConfig,
    client: &Client,
    ctx: &Context,
    shutdown: &CancellationToken,
    (channel, pattern): (&str, bool),
    reconnected: bool,
    established: &mut bool,
) -> Result<(), String> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = conn.split();
    let subscribed = if pattern {
        sink.psubscribe(channel).await
    } else {
        sink.subscribe(channel).await
    };
    subscribed.map_err(|e| format!("cannot subscribe to {channel:?}: {e}"))?;
    *established = true;
    info!(source = %cfg.name, url = %cfg.redacted_url(), channel, pattern, "subscribed to redis");
    if reconnected {
        ctx.request_rescan("redis pub/sub reconnected; messages published meanwhile were lost");
    }
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = stream.next() => m,
        };
        let Some(first) = first else {
            return Err("connection closed".into());
        };
        let mut msgs = vec![first];
        let mut closed = false;
        while msgs.len() < BATCH {
            match stream.next().now_or_never() {
                Some(Some(m)) => msgs.push(m),
                Some(None) => {
                    closed = true;
                    break;
                }
                None => break,
            }
        }
        let items = msgs
            .iter()
            .map(|m| Item {
                id: None,
                quote: quote(m.get_payload_bytes()),
                path: path_from_payload(&cfg.format, m.get_payload_bytes()),
            })
            .collect();
        if let Err(e) = handle(cfg, ctx, items).await {
            // The messages are gone; a rescan finds their files.
            warn!(source = %cfg.name, error = %e, "cannot record files from redis messages; rescanning");
            ctx.request_rescan("journal error on redis messages");
        }
        if closed {
            return Err("connection closed".into());
        }
    }
}

struct StreamSpec<'a> {
    stream: &'a str,
    group: &'a str,
    consumer: &'a str,
    claim_idle: Duration,
}

/// One streams session: make sure the group exists, take over abandoned entries, re-read
/// this consumer's pending entries, then read new ones. Each batch is acknowledged once
/// journaled.
async fn streams(
    cfg: &RedisConfig,
    client: &Client,
    ctx: &Context,
    shutdown: &CancellationToken,
    s: &StreamSpec<'_>,
    established: &mut bool,
) -> Result<(), String> {
    let conn_cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(STREAM_BLOCK + Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&conn_cfg)
        .await
        .map_err(|e| e.to_string())?;
    // From "0": entries added before the group existed are files too.
    let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(s.stream)
        .arg(s.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Ok(_) => {
            info!(source = %cfg.name, stream = s.stream, group = s.group, "created consumer group")
        }
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(format!("cannot create consumer group {:?}: {e}", s.group)),
    }
    *established = true;
    let claimed = claim_abandoned(&mut conn, s).await?;
    info!(source = %cfg.name, url = %cfg.redacted_url(), stream = s.stream, group = s.group,
        consumer = s.consumer, claimed, "reading redis stream");

    // First this consumer's pending entries (read but never acknowledged), then new ones.
    let mut pending_after: Option<String> = Some("0".into());
    let mut retry = cfg.reconnect_min;
    loop {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(s.group)
            .arg(s.consumer)
            .arg("COUNT")
            .arg(BATCH);
        match &pending_after {
            Some(_) => {}
            None => {
                cmd.arg("BLOCK").arg(STREAM_BLOCK.as_millis() as u64);
            }
        }
        cmd.arg("STREAMS")
            .arg(s.stream)
            .arg(pending_after.as_deref().unwrap_or(">"));
        let reply: Value = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = cmd.query_async(&mut conn) => r.map_err(|e| e.to_string())?,
        };
        let entries = parse_read_reply(reply);
        if entries.is_empty() {
            pending_after = None;
            continue;
        }
        if pending_after.is_some() {
            if let Some((last, _)) = entries.last() {
                pending_after = Some(last.clone());
            }
        }
        let field = cfg.format.field();
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let items = entries
            .into_iter()
            .map(|(id, fields)| {
                let (quote_text, path) = match fields {
                    None => (
                        String::new(),
                        Err("entry was deleted from the stream".to_string()),
                    ),
                    Some(f) => {
                        let q = f
                            .iter()
                            .map(|(k, v)| format!("{k}={}", quote(v)))
                            .collect::<Vec<_>>()
                            .join(" ");
                        let path = match f.get(field) {
                            None => Err(format!("entry has no field {field:?}")),
                            Some(v) => std::str::from_utf8(v)
                                .map_err(|_| format!("field {field:?} is not UTF-8"))
                                .and_then(plain_path),
                        };
                        (q, path)
                    }
                };
                Item {
                    id: Some(id),
                    quote: quote_text,
                    path,
                }
            })
            .collect();
        match handle(cfg, ctx, items).await {
            Ok(()) => {
                retry = cfg.reconnect_min;
                let _: Value = redis::cmd("XACK")
                    .arg(s.stream)
                    .arg(s.group)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("XACK failed: {e}"))?;
            }
            Err(e) => {
                // Not acknowledged: the entries stay pending; read them again.
                warn!(source = %cfg.name, error = %e, entries = ids.len(), retry_in = ?retry,
                    "cannot record files from stream entries; they stay pending and are retried");
                pending_after = Some("0".into());
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(cfg.reconnect_max);
            }
        }
    }
}

/// Moves entries that other consumers left pending for longer than `claim_idle` to this
/// consumer (their ids only: the pending pass reads them). Returns how many.
async fn claim_abandoned(
    conn: &mut MultiplexedConnection,
    s: &StreamSpec<'_>,
) -> Result<usize, String> {
    let mut cursor = "0-0".to_string();
    let mut claimed = 0;
    // Bounded: each round moves the cursor forward; stop after a generous number anyway.
    for _ in 0..100_000 {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(s.stream)
            .arg(s.group)
            .arg(s.consumer)
            .arg(s.claim_idle.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(BATCH)
            .arg("JUSTID")
            .query_async(conn)
            .await
            .map_err(|e| format!("XAUTOCLAIM failed: {e}"))?;
        let Value::Array(parts) = reply else {
            return Err("XAUTOCLAIM: unexpected reply".into());
        };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        if let Some(Value::Array(ids)) = parts.get(1) {
            claimed += ids.len();
        }
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    Ok(claimed)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

type Entry = (String, Option<HashMap<String, Vec<u8>>>);

/// Entries of an `XREADGROUP` reply for one stream: `(id, fields)`, fields `None` for an
/// entry deleted while pending. Anything unexpected is skipped, never a panic.
fn parse_read_reply(reply: Value) -> Vec<Entry> {
    let streams = match reply {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return Vec::new(), // Nil: BLOCK timed out
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut kv) = stream else {
            continue;
        };
        let Some(Value::Array(entries)) = kv.pop() else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let mut parts = parts.into_iter();
            let Some(id) = parts.next().as_ref().and_then(text) else {
                continue;
            };
            let fields = match parts.next() {
                Some(Value::Array(flat)) => {
                    let mut map = HashMap::new();
                    let mut it = flat.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        if let (Some(k), Value::BulkString(v)) = (text(&k), v) {
                            map.insert(k, v);
                        }
                    }
                    Some(map)
                }
                _ => None,
            };
            out.push((id, fields));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_and_odd_ones_do_not_panic() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("files"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("path"), bulk("a.fits"), bulk("x")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
                Value::Int(3),
            ]),
        ])]);
        let entries = parse_read_reply(reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(
            entries[0].1.as_ref().unwrap().get("path").unwrap(),
            b"a.fits"
        );
        assert_eq!(entries[1], ("2-0".into(), None));
        assert!(parse_read_reply(Value::Nil).is_empty());
        assert!(parse_read_reply(Value::Array(vec![Value::Int(1)])).is_empty());
    }

    #[test]
    fn long_messages_are_quoted_short() {
        let q = quote(&[b'a'; 1000]);
        assert_eq!(q.chars().count(), QUOTE_CHARS + 1);
    }
}
