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

/// Something that can describe itself as a [`Snapshot`]: a layer's shared state.
pub(crate) trait SnapshotSource: Send + Sync {
    fn snapshot(&self) -> Snapshot;
}

/// A registered instance: returns its snapshot, or `None` once the instance is gone.
type Source = Arc<dyn Fn() -> Option<Snapshot> + Send + Sync>;

/// A set of layer instances that can be snapshotted together. Cheap to clone; clones share
/// the same set.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<Mutex<Vec<Source>>>,
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

    /// Registers an instance through a function that upgrades its weak references and
    /// snapshots it, returning `None` once the instance is gone.
    #[allow(dead_code)] // used by layers behind features
    pub(crate) fn register_fn(
        &self,
        source: impl Fn() -> Option<Snapshot> + Send + Sync + 'static,
    ) {
        self.entries.lock().push(Arc::new(source));
    }

    /// Registers a layer's shared state by weak reference.
    #[allow(dead_code)] // used by layers behind features
    pub(crate) fn register<T: SnapshotSource + 'static>(&self, shared: Weak<T>) {
        self.register_fn(move || shared.upgrade().map(|s| s.snapshot()));
    }

    /// A snapshot of every live registered instance, in registration order. Allocates; meant
    /// for debug endpoints, not the hot path.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let sources: Vec<Source> = self.entries.lock().clone();
        // Snapshots run outside the registry lock (a snapshot may take a layer's own lock).
        let mut out = Vec::with_capacity(sources.len());
        let mut dead = Vec::new();
        for source in sources {
            match source() {
                Some(s) => out.push(s),
                None => dead.push(source),
            }
        }
        if !dead.is_empty() {
            self.entries
                .lock()
                .retain(|e| !dead.iter().any(|d| Arc::ptr_eq(d, e)));
        }
        out
    }

    /// The number of live registered instances (takes a snapshot of each).
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// `true` when no live instance is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
