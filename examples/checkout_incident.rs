//! A checkout service calls a fraud-check API that slows from ~20 ms to 2 s during an
//! incident. Without a deadline every caller waits the full 2 s; with tower-breakwater's
//! timeout each call is cut off at 100 ms and the caller can fall back.
//!
//! Run: `cargo run --release --example checkout_incident`
//!
//! The dependency is simulated in-process on tokio's paused clock, so the run is instant and
//! deterministic. (A full replay over real HTTP with every layer arrives with the demo.)

use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_breakwater::error::{self, ErrorKind};
use tower_breakwater::timeout::TimeoutLayer;

/// The fraud API: 20 ms per call, 2 s during the incident (requests 40..80).
fn fraud_api() -> impl Service<u32, Response = bool, Error = std::io::Error, Future: Send> + Clone {
    service_fn(|n: u32| async move {
        let ms = if (40..80).contains(&n) { 2_000 } else { 20 };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, std::io::Error>(n % 7 != 0)
    })
}

#[derive(Default)]
struct Tally {
    ok: u32,
    timeouts: u32,
    errors: u32,
    waited: Duration,
}

async fn run<S>(svc: S) -> Tally
where
    S: Service<u32, Response = bool, Error = tower_breakwater::BoxError> + Clone,
{
    let mut t = Tally::default();
    for n in 0..120 {
        let start = tokio::time::Instant::now();
        match svc.clone().oneshot(n).await {
            Ok(_) => t.ok += 1,
            Err(e) if error::find(e.as_ref()).map(|e| e.kind()) == Some(ErrorKind::Timeout) => {
                t.timeouts += 1
            }
            Err(_) => t.errors += 1,
        }
        t.waited += start.elapsed();
    }
    t
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), tower_breakwater::BoxError> {
    let unprotected = run(fraud_api().map_err(Into::into)).await;
    let protected = run(ServiceBuilder::new()
        .layer(
            TimeoutLayer::builder()
                .name("fraud-api")
                .timeout(Duration::from_millis(100))
                .build()?,
        )
        .service(fraud_api()))
    .await;
    println!(
        "120 sequential fraud checks; the API answers in 2 s instead of 20 ms for 40 of them\n"
    );
    println!(
        "{:<14} {:>8} {:>9} {:>7} {:>16}",
        "", "ok", "timeouts", "errors", "time callers waited"
    );
    for (label, t) in [("unprotected", &unprotected), ("breakwater", &protected)] {
        println!(
            "{:<14} {:>8} {:>9} {:>7} {:>16.1?}",
            label, t.ok, t.timeouts, t.errors, t.waited
        );
    }
    Ok(())
}
