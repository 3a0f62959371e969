//! skyferry-receiver: the cloud side. Accepts agents over QUIC with mutual TLS, verifies
//! every chunk and every whole file, stores files durably and atomically, and reports
//! its health.
//!
//! `main.rs` is only the command line; [`run`] is the daemon.

pub mod inventory;
pub mod metrics;
pub mod server;
pub mod session;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skyferry_common::config::ReceiverConfig;
use tokio_util::sync::CancellationToken;

/// How long in-flight file sessions may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Runs the receiver until `shutdown` is cancelled. `ready` is called once it listens.
pub async fn run(
    config: ReceiverConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let root = config.storage_root.clone();
    let storage = tokio::task::spawn_blocking(move || storage::Storage::open(&root))
        .await?
        .with_context(|| format!("opening storage at {}", config.storage_root.display()))?;
    let server_config = skyferry_common::tls::server_config(
        &config.ca,
        &config.cert,
        &config.key,
        config.heartbeat_interval,
    )
    .context("loading TLS identity")?;
    let endpoint = skyferry_common::tls::endpoint(config.listen, Some(server_config))
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = endpoint.local_addr()?;
    tracing::info!(%addr, storage = %config.storage_root.display(), "listening");
    ready(addr);
    let shared = Arc::new(server::Shared::new(config, storage));
    server::serve(endpoint, shared, shutdown, SHUTDOWN_GRACE).await;
    Ok(())
}
