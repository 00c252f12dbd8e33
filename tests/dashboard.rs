//! The Grafana dashboard queries only metrics the crate emits, shows all of them with fitting
//! units, and answers the on-call questions; the README metric table lists them all.

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

/// The metric a queried name stands for: histograms are exported with suffixes.
fn base<'a>(name: &'a str, known: &BTreeSet<&str>) -> &'a str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
        .unwrap_or(name)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/tower-breakwater.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every panel with queries, as (title, unit, queries).
fn panels(dashboard: &serde_json::Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let mut queries = Vec::new();
        exprs(&panel["targets"], &mut queries);
        if queries.is_empty() {
            continue;
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("none");
        let title = panel["title"].as_str().unwrap().to_owned();
        out.push((title, unit.to_owned(), queries));
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_crate_emits() {
    let dashboard = dashboard();
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
            let base = base(&name, &known).to_owned();
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
    // And every metric the crate emits is on the dashboard.
    let missing: Vec<&str> = known
        .iter()
        .filter(|k| !queried.contains(**k))
        .copied()
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

/// A panel's unit fits every query in it: rates per second only rate counters, ratios divide
/// (or read a gauge that is a ratio), durations are in seconds, counts rate nothing.
#[test]
fn every_panel_has_one_unit_that_fits_all_its_queries() {
    let known: BTreeSet<&str> = ALL.iter().map(|s| s.name).collect();
    for (title, unit, queries) in panels(&dashboard()) {
        for q in &queries {
            let names = metric_names(q);
            let fits = match unit.as_str() {
                "reqps" => q.contains("rate(") && !q.contains(" / "),
                "percentunit" => q.contains(" / ") || names.iter().all(|n| n.ends_with("_rate")),
                "s" => names.iter().all(|n| base(n, &known).ends_with("_seconds")),
                "short" => !q.contains("rate("),
                "none" => names.iter().all(|n| n.ends_with("_state")),
                other => panic!("{title}: unexpected unit {other}"),
            };
            assert!(fits, "{title} ({unit}): {q}");
        }
    }
}

/// The on-call questions of the cache and coalescing have their panels: hit, stale and
/// early-refresh ratios, and the share of coalesced calls that shared an upstream call.
#[test]
fn cache_ratios_and_the_coalescing_ratio_have_panels() {
    let ratios: Vec<String> = panels(&dashboard())
        .into_iter()
        .filter(|(_, unit, _)| unit == "percentunit")
        .flat_map(|(_, _, queries)| queries)
        .collect();
    let has = |numerator: &str, denominator: &str| {
        ratios.iter().any(|q| {
            q.split_once(" / ")
                .is_some_and(|(n, d)| n.contains(numerator) && d.contains(denominator))
        })
    };
    let lookups = "breakwater_cache_lookups_total{name=~\"$name\"";
    assert!(has(
        "breakwater_cache_lookups_total{name=~\"$name\",result=\"hit\"}",
        &format!("{lookups}}}")
    ));
    assert!(has(
        "breakwater_cache_lookups_total{name=~\"$name\",result=\"stale\"}",
        &format!("{lookups}}}")
    ));
    assert!(has(
        "breakwater_cache_early_refreshes_total",
        "breakwater_cache_lookups_total{name=~\"$name\",result=\"hit\"}"
    ));
    assert!(has(
        "breakwater_coalesce_calls_total{name=~\"$name\",role=\"follower\"}",
        "breakwater_coalesce_calls_total{name=~\"$name\"}"
    ));
}

/// The README's metric table lists every metric the crate emits, once, with its type.
#[test]
fn the_readme_metric_table_lists_every_metric_with_its_type() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n\n").find(|t| t.starts_with("| name | type |")))
        .expect("the Metrics section's table");
    let mut rows: Vec<(String, String)> = table
        .lines()
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let name = cells[0].trim_start_matches("| ").trim_matches('`');
            (name.to_owned(), cells[1].to_owned())
        })
        .collect();
    rows.sort();
    let mut expected: Vec<(String, String)> = ALL
        .iter()
        .map(|s| (s.name.to_owned(), s.kind.as_str().to_owned()))
        .collect();
    expected.sort();
    assert_eq!(rows, expected);
}
