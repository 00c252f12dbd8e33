//! The registry: explicit joining, weak references, one snapshot of everything.
#![cfg(feature = "timeout")]

use std::time::Duration;

use tower_breakwater::registry::Registry;
use tower_breakwater::timeout::TimeoutLayer;

fn timeout(name: &str, registry: Option<&Registry>) -> TimeoutLayer {
    let mut b = TimeoutLayer::builder()
        .name(name)
        .timeout(Duration::from_millis(250));
    if let Some(r) = registry {
        b = b.registry(r);
    }
    b.build().unwrap()
}

#[test]
fn only_layers_given_the_registry_join_it_and_dropped_ones_leave() {
    let registry = Registry::new();
    let a = timeout("a", Some(&registry));
    let b = timeout("b", Some(&registry));
    let _c = timeout("c", None);
    let names: Vec<String> = registry.snapshot().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["a", "b"]);
    let handle = a.handle();
    drop(a);
    assert_eq!(registry.len(), 2, "a handle keeps the instance alive");
    drop(handle);
    drop(b);
    assert_eq!(registry.len(), 0);
    assert!(registry.snapshot().is_empty());
}

#[test]
fn the_global_registry_is_opt_in() {
    let before = Registry::global().len();
    let _quiet = timeout("quiet", None);
    assert_eq!(Registry::global().len(), before);
    let _loud = timeout("loud", Some(Registry::global()));
    assert_eq!(Registry::global().len(), before + 1);
}

#[cfg(feature = "serde")]
#[test]
fn snapshots_serialize_to_the_documented_json() {
    let registry = Registry::new();
    let _a = timeout("fraud-api", Some(&registry));
    let json = serde_json::to_string(&registry.snapshot()).unwrap();
    assert_eq!(
        json,
        r#"[{"name":"fraud-api","layer":"timeout","state":null,"counters":{"timeouts":0},"gauges":{"timeout_seconds":0.25}}]"#
    );
}
