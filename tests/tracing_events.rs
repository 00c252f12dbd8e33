//! With the `tracing` feature, events reach `tracing` with the instance name as a field, at the
//! levels an operator expects: a breaker opening at WARN, other transitions at INFO, per-call
//! events (rejections, timeouts) at DEBUG.
#![cfg(all(feature = "tracing", feature = "circuit-breaker", feature = "timeout"))]

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, ServiceExt, service_fn};
use tower_breakwater::BoxError;
use tower_breakwater::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use tower_breakwater::timeout::TimeoutLayer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Records every event as (level, "field=value ..." for the fields `layer`, `name`, `event`).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String)>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() != "message" {
            let _ = write!(self.0, "{}={} ", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "event" {
            let _ = write!(self.0, "event={value:?} ");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() != "tower_breakwater" {
            return;
        }
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), f.0.trim_end().to_owned()));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn transitions_and_per_call_events_reach_tracing_at_their_levels() {
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let breaker = CircuitBreakerLayer::builder()
                .name("pay")
                .sliding_window(SlidingWindow::count_based(2))
                .minimum_calls(2)
                .build()
                .unwrap();
            let svc = breaker.layer(service_fn(|_: ()| async {
                Err::<(), BoxError>("down".into())
            }));
            for _ in 0..3 {
                let _ = svc.clone().oneshot(()).await;
            }
            let timeout = TimeoutLayer::builder()
                .name("inv")
                .timeout(Duration::from_millis(5))
                .build()
                .unwrap();
            let slow = timeout.layer(service_fn(|_: ()| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<(), BoxError>(())
            }));
            let _ = slow.oneshot(()).await;
        });
    });
    let got = capture.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (
                Level::WARN,
                r#"layer=circuit_breaker name=pay event=StateTransition { from: "closed", to: "open" }"#
                    .to_owned()
            ),
            (
                Level::DEBUG,
                "layer=circuit_breaker name=pay event=Rejected { kind: CircuitOpen, retry_after: Some(60s) }"
                    .to_owned()
            ),
            (
                Level::DEBUG,
                "layer=timeout name=inv event=TimedOut { after: 5ms }".to_owned()
            ),
        ]
    );
}
