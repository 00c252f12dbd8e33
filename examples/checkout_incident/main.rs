//! The incident this crate exists for, replayed over real HTTP on `127.0.0.1`, with and
//! without tower-breakwater.
//!
//! A checkout service calls a payment service's fraud-check API. During a traffic spike the
//! fraud API, overwhelmed by concurrent requests, queues and slows from ~20 ms to seconds;
//! then it fails outright for a while (`503`s, answered late). Unprotected callers wait, hold
//! connections and pile up. Protected callers put a deadline on every call and fail fast.
//! A second, cacheable dependency (a merchant risk-profile lookup, a GET by merchant id,
//! answered in 120 ms with `Cache-Control: max-age=2`) is called by every checkout first;
//! one checkout in ten asks for the current profile (`Cache-Control: no-cache`). Protected,
//! it goes through the same preset with a cache (XFetch early refresh, stale on error) and
//! coalescing on. Fraud checks themselves are never coalesced or cached: each transaction is
//! distinct.
//!
//! Run: `cargo run --release --example checkout_incident`. Environment variables change the
//! traffic, the outage and the limits (whole numbers; an unparseable or out-of-range value
//! stops the example before any run, naming the variable):
//!
//! | variable | meaning | default | range |
//! |---|---|---|---|
//! | `DEMO_RPS` | base checkouts per second (the spike is three times that) | 100 | 1..=10000 |
//! | `DEMO_PHASE_MS` | one phase unit in milliseconds; a run is 8 units, and there are two | 1000 | 1..=60000 |
//! | `DEMO_OUTAGE_MS` | how long the fraud API takes to answer each `503` during its outage | 500 | 0..=60000 |
//! | `DEMO_FRAUD_RATE` | fraud checks per second the rate limiter allows | 150 | 1..=1000000 |
//! | `DEMO_FRAUD_CONCURRENCY` | fraud checks in flight the bulkhead allows | 8 | 1..=10000 |

mod load;
mod server;
mod stacks;

use std::ops::RangeInclusive;
use std::time::Duration;

use tower_breakwater::BoxError;

use load::{RiskCounts, Summary};
use server::ServerConfig;
use stacks::Settings;

/// The demo's settings, read from the environment.
struct Config {
    rps: u32,
    unit: Duration,
    outage_delay: Duration,
    settings: Settings,
}

/// The variable `name` as a whole number in `range`, `default` when unset.
fn env(name: &str, default: u64, range: RangeInclusive<u64>) -> Result<u64, String> {
    let raw = match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => return Ok(default),
        Err(std::env::VarError::NotUnicode(v)) => return Err(format!("{name}={v:?}: not UTF-8")),
        Ok(raw) => raw,
    };
    let (lo, hi) = (range.start(), range.end());
    match raw.trim().parse::<u64>() {
        Ok(v) if range.contains(&v) => Ok(v),
        Ok(v) => Err(format!(
            "{name}={v}: expected a whole number in {lo}..={hi}"
        )),
        Err(e) => Err(format!(
            "{name}={raw:?}: {e}; expected a whole number in {lo}..={hi}"
        )),
    }
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let defaults = Settings::default();
        let rps = env("DEMO_RPS", 100, 1..=10_000)? as u32;
        let unit = Duration::from_millis(env("DEMO_PHASE_MS", 1_000, 1..=60_000)?);
        let outage_delay = Duration::from_millis(env("DEMO_OUTAGE_MS", 500, 0..=60_000)?);
        let fraud_rate = env("DEMO_FRAUD_RATE", defaults.fraud_rate, 1..=1_000_000)?;
        let concurrency = defaults.fraud_concurrency as u64;
        let fraud_concurrency = env("DEMO_FRAUD_CONCURRENCY", concurrency, 1..=10_000)? as usize;
        Ok(Config {
            rps,
            unit,
            outage_delay,
            settings: Settings {
                fraud_rate,
                fraud_concurrency,
                ..defaults
            },
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let config = Config::from_env().unwrap_or_else(|e| {
        eprintln!("checkout_incident: {e}");
        std::process::exit(2);
    });
    // Install the recorder before building layers: handles are registered at build time.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;

    let (rps, unit) = (config.rps, config.unit);
    let cfg = ServerConfig {
        workers: 4,
        base: Duration::from_millis(20),
        outage_delay: config.outage_delay,
        risk_time: Duration::from_millis(120),
        risk_max_age: 2,
    };
    let (addr, stats) = server::start(cfg.clone()).await?;
    let base = format!("http://{addr}");
    println!(
        "Fraud API on {addr}: {} workers x {:?} per check (capacity {} checks/s); outage: 503 after {:?}",
        cfg.workers,
        cfg.base,
        cfg.workers as u128 * 1_000 / cfg.base.as_millis(),
        cfg.outage_delay
    );
    println!(
        "Protected: at most {} fraud checks/s (rate limiter) and {} in flight (bulkhead)",
        config.settings.fraud_rate, config.settings.fraud_concurrency
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
            stacks::protected(&config.settings)?
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
