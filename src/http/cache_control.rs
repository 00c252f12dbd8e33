use std::time::Duration;

use http::header::{CACHE_CONTROL, SET_COOKIE, VARY};
use http::{HeaderName, Response};

use super::HttpKey;

/// Iterates the directives of every `Cache-Control` field line: `(name, value)` with the name
/// lower-cased by comparison (callers use `eq_ignore_ascii_case`) and quotes removed from the
/// value.
fn directives<B>(res: &Response<B>) -> impl Iterator<Item = (&str, Option<&str>)> {
    res.headers()
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (d, None),
        })
}

/// `true` if `res` may be stored and served to other callers of a cache whose requests are
/// keyed by `key`, following RFC 9111's rules for a shared cache:
///
/// - no `Set-Cookie` (a per-user response);
/// - no `Cache-Control` directive `no-store`, `private`, or `no-cache` (the last requires
///   revalidation before each reuse, which this crate's cache does not do);
/// - no `Vary: *`, and every header named by `Vary` is one of `key`'s headers (otherwise
///   requests with equal keys could get different responses).
///
/// Whether the response is a success is the cache's classifier's business, not this check's.
pub fn is_storable<B>(res: &Response<B>, key: &HttpKey) -> bool {
    if res.headers().contains_key(SET_COOKIE) {
        return false;
    }
    if directives(res).any(|(name, _)| {
        ["no-store", "private", "no-cache"]
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d))
    }) {
        return false;
    }
    res.headers()
        .get_all(VARY)
        .iter()
        .all(|line| match line.to_str() {
            Err(_) => false,
            Ok(line) => line
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .all(|n| {
                    n != "*"
                        && HeaderName::from_bytes(n.as_bytes())
                            .is_ok_and(|h| key.header_names().any(|k| *k == h))
                }),
        })
}

/// The freshness lifetime a shared cache may give `res`: `s-maxage` if present, else
/// `max-age` (RFC 9111, section 4.2.1), in whole seconds; the first occurrence of a directive
/// counts. `None` when neither is present or the value is not a non-negative integer.
pub fn max_age<B>(res: &Response<B>) -> Option<Duration> {
    let find = |wanted: &str| {
        directives(res)
            .find(|(n, _)| n.eq_ignore_ascii_case(wanted))
            .and_then(|(_, v)| v)
            .map(|v| v.parse::<u64>().ok().map(Duration::from_secs))
    };
    match find("s-maxage") {
        Some(v) => v,
        None => find("max-age").flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT_LANGUAGE;

    fn res(headers: &[(HeaderName, &'static str)]) -> Response<()> {
        let mut b = Response::builder().status(200);
        for (n, v) in headers {
            b = b.header(n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn set_cookie_private_no_store_and_no_cache_are_not_storable() {
        let k = HttpKey::new();
        assert!(is_storable(&res(&[]), &k));
        assert!(is_storable(
            &res(&[(CACHE_CONTROL, "public, max-age=60")]),
            &k
        ));
        assert!(!is_storable(&res(&[(SET_COOKIE, "sid=1")]), &k));
        assert!(!is_storable(&res(&[(CACHE_CONTROL, "no-store")]), &k));
        assert!(!is_storable(
            &res(&[(CACHE_CONTROL, "max-age=60, Private")]),
            &k
        ));
        assert!(!is_storable(
            &res(&[(CACHE_CONTROL, "max-age=60"), (CACHE_CONTROL, "no-cache")]),
            &k
        ));
    }

    #[test]
    fn vary_must_be_covered_by_the_key() {
        let k = HttpKey::new();
        assert!(is_storable(&res(&[(VARY, "Accept")]), &k));
        assert!(is_storable(&res(&[(VARY, "accept, authorization")]), &k));
        assert!(!is_storable(&res(&[(VARY, "*")]), &k));
        assert!(!is_storable(&res(&[(VARY, "Accept-Language")]), &k));
        let with_lang = HttpKey::new().headers([ACCEPT_LANGUAGE]);
        assert!(is_storable(&res(&[(VARY, "Accept-Language")]), &with_lang));
    }

    #[test]
    fn max_age_prefers_s_maxage() {
        assert_eq!(
            max_age(&res(&[(CACHE_CONTROL, "max-age=60")])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            max_age(&res(&[(CACHE_CONTROL, "max-age=\"30\"")])),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            max_age(&res(&[(CACHE_CONTROL, "max-age=60, s-maxage=10")])),
            Some(Duration::from_secs(10))
        );
        assert_eq!(max_age(&res(&[(CACHE_CONTROL, "max-age=-1")])), None);
        assert_eq!(max_age(&res(&[(CACHE_CONTROL, "public")])), None);
        assert_eq!(max_age(&res(&[])), None);
    }
}
