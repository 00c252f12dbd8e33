//! HTTP integration: making the layers right for `http::Request` / `http::Response` services
//! (hyper-util's client, reqwest behind a `tower::service_fn`, tonic channels).
//!
//! - [`HttpClassifier`]: 5xx and 429 are failures (configurable), other statuses success;
//!   transport errors failures; rejections by our own layers ignored (the crate's rule).
//! - [`retry_after`](retry_after()): the `Retry-After` of a 429 or 503 response, in both of
//!   RFC 9110's forms (delay-seconds and HTTP-date); anything else is ignored.
//! - [`HttpKey`]: request keys for coalescing and caching: method + full URI + chosen headers
//!   (`Authorization` and `Accept` by default), only for safe methods (GET and HEAD by
//!   default), so that one layer shared by several routes or callers never mixes responses;
//!   `Range` and conditional requests, and requests with a `Cookie` or
//!   `Proxy-Authorization`, pass through unless the key includes that header (their answers
//!   are for them or their caller alone).
//! - [`is_storable`], [`max_age`] and [`stale_allowance`]: RFC 9111's rules for a cache
//!   shared by several callers (which one layer is, even inside one client, so `private` is
//!   never stored): whether a response may be stored (complete, reusable statuses only;
//!   `Cache-Control`, `Set-Cookie`, `Vary`), for how long (`s-maxage` or `max-age` minus
//!   `Age`, capped at 2^31 s), and how long it may be served stale when the origin fails
//!   (none after `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage`;
//!   `stale-if-error`).
//! - [`rejection_response`]: turns our own rejections into a `503` or `429` response with
//!   `Retry-After`, for server-side use.
//!
//! Wire a cache for HTTP as below: `ttl_fn` returns `None` (do not store) for what must not
//! be shared, and `staleness_fn` keeps a response from being served stale longer than it
//! allows (within the cache's own `max_staleness`).
//!
//! ```
//! # #[cfg(feature = "cache")] {
//! use http::{Request, Response};
//! use tower_breakwater::cache::CacheLayer;
//! use tower_breakwater::http::{HttpClassifier, HttpKey, is_storable, max_age, stale_allowance};
//!
//! let keys = HttpKey::new();
//! let rules = keys.clone();
//! let layer = CacheLayer::builder()
//!     .name("risk")
//!     .key(move |req: &Request<()>| keys.key(req))
//!     .ttl_fn(move |res: &Response<bytes::Bytes>| {
//!         is_storable(res, &rules).then(|| max_age(res)).flatten()
//!     })
//!     .classifier(HttpClassifier::new())
//!     .max_staleness(std::time::Duration::from_secs(300))
//!     .staleness_fn(stale_allowance::<bytes::Bytes>)
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! # }
//! ```
//!
//! Enabled by the `http` cargo feature.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower_breakwater::classify::{Classify, Outcome};
//! use tower_breakwater::http::{HttpClassifier, HttpKey};
//!
//! let classifier = HttpClassifier::new();
//! let unavailable = Response::builder().status(503).body(()).unwrap();
//! assert_eq!(classifier.classify(Ok(&unavailable)), Outcome::Failure);
//!
//! let keys = HttpKey::new();
//! let get = Request::get("https://risk.example/merchants/42").body(()).unwrap();
//! let post = Request::post("https://risk.example/merchants/42").body(()).unwrap();
//! assert!(keys.key(&get).is_some());
//! assert!(keys.key(&post).is_none(), "unsafe methods are never coalesced or cached");
//! ```

mod cache_control;
mod classify;
mod key;
mod response;
mod retry_after;

pub use cache_control::{is_storable, max_age, stale_allowance};
pub use classify::HttpClassifier;
pub use key::{HttpKey, MAX_KEY_HEADERS, RequestKey, SafeMethod};
pub use response::rejection_response;
pub use retry_after::{parse_retry_after, retry_after};
