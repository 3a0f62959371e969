//! Shared pieces of the skyferry fuzz targets (see `fuzz/README.md`).
//!
//! The targets drive only the public API of `skyferry-common`. Everything that names a
//! message's or a lookup's fields is in [`build`], so that a protocol change (a new
//! field, an optional file hash, a new message kind) is one edit there rather than one
//! per target; [`shape`] turns fuzz bytes into the sizes, chunk sizes and paths that
//! reach the interesting boundaries quickly; [`wire`] passes messages through the real
//! codec the way a peer's frames arrive.

pub mod build;
pub mod shape;
pub mod wire;
