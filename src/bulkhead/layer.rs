use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};
use tower::Layer;

use super::Bulkhead;
use super::future::{Permit, Ticket};
use super::semaphore::{Enqueue, Semaphore};
use crate::clock;
use crate::completion::AtResponse;
#[cfg(feature = "http")]
use crate::completion::WholeBody;
use crate::config::{Common, ConfigError, common_builder_methods};
use crate::error::{BreakwaterError, ErrorKind, LayerKind};
use crate::event::{EventKind, Events};
use crate::metrics::names;
use crate::snapshot::Snapshot;
use crate::spare::{self, Owner};

/// Metric handles of one bulkhead instance, registered at build time.
#[derive(Debug)]
pub(super) struct BulkheadMetrics {
    in_flight: Gauge,
    available: Gauge,
    waiting: Gauge,
    permitted: Counter,
    rejected: Counter,
    pub(super) wait: Option<Histogram>,
}

/// How an admission attempt in `call` ended. The permit or the place in the queue is
/// owned by an RAII value from the moment it is taken.
pub(super) enum Admission {
    /// A permit is held.
    Admitted(Permit),
    /// Queued (until the ticket's deadline).
    Queued(Ticket),
    /// Rejected at once.
    Rejected(BreakwaterError),
}

/// State shared by a layer, its services and their futures. Layers, services and handles
/// hold it through an [`Owner`]; permits and queued calls hold the `Arc` inside, from the
/// thread's spare cache (see [`spare`](crate::spare)).
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) name: Arc<str>,
    max: u32,
    /// `None`: reject at once when no permit is free.
    pub(super) max_wait: Option<Duration>,
    max_waiting: u32,
    pub(super) sem: Semaphore,
    pub(super) metrics: BulkheadMetrics,
    pub(super) events: Events,
    rejected: AtomicU64,
    /// Set when the last layer, service and handle is dropped.
    closed: AtomicBool,
}

crate::spare::impl_spare!(Shared, closed);

impl Shared {
    /// Admits a call (`call` time): a free permit, else the queue, else a rejection.
    ///
    /// The permit or the place in the queue is owned by its RAII value before any metric
    /// handle runs, so a panicking recorder cannot leak it.
    #[inline(always)]
    pub(super) fn admit(self: &Arc<Self>) -> Admission {
        if self.sem.try_acquire() {
            let permit = Permit::new(spare::acquire(self));
            self.on_acquired();
            return Admission::Admitted(permit);
        }
        self.admit_slow()
    }

    #[cold]
    #[inline(never)]
    fn admit_slow(self: &Arc<Self>) -> Admission {
        if self.max_wait.is_some() {
            match self.sem.acquire_or_enqueue(self.max_waiting) {
                Enqueue::Acquired => {
                    let permit = Permit::new(spare::acquire(self));
                    self.on_acquired();
                    return Admission::Admitted(permit);
                }
                Enqueue::Queued(slot) => {
                    let ticket = Ticket::new(spare::acquire(self), slot, clock::now());
                    self.publish_waiting();
                    return Admission::Queued(ticket);
                }
                Enqueue::Full => {}
            }
        }
        Admission::Rejected(self.reject())
    }

    /// A free permit was taken: publish the gauges and count it.
    #[inline]
    fn on_acquired(&self) {
        self.publish_permits();
        self.metrics.permitted.increment(1);
    }

    /// A queued caller collected the permit handed to it (the gauges already count it).
    pub(super) fn on_granted(&self) {
        self.metrics.permitted.increment(1);
    }

    /// Returns a held permit: to the oldest waiter if any (waking it), else to the free
    /// count; then publishes the gauges that changed. The permit is returned before any
    /// metric handle runs, so a panicking recorder cannot leak it.
    #[inline]
    pub(super) fn release(&self) {
        if self.sem.release() {
            self.publish_permits();
        } else {
            // Handed to the head waiter: still held, one caller fewer queues.
            self.publish_waiting();
        }
    }

    /// Publishes `in_flight` and `available` after a change of the free count.
    ///
    /// The gauges are never adjusted relatively: each write is the absolute value of the
    /// free count read *after* the change (`in_flight = max - free`, `available = free`),
    /// so every value written is one the bulkhead really had, within `0..=max`, whatever
    /// the interleaving, and instances sharing a name overwrite each other instead of
    /// adding up. Concurrent writers can finish in any order, so after writing, the count
    /// is read again and the write repeated if it changed: whoever changes the count last
    /// writes last. (With recorders whose gauge writes are atomic read-modify-writes, as in
    /// the `metrics` crate's atomic storage, this is exact: a writer whose value was
    /// overtaken is ordered after the overtaking change and sees it on its second read.)
    #[inline]
    fn publish_permits(&self) {
        let mut free = self.sem.available();
        loop {
            self.metrics.in_flight.set(f64::from(self.max - free));
            self.metrics.available.set(f64::from(free));
            let now = self.sem.available();
            if now == free {
                return;
            }
            free = now;
        }
    }

    /// Publishes `waiting` after a change of the queue length, as
    /// [`publish_permits`](Self::publish_permits) does for the permits.
    pub(super) fn publish_waiting(&self) {
        let mut queued = self.sem.waiting();
        loop {
            self.metrics.waiting.set(f64::from(queued));
            let now = self.sem.waiting();
            if now == queued {
                return;
            }
            queued = now;
        }
    }

    /// Counts a rejection, emits its event and builds its error.
    #[cold]
    pub(super) fn reject(&self) -> BreakwaterError {
        // A rejected call takes no reference, so it sweeps spares of dropped bulkheads here.
        crate::spare::tidy::<Shared>();
        self.metrics.rejected.increment(1);
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.events.emit(|| EventKind::Rejected {
            kind: ErrorKind::BulkheadFull,
            retry_after: None,
        });
        BreakwaterError::new(
            ErrorKind::BulkheadFull,
            LayerKind::Bulkhead,
            self.name.clone(),
        )
    }
}

/// Builds a [`BulkheadLayer`]; see the [module docs](crate::bulkhead).
///
/// Required: [`max_concurrent_calls`](Self::max_concurrent_calls). Defaults: no waiting
/// (`max_wait` zero: reject at once, load shedding), no limit on waiters when waiting is on.
#[derive(Debug)]
#[must_use]
pub struct BulkheadBuilder<M = AtResponse> {
    common: Common,
    max_concurrent_calls: Option<usize>,
    max_wait: Duration,
    max_waiting: Option<usize>,
    completion: M,
}

impl Default for BulkheadBuilder {
    fn default() -> Self {
        BulkheadBuilder {
            common: Common::default(),
            max_concurrent_calls: None,
            max_wait: Duration::ZERO,
            max_waiting: None,
            completion: AtResponse,
        }
    }
}

impl<M> BulkheadBuilder<M> {
    common_builder_methods!();

    /// The maximum number of calls holding a permit at once, in `1..=u32::MAX` (required).
    pub fn max_concurrent_calls(mut self, max: usize) -> Self {
        self.max_concurrent_calls = Some(max);
        self
    }

    /// How long a call may wait for a permit when none is free (default zero).
    ///
    /// Zero rejects at once with [`ErrorKind::BulkheadFull`] (load shedding). A positive
    /// duration queues the call, first in first out, and rejects it with `BulkheadFull`
    /// when the duration passes without a permit (tokio rounds the deadline up to the next
    /// millisecond). A duration too large to add to the current instant (such as
    /// `Duration::MAX`) means no limit.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The maximum number of calls waiting for a permit at once, in `1..=u32::MAX`
    /// (4,294,967,295). Unset (the default), the queue has no limit of our own, which is
    /// the same as `u32::MAX`, the most the permit word can count; a larger value, such as
    /// `usize::MAX` on 64-bit targets, is a [`ConfigError`] (it is never clamped): leave
    /// this unset for no limit. A call finding the queue full is rejected at once. Only
    /// meaningful with a positive [`max_wait`](Self::max_wait).
    pub fn max_waiting(mut self, max: usize) -> Self {
        self.max_waiting = Some(max);
        self
    }

    /// For `http::Response` services: the call ends at the end of the response body, not at
    /// its headers, so the permit is held until the body reaches its end of stream, fails, or
    /// is dropped unread, and returned then, exactly once (see
    /// [`WholeBody`] and [`BulkheadBody`](super::BulkheadBody)). A slow body then counts
    /// against the limit as long as it holds a connection. Requires the `http` feature.
    #[cfg(feature = "http")]
    pub fn whole_body(self) -> BulkheadBuilder<WholeBody> {
        BulkheadBuilder {
            common: self.common,
            max_concurrent_calls: self.max_concurrent_calls,
            max_wait: self.max_wait,
            max_waiting: self.max_waiting,
            completion: WholeBody,
        }
    }

    /// Validates the configuration, registers the metric handles with the current recorder
    /// and returns the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field when `max_concurrent_calls` is unset or outside
    /// `1..=u32::MAX`, when `max_waiting` is outside `1..=u32::MAX` or set while `max_wait`
    /// is zero (nobody waits), or when the name is empty.
    pub fn build(self) -> Result<BulkheadLayer<M>, ConfigError> {
        const COUNT: &str = "a count in 1..=4294967295";
        let v = self.common.validator(LayerKind::Bulkhead)?;
        let max = v.required("max_concurrent_calls", self.max_concurrent_calls, COUNT)?;
        let max = u32::try_from(max)
            .ok()
            .filter(|m| *m > 0)
            .ok_or_else(|| v.error("max_concurrent_calls", max, COUNT))?;
        let max_waiting = match self.max_waiting {
            None => u32::MAX,
            Some(n) if self.max_wait.is_zero() => {
                return Err(v.error(
                    "max_waiting",
                    n,
                    "unset while max_wait is zero (no call waits)",
                ));
            }
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|m| *m > 0)
                .ok_or_else(|| v.error("max_waiting", n, COUNT))?,
        };
        let reg = self.common.registrar();
        let max_gauge = reg.gauge(&names::BULKHEAD_MAX, &[]);
        max_gauge.set(f64::from(max));
        let in_flight = reg.gauge(&names::BULKHEAD_IN_FLIGHT, &[]);
        in_flight.set(0.0);
        let available = reg.gauge(&names::BULKHEAD_AVAILABLE, &[]);
        available.set(f64::from(max));
        let waiting = reg.gauge(&names::BULKHEAD_WAITING, &[]);
        waiting.set(0.0);
        let metrics = BulkheadMetrics {
            in_flight,
            available,
            waiting,
            permitted: reg.counter(&names::BULKHEAD_CALLS, &[("outcome", "permitted")]),
            rejected: reg.counter(&names::BULKHEAD_CALLS, &[("outcome", "rejected")]),
            wait: reg
                .durations(LayerKind::Bulkhead, self.common.record_durations)
                .then(|| reg.histogram(&names::BULKHEAD_WAIT_DURATION, &[])),
        };
        let shared = Shared {
            name: v.name().clone(),
            max,
            max_wait: (!self.max_wait.is_zero()).then_some(self.max_wait),
            max_waiting,
            sem: Semaphore::new(max),
            metrics,
            events: self.common.events(LayerKind::Bulkhead),
            rejected: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        };
        // The registry holds the owners' share weakly: a bulkhead whose layers, services and
        // handles are all dropped leaves it, whatever permits or spare references remain.
        let shared = Arc::new(Owner::new(shared));
        let weak = Arc::downgrade(&shared);
        self.common.register_fn(move || {
            Some(
                BulkheadHandle {
                    shared: weak.upgrade()?,
                }
                .snapshot(),
            )
        });
        Ok(BulkheadLayer {
            shared,
            completion: self.completion,
        })
    }
}

/// Limits the calls in flight through every service it makes; see the
/// [module docs](crate::bulkhead).
///
/// Cheap to clone (one `Arc`); every clone, and every service it makes, shares one
/// bulkhead.
#[derive(Debug, Clone)]
pub struct BulkheadLayer<M = AtResponse> {
    pub(super) shared: Arc<Owner<Shared>>,
    completion: M,
}

impl BulkheadLayer {
    /// A builder with defaults: name `"default"`, `max_concurrent_calls` unset (required),
    /// `max_wait` zero (reject at once), no limit on waiters, the default metrics profile, no
    /// wait-duration histogram, no listener.
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder::default()
    }

    /// A load shedder: at most `max_concurrent_calls` calls in flight, the rest rejected at
    /// once. Shorthand for `BulkheadLayer::builder().max_concurrent_calls(n).build()`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when `max_concurrent_calls` is outside `1..=u32::MAX`.
    pub fn new(max_concurrent_calls: usize) -> Result<Self, ConfigError> {
        Self::builder()
            .max_concurrent_calls(max_concurrent_calls)
            .build()
    }
}

impl<M> BulkheadLayer<M> {
    /// A handle to this bulkhead's state, for snapshots.
    pub fn handle(&self) -> BulkheadHandle {
        BulkheadHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, M: Clone> Layer<S> for BulkheadLayer<M> {
    type Service = Bulkhead<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, self.shared.clone(), self.completion.clone())
    }
}

/// A handle to one bulkhead, for snapshots and live counts. Cheap to clone.
///
/// Counts are read from the admission state itself (not from the metric gauges), so they
/// are exact at the moment of reading.
#[derive(Clone)]
pub struct BulkheadHandle {
    shared: Arc<Owner<Shared>>,
}

impl fmt::Debug for BulkheadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadHandle")
            .field("name", &self.shared.name)
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl BulkheadHandle {
    /// The instance name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configured maximum of concurrent calls.
    pub fn max_concurrent_calls(&self) -> u32 {
        self.shared.max
    }

    /// The configured maximum wait for a permit (zero: reject at once).
    pub fn max_wait(&self) -> Duration {
        self.shared.max_wait.unwrap_or(Duration::ZERO)
    }

    /// Permits free now, in `0..=max_concurrent_calls`.
    pub fn available(&self) -> u32 {
        self.shared.sem.available()
    }

    /// Permits held now (`max_concurrent_calls - available`), including a permit handed to
    /// a waiter that has not been polled since.
    pub fn in_flight(&self) -> u32 {
        self.shared.max - self.available()
    }

    /// Calls queued for a permit now.
    pub fn waiting(&self) -> u32 {
        self.shared.sem.waiting()
    }

    /// A snapshot: kind `bulkhead`, no state; gauges `in_flight`, `waiting`, `available`,
    /// `max_concurrent_calls` (counts) and `max_wait_seconds`; counter `rejected` (calls
    /// rejected since the layer was built).
    pub fn snapshot(&self) -> Snapshot {
        let available = self.available();
        Snapshot::new(LayerKind::Bulkhead, &self.shared.name)
            .with_gauge("in_flight", f64::from(self.shared.max - available))
            .with_gauge("waiting", f64::from(self.waiting()))
            .with_gauge("available", f64::from(available))
            .with_gauge("max_concurrent_calls", f64::from(self.shared.max))
            .with_gauge("max_wait_seconds", self.max_wait().as_secs_f64())
            .with_counter("rejected", self.shared.rejected.load(Ordering::Relaxed))
    }
}
