//! The Grafana dashboard queries only metrics the crate emits.

use std::collections::BTreeSet;

use tower_breakwater::metrics::names::ALL;

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Every `breakwater_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("breakwater_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_crate_emits() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/tower-breakwater.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 20, "{} queries", all.len());
    let known: BTreeSet<&str> = ALL.iter().map(|s| s.name).collect();
    let mut queried = BTreeSet::new();
    for expr in &all {
        assert!(
            expr.contains("name=~\"$name\""),
            "not filtered by dependency: {expr}"
        );
        let names = metric_names(expr);
        assert!(!names.is_empty(), "queries none of our metrics: {expr}");
        for name in names {
            // Histograms are exported with suffixes.
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                known.contains(base.as_str()),
                "{name} is not emitted by the crate"
            );
            queried.insert(base);
        }
    }
    // Every layer has a panel.
    for layer in [
        "timeout",
        "circuit_breaker",
        "bulkhead",
        "rate_limiter",
        "coalesce",
        "cache",
    ] {
        let prefix = format!("breakwater_{layer}_");
        assert!(
            queried.iter().any(|q| q.starts_with(&prefix)),
            "no panel for {layer}"
        );
    }
}
