//! A registry of layer instances, for one call that snapshots them all (a `/debug/resilience`
//! endpoint, a test, a panic hook).
//!
//! Joining is explicit: a layer joins a [`Registry`] when its builder is given one with
//! `.registry(&registry)`. [`Registry::global`] is a process-wide registry for applications
//! that want one; nothing joins it unless told to. The registry holds weak references, so it
//! never keeps a layer alive: an instance whose layer, services and handles are all dropped
//! disappears from the next snapshot.
//!
//! ```
//! use std::time::Duration;
//! use tower_breakwater::registry::Registry;
//! use tower_breakwater::timeout::TimeoutLayer;
//!
//! let registry = Registry::new();
//! let layer = TimeoutLayer::builder()
//!     .name("fraud-api")
//!     .timeout(Duration::from_millis(250))
//!     .registry(&registry)
//!     .build()
//!     .unwrap();
//! let all = registry.snapshot();
//! assert_eq!(all.len(), 1);
//! assert_eq!(all[0].name, "fraud-api");
//! # drop(layer);
//! ```
//!
//! Registration and snapshots take a short lock; calls through the layers never touch the
//! registry.

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::snapshot::Snapshot;

/// Something that can describe itself as a [`Snapshot`]: each layer's shared state.
pub(crate) trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

/// A set of layer instances that can be snapshotted together. Cheap to clone; clones share
/// the same set.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<Mutex<Vec<Weak<dyn SnapshotSource>>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("entries", &self.entries.lock().len())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide registry. Layers join it only when given it explicitly
    /// (`.registry(Registry::global())`).
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(Registry::new)
    }

    #[allow(dead_code)] // used by layers behind features
    pub(crate) fn register(&self, source: Weak<dyn SnapshotSource>) {
        let mut entries = self.entries.lock();
        entries.retain(|e| e.strong_count() > 0);
        entries.push(source);
    }

    /// A snapshot of every live registered instance, in registration order. Allocates; meant
    /// for debug endpoints, not the hot path.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let live: Vec<Arc<dyn SnapshotSource>> = {
            let mut entries = self.entries.lock();
            entries.retain(|e| e.strong_count() > 0);
            entries.iter().filter_map(Weak::upgrade).collect()
        };
        // Snapshots run outside the registry lock (a snapshot may take a layer's own lock).
        live.iter().map(|s| s.snapshot()).collect()
    }

    /// The number of live registered instances.
    pub fn len(&self) -> usize {
        let mut entries = self.entries.lock();
        entries.retain(|e| e.strong_count() > 0);
        entries.len()
    }

    /// `true` when no live instance is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
