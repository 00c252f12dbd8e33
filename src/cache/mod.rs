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
//!   `None` to pass it through uncached and uncoalesced (counted in `passed_through`, not as
//!   a lookup).
//! - **Entries.** Only responses the [classifier](CacheBuilder::classifier) calls
//!   [`Success`](crate::classify::Outcome::Success) are stored as values (with the HTTP
//!   classifier, an `Ok` carrying a 503 is not). An entry holds the value, its **expiry** (a
//!   [`tokio::time::Instant`]: the instant it was stored plus its TTL, fixed with
//!   [`ttl`](CacheBuilder::ttl) or computed from the response with
//!   [`ttl_fn`](CacheBuilder::ttl_fn); a sum past the clock's range saturates at about 30
//!   years from now) and its **delta** (a [`std::time::Duration`]: how long the upstream
//!   computation that produced it took, from the moment the inner service, ready, was
//!   called to its response, on tokio's clock; time spent waiting for the inner service's
//!   readiness, a full pool or a rate limiter's queue, is not part of it, so a congested
//!   dependency does not get earlier and more frequent refreshes).
//! - **Responses must be `Clone`** (`+ Send + Sync`): a hit returns a clone. HTTP users
//!   buffer bodies to `Bytes` first (cheap clones); for large values map them to `Arc<_>`.
//!   A `Clone` that panics is a panic of what ran it: of the fetch when it clones the value
//!   to store (or a rejected response to remember), recorded like an upstream panic; of
//!   the read when it clones the value for that read (`call` unwinds, or the read's task
//!   panics), which leaves no flag behind and fails no other read.
//! - **Miss, or read after expiry**: the value is fetched through the coalescing core:
//!   concurrent misses for one key make one upstream call, every caller gets its result.
//! - **XFetch** (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede
//!   Prevention", PVLDB 8(8), 2015): a read of a fresh entry at `now` starts an early
//!   refresh when `now - delta * beta * ln(u) >= expiry` (computed in seconds, as `f64`),
//!   `u` uniform in `(0, 1]` from the [random source](CacheBuilder::random) (a seeded
//!   SplitMix64 by default), `beta` > 0 ([`beta`](CacheBuilder::beta), default 1.0).
//!   Equivalently, with `r` = time left, the refresh probability of a read is
//!   `exp(-r / (beta * delta))`. An entry with a zero delta (an upstream that answered
//!   without tokio's clock moving) never refreshes early. A `u` outside `(0, 1]` from an
//!   injected source (zero, negative, NaN, above 1) counts as `u = 1`: no early refresh on
//!   that read, never a panic. At most one early refresh per key is in flight, and every
//!   other read during it gets the stored value at once (stale-while-revalidate). When it
//!   succeeds the new value, expiry and delta replace the old ones; when it fails the old
//!   value stays.
//! - **Refresh timeout.** An early refresh (either mode), and a retry during an outage (see
//!   below), fails when it runs past its first poll plus
//!   [`refresh_timeout`](CacheBuilder::refresh_timeout) (default 30 s): a cache
//!   [`Timeout`](crate::error::ErrorKind::Timeout) error, recorded like any failure, its
//!   upstream future dropped. A hung refresh never pins its key: readers that joined it
//!   after expiry get its failure then, and the next read goes upstream again.
//! - **Outside a tokio runtime** (a `futures` executor, a synchronous caller), a read that
//!   would start a background refresh starts nothing and leaves no flag behind (the next
//!   read in the window inside a runtime may start it); a background retry is made by the
//!   read itself, which waits for it. Inline refreshes run without a deadline there.
//! - **Serve-stale-on-error.** When a fetch or a refresh fails (an error, a response the
//!   classifier does not call a success, a panic, or a refresh past its timeout), the
//!   failure is recorded (`refresh_errors` and one event, see [Events](#events)) and the
//!   stored value is kept: a failure never overwrites a value that may still be served.
//!   An entry may be served until its expiry plus its **maximum staleness**: the
//!   configured [`max_staleness`](CacheBuilder::max_staleness) (default zero), or less when
//!   its response allows less ([`staleness_fn`](CacheBuilder::staleness_fn); for HTTP,
//!   [`stale_allowance`](crate::http::stale_allowance): zero after `must-revalidate`). A
//!   failed fetch is answered with that value while it may be served (and with a
//!   [`FetchError`], or the response the classifier rejected, otherwise). Past that
//!   instant, a value is never served.
//! - **Outage and back-off.** While a key's value may be served and its last fetch or
//!   refresh failed, the key is in outage: for
//!   [`stale_retry_interval`](CacheBuilder::stale_retry_interval) no request for it goes
//!   upstream and reads get the stale value at once; then the first read starts one retry,
//!   **in the background** (detached and coalesced, like a background early refresh, with
//!   the refresh timeout), and it and every read during the retry get the stale value at
//!   once. A failed retry starts a new interval; a successful one stores its value and ends
//!   the outage. (The first fetch after expiry, before any failure, is waited for by its
//!   readers: they get its new value, or the stale one when it fails.) A failed early
//!   refresh of a fresh entry backs off its next early refresh the same way.
//! - **Without a value to serve** (none stored, or past its expiry plus its maximum
//!   staleness) there is no back-off: each read goes upstream (concurrent reads coalesced
//!   into one call) and gets the failure when it fails again, unless a
//!   [negative TTL](#negative-caching) is configured, which then is the back-off: the
//!   failure is remembered and reads get it at once, with no upstream call, for that TTL.
//!
//! # Modes
//!
//! [`refresh_mode`](CacheBuilder::refresh_mode) chooses how an early refresh runs:
//!
//! - [`RefreshMode::Background`] (the default): **detached** through the coalescing core's
//!   detached mode (a task on the current tokio runtime; none outside a runtime, see
//!   above); the read that triggered it gets the cached value at once, like every other
//!   read.
//! - [`RefreshMode::Inline`], as in the paper: the read that triggered it waits for the new
//!   value (driving the refresh on its own task; if it fails, that read gets the value it
//!   found while that may still be served, counted as the hit it was). Concurrent reads
//!   during it still get the cached value at once. If the waiting read is dropped, the
//!   refresh is dropped with it (it has no other caller), and a later read in the window
//!   may start another.
//!
//! Either way the refresh is a shared call of the coalescing core, with the refresh
//! timeout: a read that finds the entry expired, with no value to serve instead, while the
//! refresh runs joins it instead of starting another call.
//!
//! # Negative caching
//!
//! Off by default: errors are never stored. With
//! [`negative_ttl`](CacheBuilder::negative_ttl), a failed fetch that leaves no value to
//! serve (none was stored, or it is past its expiry plus the maximum staleness) is
//! remembered for that TTL: reads of its key get the failure at once, with no upstream
//! call, counted as `negative` lookups. The remembered failure is what the fetch's callers
//! got: its error is not `Clone`, so, as the coalescing core does for the callers of one
//! call, it is shared behind an `Arc` and each read gets a [`FetchError`] holding a clone
//! of that `Arc` (a rejected response is cloned). A failure never replaces a value that may
//! still be served. Remembered failures take entries of the capacity like values.
//!
//! # Events
//!
//! Through the builder's `on_event` listeners:
//!
//! - [`EarlyRefresh`](crate::event::EventKind::EarlyRefresh): a read started an XFetch
//!   early refresh (one per `early_refreshes`);
//! - [`StaleServed`](crate::event::EventKind::StaleServed): a read was answered with a
//!   value past its expiry (one per `stale` lookup);
//! - one per failed fetch, refresh or retry (one per `refresh_errors`):
//!   [`RefreshFailed`](crate::event::EventKind::RefreshFailed) for an error or a response
//!   the classifier did not call a success,
//!   [`Panicked`](crate::event::EventKind::Panicked) when it panicked (the upstream call,
//!   the classifier, the TTL or staleness function, or the `Clone` of what is stored), or
//!   [`TimedOut`](crate::event::EventKind::TimedOut) (`after` = the refresh timeout) for a
//!   refresh past its deadline.
//!
//! # Metrics
//!
//! Lookups by result, early refreshes, refresh errors, fetches (upstream calls the cache
//! made), passed-through requests, the entries gauge and, with `record_durations(true)`,
//! the recompute histogram (delta). What each counts, and when, is in
//! [`CacheHandle::snapshot`]; every read with a key is counted exactly once, also when it
//! is cancelled.
//!
//! # Capacity and eviction
//!
//! At most [`max_entries`](CacheBuilder::max_entries) entries (default
//! [`DEFAULT_MAX_ENTRIES`]) per response type, exactly: a store holds `max_entries` keys
//! before it evicts any. One count of the entries, written only when a new key is
//! inserted, bounds the whole store; its `n` shards (a power of two, at most four per
//! core, and at most one per 64 entries of capacity, so a small cache has one shard) are
//! `hashbrown` tables under `parking_lot::RwLock`s with no capacity of their own.
//!
//! Eviction is CLOCK, or second chance (F. J. Corbató, "A Paging Experiment with the
//! Multics System", MIT Project MAC, 1968), in each shard: every entry has a reference bit
//! that a read sets with a relaxed atomic store, and only when it is clear (so a hot
//! entry's cache line is written once per pass of the hand, not on every hit). A new key
//! beyond the capacity moves its shard's hand over the table's buckets: an entry read since
//! the hand last passed loses its bit and stays (its second chance); the first entry not
//! read since, or no longer servable (past its expiry plus the maximum staleness; even
//! one read since), is evicted. Keys read between inserts stay while cold keys stream
//! through; each bit the hand clears was set by a read, so an insert costs O(1) amortised.
//! When the new key's shard holds no other entry, the next shard holding one evicts
//! instead (one shard lock at a time).
//!
//! Entries hold their value behind an `Arc` (storing a value allocates it): a read holds
//! the shard's read lock only to find the entry and clone the `Arc`, and the value's
//! `Clone` (user code, e.g. an `http::Response`'s header map) runs after the lock is
//! released, as does the XFetch draw of `u` (a read that then starts a refresh takes the
//! read lock once more to set the entry's flag), so a store never waits for user code. Values are cloned before, and replaced
//! or evicted values dropped after, the write lock. Keys are hashed with `foldhash` (fast,
//! seeded per store at random; not a cryptographic hash: the bounded capacity bounds what
//! colliding keys can cost).
//!
//! # Hit path
//!
//! A hit reads tokio's clock once (the expiry check needs `now`), hashes the key, takes one
//! shard's read lock, clones the value and counts the hit (one metric handle, one atomic
//! add); it allocates nothing beyond the value's clone. Each entry stores the instant its
//! XFetch window opens, `expiry - 746 * beta * delta` (no `u` in `(0, 1]` can trigger a
//! refresh before it, since `-ln(u) <= 744.5` for every positive `f64`): reads before it
//! skip XFetch with one comparison, and only reads within it draw `u` and evaluate the
//! exact condition above.
//!
//! # Admission and `Clone`
//!
//! `poll_ready` is always ready and reserves nothing. Fetches and refreshes drive a clone of
//! the inner service (polling its readiness first); a pass-through call (a request without
//! a key) calls the inner service in `call` when it is ready, as every layer does (see the
//! [admission rule](crate#the-admission-rule)); hence the bound `S: Clone`. A miss allocates once (its shared fetch, boxed, so that the response future
//! stays small); a refresh or retry also allocates its deadline timer and its task; a read
//! that finds a remembered failure allocates the boxed error; a hit allocates nothing.
//!
//! # Concurrency
//!
//! Per-key state is an entry under a shard lock plus the coalescing core's in-flight table
//! (checked in its own module); the only lock-free flag, "refresh in flight" (an early
//! refresh, or a retry during an outage), is set with one `swap` so exactly one reader
//! starts a refresh. From that `swap` until the refresh exists, a guard of the read owns
//! the flag: user code the read runs meanwhile (the value's `Clone` for the read, the inner
//! service's and the key's `Clone` for the refresh, an event listener) clears it if it
//! panics, as does a read that finds no runtime to spawn the refresh on. Then the refresh
//! owns it: it is cleared under the shard's write lock when the refresh records its result
//! (a success, a failure, its timeout), and otherwise by a guard the refresh owns, on every
//! other exit: its poll panicked (the coalescing core catches the panic and drops the
//! refresh; the guard records the failure), or it was dropped unfinished (every caller
//! left, or its runtime shut down). All user code a refresh runs on its result (the
//! classifier, the TTL and staleness functions, the `Clone` of what is stored) runs before
//! it lets go of that guard, and a failure's listeners run after the entry is updated. So
//! no exit leaves the flag set.

mod fill;
mod instruments;
mod layer;
mod policy;
mod service;
mod store;
mod xfetch;

pub use layer::{
    CacheBuilder, CacheHandle, CacheLayer, DEFAULT_MAX_ENTRIES, DEFAULT_REFRESH_TIMEOUT, FetchError,
};
pub use policy::{FixedTtl, StalenessFn, StalenessPolicy, TtlConfig, TtlFn, Unset};
pub use service::{Cache, ResponseFuture};
pub use store::{RefreshMode, TtlPolicy};
