//! Test helpers shared by the integration tests: an in-memory metrics recorder whose handles
//! are plain atomics, and small inner services.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// An in-memory recorder: counters and gauges are `AtomicU64`s, histograms atomic buckets.
/// Unlike a draining debug recorder, reading values does not reset them.
#[derive(Clone)]
pub struct TestRecorder {
    registry: Arc<Registry<Key, AtomicStorage>>,
}

impl Default for TestRecorder {
    fn default() -> Self {
        TestRecorder {
            registry: Arc::new(Registry::atomic()),
        }
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn matches(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    key.name() == name
        && key.labels().count() == labels.len()
        && labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

impl TestRecorder {
    /// Runs `f` (typically building layers) with this recorder as the thread's recorder.
    pub fn install_while<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    /// The counter with exactly these labels; `None` if never registered.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let mut found = None;
        self.registry.visit_counters(|k, c| {
            if matches(k, name, labels) {
                found = Some(c.load(Ordering::SeqCst));
            }
        });
        found
    }

    /// The gauge with exactly these labels; `None` if never registered.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        self.registry.visit_gauges(|k, g| {
            if matches(k, name, labels) {
                found = Some(f64::from_bits(g.load(Ordering::SeqCst)));
            }
        });
        found
    }

    /// The values recorded in the histogram with exactly these labels; `None` if never
    /// registered.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<Vec<f64>> {
        let mut found = None;
        self.registry.visit_histograms(|k, h| {
            if matches(k, name, labels) {
                found = Some(h.data());
            }
        });
        found
    }

    /// Every series of the instance named `instance` (label `name`), as sorted lines
    /// `metric{label=value,...} = value` (the `name` label left out; histograms as the sorted
    /// list of recorded values).
    pub fn dump(&self, instance: &str) -> Vec<String> {
        let line = |k: &Key| {
            let mine = k
                .labels()
                .any(|l| l.key() == "name" && l.value() == instance);
            let labels: Vec<String> = k
                .labels()
                .filter(|l| l.key() != "name")
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            mine.then(|| format!("{}{{{}}}", k.name(), labels.join(",")))
        };
        let mut out = Vec::new();
        self.registry.visit_counters(|k, c| {
            if let Some(l) = line(k) {
                out.push(format!("{l} = {}", c.load(Ordering::SeqCst)));
            }
        });
        self.registry.visit_gauges(|k, g| {
            if let Some(l) = line(k) {
                out.push(format!(
                    "{l} = {}",
                    f64::from_bits(g.load(Ordering::SeqCst))
                ));
            }
        });
        self.registry.visit_histograms(|k, h| {
            if let Some(l) = line(k) {
                let mut values = h.data();
                values.sort_by(f64::total_cmp);
                out.push(format!("{l} = {values:?}"));
            }
        });
        out.sort();
        out
    }

    /// Every registered series name, sorted and deduplicated.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.registry
            .visit_counters(|k, _| out.push(k.name().to_owned()));
        self.registry
            .visit_gauges(|k, _| out.push(k.name().to_owned()));
        self.registry
            .visit_histograms(|k, _| out.push(k.name().to_owned()));
        out.sort();
        out.dedup();
        out
    }
}

/// Counts how many times something happened (calls, drops, polls). Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct Count(Arc<AtomicU64>);

impl Count {
    pub fn incr(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Increments a [`Count`] when dropped: put one in an inner future to see it dropped.
pub struct DropGuard(pub Count);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.incr();
    }
}

/// An event listener that counts its own drop into `freed` (it is dropped with the layer's
/// state, so `freed` tells when that state was freed).
pub fn drop_counting_listener(
    freed: &Count,
) -> impl Fn(&tower_breakwater::event::Event<'_>) + Send + Sync + 'static {
    let guard = DropGuard(freed.clone());
    move |_| {
        let _ = &guard;
    }
}

/// An inner service answering its request at once.
pub fn echo()
-> impl tower::Service<u32, Response = u32, Error = tower_breakwater::BoxError, Future: Send>
+ Clone
+ Send
+ Sync {
    tower::service_fn(|n: u32| async move { Ok::<_, tower_breakwater::BoxError>(n) })
}

/// An HTTP body that yields each frame after its delay on tokio's clock, then optionally an
/// error; counts its drops.
#[cfg(feature = "http")]
pub mod body {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use tokio::time::Sleep;

    use super::{Count, DropGuard};

    pub struct SlowBody {
        frames: VecDeque<(Duration, &'static str)>,
        fail_at_end: bool,
        sleep: Option<Pin<Box<Sleep>>>,
        _drops: DropGuard,
    }

    impl SlowBody {
        /// Frames as (delay after the previous frame, content).
        pub fn new(frames: &[(u64, &'static str)], fail_at_end: bool, drops: Count) -> Self {
            SlowBody {
                frames: frames
                    .iter()
                    .map(|(ms, s)| (Duration::from_millis(*ms), *s))
                    .collect(),
                fail_at_end,
                sleep: None,
                _drops: DropGuard(drops),
            }
        }
    }

    impl Body for SlowBody {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            let Some(&(delay, data)) = self.frames.front() else {
                return Poll::Ready(if std::mem::take(&mut self.fail_at_end) {
                    Some(Err(std::io::Error::other("body reset")))
                } else {
                    None
                });
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            self.frames.pop_front();
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
        }
    }
}

/// Cache reads through a `u64 -> u64` service (the review tests of the cache).
pub mod reads {
    use futures_util::FutureExt;
    use tower::{Service, ServiceExt};
    use tower_breakwater::BoxError;

    /// One read, once the service is ready.
    pub async fn get<S>(svc: &mut S, k: u64) -> Result<u64, BoxError>
    where
        S: Service<u64, Response = u64, Error = BoxError>,
    {
        svc.ready().await?.call(k).await
    }

    /// A cache's counters: hits, misses, stale, negative, early refreshes, refresh errors,
    /// fetches.
    #[cfg(feature = "cache")]
    pub fn counts(h: &tower_breakwater::cache::CacheHandle) -> [u64; 7] {
        let s = h.snapshot();
        [
            "hits",
            "misses",
            "stale",
            "negative",
            "early_refreshes",
            "refresh_errors",
            "fetches",
        ]
        .map(|c| s.counter(c).expect("a cache counter"))
    }

    /// A read that must be answered on its first poll (a hit, or a stale value served at
    /// once); panics otherwise.
    pub fn cached<S>(svc: &mut S, k: u64) -> u64
    where
        S: Service<u64, Response = u64, Error = BoxError>,
    {
        svc.call(k)
            .now_or_never()
            .expect("answered at once")
            .expect("a value")
    }
}

/// Tasks: reads on their own task (so that they can panic or be aborted), and letting
/// spawned tasks run.
pub mod tasks {
    use tokio::task::JoinHandle;
    use tower::Service;
    use tower_breakwater::BoxError;

    /// Lets spawned tasks (detached refreshes, readers) run until they wait on something.
    pub async fn run_tasks() {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    }

    /// One read of `k` through a clone of `svc`, on a task of its own.
    pub fn spawn_get<S>(svc: &S, k: u64) -> JoinHandle<Result<u64, BoxError>>
    where
        S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send,
    {
        let mut svc = svc.clone();
        tokio::spawn(async move { super::reads::get(&mut svc, k).await })
    }
}
