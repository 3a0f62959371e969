//! State shared by the accept loop, every connection and every file session: the
//! configuration, storage, health, metrics, the file-slot semaphore and the set of
//! (agent, path) claims. Its own module so that `server` and `session` both use it
//! without importing each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use skyferry_common::config::ReceiverConfig;
use tokio::sync::Semaphore;

use crate::health::StorageHealth;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// State shared by all connections.
pub struct Shared {
    pub config: ReceiverConfig,
    pub storage: Arc<Storage>,
    pub health: StorageHealth,
    pub metrics: Metrics,
    pub file_slots: Semaphore,
    busy: Mutex<HashSet<(Arc<str>, String)>>,
}

/// Marks (agent, path) as being received; released on drop.
pub struct BusyGuard<'a> {
    shared: &'a Shared,
    key: (Arc<str>, String),
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.shared.busy_set().remove(&self.key);
    }
}

impl Shared {
    pub fn new(config: ReceiverConfig, storage: Storage) -> Shared {
        Shared {
            file_slots: Semaphore::new(config.max_concurrent_files),
            config,
            storage: Arc::new(storage),
            health: StorageHealth::default(),
            metrics: Metrics::default(),
            busy: Mutex::new(HashSet::new()),
        }
    }

    fn busy_set(&self) -> std::sync::MutexGuard<'_, HashSet<(Arc<str>, String)>> {
        // The set holds plain keys; a panic elsewhere cannot leave it inconsistent.
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims a path so that two streams never write the same partial at once.
    pub fn claim(&self, agent: &Arc<str>, path: &str) -> Option<BusyGuard<'_>> {
        let key = (agent.clone(), path.to_owned());
        let inserted = self.busy_set().insert(key.clone());
        // Lazily: a guard built for a path that is already claimed would, when dropped,
        // release the other holder's claim (and take the lock while it is still held).
        inserted.then(|| BusyGuard { shared: self, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contested_claim_is_refused_and_leaves_the_holder_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let text = r#"
            [receiver]
            listen = "127.0.0.1:7443"
            storage_root = "."
            ca = "ca.pem"
            cert = "r.pem"
            key = "r.key"
        "#;
        let file = dir.path().join("receiver.toml");
        std::fs::write(&file, text).expect("write config");
        let config = ReceiverConfig::load(&file).expect("config");
        let storage = Storage::open(dir.path()).expect("storage");
        let shared = Shared::new(config, storage);
        let agent: Arc<str> = Arc::from("kiso");
        let held = shared.claim(&agent, "a.fits").expect("first claim");
        assert!(shared.claim(&agent, "a.fits").is_none(), "busy");
        assert!(shared.claim(&agent, "a.fits").is_none(), "still busy");
        drop(held);
        assert!(shared.claim(&agent, "a.fits").is_some(), "free again");
    }
}
