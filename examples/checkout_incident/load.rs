//! The traffic: checkouts issued at a fixed rate per phase, each one calling the risk-profile
//! lookup, then the fraud check. Every checkout ends in exactly one outcome.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tower_breakwater::BoxError;
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
    for phase in phases {
        stats.outage.store(phase.outage, Ordering::SeqCst);
        let every = Duration::from_secs(1) / phase.rps.max(1);
        let end = at + phase.duration;
        while at < end {
            tokio::time::sleep_until(at).await;
            let fut = checkout(n);
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let result = fut.await;
                Record {
                    latency: start.elapsed(),
                    outcome: Outcome::of(&result),
                }
            }));
            n += 1;
            at += every;
        }
    }
    stats.outage.store(false, Ordering::SeqCst);
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.expect("checkout task panicked"));
    }
    records
}

/// A summary of one run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub requests: usize,
    pub outcomes: BTreeMap<Outcome, usize>,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub fraud_calls: u64,
    pub risk_calls: u64,
    pub fraud_peak: usize,
    /// Fraud checks the client had in flight at once, below every layer (set by the caller).
    pub client_peak: usize,
}

impl Summary {
    pub fn new(records: &[Record], stats: &ServerStats) -> Self {
        let mut lat: Vec<Duration> = records.iter().map(|r| r.latency).collect();
        lat.sort();
        let pct = |p: f64| {
            if lat.is_empty() {
                Duration::ZERO
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        let mut outcomes = BTreeMap::new();
        for r in records {
            *outcomes.entry(r.outcome).or_insert(0) += 1;
        }
        Summary {
            requests: records.len(),
            outcomes,
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
            fraud_calls: stats.fraud_calls.load(Ordering::SeqCst),
            risk_calls: stats.risk_calls.load(Ordering::SeqCst),
            fraud_peak: stats.peak_in_flight.load(Ordering::SeqCst),
            client_peak: 0,
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
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "checkouts".into(),
            runs.iter().map(|(_, s)| s.requests.to_string()).collect(),
        ),
        (
            "succeeded".into(),
            runs.iter()
                .map(|(_, s)| s.count(Outcome::Success).to_string())
                .collect(),
        ),
        (
            "rejected fast (all layers)".into(),
            runs.iter().map(|(_, s)| s.rejected().to_string()).collect(),
        ),
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
        rows.push((
            format!("  by {l}"),
            runs.iter()
                .map(|(_, s)| s.count(Outcome::Rejected(l)).to_string())
                .collect(),
        ));
    }
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    rows.extend([
        (
            "errors (503, transport)".into(),
            runs.iter()
                .map(|(_, s)| s.count(Outcome::Error).to_string())
                .collect(),
        ),
        (
            "timeouts".into(),
            runs.iter()
                .map(|(_, s)| s.count(Outcome::Timeout).to_string())
                .collect(),
        ),
        (
            "latency p50".into(),
            runs.iter().map(|(_, s)| ms(s.p50)).collect(),
        ),
        (
            "latency p95".into(),
            runs.iter().map(|(_, s)| ms(s.p95)).collect(),
        ),
        (
            "latency p99".into(),
            runs.iter().map(|(_, s)| ms(s.p99)).collect(),
        ),
        (
            "fraud in flight (client)".into(),
            runs.iter()
                .map(|(_, s)| s.client_peak.to_string())
                .collect(),
        ),
        (
            "fraud API peak concurrency".into(),
            runs.iter().map(|(_, s)| s.fraud_peak.to_string()).collect(),
        ),
        (
            "fraud API calls".into(),
            runs.iter()
                .map(|(_, s)| s.fraud_calls.to_string())
                .collect(),
        ),
        (
            "risk API calls".into(),
            runs.iter().map(|(_, s)| s.risk_calls.to_string()).collect(),
        ),
        (
            "risk calls saved".into(),
            runs.iter()
                .map(|(_, s)| (s.requests as u64).saturating_sub(s.risk_calls).to_string())
                .collect(),
        ),
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
