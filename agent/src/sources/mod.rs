//! Sources of files to ship. Each source only discovers files and records them in the
//! journal; the journal's idempotent enqueue makes overlapping sources harmless.

pub mod fs;
