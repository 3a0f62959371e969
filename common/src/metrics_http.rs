//! `GET /metrics` for both daemons: the registry in the OpenMetrics text format, served by
//! a small HTTP/1.1 server (hyper) on the address of `[metrics] listen`. Anything else is
//! 404 (405 for another method on /metrics); every connection has a bounded time to send
//! its request and get its answer, so a slow or silent client holds nothing for long.
//!
//! Prometheus asks for OpenMetrics (`Accept: application/openmetrics-text`) and gets it. A
//! client that does not (curl, `promtool check metrics`, older scrapers) gets the same
//! samples in the Prometheus text format 0.0.4, which names a counter's family with its
//! `_total` and has no `# EOF`: the negotiation Prometheus's own client libraries do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The content type of the Prometheus text format, for clients that do not ask for
/// OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of the OpenMetrics text format that prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label of `skyferry_<daemon>_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// `skyferry_<daemon>_build_info{version} 1`: a gauge, not an OpenMetrics `info` (which
/// the Prometheus text format, and so `promtool check metrics`, does not know).
pub fn build_info(
    version: &'static str,
) -> prometheus_client::metrics::family::Family<BuildLabels, prometheus_client::metrics::gauge::Gauge>
{
    let f = prometheus_client::metrics::family::Family::<
        BuildLabels,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    f.get_or_create(&BuildLabels { version }).set(1);
    f
}

/// How long a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last in all (a scraper keeps it alive between scrapes; it
/// reconnects after this).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr} (metrics.listen): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`; the error names the address and the setting. Called before the daemon
/// reports itself ready, so that a taken port is a failure at start.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// The OpenMetrics text of prometheus-client as the Prometheus text format 0.0.4: a
/// counter family `x` (samples `x_total`) is announced as `x_total`, `# UNIT` and `# EOF`
/// lines are dropped. Nothing else differs for the metric types skyferry uses (counters,
/// gauges, histograms).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // HELP comes right before its TYPE: held until the type is known.
            if let Some(h) = help.replace(rest) {
                push_line(&mut out, &format!("# HELP {h}"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let renamed = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.strip_prefix(name).unwrap_or(h);
                push_line(&mut out, &format!("# HELP {renamed}{text}"));
            }
            push_line(&mut out, &format!("# TYPE {renamed} {kind}"));
            continue;
        }
        if let Some(h) = help.take() {
            push_line(&mut out, &format!("# HELP {h}"));
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        push_line(&mut out, line);
    }
    out
}

fn push_line(out: &mut String, line: &str) {
    out.push_str(line);
    out.push('\n');
}

/// Whether an `Accept` header value asks for OpenMetrics.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// What one request is answered with (pure: method, path, `Accept` and the registry).
pub fn respond(
    method: &Method,
    path: &str,
    accept: Option<&HeaderValue>,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if path != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: only GET /metrics is served\n".into(),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on /metrics: use GET\n"),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        );
    }
    let (body, content_type) = if wants_openmetrics(accept) {
        (body, OPENMETRICS_CONTENT_TYPE)
    } else {
        (to_prometheus_text(&body), TEXT_CONTENT_TYPE)
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Serves `registry` on `listener` until `shutdown`; connections still open then are
/// closed gracefully (each within its own time bound).
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "serving metrics at /metrics");
    }
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(
                    req.method(),
                    req.uri().path(),
                    req.headers().get(hyper::header::ACCEPT),
                    &registry,
                );
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let bounded = tokio::time::timeout(CONNECTION_TIMEOUT, async {
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            });
            match bounded.await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) if e.is_timeout() || e.is_incomplete_message() => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection failed"),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;

    fn registry() -> Registry {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("things", "Things", c);
        r
    }

    async fn body(r: Response<Full<Bytes>>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[tokio::test]
    async fn prometheus_gets_openmetrics_and_everything_else_is_not_found() {
        let reg = registry();
        let accept = HeaderValue::from_static(PROMETHEUS_ACCEPT);
        let ok = respond(&Method::GET, "/metrics", Some(&accept), &reg);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let text = body(ok).await;
        assert!(
            text.contains("# TYPE things counter\nthings_total 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let nf = respond(&Method::GET, "/", None, &reg);
        assert_eq!(nf.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&Method::GET, "/metrics/x", None, &reg).status(),
            StatusCode::NOT_FOUND
        );
        let post = respond(&Method::POST, "/metrics", None, &reg);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(body(post).await.contains("POST"));
    }

    #[tokio::test]
    async fn a_client_without_accept_gets_the_prometheus_text_format() {
        let r = respond(&Method::GET, "/metrics", None, &registry());
        assert_eq!(r.headers()[CONTENT_TYPE], TEXT_CONTENT_TYPE);
        let text = body(r).await;
        assert_eq!(
            text,
            "# HELP things_total Things.\n# TYPE things_total counter\nthings_total 3\n"
        );
    }

    #[test]
    fn the_text_format_renames_only_counters_and_drops_eof() {
        let om = "# HELP a A.\n# TYPE a counter\na_total 1\n# HELP g G.\n# TYPE g gauge\ng 2\n\
                  # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 0\nh_sum 0.0\nh_count 0\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# HELP g G.\n# TYPE g gauge\ng 2\n\
             # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 0\nh_sum 0.0\nh_count 0\n"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address_and_setting() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err().to_string();
        assert!(
            e.contains(&addr.to_string()) && e.contains("metrics.listen"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_header_timeout() {
        tokio::time::pause();
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, Arc::new(registry()), stop.clone()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        // With the clock paused the runtime advances time when idle: the header timeout
        // fires and the server answers 408 or closes; either way the read ends.
        let n = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut buf))
            .await
            .expect("the server kept a silent connection open")
            .unwrap_or(0);
        let _ = n;
        stop.cancel();
        server.await.unwrap();
    }
}
