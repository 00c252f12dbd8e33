use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};

use crate::classify::{Classify, DefaultClassifier, Outcome, ReadsRetryAfter};
use crate::error::BoxError;

/// Classifies HTTP responses by status: a status in the failure set is
/// [`Outcome::Failure`], any other status [`Outcome::Success`]. Errors follow the crate's
/// default rule: transport (inner) errors and timeouts are failures, rejections by our own
/// layers further inside are ignored.
///
/// The default failure set is every `5xx` status and `429 Too Many Requests`: both say the
/// dependency is overloaded or broken, while `4xx` says the request was wrong. Change it with
/// [`failure_status`](Self::failure_status) and [`success_status`](Self::success_status).
///
/// The set is a 1,000-bit bitmap (statuses 100 to 999), so the classifier is `Copy` and a
/// lookup is one load and a shift.
///
/// It also reports a response's `Retry-After` ([`Classify::retry_after`]: that of a `429` or
/// `503` response, in either form, as [`retry_after`](super::retry_after()) reads it, with
/// the wall clock read only for an HTTP-date), which a circuit breaker with
/// [`retry_after_hold`](crate::circuit_breaker::CircuitBreakerBuilder::retry_after_hold) on
/// honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpClassifier {
    failures: [u64; 16],
}

impl Default for HttpClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClassifier {
    /// The default: `500..=599` and `429` are failures.
    pub fn new() -> Self {
        let mut c = HttpClassifier { failures: [0; 16] };
        for code in 500..=599 {
            c.set(code, true);
        }
        c.set(429, true);
        c
    }

    /// A classifier with an empty failure set: every response is a success.
    pub fn none() -> Self {
        HttpClassifier { failures: [0; 16] }
    }

    fn set(&mut self, code: u16, failure: bool) {
        let (word, bit) = (usize::from(code / 64), code % 64);
        if failure {
            self.failures[word] |= 1 << bit;
        } else {
            self.failures[word] &= !(1 << bit);
        }
    }

    /// Adds `status` to the failure set.
    pub fn failure_status(mut self, status: StatusCode) -> Self {
        self.set(status.as_u16(), true);
        self
    }

    /// Removes `status` from the failure set (for example `501 Not Implemented`, which says
    /// nothing about the dependency's health).
    pub fn success_status(mut self, status: StatusCode) -> Self {
        self.set(status.as_u16(), false);
        self
    }

    /// `true` if `status` is in the failure set.
    #[inline]
    pub fn is_failure(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        self.failures[usize::from(code / 64)] & (1 << (code % 64)) != 0
    }
}

impl ReadsRetryAfter for HttpClassifier {}

impl<B> Classify<Response<B>> for HttpClassifier {
    #[inline]
    fn classify(&self, result: Result<&Response<B>, &BoxError>) -> Outcome {
        match result {
            Ok(res) if self.is_failure(res.status()) => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(e) => DefaultClassifier.classify_error(e),
        }
    }

    #[inline]
    fn retry_after(&self, result: Result<&Response<B>, &BoxError>) -> Option<Duration> {
        super::retry_after::retry_after_with(result.ok()?, SystemTime::now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BreakwaterError, ErrorKind, LayerKind};

    fn status(code: u16) -> Response<()> {
        Response::builder().status(code).body(()).unwrap()
    }

    #[test]
    fn table_over_statuses_and_error_kinds() {
        let c = HttpClassifier::new();
        let table: &[(u16, Outcome)] = &[
            (100, Outcome::Success),
            (200, Outcome::Success),
            (204, Outcome::Success),
            (301, Outcome::Success),
            (304, Outcome::Success),
            (400, Outcome::Success),
            (404, Outcome::Success),
            (428, Outcome::Success),
            (429, Outcome::Failure),
            (430, Outcome::Success),
            (499, Outcome::Success),
            (500, Outcome::Failure),
            (502, Outcome::Failure),
            (503, Outcome::Failure),
            (504, Outcome::Failure),
            (599, Outcome::Failure),
            (600, Outcome::Success),
            (999, Outcome::Success),
        ];
        for &(code, want) in table {
            assert_eq!(c.classify(Ok(&status(code))), want, "status {code}");
        }
        let err =
            |kind| -> BoxError { Box::new(BreakwaterError::new(kind, LayerKind::Bulkhead, "x")) };
        let errors: &[(BoxError, Outcome)] = &[
            ("connection reset".into(), Outcome::Failure),
            (err(ErrorKind::Timeout), Outcome::Failure),
            (err(ErrorKind::CircuitOpen), Outcome::Ignored),
            (err(ErrorKind::BulkheadFull), Outcome::Ignored),
            (err(ErrorKind::RateLimited), Outcome::Ignored),
            (err(ErrorKind::TooManyKeys), Outcome::Ignored),
            (err(ErrorKind::Shed), Outcome::Ignored),
            (err(ErrorKind::Panicked), Outcome::Failure),
        ];
        for (e, want) in errors {
            assert_eq!(Classify::<Response<()>>::classify(&c, Err(e)), *want, "{e}");
        }
    }

    #[test]
    fn the_failure_set_is_configurable() {
        let c = HttpClassifier::new()
            .success_status(StatusCode::NOT_IMPLEMENTED)
            .failure_status(StatusCode::REQUEST_TIMEOUT);
        assert_eq!(c.classify(Ok(&status(501))), Outcome::Success);
        assert_eq!(c.classify(Ok(&status(408))), Outcome::Failure);
        assert_eq!(c.classify(Ok(&status(500))), Outcome::Failure);
        assert_eq!(
            HttpClassifier::none().classify(Ok(&status(503))),
            Outcome::Success
        );
    }
}
