//! Review of the per-thread spare reference cache (`src/spare.rs`) through the bulkhead, the
//! timeout and the circuit breaker: sequences in which a dropped layer's state (its event
//! listener with it) could outlive what the docs promise. The first ones failed on the
//! reviewed change (a call through a dropped layer, or a refused call, did not sweep the
//! thread's other spares) and pass since the fix. Calls run on dedicated threads, each with
//! its own cache and a paused current-thread runtime; the tests assert counts only.
#![cfg(all(feature = "timeout", feature = "bulkhead", feature = "circuit-breaker"))]

mod support;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use support::{Count, DropGuard};
use support::{drop_counting_listener as listener, echo};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::circuit_breaker::CircuitBreakerLayer;
use tower_breakwater::timeout::TimeoutLayer;

type Svc = BoxCloneSyncService<u32, u32, BoxError>;
type Job = Box<dyn FnOnce() + Send>;

fn bulkhead(name: &str, max: usize, freed: &Count) -> Svc {
    let layer = BulkheadLayer::builder()
        .name(name)
        .max_concurrent_calls(max)
        .on_event(listener(freed))
        .build()
        .unwrap();
    BoxCloneSyncService::new(layer.layer(echo()).map_response(|r| r))
}

fn timeout(name: &str, freed: &Count) -> Svc {
    let layer = TimeoutLayer::builder()
        .name(name)
        .timeout(Duration::from_secs(1))
        .on_event(listener(freed))
        .build()
        .unwrap();
    BoxCloneSyncService::new(layer.layer(echo()).map_response(|r| r))
}

fn breaker(name: &str, freed: &Count) -> Svc {
    let layer = CircuitBreakerLayer::builder()
        .name(name)
        .on_event(listener(freed))
        .build()
        .unwrap();
    BoxCloneSyncService::new(layer.layer(echo()).map_response(|r| r))
}

/// A thread of its own (so a spare cache of its own) that runs jobs on a paused
/// current-thread runtime, one at a time, and stays alive until dropped (a thread's exit
/// drops its spares, which would hide a spare it keeps).
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn new() -> Worker {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = thread::spawn(move || {
            for job in rx {
                job();
            }
        });
        Worker {
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Starts `f` on the worker; its result arrives on the receiver.
    fn start<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> mpsc::Receiver<R> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.as_ref().unwrap().send(job).unwrap();
        rx
    }

    /// Runs `f` on the worker and returns its result.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.start(f).recv().expect("the job panicked")
    }

    /// Drives `fut` to completion on the worker.
    fn block_on<F: Future<Output = R> + Send + 'static, R: Send + 'static>(&self, fut: F) -> R {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
                .block_on(fut)
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A call admitted on this thread through `svc`, not yet polled.
async fn admitted(mut svc: Svc, n: u32) -> <Svc as Service<u32>>::Future {
    svc.ready().await.unwrap();
    svc.call(n)
}

/// The sequence of the public docs' promise ("a spare parked earlier on another thread
/// lasts until that thread finishes a call through any <layer kind>"): the worker parks a
/// spare of `x`; a call through `y` is admitted here; every owner of `x` and `y` is dropped;
/// the worker finishes the call through `y`. Returns how many of `x`'s and `y`'s states were
/// freed once that call finished.
async fn spare_after_a_call_through_a_dropped_layer(
    make: impl Fn(&str, &Count) -> Svc,
) -> (u64, u64) {
    let (freed_x, freed_y) = (Count::default(), Count::default());
    let (x, y) = (make("x", &freed_x), make("y", &freed_y));
    let worker = Worker::new();
    let c = x.clone();
    assert_eq!(worker.block_on(c.oneshot(1)).unwrap(), 1); // parks a spare of x there
    let in_flight = admitted(y.clone(), 2).await;
    drop((x, y));
    assert_eq!(
        (freed_x.get(), freed_y.get()),
        (0, 0),
        "the spare and the call hold them"
    );
    // The worker finishes a call through a layer of the same kind.
    assert_eq!(worker.block_on(in_flight).unwrap(), 2);
    let freed = (freed_x.get(), freed_y.get());
    drop(worker); // its exit drops the spare: x is freed then at the latest
    assert_eq!((freed_x.get(), freed_y.get()), (1, 1));
    freed
}

#[tokio::test(start_paused = true)]
async fn bulkhead_spare_is_swept_when_the_thread_finishes_a_call_through_a_dropped_bulkhead() {
    let freed = spare_after_a_call_through_a_dropped_layer(|n, f| bulkhead(n, 4, f)).await;
    assert_eq!(freed, (1, 1), "(x, y) freed after the call through y");
}

#[tokio::test(start_paused = true)]
async fn timeout_spare_is_swept_when_the_thread_finishes_a_call_through_a_dropped_timeout() {
    let freed = spare_after_a_call_through_a_dropped_layer(timeout).await;
    assert_eq!(freed, (1, 1), "(x, y) freed after the call through y");
}

#[tokio::test(start_paused = true)]
async fn breaker_spare_is_swept_when_the_thread_finishes_a_call_through_a_dropped_breaker() {
    let freed = spare_after_a_call_through_a_dropped_layer(breaker).await;
    assert_eq!(freed, (1, 1), "(x, y) freed after the call through y");
}

/// Control for the three above: a call through a live layer of the kind does sweep.
#[tokio::test(start_paused = true)]
async fn a_call_through_a_live_bulkhead_sweeps_the_spare_of_a_dropped_one() {
    let (freed_x, freed_z) = (Count::default(), Count::default());
    let (x, z) = (bulkhead("x", 4, &freed_x), bulkhead("z", 4, &freed_z));
    let worker = Worker::new();
    let c = x.clone();
    assert_eq!(worker.block_on(c.oneshot(1)).unwrap(), 1);
    drop(x);
    assert_eq!(freed_x.get(), 0, "the worker's spare holds it");
    let c = z.clone();
    assert_eq!(worker.block_on(c.oneshot(2)).unwrap(), 2);
    assert_eq!((freed_x.get(), freed_z.get()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn breaker_spare_is_swept_when_the_thread_finishes_a_call_rejected_by_an_open_breaker() {
    let (freed_x, freed_z) = (Count::default(), Count::default());
    let x = breaker("x", &freed_x);
    let z_layer = CircuitBreakerLayer::builder()
        .name("z")
        .on_event(listener(&freed_z))
        .build()
        .unwrap();
    z_layer.handle().force_open();
    let z: Svc = BoxCloneSyncService::new(z_layer.layer(echo()).map_response(|r| r));
    let worker = Worker::new();
    let c = x.clone();
    assert_eq!(worker.block_on(c.oneshot(1)).unwrap(), 1); // parks a spare of x there
    drop(x);
    assert_eq!(freed_x.get(), 0, "the worker's spare holds it");
    let c = z.clone();
    let rejected = worker.block_on(c.oneshot(2)).unwrap_err();
    assert!(rejected.to_string().contains("open"), "{rejected}");
    assert_eq!(
        (freed_x.get(), freed_z.get()),
        (1, 0),
        "(x, z) freed after the worker's call through z"
    );
}

/// A listener that, when dropped with its state, finishes one call through `svc` (a
/// bulkhead around `echo`, ready at once) and counts into `freed`.
struct CallsOnDrop(Svc, Count);

impl Drop for CallsOnDrop {
    fn drop(&mut self) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut fut = self.0.call(9);
        let got = std::pin::Pin::new(&mut fut).poll(&mut cx);
        assert!(matches!(got, std::task::Poll::Ready(Ok(9))), "{got:?}");
        self.1.incr();
    }
}

/// Reentrancy: a dropped bulkhead's last reference is a spare, dropped by the sweep that a
/// call through a live bulkhead makes; its listener's drop calls that live bulkhead (the
/// same cache) from inside the sweep. The nested call takes and gives back a reference and
/// every permit comes back.
#[tokio::test(start_paused = true)]
async fn a_listener_dropped_inside_a_sweep_may_call_a_bulkhead_of_the_same_kind() {
    let (freed_x, called) = (Count::default(), Count::default());
    let z_layer = BulkheadLayer::builder()
        .name("z")
        .max_concurrent_calls(2)
        .build()
        .unwrap();
    let z: Svc = BoxCloneSyncService::new(z_layer.layer(echo()).map_response(|r| r));
    let on_drop = CallsOnDrop(z.clone(), called.clone());
    let guard = DropGuard(freed_x.clone());
    let x_layer = BulkheadLayer::builder()
        .name("x")
        .max_concurrent_calls(2)
        .on_event(move |_| {
            let _ = (&on_drop, &guard);
        })
        .build()
        .unwrap();
    let x: Svc = BoxCloneSyncService::new(x_layer.layer(echo()).map_response(|r| r));
    drop(x_layer);
    let worker = Worker::new();
    let c = x.clone();
    assert_eq!(worker.block_on(c.oneshot(1)).unwrap(), 1); // parks a spare of x there
    drop(x);
    assert_eq!(
        (freed_x.get(), called.get()),
        (0, 0),
        "the worker's spare holds x"
    );
    for n in 2..5 {
        let c = z.clone();
        assert_eq!(worker.block_on(c.oneshot(n)).unwrap(), n); // the first one sweeps
        assert_eq!((freed_x.get(), called.get()), (1, 1), "call {n}");
    }
    let h = z_layer.handle();
    assert_eq!((h.in_flight(), h.available()), (0, 2));
}

#[cfg(feature = "http")]
mod whole_body {
    use bytes::Bytes;
    use http_body_util::Full;

    use super::*;

    /// Bodies outliving their layers and dropped on another thread (the release on a thread
    /// other than the acquire's): the worker does not park references of closed states, so
    /// the last body's drop frees both states at once.
    #[tokio::test(start_paused = true)]
    async fn bodies_dropped_on_another_thread_free_their_dropped_layers_at_once() {
        let (freed_t, freed_b) = (Count::default(), Count::default());
        let t = TimeoutLayer::builder()
            .name("t")
            .timeout(Duration::from_secs(1))
            .whole_body()
            .on_event(listener(&freed_t))
            .build()
            .unwrap();
        let b = BulkheadLayer::builder()
            .name("b")
            .max_concurrent_calls(2)
            .whole_body()
            .on_event(listener(&freed_b))
            .build()
            .unwrap();
        let server = service_fn(|()| async {
            Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from_static(b"a"))))
        });
        let svc = t.layer(b.layer(server));
        let first = svc.clone().oneshot(()).await.unwrap();
        let second = svc.oneshot(()).await.unwrap();
        let h = b.handle();
        assert_eq!(h.in_flight(), 2, "each body holds its permit");
        drop((t, b, h));
        let worker = Worker::new();
        worker.run(move || drop(first));
        assert_eq!((freed_t.get(), freed_b.get()), (0, 0), "the second body");
        worker.run(move || drop(second));
        assert_eq!(
            (freed_t.get(), freed_b.get()),
            (1, 1),
            "freed with the last body"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn bulkhead_spare_is_swept_when_the_thread_is_refused_a_call_by_a_full_bulkhead() {
    let (freed_x, freed_z) = (Count::default(), Count::default());
    let x = bulkhead("x", 1, &freed_x);
    let z_layer = BulkheadLayer::builder()
        .name("z")
        .max_concurrent_calls(1)
        .on_event(listener(&freed_z))
        .build()
        .unwrap();
    let z: Svc = BoxCloneSyncService::new(
        z_layer
            .layer(service_fn(|_: u32| {
                std::future::pending::<Result<u32, BoxError>>()
            }))
            .map_response(|r| r),
    );
    let worker = Worker::new();
    let c = x.clone();
    assert_eq!(worker.block_on(c.oneshot(1)).unwrap(), 1); // parks a spare of x there
    drop(x);
    assert_eq!(freed_x.get(), 0, "the worker's spare holds it");
    let mut holder = z.clone();
    let _held = holder.call(0); // takes z's one permit
    let c = z.clone();
    let refused = worker.block_on(c.oneshot(2)).unwrap_err();
    assert!(refused.to_string().contains("full"), "{refused}");
    assert_eq!(
        (freed_x.get(), freed_z.get()),
        (1, 0),
        "(x, z) freed after the worker was refused a call through z"
    );
}
