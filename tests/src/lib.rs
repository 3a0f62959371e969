//! The skyferry end-to-end harness: drives the REAL `skyferry-agent` and
//! `skyferry-receiver` binaries, never in-process copies of their code.
//!
//! - [`binaries`] builds and locates the daemons for the current profile;
//! - [`fits`] writes realistic Tomo-e Gozen-like FITS files, fast and deterministically;
//! - [`tree`] hashes and compares a source tree with its replica;
//! - [`pair`] runs one agent and one receiver on loopback in a temporary directory;
//! - [`relay`] is a UDP relay that drops, delays, duplicates and black-holes datagrams;
//! - [`sockets`] reads the kernel's drop counts of the pair's UDP sockets;
//! - [`faults`] holds what fault tests share: a seeded RNG, contents, a small tmpfs;
//! - [`hostile`] is a hostile agent (a QUIC client of its own) for attack tests;
//! - [`prom`] reads metrics endpoints and Prometheus, and the shipped dashboards and rules.
//!
//! The `skyferry-demo` and `skyferry-bench` binaries are built on these modules.

pub mod binaries;
pub mod catalog;
pub mod faults;
pub mod fits;
pub mod hostile;
pub mod pair;
pub mod prom;
pub mod redis;
pub mod relay;
pub mod sockets;
pub mod tree;

pub use pair::{Identity, Moment, Pair, PairOptions, Side};
pub use relay::{Faults, Relay};
pub use tree::{compare_trees, wait_arrived, wait_replicated, TreeReport};
