//! The incident this crate exists for, replayed over real HTTP on `127.0.0.1`, with and
//! without tower-breakwater.
//!
//! A checkout service calls a payment service's fraud-check API. During a traffic spike the
//! fraud API, overwhelmed by concurrent requests, queues and slows from ~20 ms to seconds;
//! then it fails outright for a while (slow `503`s). Unprotected callers wait, hold
//! connections and pile up. Protected callers put a deadline on every call and fail fast.
//! A second, cacheable dependency (a merchant risk-profile lookup, a GET by merchant id,
//! answered in 120 ms with `Cache-Control: max-age=2`) is called by every checkout first;
//! one checkout in ten asks for the current profile (`Cache-Control: no-cache`). Protected,
//! it goes through the same preset with a cache (XFetch early refresh, stale on error) and
//! coalescing on. Fraud checks themselves are never coalesced or cached: each transaction is
//! distinct.
//!
//! Run: `cargo run --release --example checkout_incident`. Environment variables change the
//! traffic and the limits: `DEMO_RPS` (base checkouts per second, default 100),
//! `DEMO_PHASE_MS` (length of one phase unit in milliseconds, default 1000; the run is 8 units,
//! twice), `DEMO_FRAUD_RATE` (fraud checks per second the rate limiter allows, default 150),
//! `DEMO_FRAUD_CONCURRENCY` (fraud checks in flight the bulkhead allows, default 8).

mod load;
mod server;
mod stacks;

use std::time::Duration;

use tower_breakwater::BoxError;

use load::{RiskCounts, Summary};
use server::ServerConfig;
use stacks::Settings;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Install the recorder before building layers: handles are registered at build time.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;

    let rps = env("DEMO_RPS", 100) as u32;
    let unit = Duration::from_millis(env("DEMO_PHASE_MS", 1_000));
    let cfg = ServerConfig {
        workers: 4,
        base: Duration::from_millis(20),
        outage_delay: Duration::from_secs(2),
        risk_time: Duration::from_millis(120),
        risk_max_age: 2,
    };
    let (addr, stats) = server::start(cfg.clone()).await?;
    let base = format!("http://{addr}");
    println!(
        "Fraud API on {addr}: {} workers x {:?} per check (capacity {} checks/s); outage: {:?} then 503",
        cfg.workers,
        cfg.base,
        cfg.workers as u128 * 1_000 / cfg.base.as_millis(),
        cfg.outage_delay
    );
    let phases = stacks::phases(rps, unit);
    for p in &phases {
        println!(
            "  phase {:<9} {:>6.1?} at {:>4} checkouts/s{}",
            p.name,
            p.duration,
            p.rps,
            if p.outage { " (fraud API failing)" } else { "" }
        );
    }

    let mut summaries = Vec::new();
    for protected in [false, true] {
        stats.reset();
        let clients = if protected {
            stacks::protected(&Settings {
                fraud_rate: env("DEMO_FRAUD_RATE", 150),
                fraud_concurrency: env("DEMO_FRAUD_CONCURRENCY", 8) as usize,
                ..Settings::default()
            })?
        } else {
            stacks::unprotected()
        };
        let (risk, fraud) = (clients.risk, clients.fraud);
        println!(
            "\nrunning {} ...",
            if protected {
                "with tower-breakwater"
            } else {
                "unprotected"
            }
        );
        let records = load::drive(&phases, &stats, |n| {
            let (risk, fraud, base) = (risk.clone(), fraud.clone(), base.clone());
            async move { stacks::checkout(n, &base, risk, fraud).await }
        })
        .await;
        let mut summary = Summary::new(&records, &stats);
        summary.client_peak = clients
            .fraud_client_peak
            .load(std::sync::atomic::Ordering::SeqCst);
        let lookups = records.len() as u64;
        let fresh = (0..lookups).filter(|n| stacks::fresh_read(*n)).count() as u64;
        summary.risk = RiskCounts::new(
            lookups,
            fresh,
            clients.cache.as_ref(),
            clients.coalesce.as_ref(),
        );
        summaries.push(summary);
    }

    println!();
    load::print_table(&[
        ("unprotected", &summaries[0]),
        ("breakwater", &summaries[1]),
    ]);

    println!("\nbreakwater metrics (Prometheus text format; zero-valued counters left out):\n");
    let rendered = prometheus.render();
    let mut lines: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("breakwater_"))
        .filter(|l| !(l.ends_with(" 0") && (l.contains("_total{") || l.contains("_total "))))
        .collect();
    lines.sort();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
