//! The failure models: a count-based sliding window (a ring of the last N outcomes), a
//! time-based sliding window (a ring of time buckets) and a run of consecutive failures.
//!
//! Each keeps running totals, so recording an outcome and reading the rates are O(1) (the time
//! window also evicts the buckets that slid out, at most one pass over the ring per record).

use std::time::Duration;

use crate::clock::Instant;

/// Totals of a window: recorded calls, failures among them, slow calls among them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) calls: u64,
    pub(super) failures: u64,
    pub(super) slow: u64,
}

impl Totals {
    /// The failure rate, `0.0` when nothing is recorded.
    pub(super) fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    /// The slow-call rate, `0.0` when nothing is recorded.
    pub(super) fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }

    fn add(&mut self, failure: bool, slow: bool) {
        self.calls += 1;
        self.failures += u64::from(failure);
        self.slow += u64::from(slow);
    }

    fn sub(&mut self, failure: bool, slow: bool) {
        self.calls -= 1;
        self.failures -= u64::from(failure);
        self.slow -= u64::from(slow);
    }
}

/// `num / den` as a ratio, `0.0` for an empty denominator. Division is correctly rounded, so
/// `5 / 10` compares equal to a threshold written `0.5`.
pub(super) fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

const FAILURE: u8 = 1;
const SLOW: u8 = 2;

/// The last `capacity` outcomes, truly sliding: each new outcome evicts the oldest once full.
#[derive(Debug)]
pub(super) struct CountWindow {
    ring: Box<[u8]>,
    /// Index of the next write (the oldest entry once full).
    head: usize,
    len: usize,
    totals: Totals,
}

impl CountWindow {
    pub(super) fn new(capacity: usize) -> Self {
        CountWindow {
            ring: vec![0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            totals: Totals::default(),
        }
    }

    fn record(&mut self, failure: bool, slow: bool) {
        let cap = self.ring.len();
        if self.len == cap {
            let old = self.ring[self.head];
            self.totals.sub(old & FAILURE != 0, old & SLOW != 0);
        } else {
            self.len += 1;
        }
        self.ring[self.head] = (u8::from(failure) * FAILURE) | (u8::from(slow) * SLOW);
        self.head = (self.head + 1) % cap;
        self.totals.add(failure, slow);
    }

    fn reset(&mut self) {
        self.head = 0;
        self.len = 0;
        self.totals = Totals::default();
    }

    /// Full and free of failures and slow calls: one more fast success would evict a fast
    /// success, which changes nothing observable.
    fn clean(&self) -> bool {
        self.len == self.ring.len() && self.totals.failures == 0 && self.totals.slow == 0
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which granule of time (since the window's origin) the bucket holds.
    epoch: u64,
    totals: Totals,
}

/// Outcomes of the last `buckets * granularity`, in `buckets` buckets of `granularity`.
///
/// An outcome counts until its bucket slides out: for at most the window length and at least
/// the window length minus one granularity.
#[derive(Debug)]
pub(super) struct TimeWindow {
    origin: Instant,
    granularity: Duration,
    ring: Box<[Bucket]>,
    /// The newest epoch seen; every bucket with `epoch + len <= current` has slid out.
    current: u64,
    totals: Totals,
}

impl TimeWindow {
    pub(super) fn new(origin: Instant, granularity: Duration, buckets: usize) -> Self {
        TimeWindow {
            origin,
            granularity,
            ring: vec![Bucket::default(); buckets].into_boxed_slice(),
            current: 0,
            totals: Totals::default(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        (since / self.granularity.as_nanos()) as u64
    }

    /// Slides the window to `now`, dropping the buckets older than the window.
    fn slide(&mut self, now: Instant) {
        let epoch = self.epoch(now);
        if epoch <= self.current {
            return;
        }
        self.current = epoch;
        let len = self.ring.len() as u64;
        for b in self.ring.iter_mut() {
            if b.totals.calls != 0 && b.epoch + len <= epoch {
                self.totals.calls -= b.totals.calls;
                self.totals.failures -= b.totals.failures;
                self.totals.slow -= b.totals.slow;
                b.totals = Totals::default();
            }
        }
    }

    fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        self.slide(now);
        let epoch = self.current;
        let idx = (epoch % self.ring.len() as u64) as usize;
        let b = &mut self.ring[idx];
        if b.epoch != epoch {
            // Slid out already in `slide` (or never used).
            b.epoch = epoch;
        }
        b.totals.add(failure, slow);
        self.totals.add(failure, slow);
    }

    fn reset(&mut self) {
        self.ring.iter_mut().for_each(|b| *b = Bucket::default());
        self.totals = Totals::default();
    }
}

/// The failure model of a breaker in the Closed state.
#[derive(Debug)]
pub(super) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
    /// Open after `limit` failures in a row; `run` is the current run.
    Consecutive {
        limit: u64,
        run: u64,
    },
}

impl Window {
    /// Records one outcome. `now` is read only by the time-based window.
    pub(super) fn record(&mut self, failure: bool, slow: bool, now: impl FnOnce() -> Instant) {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(now(), failure, slow),
            Window::Consecutive { run, .. } => {
                if failure {
                    *run += 1;
                } else {
                    *run = 0;
                }
            }
        }
    }

    /// The totals now (the time window slides to `now` first). For the consecutive model:
    /// the current run, as calls and failures.
    pub(super) fn totals(&mut self, now: impl FnOnce() -> Instant) -> Totals {
        match self {
            Window::Count(w) => w.totals,
            Window::Time(w) => {
                w.slide(now());
                w.totals
            }
            Window::Consecutive { run, .. } => Totals {
                calls: *run,
                failures: *run,
                slow: 0,
            },
        }
    }

    pub(super) fn reset(&mut self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
            Window::Consecutive { run, .. } => *run = 0,
        }
    }

    /// `true` when a fast success would change nothing, so it need not be recorded (the
    /// lock-free fast path). Never for the time window, whose buckets move with the clock.
    pub(super) fn clean(&self) -> bool {
        match self {
            Window::Count(w) => w.clean(),
            Window::Time(_) => false,
            Window::Consecutive { run, .. } => *run == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_slides() {
        let mut w = CountWindow::new(3);
        w.record(true, false);
        w.record(false, true);
        assert!(!w.clean());
        w.record(false, false);
        assert_eq!(
            w.totals,
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(false, false);
        w.record(false, false);
        assert_eq!(w.totals.failures, 0);
        assert_eq!(w.totals.slow, 0);
        assert!(w.clean());
    }
}
