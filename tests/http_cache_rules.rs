//! HTTP cache rules under arbitrary header values: `is_storable`, `max_age`,
//! `stale_allowance` and `HttpKey::key` never panic, and every duration they return fits in
//! 2^31 s, so adding it to an instant (as a cache does for expiry and staleness) never
//! overflows.
#![cfg(feature = "http")]

use std::time::Duration;

use http::{HeaderValue, Request, Response};
use proptest::prelude::*;
use tokio::time::Instant;
use tower_breakwater::http::{HttpKey, is_storable, max_age, stale_allowance};

const CAP: Duration = Duration::from_secs(1 << 31);

/// Header value bytes built from the pieces a `Cache-Control`, `Age` or `Vary` parser cares
/// about, plus any byte a header value may hold.
fn value() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"max-age".to_vec()),
        Just(b"MAX-AGE".to_vec()),
        Just(b"s-maxage".to_vec()),
        Just(b"stale-if-error".to_vec()),
        Just(b"must-revalidate".to_vec()),
        Just(b"no-store".to_vec()),
        Just(b"private".to_vec()),
        Just(b"*".to_vec()),
        Just(b"=".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b",".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"-".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"2147483648".to_vec()),
        "[0-9]{1,25}".prop_map(String::into_bytes),
        // Every byte a header value may hold: visible ASCII, tab, and obs-text.
        prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff], 1..4),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

fn header(v: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(v).expect("only valid header bytes are generated")
}

proptest! {
    #[test]
    fn response_rules_never_panic_and_stay_within_two_to_the_31_seconds(
        status in 100u16..=599,
        cache_control in prop::collection::vec(value(), 0..4),
        age in prop::collection::vec(value(), 0..3),
        vary in prop::collection::vec(value(), 0..2),
    ) {
        let mut res = Response::builder().status(status);
        for v in &cache_control {
            res = res.header("cache-control", header(v));
        }
        for v in &age {
            res = res.header("age", header(v));
        }
        for v in &vary {
            res = res.header("vary", header(v));
        }
        let res = res.body(()).unwrap();
        let _ = is_storable(&res, &HttpKey::new());
        let ttl = max_age(&res);
        let stale = stale_allowance(&res);
        prop_assert!(ttl.is_none_or(|t| !t.is_zero() && t <= CAP), "{ttl:?}");
        prop_assert!(stale.is_none_or(|s| s <= CAP), "{stale:?}");
        let _expiry_plus_staleness =
            Instant::now() + ttl.unwrap_or_default() + stale.unwrap_or_default();
    }

    #[test]
    fn keys_never_panic(
        names in prop::collection::vec(
            prop::sample::select(vec![
                "range", "if-range", "if-match", "if-none-match", "if-modified-since",
                "if-unmodified-since", "accept", "authorization", "host", "x-other",
            ]),
            0..6,
        ),
        values in prop::collection::vec(value(), 6),
    ) {
        let mut req = Request::get("/x");
        for (n, v) in names.iter().zip(&values) {
            req = req.header(*n, header(v));
        }
        let req = req.body(()).unwrap();
        let key = HttpKey::new().key(&req);
        let per_request = names.iter().any(|n| n.starts_with("if-") || *n == "range");
        if per_request {
            prop_assert!(key.is_none());
        }
    }
}

/// The cap applies to every delta-seconds value, whatever its length.
#[test]
fn a_thousand_digit_max_age_is_two_to_the_31_seconds() {
    let digits = "9".repeat(1000);
    let res = Response::builder()
        .header("cache-control", format!("max-age={digits}"))
        .body(())
        .unwrap();
    assert_eq!(max_age(&res), Some(CAP));
    let res = Response::builder()
        .header(
            "cache-control",
            format!("max-age=60, stale-if-error={digits}"),
        )
        .body(())
        .unwrap();
    assert_eq!(stale_allowance(&res), Some(CAP));
}
