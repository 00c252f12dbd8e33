//! A response cache with probabilistic early expiry (XFetch), stale-while-revalidate and
//! serve-stale-on-error, built on the [coalescing core](crate::coalesce).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_breakwater::{cache::CacheLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CacheLayer::builder()
//!     .name("profiles")
//!     .key(|user_id: &u64| Some(*user_id))
//!     .ttl(Duration::from_secs(60))
//!     .max_entries(1_000)
//!     .max_staleness(Duration::from_secs(300))
//!     .build()?;
//! let handle = layer.handle();
//! let mut svc = ServiceBuilder::new().layer(layer).service(service_fn(|id: u64| async move {
//!     Ok::<_, std::io::Error>(format!("profile {id}"))
//! }));
//!
//! assert_eq!(svc.ready().await?.call(7).await?, "profile 7"); // miss: fetched
//! assert_eq!(svc.ready().await?.call(7).await?, "profile 7"); // hit
//! let snap = handle.snapshot();
//! assert_eq!((snap.counter("misses"), snap.counter("hits")), (Some(1), Some(1)));
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - **Keys.** The [key function](CacheBuilder::key) maps a request to `Some(key)`, or to
//!   `None` to pass it through uncached and uncoalesced.
//! - **Entries.** Only responses the [classifier](CacheBuilder::classifier) calls
//!   [`Success`](crate::classify::Outcome::Success) are stored (with the HTTP classifier, an
//!   `Ok` carrying a 503 is not); errors are never stored. An entry holds the value, its
//!   **expiry** (a [`tokio::time::Instant`]: the instant it was stored plus its TTL, fixed
//!   with [`ttl`](CacheBuilder::ttl) or computed from the response with
//!   [`ttl_fn`](CacheBuilder::ttl_fn)) and its **delta** (a [`std::time::Duration`]: how long
//!   the upstream computation that produced it took, from the first poll of the upstream
//!   call to its result, on tokio's clock).
//! - **Responses must be `Clone`** (`+ Send + Sync`): a hit returns a clone. HTTP users
//!   buffer bodies to `Bytes` first (cheap clones); for large values map them to `Arc<_>`.
//! - **Miss, or read after expiry**: the value is fetched through the coalescing core:
//!   concurrent misses for one key make one upstream call, every caller gets its result.
//! - **XFetch** (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede
//!   Prevention", PVLDB 8(8), 2015): a read of a fresh entry at `now` starts an early
//!   refresh when `now - delta * beta * ln(u) >= expiry`, `u` uniform in `(0, 1]` from the
//!   [random source](CacheBuilder::random) (a seeded SplitMix64 by default), `beta` > 0
//!   ([`beta`](CacheBuilder::beta), default 1.0). Equivalently, with `r` = time left, the
//!   refresh probability of a read is `exp(-r / (beta * delta))`. The refresh runs
//!   **detached** in the background (the coalescing core's detached mode, a task on the
//!   current tokio runtime); the reader that triggered it, and every read during it, get
//!   the cached value at once (stale-while-revalidate). At most one early refresh per key is
//!   in flight. When it succeeds the new value, expiry and delta replace the old ones.
//!   An inline mode (the triggering reader waits) is not offered.
//! - **Serve-stale-on-error.** When a refresh or a fetch fails (an error, or a response the
//!   classifier does not call a success), the failure is recorded
//!   (`refresh_errors`, [`RefreshFailed`](crate::event::EventKind::RefreshFailed)), the
//!   stored value is kept, and for [`stale_retry_interval`](CacheBuilder::stale_retry_interval)
//!   no request for that key goes upstream. A failed fetch is answered with the stored
//!   value while it is within [`max_staleness`](CacheBuilder::max_staleness) of its expiry
//!   (and with a [`FetchError`] otherwise); reads while backing off get that stale value at
//!   once. Past expiry plus the maximum staleness, a value is never served.
//!
//! # Capacity and eviction
//!
//! At most [`max_entries`](CacheBuilder::max_entries) entries (default
//! [`DEFAULT_MAX_ENTRIES`]) per response type. The store has `n` shards (a power of two, at
//! most four per core and at most `max_entries`), each a `hashbrown` table under a
//! `parking_lot::RwLock`, holding at most `max_entries / n` entries. Inserting a new key in
//! a full shard evicts that shard's entry with the earliest expiry (an expired one first,
//! since it expires earliest): a scan of one shard, on inserts only.
//!
//! # Hit path
//!
//! A hit hashes the key, takes one shard's read lock, clones the value and counts the hit;
//! it allocates nothing beyond the value's clone and draws a random number only within the
//! window where some `u` can trigger a refresh (`r <= 745 * beta * delta`).
//!
//! # Admission and `Clone`
//!
//! `poll_ready` is always ready and reserves nothing. Fetches, refreshes and pass-through
//! calls drive a clone of the inner service (polling its readiness first), hence the bound
//! `S: Clone`. A miss allocates (the shared fetch is boxed); a hit does not.
//!
//! # Concurrency
//!
//! Per-key state is an entry under a shard lock plus the coalescing core's in-flight table
//! (checked in its own module); the only lock-free flag, "early refresh in flight", is set
//! with one `swap` so exactly one reader starts a refresh, and cleared under the shard's
//! write lock when the refresh ends. A refresh whose task panics leaves the flag set: no
//! further early refresh of that entry, but the fetch at expiry replaces it.

mod fill;
mod layer;
mod service;
mod store;

pub use layer::{
    CacheBuilder, CacheHandle, CacheLayer, DEFAULT_MAX_ENTRIES, FetchError, FixedTtl, TtlConfig,
    TtlFn, Unset,
};
pub use service::{Cache, ResponseFuture};
pub use store::{RefreshMode, TtlPolicy};
