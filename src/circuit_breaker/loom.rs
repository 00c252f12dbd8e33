//! Exhaustive checks of the breaker's concurrency core with loom (see the module docs for the
//! command). Time is fixed: the model covers interleavings, not the clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::time::Duration;

use loom::sync::atomic::{AtomicUsize as LoomUsize, Ordering};
use loom::thread;

use super::State;
use super::core::{Config, Now, Shared};
use super::metrics::Metrics;
use super::window::{CountWindow, Window};
use crate::classify::Outcome;
use crate::clock::{self, Instant};
use crate::error::LayerKind;
use crate::event::{EventKind, Events};
use crate::metrics::{MetricsProfile, Registrar};

fn breaker(permitted: u64, window: u64, transitions: Arc<AtomicUsize>) -> (Arc<Shared>, Instant) {
    let name: Arc<str> = Arc::from("loom");
    let cfg = Config {
        failure_rate_threshold: 0.5,
        slow_call_rate_threshold: None,
        slow_call_duration: Duration::from_secs(60),
        minimum_calls: window,
        permitted_in_half_open: permitted,
        wait_in_open: Duration::from_secs(60),
        backoff: None,
        max_time_in_half_open: None,
        retry_after_hold: None,
    };
    let metrics = Metrics::register(&Registrar::new(name.clone(), MetricsProfile::Off), false);
    let listener: crate::event::Listener = Arc::new(move |e: &crate::event::Event<'_>| {
        if let EventKind::StateTransition { .. } = e.kind() {
            transitions.fetch_add(1, StdOrdering::SeqCst);
        }
    });
    let events = Events::new(LayerKind::CircuitBreaker, name.clone(), vec![listener]);
    let origin = clock::now();
    let w = Window::Count(CountWindow::new(window as usize));
    (
        Arc::new(Shared::new(cfg, w, name, metrics, events, origin)),
        origin,
    )
}

/// Two threads race for probe slots, each taking one, then freeing it (by cancellation or an
/// ignored outcome) and trying again: never more than N in flight, every slot freed.
#[test]
fn probe_slots_never_exceed_n_and_are_freed() {
    loom::model(|| {
        let (b, t0) = breaker(1, 1, Arc::default());
        b.force(State::HalfOpen, &mut Now::at(t0));
        let in_flight = Arc::new(LoomUsize::new(0));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let b = b.clone();
                let in_flight = in_flight.clone();
                thread::spawn(move || {
                    for _ in 0..2 {
                        if let Ok(t) = b.admit() {
                            assert!(t.probe);
                            let before = in_flight.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(before, 0, "two probes in flight with N = 1");
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            if i == 0 {
                                b.cancel(t, None);
                            } else {
                                b.complete(t, Outcome::Ignored, None);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(b.probes_taken(), 0);
        assert_eq!(b.state(&mut Now::at(t0)), State::HalfOpen);
    });
}

/// Two calls admitted while Closed both fail; the first recorded failure opens the breaker,
/// the other is from an earlier generation (or was rejected): exactly one transition.
#[test]
fn a_late_failure_never_transitions_twice() {
    loom::model(|| {
        let transitions = Arc::new(AtomicUsize::new(0));
        let (b, t0) = breaker(1, 1, transitions.clone());
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || {
                    if let Ok(t) = b.admit() {
                        b.complete(t, Outcome::Failure, None);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(transitions.load(StdOrdering::SeqCst), 1);
        assert_eq!(b.state(&mut Now::at(t0)), State::Open);
    });
}

/// A success skipped on the lock-free path (full window, no failure) races a failure: the
/// result is the same as if the success had been recorded first.
#[test]
fn a_clean_success_racing_a_failure_is_ordered_before_it() {
    loom::model(|| {
        let transitions = Arc::new(AtomicUsize::new(0));
        let (b, t0) = breaker(1, 3, transitions.clone());
        for _ in 0..3 {
            let t = b.admit().unwrap();
            b.complete(t, Outcome::Success, None);
        }
        let ok = {
            let b = b.clone();
            thread::spawn(move || {
                let t = b.admit().unwrap();
                b.complete(t, Outcome::Success, None);
            })
        };
        let t = b.admit().unwrap();
        b.complete(t, Outcome::Failure, None);
        ok.join().unwrap();
        // Either order leaves exactly one failure among the last 3 outcomes.
        let snap = b.snapshot(&mut Now::at(t0));
        assert_eq!(snap.state, Some("closed"));
        assert_eq!(snap.gauge("calls_in_window"), Some(3.0));
        assert_eq!(snap.gauge("failure_rate"), Some(1.0 / 3.0));
        assert_eq!(transitions.load(StdOrdering::SeqCst), 0);
        // The window holds a failure, so the next successes must be recorded (not skipped):
        // three more evict it whatever the order was.
        for _ in 0..3 {
            let t = b.admit().unwrap();
            b.complete(t, Outcome::Success, None);
        }
        let snap = b.snapshot(&mut Now::at(t0));
        assert_eq!(snap.gauge("failure_rate"), Some(0.0));
    });
}
