//! RFC 9111 response rules for a cache shared by several callers: what may be stored, for how
//! long, and how long past that it may be served stale.
//!
//! One parser reads every `Cache-Control` field line as bytes (a line that is not visible
//! ASCII is still read, so a `no-store` next to an odd byte is never missed): directives are
//! separated by commas (and tolerated whitespace), names compare case-insensitively, values
//! may be tokens or quoted strings (a comma inside quotes does not split). A directive given
//! twice counts with its most restrictive value.

use std::time::Duration;

use http::header::{AGE, CACHE_CONTROL, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, Response, StatusCode};

use super::HttpKey;

/// The greatest delta-seconds value this crate represents, 2^31 s (about 68 years): larger
/// values, including ones beyond `u64`, are taken as this one (RFC 9111, section 1.2.2).
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Statuses stored by [`is_storable`]: the final statuses RFC 9110 (section 15.1) calls
/// heuristically cacheable, less `206 Partial Content`.
const STORABLE_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Parses `delta-seconds` (RFC 9111, section 1.2.2: `1*DIGIT`, no sign, no fraction),
/// saturating at [`MAX_DELTA_SECONDS`]. Also the `delay-seconds` form of `Retry-After`
/// (RFC 9110, section 10.2.3), which has the same grammar.
pub(super) fn delta_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // `acc` stays <= 2^31, so `acc * 10 + 9` never overflows.
    Some(v.iter().fold(0, |acc: u64, d| {
        (acc * 10 + u64::from(d - b'0')).min(MAX_DELTA_SECONDS)
    }))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip(s: &[u8], what: impl Fn(u8) -> bool) -> &[u8] {
    let n = s.iter().position(|&b| !what(b)).unwrap_or(s.len());
    &s[n..]
}

/// The directives of one `Cache-Control` field line: `(name, value)`, the value without its
/// quotes (escapes are left as sent; no value this crate reads contains one).
struct Directives<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = skip(self.rest, |b| b == b',' || is_ows(b));
            if s.is_empty() {
                self.rest = s;
                return None;
            }
            let end = s
                .iter()
                .position(|&b| b == b'=' || b == b',' || is_ows(b))
                .unwrap_or(s.len());
            let name = &s[..end];
            let after = skip(&s[end..], is_ows);
            let (value, rest) = match after.split_first() {
                Some((b'=', v)) => {
                    let v = skip(v, is_ows);
                    if let Some((b'"', q)) = v.split_first() {
                        let mut i = 0;
                        while i < q.len() && q[i] != b'"' {
                            i += if q[i] == b'\\' { 2 } else { 1 };
                        }
                        let i = i.min(q.len());
                        (Some(&q[..i]), q.get(i + 1..).unwrap_or_default())
                    } else {
                        let n = v
                            .iter()
                            .position(|&b| b == b',' || is_ows(b))
                            .unwrap_or(v.len());
                        (Some(&v[..n]), &v[n..])
                    }
                }
                _ => (None, after),
            };
            self.rest = rest;
            if !name.is_empty() {
                return Some((name, value));
            }
        }
    }
}

/// A freshness directive (`max-age`, `s-maxage`) after merging its occurrences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    Absent,
    /// Present with an invalid value: the response counts as stale (RFC 9111, 4.2.1).
    Invalid,
    Seconds(u64),
}

impl Lifetime {
    /// The most restrictive of `self` and one more occurrence with `value`.
    fn and(self, value: Option<&[u8]>) -> Lifetime {
        match (self, value.and_then(delta_seconds)) {
            (Lifetime::Invalid, _) | (_, None) => Lifetime::Invalid,
            (Lifetime::Seconds(a), Some(b)) => Lifetime::Seconds(a.min(b)),
            (Lifetime::Absent, Some(b)) => Lifetime::Seconds(b),
        }
    }
}

/// The response directives this crate acts on, merged over every `Cache-Control` line.
#[derive(Debug, Clone, Copy)]
struct CacheControl {
    no_store: bool,
    no_cache: bool,
    private: bool,
    must_revalidate: bool,
    proxy_revalidate: bool,
    max_age: Lifetime,
    s_maxage: Lifetime,
    stale_if_error: Option<u64>,
}

impl CacheControl {
    fn of(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl {
            no_store: false,
            no_cache: false,
            private: false,
            must_revalidate: false,
            proxy_revalidate: false,
            max_age: Lifetime::Absent,
            s_maxage: Lifetime::Absent,
            stale_if_error: None,
        };
        for line in headers.get_all(CACHE_CONTROL) {
            for (name, value) in (Directives {
                rest: line.as_bytes(),
            }) {
                let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
                if is("no-store") {
                    cc.no_store = true;
                } else if is("no-cache") {
                    cc.no_cache = true;
                } else if is("private") {
                    cc.private = true;
                } else if is("must-revalidate") {
                    cc.must_revalidate = true;
                } else if is("proxy-revalidate") {
                    cc.proxy_revalidate = true;
                } else if is("max-age") {
                    cc.max_age = cc.max_age.and(value);
                } else if is("s-maxage") {
                    cc.s_maxage = cc.s_maxage.and(value);
                } else if is("stale-if-error") {
                    if let Some(n) = value.and_then(delta_seconds) {
                        cc.stale_if_error = Some(cc.stale_if_error.map_or(n, |m| m.min(n)));
                    }
                }
            }
        }
        cc
    }

    /// The freshness lifetime for a shared cache: `s-maxage` when present, else `max-age`.
    fn lifetime(&self) -> Lifetime {
        match self.s_maxage {
            Lifetime::Absent => self.max_age,
            s => s,
        }
    }
}

/// The `Age` header in seconds (RFC 9111, section 5.1): the first member of the first field
/// line; an invalid value is ignored (zero).
fn age(headers: &HeaderMap) -> u64 {
    headers
        .get(AGE)
        .and_then(|v| {
            let first = v.as_bytes().split(|&b| b == b',').next()?;
            let first = skip(first, is_ows);
            let end = first.iter().rposition(|&b| !is_ows(b)).map_or(0, |i| i + 1);
            delta_seconds(&first[..end])
        })
        .unwrap_or(0)
}

/// `true` if `res` may be stored and served to other callers of a cache whose requests are
/// keyed by `key`, following RFC 9111's rules for a shared cache (sections 3 and 5.2.2). A
/// layer serving several callers is shared in RFC 9111's sense even inside one client, so
/// `private` responses are refused.
///
/// Storable means all of:
/// - the status is a complete, reusable final response this cache understands: one of 200,
///   203, 204, 300, 301, 308, 404, 405, 410, 414 and 501 (the statuses RFC 9110, section
///   15.1, calls heuristically cacheable, less 206: a partial response answers one `Range`).
///   `304 Not Modified` (an answer to one caller's conditional request), `1xx`, `206` and
///   every other status are refused, even with an explicit `max-age`;
/// - no `Set-Cookie` (a per-user response);
/// - no `Cache-Control` directive `no-store`, `private`, or `no-cache` (the last requires
///   revalidation before each reuse, which this crate's cache does not do), in any case, on
///   any `Cache-Control` line, qualified (`private="..."`) or not;
/// - no `Vary: *`, and every header named by `Vary` is one of `key`'s headers (otherwise
///   requests with equal keys could get different responses).
///
/// Whether the response is a success is the cache's classifier's business: with
/// [`HttpClassifier`](super::HttpClassifier), a 501 is a failure and is not stored. How long
/// the response may be kept is [`max_age`]'s; a response without a freshness lifetime is
/// storable here, and `max_age` returns `None` for it.
pub fn is_storable<B>(res: &Response<B>, key: &HttpKey) -> bool {
    if !is_storable_status(res.status()) || res.headers().contains_key(SET_COOKIE) {
        return false;
    }
    let cc = CacheControl::of(res.headers());
    if cc.no_store || cc.private || cc.no_cache {
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

fn is_storable_status(status: StatusCode) -> bool {
    STORABLE_STATUSES.contains(&status.as_u16())
}

/// How long a cache storing `res` now may serve it fresh, in whole seconds: the freshness
/// lifetime minus the response's current age (RFC 9111, sections 4.2.1 and 4.2.3), or `None`
/// when the response must not be stored as fresh.
///
/// - **Freshness lifetime**: `s-maxage` when present, else `max-age` (the rule for a shared
///   cache, which a layer serving several callers is). A directive given more than once
///   counts with its smallest value. A present but invalid value (not `1*DIGIT`: a sign, a
///   fraction, a missing value) makes the response stale, as RFC 9111 (4.2.1) encourages,
///   even next to a valid occurrence. `Expires` is not read.
/// - **Current age**: the `Age` header (first member of the first line; an invalid value is
///   ignored, RFC 9111 section 5.1). `Date` is not read: no wall clock is consulted, and the
///   cache counts the time from the instant it stores the response.
/// - Every delta-seconds value (lifetime or age) beyond 2^31 s (about 68 years), including
///   values beyond `u64`, is taken as 2^31 s (RFC 9111, section 1.2.2), so the result never
///   exceeds 2^31 s and adding it to an instant cannot overflow.
///
/// `None` when there is no lifetime, it is invalid, or the age is at least the lifetime
/// (`max-age=0` included). Never panics. Use it with [`is_storable`]:
///
/// ```
/// use std::time::Duration;
/// use http::Response;
/// use tower_breakwater::http::max_age;
///
/// let res = Response::builder()
///     .header("cache-control", "public, max-age=60")
///     .header("age", "50")
///     .body(())
///     .unwrap();
/// assert_eq!(max_age(&res), Some(Duration::from_secs(10)));
/// ```
pub fn max_age<B>(res: &Response<B>) -> Option<Duration> {
    let Lifetime::Seconds(lifetime) = CacheControl::of(res.headers()).lifetime() else {
        return None;
    };
    let left = lifetime.saturating_sub(age(res.headers()));
    (left > 0).then(|| Duration::from_secs(left))
}

/// How long past its expiry `res` may be served stale when the origin fails (RFC 9111,
/// section 4.2.4), in whole seconds:
///
/// - `Some(Duration::ZERO)`: never, because of `must-revalidate`, `proxy-revalidate`,
///   `no-cache` or `s-maxage` (which carries `proxy-revalidate`'s meaning for a shared
///   cache, RFC 9111 section 5.2.2.10). These win over `stale-if-error`;
/// - `Some(n)`: `stale-if-error=n` (RFC 5861, section 4), the smallest valid value when
///   given more than once, capped at 2^31 s; invalid values are ignored;
/// - `None`: the response says nothing, and the cache's configured maximum staleness
///   applies.
///
/// A cache honouring it serves an entry stale at most until its expiry plus this allowance
/// (bounded by the cache's own maximum staleness, the operator's limit). Never panics.
///
/// ```
/// use std::time::Duration;
/// use http::Response;
/// use tower_breakwater::http::stale_allowance;
///
/// let res = |cc: &str| Response::builder().header("cache-control", cc).body(()).unwrap();
/// assert_eq!(stale_allowance(&res("max-age=60, must-revalidate")), Some(Duration::ZERO));
/// assert_eq!(stale_allowance(&res("max-age=60, stale-if-error=300")), Some(Duration::from_secs(300)));
/// assert_eq!(stale_allowance(&res("max-age=60")), None);
/// ```
pub fn stale_allowance<B>(res: &Response<B>) -> Option<Duration> {
    let cc = CacheControl::of(res.headers());
    if cc.must_revalidate || cc.proxy_revalidate || cc.no_cache || cc.s_maxage != Lifetime::Absent {
        return Some(Duration::ZERO);
    }
    cc.stale_if_error.map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT_LANGUAGE;

    fn res(headers: &[(HeaderName, &'static str)]) -> Response<()> {
        with_status(200, headers)
    }

    fn with_status(status: u16, headers: &[(HeaderName, &'static str)]) -> Response<()> {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(n, *v);
        }
        b.body(()).unwrap()
    }

    fn cc(v: &'static str) -> Response<()> {
        res(&[(CACHE_CONTROL, v)])
    }

    fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    #[test]
    fn set_cookie_private_no_store_and_no_cache_are_not_storable() {
        let k = HttpKey::new();
        assert!(is_storable(&res(&[]), &k));
        assert!(is_storable(&cc("public, max-age=60"), &k));
        assert!(!is_storable(&res(&[(SET_COOKIE, "sid=1")]), &k));
        assert!(!is_storable(&cc("no-store"), &k));
        assert!(!is_storable(&cc("max-age=60, Private"), &k));
        assert!(!is_storable(&cc("max-age=60,NO-STORE"), &k));
        assert!(!is_storable(&cc("private=\"x-user\""), &k));
        assert!(
            !is_storable(&cc("max-age=60 no-store"), &k),
            "missing comma"
        );
        assert!(!is_storable(
            &res(&[(CACHE_CONTROL, "max-age=60"), (CACHE_CONTROL, "no-cache")]),
            &k
        ));
        assert!(
            is_storable(&cc("ext=\"no-store, private\", max-age=60"), &k),
            "directive names inside a quoted value do not count"
        );
    }

    #[test]
    fn only_complete_reusable_statuses_are_storable() {
        let k = HttpKey::new();
        for status in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            assert!(is_storable(&with_status(status, &[]), &k), "{status}");
        }
        for status in [
            100, 101, 103, 201, 202, 205, 206, 302, 303, 304, 307, 400, 401, 403, 429, 500, 502,
            503, 504,
        ] {
            let r = with_status(status, &[(CACHE_CONTROL, "public, max-age=60")]);
            assert!(!is_storable(&r, &k), "{status}");
        }
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
        assert_eq!(max_age(&cc("max-age=60")), secs(60));
        assert_eq!(max_age(&cc("max-age=\"30\"")), secs(30));
        assert_eq!(max_age(&cc("max-age=60, s-maxage=10")), secs(10));
        assert_eq!(max_age(&cc("max-age=10, s-maxage=60")), secs(60));
        assert_eq!(max_age(&cc("public")), None);
        assert_eq!(max_age(&res(&[])), None);
    }

    #[test]
    fn directive_names_are_case_insensitive_and_values_may_be_quoted() {
        assert_eq!(max_age(&cc("MAX-AGE=60")), secs(60));
        assert_eq!(max_age(&cc("Max-Age = 60")), secs(60));
        assert_eq!(max_age(&cc("S-MaxAge=\"7\", max-age=60")), secs(7));
        assert_eq!(
            max_age(&cc("no-cache=\"set-cookie, x-a\", max-age=60")),
            secs(60),
            "a comma inside quotes does not split"
        );
        assert_eq!(max_age(&cc(",, ,max-age=60,,")), secs(60));
        assert_eq!(max_age(&cc("max-age=\"60")), secs(60), "unterminated quote");
    }

    #[test]
    fn duplicates_take_the_most_restrictive_value_across_lines() {
        assert_eq!(max_age(&cc("max-age=60, max-age=10")), secs(10));
        assert_eq!(
            max_age(&res(&[
                (CACHE_CONTROL, "max-age=10"),
                (CACHE_CONTROL, "public, max-age=60")
            ])),
            secs(10)
        );
        assert_eq!(max_age(&cc("s-maxage=30, s-maxage=20")), secs(20));
    }

    #[test]
    fn invalid_lifetimes_make_the_response_stale() {
        for v in [
            "max-age=-1",
            "max-age=+5",
            "max-age=1.5",
            "max-age=",
            "max-age",
            "max-age=abc, max-age=60",
            "max-age=60, s-maxage=x",
            "max-age=0",
        ] {
            assert_eq!(max_age(&res(&[(CACHE_CONTROL, v)])), None, "{v}");
        }
        assert_eq!(max_age(&cc("max-age=60, stale-if-error=x")), secs(60));
    }

    #[test]
    fn delta_seconds_saturate_at_two_to_the_31() {
        assert_eq!(delta_seconds(b"0"), Some(0));
        assert_eq!(delta_seconds(b"007"), Some(7));
        assert_eq!(delta_seconds(b"2147483647"), Some(2_147_483_647));
        assert_eq!(delta_seconds(b"2147483648"), Some(1 << 31));
        assert_eq!(delta_seconds(b"2147483649"), Some(1 << 31));
        assert_eq!(delta_seconds(b"18446744073709551616"), Some(1 << 31));
        assert_eq!(delta_seconds(&[b'9'; 4000]), Some(1 << 31));
        for bad in [&b""[..], b"+1", b"-1", b" 1", b"1s", b"0x10", b"\xff"] {
            assert_eq!(delta_seconds(bad), None);
        }
        assert_eq!(max_age(&cc("max-age=2147483649")), secs(1 << 31));
    }

    #[test]
    fn the_age_header_is_subtracted() {
        let aged = |age: &'static str| res(&[(CACHE_CONTROL, "max-age=60"), (AGE, age)]);
        assert_eq!(max_age(&aged("0")), secs(60));
        assert_eq!(max_age(&aged("50")), secs(10));
        assert_eq!(max_age(&aged("59")), secs(1));
        assert_eq!(max_age(&aged("60")), None);
        assert_eq!(max_age(&aged("61")), None);
        assert_eq!(max_age(&aged("99999999999999999999999")), None);
        assert_eq!(max_age(&aged("50, 10")), secs(10), "first member");
        assert_eq!(max_age(&aged(" 50 ")), secs(10));
        assert_eq!(max_age(&aged("-5")), secs(60), "invalid Age ignored");
        assert_eq!(max_age(&aged("5.5")), secs(60), "invalid Age ignored");
        let shared = res(&[(CACHE_CONTROL, "max-age=60, s-maxage=100"), (AGE, "70")]);
        assert_eq!(max_age(&shared), secs(30));
        let huge = res(&[(CACHE_CONTROL, "max-age=99999999999999999999"), (AGE, "1")]);
        assert_eq!(max_age(&huge), secs((1 << 31) - 1));
    }

    #[test]
    fn stale_allowance_follows_revalidation_and_stale_if_error() {
        assert_eq!(stale_allowance(&res(&[])), None);
        assert_eq!(stale_allowance(&cc("max-age=60")), None);
        for v in [
            "max-age=60, must-revalidate",
            "max-age=60, Proxy-Revalidate",
            "no-cache",
            "max-age=60, s-maxage=60",
            "s-maxage=x",
            "must-revalidate, stale-if-error=300",
        ] {
            assert_eq!(stale_allowance(&cc(v)), Some(Duration::ZERO), "{v}");
        }
        assert_eq!(stale_allowance(&cc("stale-if-error=300")), secs(300));
        assert_eq!(stale_allowance(&cc("stale-if-error=\"300\"")), secs(300));
        assert_eq!(
            stale_allowance(&cc("stale-if-error=300, STALE-IF-ERROR=20")),
            secs(20)
        );
        assert_eq!(
            stale_allowance(&cc("stale-if-error=x, stale-if-error=20")),
            secs(20),
            "invalid values ignored"
        );
        assert_eq!(stale_allowance(&cc("stale-if-error=-1")), None);
        assert_eq!(
            stale_allowance(&cc("stale-if-error=99999999999999999999")),
            secs(1 << 31)
        );
    }
}
