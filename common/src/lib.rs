//! Shared core of skyferry: the wire protocol and file-session state machines (pure: no
//! sockets, no clocks), chunking and checksums, compression, configuration, TLS
//! identities, and the async framing adapter used by both daemons.

// Tests may unwrap: a panic there is a failed test, not a crash.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod buf;
pub mod chunk;
pub mod compress;
pub mod config;
pub mod daemon;
pub mod metrics_http;
pub mod night;
pub mod node_load;
pub mod protocol;
pub mod relpath;
pub mod session;
pub mod state_file;
pub mod tls;
pub mod udp;
pub mod unix_time;
pub mod wire;
