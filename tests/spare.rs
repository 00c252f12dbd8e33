//! Spare references of the timeout and the bulkhead: a call on a thread parks its reference
//! to the layer's state in that thread's cache, yet dropping every layer, service and handle
//! frees the state (its event listener with it), on this thread and on others; calls keep
//! working through more layers than the cache has slots.
#![cfg(all(feature = "timeout", feature = "bulkhead"))]

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use support::{Count, TestRecorder};
use support::{drop_counting_listener as listener, echo};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::bulkhead::BulkheadLayer;
use tower_breakwater::timeout::TimeoutLayer;

type Svc = BoxCloneSyncService<u32, u32, BoxError>;

fn timeout(name: &str, freed: &Count) -> TimeoutLayer {
    TimeoutLayer::builder()
        .name(name)
        .timeout(Duration::from_secs(1))
        .on_event(listener(freed))
        .build()
        .unwrap()
}

fn bulkhead(name: &str, freed: &Count) -> BulkheadLayer {
    BulkheadLayer::builder()
        .name(name)
        .max_concurrent_calls(2)
        .on_event(listener(freed))
        .build()
        .unwrap()
}

fn timeout_svc(layer: &TimeoutLayer) -> Svc {
    BoxCloneSyncService::new(layer.layer(echo()).map_response(|r| r))
}

fn bulkhead_svc(layer: &BulkheadLayer) -> Svc {
    BoxCloneSyncService::new(layer.layer(echo()).map_response(|r| r))
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_freed_when_its_last_owner_is_dropped_after_calls_on_this_thread() {
    let freed = Count::default();
    let layer = timeout("t", &freed);
    let svc = timeout_svc(&layer);
    for n in 0..3 {
        assert_eq!(svc.clone().oneshot(n).await.unwrap(), n); // parks a spare here
    }
    let h = layer.handle();
    drop((layer, svc));
    assert_eq!(freed.get(), 0, "the handle still owns it");
    assert_eq!(h.snapshot().name, "t");
    drop(h);
    assert_eq!(freed.get(), 1, "the spare reference did not keep it alive");
}

#[tokio::test(start_paused = true)]
async fn a_bulkhead_is_freed_when_its_last_owner_is_dropped_after_calls_on_this_thread() {
    let freed = Count::default();
    let layer = bulkhead("b", &freed);
    let svc = bulkhead_svc(&layer);
    for n in 0..3 {
        assert_eq!(svc.clone().oneshot(n).await.unwrap(), n); // parks a spare here
    }
    let h = layer.handle();
    assert_eq!((h.in_flight(), h.available()), (0, 2));
    drop((layer, svc));
    assert_eq!(freed.get(), 0, "the handle still owns it");
    drop(h);
    assert_eq!(freed.get(), 1, "the spare reference did not keep it alive");
}

#[tokio::test(start_paused = true)]
async fn the_registry_drops_a_timeout_and_a_bulkhead_whose_owners_are_gone_despite_spares() {
    let registry = tower_breakwater::registry::Registry::new();
    let t = TimeoutLayer::builder()
        .name("t")
        .timeout(Duration::from_secs(1))
        .registry(&registry)
        .build()
        .unwrap();
    let b = BulkheadLayer::builder()
        .name("b")
        .max_concurrent_calls(1)
        .registry(&registry)
        .build()
        .unwrap();
    let svc = BoxCloneSyncService::new(t.layer(b.layer(echo())).map_response(|r| r));
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1); // parks spares of both here
    assert_eq!(registry.snapshot().len(), 2);
    drop((t, svc));
    let left: Vec<_> = registry.snapshot().into_iter().map(|s| s.name).collect();
    assert_eq!(left, ["b"]);
    drop(b);
    assert!(registry.snapshot().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_queued_bulkhead_call_keeps_a_dropped_bulkhead_until_it_ends_then_frees_it() {
    let freed = Count::default();
    let layer = BulkheadLayer::builder()
        .name("q")
        .max_concurrent_calls(1)
        .max_wait(Duration::from_secs(1))
        .on_event(listener(&freed))
        .build()
        .unwrap();
    let slow = service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(ms)
    });
    let svc = layer.layer(slow);
    let h = layer.handle();
    let first = tokio::spawn(svc.clone().oneshot(100));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(10)); // queued behind the first
    tokio::task::yield_now().await;
    assert_eq!((h.in_flight(), h.waiting()), (1, 1));
    drop((layer, svc, h));
    assert_eq!(freed.get(), 0, "the calls in flight still need it");
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(first.await.unwrap().unwrap(), 100);
    tokio::time::advance(Duration::from_millis(10)).await;
    assert_eq!(second.await.unwrap().unwrap(), 10);
    assert_eq!(freed.get(), 1, "freed when the last call finished");
}

#[tokio::test(start_paused = true)]
async fn calls_keep_working_through_more_layers_than_cache_slots_and_all_are_freed() {
    const LAYERS: usize = 10; // more than the 4 spare slots per thread and layer kind
    let rec = TestRecorder::default();
    let freed = Count::default();
    let (timeouts, bulkheads): (Vec<_>, Vec<_>) = rec.install_while(|| {
        (0..LAYERS)
            .map(|i| {
                let name = format!("l{i}");
                (timeout(&name, &freed), bulkhead(&name, &freed))
            })
            .unzip()
    });
    // Each stack: timeout around bulkhead around the inner service.
    let stacks: Vec<Svc> = timeouts
        .iter()
        .zip(&bulkheads)
        .map(|(t, b)| BoxCloneSyncService::new(t.layer(b.layer(echo())).map_response(|r| r)))
        .collect();
    for round in 0..5u32 {
        for (i, svc) in stacks.iter().enumerate() {
            let n = round * 100 + i as u32;
            assert_eq!(svc.clone().oneshot(n).await.unwrap(), n);
        }
    }
    for (i, (t, b)) in timeouts.iter().zip(&bulkheads).enumerate() {
        let name = format!("l{i}");
        let calls = rec.counter(
            "breakwater_timeout_calls_total",
            &[("name", name.as_str()), ("outcome", "success")],
        );
        assert_eq!(calls, Some(5), "timeout {name}");
        let permitted = rec.counter(
            "breakwater_bulkhead_calls_total",
            &[("name", name.as_str()), ("outcome", "permitted")],
        );
        assert_eq!(permitted, Some(5), "bulkhead {name}");
        assert_eq!(b.handle().in_flight(), 0);
        assert_eq!(t.handle().snapshot().counter("timeouts"), Some(0));
    }
    drop(stacks);
    drop(timeouts);
    assert_eq!(freed.get(), LAYERS as u64, "every timeout freed");
    drop(bulkheads);
    assert_eq!(freed.get(), 2 * LAYERS as u64, "every bulkhead freed");
}

/// Runs `f` once on each of the runtime's `workers` worker threads at the same time (a
/// barrier holds each task until all run, so no two share a thread).
async fn on_every_worker<F>(workers: usize, f: F)
where
    F: Fn() -> Svc + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(workers));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (f, barrier) = (f.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait();
                f().oneshot(7).await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 7);
    }
}

/// Calls through `svc` on every worker (parking spares there), drops `owners`, then checks
/// the spares kept the state until a call through `other` on every worker swept them.
async fn freed_after_calls_on_other_threads(freed: Count, svc: Svc, other: Svc, owners: impl Send) {
    const WORKERS: usize = 2;
    let calls = svc.clone();
    on_every_worker(WORKERS, move || calls.clone()).await;
    drop((svc, owners));
    assert_eq!(freed.get(), 0, "spares parked on the workers");
    on_every_worker(WORKERS, move || other.clone()).await;
    assert_eq!(freed.get(), 1, "each worker's next call swept its spare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_with_spares_on_other_threads_is_freed_at_their_next_call() {
    let freed = Count::default();
    let layer = timeout("t", &freed);
    let other = timeout("other", &Count::default());
    let svc = timeout_svc(&layer);
    let handle = layer.handle();
    freed_after_calls_on_other_threads(freed, svc, timeout_svc(&other), (layer, handle)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_with_spares_on_other_threads_is_freed_at_their_next_call() {
    let freed = Count::default();
    let layer = bulkhead("b", &freed);
    let other = bulkhead("other", &Count::default());
    let svc = bulkhead_svc(&layer);
    let handle = layer.handle();
    freed_after_calls_on_other_threads(freed, svc, bulkhead_svc(&other), (layer, handle)).await;
}

#[cfg(feature = "http")]
mod whole_body {
    use http_body_util::BodyExt;
    use support::body::SlowBody;

    use super::*;

    fn server(
        drops: Count,
    ) -> impl Service<(), Response = http::Response<SlowBody>, Error = std::io::Error> + Clone {
        service_fn(move |()| {
            let body = SlowBody::new(&[(10, "a")], false, drops.clone());
            async move { Ok::<_, std::io::Error>(http::Response::new(body)) }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_body_keeps_a_dropped_timeout_until_the_body_ends() {
        let (freed, drops) = (Count::default(), Count::default());
        let layer = TimeoutLayer::builder()
            .timeout(Duration::from_secs(1))
            .whole_body()
            .on_event(listener(&freed))
            .build()
            .unwrap();
        let res = layer
            .layer(server(drops.clone()))
            .oneshot(())
            .await
            .unwrap();
        drop(layer);
        assert_eq!(freed.get(), 0, "the body holds the deadline");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"a");
        assert_eq!((freed.get(), drops.get()), (1, 1), "freed with the body");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulkhead_body_keeps_a_dropped_bulkhead_until_the_body_ends() {
        let (freed, drops) = (Count::default(), Count::default());
        let layer = BulkheadLayer::builder()
            .max_concurrent_calls(1)
            .whole_body()
            .on_event(listener(&freed))
            .build()
            .unwrap();
        let h = layer.handle();
        let res = layer
            .layer(server(drops.clone()))
            .oneshot(())
            .await
            .unwrap();
        assert_eq!(h.in_flight(), 1, "the body holds the permit");
        drop((layer, h));
        assert_eq!(freed.get(), 0, "the body holds the permit");
        drop(res);
        assert_eq!((freed.get(), drops.get()), (1, 1), "freed with the body");
    }
}
