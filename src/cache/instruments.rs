//! Metric handles, snapshot counts and event listeners of one cache instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};

use crate::event::{EventKind, Events};

/// Metric handles, counts and listeners of one cache instance, registered at build time.
#[derive(Debug)]
pub(crate) struct Instruments {
    pub(crate) name: Arc<str>,
    /// By result: hit, miss, stale, negative.
    pub(crate) lookups: [Counter; 4],
    pub(crate) early: Counter,
    pub(crate) errors: Counter,
    pub(crate) entries: Gauge,
    pub(crate) recompute: Option<Histogram>,
    /// Upstream calls made by fetches, early refreshes and retries.
    pub(crate) fetches: Counter,
    /// Requests passed through uncached (key `None`).
    pub(crate) passed: Counter,
    pub(crate) events: Events,
    /// Snapshot counts: hits, misses, stale, negative, early refreshes, refresh errors,
    /// entries, fetches, passed through.
    pub(crate) counts: [AtomicU64; 9],
}

pub(crate) const HIT: usize = 0;
pub(crate) const MISS: usize = 1;
pub(crate) const STALE: usize = 2;
pub(crate) const NEGATIVE: usize = 3;
pub(crate) const EARLY: usize = 4;
pub(crate) const ERRORS: usize = 5;
pub(crate) const ENTRIES: usize = 6;
pub(crate) const FETCHES: usize = 7;
pub(crate) const PASSED: usize = 8;

/// How a fetch or refresh failed, for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// An error, or a response the classifier did not call a success: `RefreshFailed`.
    Failed,
    /// The upstream call (or the classifier, or the TTL or staleness function) panicked:
    /// `Panicked`.
    Panicked,
    /// A refresh ran past its deadline: `TimedOut`.
    TimedOut(Duration),
}

impl Instruments {
    #[inline]
    pub(crate) fn lookup(&self, result: usize) {
        self.lookups[result].increment(1);
        self.counts[result].fetch_add(1, Ordering::Relaxed);
        if result == STALE {
            self.events.emit(|| EventKind::StaleServed);
        }
    }

    pub(crate) fn early_refresh(&self) {
        self.early.increment(1);
        self.counts[EARLY].fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| EventKind::EarlyRefresh);
    }

    pub(crate) fn refresh_failed(&self, how: Failure) {
        self.errors.increment(1);
        self.counts[ERRORS].fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| match how {
            Failure::Failed => EventKind::RefreshFailed,
            Failure::Panicked => EventKind::Panicked,
            Failure::TimedOut(after) => EventKind::TimedOut { after },
        });
    }

    /// An upstream call started (a fetch, an early refresh or a retry).
    pub(crate) fn fetched(&self) {
        self.fetches.increment(1);
        self.counts[FETCHES].fetch_add(1, Ordering::Relaxed);
    }

    /// A request passed through uncached.
    #[inline]
    pub(crate) fn passed(&self) {
        self.passed.increment(1);
        self.counts[PASSED].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn entries(&self, added: i64) {
        if added >= 0 {
            self.entries.increment(added as f64);
            self.counts[ENTRIES].fetch_add(added as u64, Ordering::Relaxed);
        } else {
            self.entries.decrement((-added) as f64);
            self.counts[ENTRIES].fetch_sub((-added) as u64, Ordering::Relaxed);
        }
    }
}
