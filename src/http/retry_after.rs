use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};

use super::cache_control::delta_seconds;

/// Parses a `Retry-After` field value (RFC 9110, section 10.2.3) into the delay from `now`.
///
/// Both forms are accepted:
/// - `delay-seconds` (`1*DIGIT`): that many seconds; a value beyond 2^31 s (about 68 years),
///   however long, is taken as 2^31 s, as the cache rules take delta-seconds (RFC 9111,
///   section 1.2.2): an overlong delay asks for the longest wait, it is not ignored;
/// - `HTTP-date` (the IMF-fixdate form and the two obsolete forms RFC 9110 requires
///   recipients to accept): the time from `now` until that date, or zero for a date in the
///   past.
///
/// Anything else (signs, fractions, units, spaces inside, an empty value, a malformed date)
/// returns `None`, so the caller ignores the header. `now` is wall-clock time (an HTTP-date is
/// absolute); pass `SystemTime::now()` outside tests.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use tower_breakwater::http::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 GMT
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("120"), now), Some(Duration::from_secs(120)));
/// let date = HeaderValue::from_static("Wed, 21 Oct 2015 07:30:00 GMT");
/// assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(120)));
/// assert_eq!(parse_retry_after(&HeaderValue::from_static("-1"), now), None);
/// ```
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    parse_with(value, || now)
}

/// [`parse_retry_after`] asking for the wall-clock time only to resolve an HTTP-date.
fn parse_with(value: &HeaderValue, now: impl FnOnce() -> SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim_matches(|c| c == ' ' || c == '\t');
    if s.is_empty() {
        return None;
    }
    if let Some(secs) = delta_seconds(s.as_bytes()) {
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(s).ok()?;
    Some(date.duration_since(now()).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a `429 Too Many Requests` or `503 Service Unavailable` response, as
/// the delay from `now` ([`parse_retry_after`]); `None` for other statuses, for a missing or
/// invalid value, and when the header appears more than once (ambiguous).
pub fn retry_after<B>(res: &Response<B>, now: SystemTime) -> Option<Duration> {
    retry_after_with(res, || now)
}

/// [`retry_after`] asking for the wall-clock time only to resolve an HTTP-date of a 429 or
/// 503 response (what a breaker's Retry-After hold uses: no clock read otherwise).
pub(crate) fn retry_after_with<B>(
    res: &Response<B>,
    now: impl FnOnce() -> SystemTime,
) -> Option<Duration> {
    if res.status() != StatusCode::TOO_MANY_REQUESTS
        && res.status() != StatusCode::SERVICE_UNAVAILABLE
    {
        return None;
    }
    let mut values = res.headers().get_all(RETRY_AFTER).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_with(first, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2015-10-21 07:28:00 GMT
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    fn parse(s: &'static str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_static(s), now())
    }

    #[test]
    fn delay_seconds() {
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse("007"), Some(Duration::from_secs(7)));
        let max = Some(Duration::from_secs(1 << 31));
        assert_eq!(
            parse("2147483647"),
            Some(Duration::from_secs((1 << 31) - 1))
        );
        assert_eq!(parse("2147483648"), max);
        assert_eq!(parse("18446744073709551615"), max);
        assert_eq!(parse("18446744073709551616"), max, "beyond u64: capped");
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let two_min = Some(Duration::from_secs(120));
        assert_eq!(parse("Wed, 21 Oct 2015 07:30:00 GMT"), two_min);
        assert_eq!(parse("Wednesday, 21-Oct-15 07:30:00 GMT"), two_min);
        assert_eq!(parse("Wed Oct 21 07:30:00 2015"), two_min);
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:00:00 GMT"),
            Some(Duration::ZERO),
            "past"
        );
    }

    #[test]
    fn anything_else_is_ignored() {
        for s in [
            "",
            "-1",
            "+5",
            "1.5",
            "5s",
            "1 2",
            "soon",
            "Wed, 32 Oct 2015 07:30:00 GMT",
            "Wed, 21 Oct 2015 07:30:00 UTC",
            "0x10",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
        let non_ascii = HeaderValue::from_bytes(b"\xff12").unwrap();
        assert_eq!(parse_retry_after(&non_ascii, now()), None);
    }

    #[test]
    fn the_clock_is_read_only_for_an_http_date_of_a_429_or_503() {
        let res = |code: u16, value: &'static str| {
            Response::builder()
                .status(code)
                .header(RETRY_AFTER, value)
                .body(())
                .unwrap()
        };
        let never = || -> SystemTime { panic!("the clock was read") };
        let date = "Wed, 21 Oct 2015 07:30:00 GMT";
        assert_eq!(
            retry_after_with(&res(503, "30"), never),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after_with(&res(500, date), never), None);
        assert_eq!(retry_after_with(&res(200, date), never), None);
        assert_eq!(retry_after_with(&res(429, "soon"), never), None);
        let mut reads = 0;
        let at = retry_after_with(&res(429, date), || {
            reads += 1;
            now()
        });
        assert_eq!((at, reads), (Some(Duration::from_secs(120)), 1));
    }

    #[test]
    fn only_429_and_503_carry_it() {
        let res = |code: u16, values: &[&'static str]| {
            let mut b = Response::builder().status(code);
            for v in values {
                b = b.header(RETRY_AFTER, *v);
            }
            b.body(()).unwrap()
        };
        assert_eq!(
            retry_after(&res(429, &["3"]), now()),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&res(503, &["4"]), now()),
            Some(Duration::from_secs(4))
        );
        assert_eq!(retry_after(&res(500, &["3"]), now()), None);
        assert_eq!(retry_after(&res(200, &["3"]), now()), None);
        assert_eq!(retry_after(&res(503, &[]), now()), None);
        assert_eq!(
            retry_after(&res(503, &["3", "4"]), now()),
            None,
            "ambiguous"
        );
    }
}
