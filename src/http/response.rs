use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};

use crate::error::{self, ErrorKind};

/// Turns an error from one of our layers into the response a server should send, for
/// server-side use (a handler whose downstream call was rejected or timed out):
///
/// | error kind | status | `Retry-After` |
/// |---|---|---|
/// | `CircuitOpen`, `BulkheadFull`, `Shed` | `503 Service Unavailable` | when known |
/// | `RateLimited`, `TooManyKeys` | `429 Too Many Requests` | when known |
/// | `Timeout` | `504 Gateway Timeout` | no |
///
/// `Retry-After` is in whole seconds, rounded **up** (a caller told to come back in 0.2 s is
/// told 1 s, never 0), from [`BreakwaterError::retry_after`](crate::BreakwaterError::retry_after):
/// for an open circuit breaker, the time left until it probes again, including a
/// [Retry-After hold](crate::circuit_breaker#retry-after-hold).
/// Returns `None` for errors that are not ours (found with [`error::find`]) and for
/// `Panicked`: those are the application's to map (usually to `500`). The body is
/// `B::default()`.
pub fn rejection_response<B: Default>(
    err: &(dyn std::error::Error + 'static),
) -> Option<Response<B>> {
    let ours = error::find(err)?;
    let status = match ours.kind() {
        ErrorKind::CircuitOpen | ErrorKind::BulkheadFull | ErrorKind::Shed => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::RateLimited | ErrorKind::TooManyKeys => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => return None,
    };
    let mut res = Response::new(B::default());
    *res.status_mut() = status;
    if let Some(after) = ours.retry_after().filter(|_| ours.is_rejection()) {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    Some(res)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::{BoxError, BreakwaterError, LayerKind};

    fn ours(kind: ErrorKind, after: Option<Duration>) -> BoxError {
        let mut e = BreakwaterError::new(kind, LayerKind::CircuitBreaker, "pay");
        if let Some(d) = after {
            e = e.with_retry_after(d);
        }
        Box::new(e)
    }

    fn render(err: BoxError) -> Option<(u16, Option<String>)> {
        rejection_response::<()>(err.as_ref()).map(|r| {
            (
                r.status().as_u16(),
                r.headers()
                    .get(RETRY_AFTER)
                    .map(|v| v.to_str().unwrap().to_owned()),
            )
        })
    }

    #[test]
    fn maps_kinds_to_statuses_and_rounds_retry_after_up() {
        let ms = Duration::from_millis;
        assert_eq!(
            render(ours(ErrorKind::CircuitOpen, Some(ms(200)))),
            Some((503, Some("1".into())))
        );
        assert_eq!(
            render(ours(ErrorKind::CircuitOpen, Some(ms(3_000)))),
            Some((503, Some("3".into())))
        );
        assert_eq!(
            render(ours(ErrorKind::RateLimited, Some(ms(2_001)))),
            Some((429, Some("3".into())))
        );
        assert_eq!(
            render(ours(ErrorKind::RateLimited, Some(Duration::ZERO))),
            Some((429, Some("0".into())))
        );
        assert_eq!(
            render(ours(ErrorKind::TooManyKeys, None)),
            Some((429, None))
        );
        assert_eq!(
            render(ours(ErrorKind::BulkheadFull, None)),
            Some((503, None))
        );
        assert_eq!(render(ours(ErrorKind::Shed, None)), Some((503, None)));
        assert_eq!(render(ours(ErrorKind::Timeout, None)), Some((504, None)));
        assert_eq!(render(ours(ErrorKind::Panicked, None)), None);
        assert_eq!(render("inner failure".into()), None);
    }
}
