//! The checkout incident, scaled down to about two seconds of real time over loopback HTTP
//! (the one test where real time passes). It asserts counts, never latencies.
#![cfg(all(
    feature = "http",
    feature = "timeout",
    feature = "circuit-breaker",
    feature = "bulkhead",
    feature = "rate-limit",
    feature = "coalesce",
    feature = "cache",
    feature = "preset"
))]

#[allow(dead_code)]
#[path = "../examples/checkout_incident/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../examples/checkout_incident/server.rs"]
mod server;
#[allow(dead_code)]
#[path = "../examples/checkout_incident/stacks.rs"]
mod stacks;

use std::sync::atomic::Ordering;
use std::time::Duration;

use load::{Outcome, RiskCounts, Summary};
use server::ServerConfig;
use stacks::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protected_run_bounds_concurrency_opens_and_recovers_and_loses_nothing() {
    let cfg = ServerConfig {
        workers: 4,
        base: Duration::from_millis(20),
        outage_delay: Duration::from_secs(1),
        risk_time: Duration::from_millis(120),
        risk_max_age: 1,
    };
    let (addr, stats) = server::start(cfg).await.unwrap();
    let base = format!("http://{addr}");
    let settings = Settings {
        fraud_rate: 150,
        fraud_concurrency: 6,
        breaker_wait: Duration::from_millis(200),
        breaker_window: (10, 5),
    };
    let clients = stacks::protected(&settings).unwrap();
    let mut phases = stacks::phases(100, Duration::from_millis(250));
    // A recovery long enough for a breaker that reopened on the outage's last probes to wait
    // in Open again (200 ms) and close on its next probes.
    let recovery = phases.len() - 1;
    assert_eq!(
        (phases[2].name, phases[recovery].name),
        ("outage", "recovery")
    );
    phases[recovery].duration = Duration::from_secs(1);
    let issued = std::sync::atomic::AtomicUsize::new(0);
    let fresh = std::sync::atomic::AtomicU64::new(0);
    let (risk, fraud) = (clients.risk.clone(), clients.fraud.clone());
    let records = load::drive(&phases, &stats, |n| {
        issued.fetch_add(1, Ordering::SeqCst);
        if stacks::fresh_read(n) {
            fresh.fetch_add(1, Ordering::SeqCst);
        }
        let (risk, fraud, base) = (risk.clone(), fraud.clone(), base.clone());
        async move { stacks::checkout(n, &base, risk, fraud).await }
    })
    .await;
    let issued = issued.load(Ordering::SeqCst);
    let summary = Summary::new(&records, &stats);

    // Every checkout ends in exactly one outcome; none is lost.
    assert!(issued > 300, "{issued} checkouts issued");
    assert_eq!(records.len(), issued);
    let accounted = summary.count(Outcome::Success)
        + summary.rejected()
        + summary.count(Outcome::Error)
        + summary.count(Outcome::Timeout);
    assert_eq!(accounted, records.len());

    // The client never had more fraud calls in flight than the bulkhead allows.
    let client_peak = clients.fraud_client_peak.load(Ordering::SeqCst);
    assert!(client_peak >= 1);
    assert!(
        client_peak <= settings.fraud_concurrency,
        "client peak {client_peak} > bulkhead {}",
        settings.fraud_concurrency
    );
    // The server saw at most that, plus the calls our timeouts abandoned while the server
    // was still working on them (reported).
    let abandoned = summary.count(Outcome::Timeout);
    println!(
        "server peak {}, bulkhead {}, abandoned by timeouts {abandoned}",
        summary.fraud_peak, settings.fraud_concurrency
    );
    assert!(summary.fraud_peak <= settings.fraud_concurrency + abandoned);

    // The breaker opened during the outage, not before (a breaker rejection is immediate,
    // so the phase a rejected checkout ended in is the phase the breaker was open in), and
    // admitted probes after it: it is Closed at the end, not Open nor HalfOpen.
    let breaker = clients.breaker.as_ref().unwrap().snapshot();
    println!("breaker snapshot: {breaker:?}");
    let bulkhead = clients.bulkhead.as_ref().unwrap().snapshot();
    assert_eq!(
        bulkhead.gauge("in_flight"),
        Some(0.0),
        "every permit came back"
    );
    let by_breaker = |phase: usize| {
        records
            .iter()
            .filter(|r| r.ended_in == phase && r.outcome == Outcome::Rejected("circuit_breaker"))
            .count()
    };
    let per_phase: Vec<usize> = (0..=phases.len()).map(by_breaker).collect();
    println!(
        "breaker rejections per phase (normal, spike, outage, recovery, after): {per_phase:?}"
    );
    assert_eq!(
        per_phase[..2],
        [0, 0],
        "the breaker stayed closed while the API was healthy"
    );
    assert!(per_phase[2] > 0, "the breaker opened during the outage");
    let recovered = records
        .iter()
        .filter(|r| r.ended_in == recovery && r.outcome == Outcome::Success)
        .count();
    assert!(
        recovered > 0,
        "checkouts succeeded again during the recovery"
    );
    assert_eq!(
        clients.breaker.as_ref().unwrap().state(),
        tower_breakwater::circuit_breaker::State::Closed,
        "after the recovery phase the breaker's probes have closed it"
    );

    // The cacheable lookup made far fewer upstream calls than lookups, with exact
    // bookkeeping: every lookup with a cache key is exactly one hit, miss or stale answer;
    // the others (fresh reads) all went through the coalescing layer.
    let risk = RiskCounts::new(
        records.len() as u64,
        fresh.load(Ordering::SeqCst),
        clients.cache.as_ref(),
        clients.coalesce.as_ref(),
    );
    println!("risk lookups: {risk:?}");
    assert!(risk.fresh > 0 && risk.fresh < risk.lookups);
    assert_eq!(
        risk.hits + risk.misses + risk.stale,
        risk.lookups - risk.fresh
    );
    assert!(risk.hits > risk.misses, "{risk:?}");
    assert!(risk.leaders + risk.followers >= risk.fresh);
    let risk_calls = stats.risk_calls.load(Ordering::SeqCst);
    assert_eq!(
        risk.leaders, risk_calls,
        "every upstream lookup went through the coalescing layer, as a leader"
    );
    assert!(
        risk_calls * 5 < risk.lookups,
        "{risk_calls} risk calls for {} lookups",
        risk.lookups
    );
    // Every lookup was answered by the cache, by its own upstream call or by a shared one;
    // early refreshes are upstream calls no lookup made. So the API saw at most the lookups
    // the cache did not answer plus the refreshes, and at least the coalescing layer's
    // followers were saved beyond the cache.
    assert!(risk.saved_by_cache() + risk_calls <= risk.lookups + risk.early_refreshes);
    assert!(risk.saved_by_coalescing(risk_calls) >= risk.followers);
}
