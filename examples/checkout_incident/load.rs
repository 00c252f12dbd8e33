//! The traffic: checkouts issued at a fixed rate per phase, each one calling the risk-profile
//! lookup, then the fraud check. Every checkout ends in exactly one outcome.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tower_breakwater::BoxError;
use tower_breakwater::cache::CacheHandle;
use tower_breakwater::coalesce::CoalesceHandle;
use tower_breakwater::error::{self, ErrorKind};

use crate::server::ServerStats;

/// A stretch of traffic.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub name: &'static str,
    pub duration: Duration,
    /// Checkouts per second.
    pub rps: u32,
    /// Whether the fraud API is in its outage.
    pub outage: bool,
}

/// How one checkout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Success,
    /// Rejected at once by one of our layers (the layer's kind).
    Rejected(&'static str),
    Timeout,
    Error,
}

impl Outcome {
    pub fn of(result: &Result<(), BoxError>) -> Outcome {
        match result {
            Ok(()) => Outcome::Success,
            // A plain client timeout (the unprotected run) counts as a timeout too.
            Err(e) if e.is::<tokio::time::error::Elapsed>() => Outcome::Timeout,
            Err(e) => match error::find(e.as_ref()) {
                Some(ours) if ours.kind() == ErrorKind::Timeout => Outcome::Timeout,
                Some(ours) if ours.is_rejection() => Outcome::Rejected(ours.layer().as_str()),
                _ => Outcome::Error,
            },
        }
    }
}

/// One checkout's result.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub latency: Duration,
    pub outcome: Outcome,
    /// The index of the phase in which the checkout ended (the number of phases when it
    /// ended after the last one).
    #[allow(dead_code)] // read by the integration test
    pub ended_in: usize,
}

/// Runs the phases, issuing checkout `n` at its scheduled instant, and waits for all of
/// them to end.
pub async fn drive<F, Fut>(phases: &[Phase], stats: &ServerStats, checkout: F) -> Vec<Record>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let mut tasks = Vec::new();
    let mut n = 0;
    let mut at = Instant::now();
    let current = Arc::new(AtomicUsize::new(0));
    for (i, phase) in phases.iter().enumerate() {
        current.store(i, Ordering::SeqCst);
        stats.outage.store(phase.outage, Ordering::SeqCst);
        let every = Duration::from_secs(1) / phase.rps.max(1);
        let end = at + phase.duration;
        while at < end {
            tokio::time::sleep_until(at).await;
            let (fut, current) = (checkout(n), current.clone());
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let result = fut.await;
                Record {
                    latency: start.elapsed(),
                    outcome: Outcome::of(&result),
                    ended_in: current.load(Ordering::SeqCst),
                }
            }));
            n += 1;
            at += every;
        }
    }
    current.store(phases.len(), Ordering::SeqCst);
    stats.outage.store(false, Ordering::SeqCst);
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.expect("checkout task panicked"));
    }
    records
}

/// The risk-profile lookups of one run, as the cache and the coalescing layer counted them
/// (zero where a run has no such layer).
#[derive(Debug, Clone, Copy, Default)]
pub struct RiskCounts {
    /// Lookups issued: one per checkout.
    pub lookups: u64,
    /// Of those, the ones asking for a fresh answer (no cache key: they bypass the cache).
    pub fresh: u64,
    /// Cache lookups answered from a fresh entry.
    pub hits: u64,
    /// Cache lookups that fetched, or shared a fetch in flight.
    pub misses: u64,
    /// Cache lookups answered with a stale entry (the fetch failed, or is backing off).
    pub stale: u64,
    /// XFetch early refreshes started (background upstream calls).
    pub early_refreshes: u64,
    /// Calls the coalescing layer under the cache sent upstream.
    pub leaders: u64,
    /// Calls the coalescing layer under the cache answered with another's call.
    pub followers: u64,
}

impl RiskCounts {
    /// The counts of `lookups` lookups (`fresh` of them fresh reads) from the layers' handles.
    pub fn new(
        lookups: u64,
        fresh: u64,
        cache: Option<&CacheHandle>,
        coalesce: Option<&CoalesceHandle>,
    ) -> Self {
        let mut c = RiskCounts {
            lookups,
            fresh,
            ..RiskCounts::default()
        };
        if let Some(cache) = cache {
            let s = cache.snapshot();
            let get = |name: &str| s.counter(name).unwrap_or(0);
            (c.hits, c.misses, c.stale) = (get("hits"), get("misses"), get("stale"));
            c.early_refreshes = get("early_refreshes");
        }
        if let Some(coalesce) = coalesce {
            let s = coalesce.snapshot();
            c.leaders = s.counter("leaders").unwrap_or(0);
            c.followers = s.counter("followers").unwrap_or(0);
        }
        c
    }

    /// Upstream calls saved by the cache: lookups answered from it (fresh or stale).
    pub fn saved_by_cache(&self) -> u64 {
        self.hits + self.stale
    }

    /// Upstream calls saved by coalescing, given the `upstream` calls the API saw: lookups
    /// that shared a call another lookup made (a cache miss sharing a fetch, a fresh read
    /// sharing a call in flight). Every lookup was answered by the cache, by its own call or
    /// by a shared one, and early refreshes are upstream calls no lookup made:
    /// `lookups = saved_by_cache + (upstream - early_refreshes) + shared`.
    pub fn saved_by_coalescing(&self, upstream: u64) -> u64 {
        (self.lookups + self.early_refreshes).saturating_sub(self.saved_by_cache() + upstream)
    }
}

/// Latency percentiles of a set of checkouts (nearest rank; zero when the set is empty).
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
}

impl Percentiles {
    pub fn of(latencies: impl Iterator<Item = Duration>) -> Self {
        let mut lat: Vec<Duration> = latencies.collect();
        lat.sort();
        let pct = |p: f64| {
            if lat.is_empty() {
                Duration::ZERO
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        Percentiles {
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
        }
    }
}

/// A summary of one run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub requests: usize,
    pub outcomes: BTreeMap<Outcome, usize>,
    /// Latency of every checkout, fast rejections included.
    pub all: Percentiles,
    /// Latency of the checkouts that succeeded.
    pub succeeded: Percentiles,
    pub fraud_calls: u64,
    pub risk_calls: u64,
    pub fraud_peak: usize,
    /// Fraud checks the client had in flight at once, below every layer (set by the caller).
    pub client_peak: usize,
    /// The risk-profile lookups (set by the caller).
    pub risk: RiskCounts,
}

impl Summary {
    pub fn new(records: &[Record], stats: &ServerStats) -> Self {
        let ok = records.iter().filter(|r| r.outcome == Outcome::Success);
        let mut outcomes = BTreeMap::new();
        for r in records {
            *outcomes.entry(r.outcome).or_insert(0) += 1;
        }
        Summary {
            requests: records.len(),
            outcomes,
            all: Percentiles::of(records.iter().map(|r| r.latency)),
            succeeded: Percentiles::of(ok.map(|r| r.latency)),
            fraud_calls: stats.fraud_calls.load(Ordering::SeqCst),
            risk_calls: stats.risk_calls.load(Ordering::SeqCst),
            fraud_peak: stats.peak_in_flight.load(Ordering::SeqCst),
            client_peak: 0,
            risk: RiskCounts::default(),
        }
    }

    pub fn count(&self, o: Outcome) -> usize {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }

    pub fn rejected(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|(o, _)| matches!(o, Outcome::Rejected(_)))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Prints the two runs side by side.
pub fn print_table(runs: &[(&str, &Summary)]) {
    let row = |label: &str, cell: &dyn Fn(&Summary) -> String| -> (String, Vec<String>) {
        (
            label.to_owned(),
            runs.iter().map(|(_, s)| cell(s)).collect(),
        )
    };
    let mut rows = vec![
        row("checkouts", &|s| s.requests.to_string()),
        row("succeeded", &|s| s.count(Outcome::Success).to_string()),
        row("rejected fast (all layers)", &|s| s.rejected().to_string()),
    ];
    let mut layers: Vec<&'static str> = runs
        .iter()
        .flat_map(|(_, s)| s.outcomes.keys())
        .filter_map(|o| match o {
            Outcome::Rejected(l) => Some(*l),
            _ => None,
        })
        .collect();
    layers.sort();
    layers.dedup();
    for l in layers {
        rows.push(row(&format!("  by {l}"), &|s| {
            s.count(Outcome::Rejected(l)).to_string()
        }));
    }
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    rows.extend([
        row("errors (503, transport)", &|s| {
            s.count(Outcome::Error).to_string()
        }),
        row("timeouts", &|s| s.count(Outcome::Timeout).to_string()),
        row("latency p50, all checkouts", &|s| ms(s.all.p50)),
        row("latency p95, all checkouts", &|s| ms(s.all.p95)),
        row("latency p99, all checkouts", &|s| ms(s.all.p99)),
        row("latency p50, succeeded", &|s| ms(s.succeeded.p50)),
        row("latency p95, succeeded", &|s| ms(s.succeeded.p95)),
        row("latency p99, succeeded", &|s| ms(s.succeeded.p99)),
        row("fraud in flight (client)", &|s| s.client_peak.to_string()),
        row("fraud API peak concurrency", &|s| s.fraud_peak.to_string()),
        row("fraud API calls", &|s| s.fraud_calls.to_string()),
        row("risk lookups", &|s| s.risk.lookups.to_string()),
        row("  fresh reads (no cache)", &|s| s.risk.fresh.to_string()),
        row("  cache hits", &|s| s.risk.hits.to_string()),
        row("  cache misses", &|s| s.risk.misses.to_string()),
        row("  stale served", &|s| s.risk.stale.to_string()),
        row("risk API calls", &|s| s.risk_calls.to_string()),
        row("  early refreshes (XFetch)", &|s| {
            s.risk.early_refreshes.to_string()
        }),
        row("risk calls saved", &|s| {
            s.risk.lookups.saturating_sub(s.risk_calls).to_string()
        }),
        row("  by the cache (hits, stale)", &|s| {
            s.risk.saved_by_cache().to_string()
        }),
        row("  by coalescing", &|s| {
            s.risk.saved_by_coalescing(s.risk_calls).to_string()
        }),
    ]);
    print!("| {:<28} |", "");
    for (name, _) in runs {
        print!(" {name:>14} |");
    }
    println!();
    print!("|{:-<30}|", "");
    for _ in runs {
        print!("{:->15}:|", "");
    }
    println!();
    for (label, cells) in rows {
        print!("| {label:<28} |");
        for c in cells {
            print!(" {c:>14} |");
        }
        println!();
    }
}
