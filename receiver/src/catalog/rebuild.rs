//! `catalog rebuild`: re-derives the catalog from the stored files, for an archive that
//! existed before the catalog or after a lost catalog.
//!
//! It walks the inventory (the current version of every path) and
//! `.skyferry/versions/` (earlier versions, hashed here since their names carry only a
//! hash prefix), adds the row of every version the staging database lacks, in the order
//! of the versions' source mtimes (so the current one ends current), then rewrites every
//! night file. Each row is its own short transaction, so a live receiver's ingest is
//! never blocked for long; it can run while the receiver runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use skyferry_common::chunk::hash_reader;
use skyferry_common::config::CatalogConfig;
use skyferry_common::unix_time::mtime_ns;

use super::staging::{Inserted, Staging};
use super::{export, read_row, staging_path, CatalogError, StoredFile};
use crate::inventory::Inventory;
use crate::metrics::CatalogMetrics;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub versions_seen: usize,
    pub rows_added: usize,
    pub nights: usize,
}

struct Version {
    path: String,
    hash: [u8; 32],
    size: u64,
    mtime_ns: i64,
    stored_at_us: i64,
    /// Where the bytes are, relative to the storage root.
    file: PathBuf,
}

/// Rebuilds the catalog of the storage at `root`; `progress(done, total)` is called
/// after each file.
pub fn rebuild(
    root: &Path,
    config: &CatalogConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Rebuilt, CatalogError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| CatalogError::Io {
        doing: "creating",
        path: config.dir.clone(),
        source,
    })?;
    let inventory = Inventory::open(&root.join(".skyferry").join("inventory.sqlite"))?;
    let mut by_agent: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    for (f, stored_at) in inventory.all()? {
        by_agent.entry(f.agent.clone()).or_default().push(Version {
            file: PathBuf::from(&f.agent).join(&f.path),
            path: f.path,
            hash: f.hash,
            size: f.size,
            mtime_ns: f.mtime_ns,
            stored_at_us: stored_at * 1_000_000,
        });
    }
    drop(inventory);
    let versions_root = root.join(".skyferry").join("versions");
    for (agent, old) in earlier_versions(&versions_root)? {
        by_agent.entry(agent).or_default().extend(old);
    }
    let total: usize = by_agent.values().map(Vec::len).sum();
    let mut staging = Staging::open(&staging_path(root))?;
    let mut out = Rebuilt {
        versions_seen: 0,
        ..Rebuilt::default()
    };
    for (agent, mut versions) in by_agent {
        versions.sort_by(|a, b| (&a.path, a.mtime_ns).cmp(&(&b.path, b.mtime_ns)));
        for v in versions {
            let file = StoredFile {
                agent: &agent,
                path: &v.path,
                hash: v.hash,
                size: v.size,
                mtime_ns: Some(v.mtime_ns),
            };
            // The bytes of an earlier version are under versions/, not the tree.
            let row = read_row(&root.join(&v.file), &file, v.stored_at_us, config);
            if let Inserted::New { .. } = staging.insert(&row, v.stored_at_us)? {
                out.rows_added += 1;
            }
            out.versions_seen += 1;
            progress(out.versions_seen, total);
        }
    }
    staging.mark_all_dirty()?;
    out.nights = staging.dirty_nights()?.len();
    let mut summaries = BTreeMap::new();
    if !export::flush(
        config,
        &mut staging,
        &mut summaries,
        &CatalogMetrics::default(),
    ) {
        return Err(CatalogError::Io {
            doing: "writing the night files in",
            path: config.dir.clone(),
            source: std::io::Error::other("see the warnings above"),
        });
    }
    Ok(out)
}

/// Earlier versions under `versions/<agent>/<path>.<16 hex>`, hashed.
fn earlier_versions(dir: &Path) -> Result<Vec<(String, Vec<Version>)>, CatalogError> {
    let mut out = Vec::new();
    let agents = match std::fs::read_dir(dir) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(CatalogError::Io {
                doing: "listing",
                path: dir.to_owned(),
                source,
            })
        }
    };
    for agent in agents.flatten() {
        let name = agent.file_name().to_string_lossy().into_owned();
        let mut list = Vec::new();
        let mut stack = vec![agent.path()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                if !ft.is_file() {
                    continue;
                }
                let p = e.path();
                let Ok(rel) = p.strip_prefix(agent.path()) else {
                    continue;
                };
                let rel = rel.to_string_lossy();
                let Some((path, suffix)) = rel.rsplit_once('.') else {
                    continue;
                };
                if suffix.len() != 16 || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
                    continue;
                }
                let io = |doing, source| CatalogError::Io {
                    doing,
                    path: p.clone(),
                    source,
                };
                let f = std::fs::File::open(&p).map_err(|e| io("opening", e))?;
                let meta = f.metadata().map_err(|e| io("checking", e))?;
                let (hash, size) = hash_reader(f).map_err(|e| io("hashing", e))?;
                let mtime = mtime_ns(&meta);
                list.push(Version {
                    path: path.to_owned(),
                    hash,
                    size,
                    mtime_ns: mtime,
                    stored_at_us: mtime / 1000,
                    file: PathBuf::from(".skyferry/versions")
                        .join(&name)
                        .join(rel.as_ref()),
                });
            }
        }
        out.push((name, list));
    }
    Ok(out)
}
