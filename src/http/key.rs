use http::header::{
    ACCEPT, AUTHORIZATION, COOKIE, HOST, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, PROXY_AUTHORIZATION, RANGE,
};
use http::{HeaderName, HeaderValue, Method, Request, Uri};

/// Request headers that make the response answer this one request only: `Range` (a `206`
/// partial response, RFC 9110 section 14.2) and the preconditions `If-Match`, `If-None-Match`,
/// `If-Modified-Since`, `If-Unmodified-Since` and `If-Range` (a `304` or `412`, RFC 9110
/// section 13.1).
const PER_REQUEST: [HeaderName; 6] = [
    RANGE,
    IF_MATCH,
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_UNMODIFIED_SINCE,
    IF_RANGE,
];

/// Request headers that carry the caller's credentials besides `Authorization`, making the
/// response answer this caller only: `Cookie` (a session, RFC 6265 section 5.4) and
/// `Proxy-Authorization` (RFC 9110 section 11.7.2).
const PER_CALLER: [HeaderName; 2] = [COOKIE, PROXY_AUTHORIZATION];

/// The most request headers an [`HttpKey`] can include.
pub const MAX_KEY_HEADERS: usize = 4;

/// A method that RFC 9110 (section 9.2.1) defines as *safe*: read-only, so two identical
/// requests may share one response. Only safe methods can be coalesced or cached; the type
/// makes an unsafe method (POST, PUT, PATCH, DELETE, ...) impossible to allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SafeMethod {
    /// `GET`.
    Get,
    /// `HEAD`.
    Head,
    /// `OPTIONS`.
    Options,
    /// `TRACE`.
    Trace,
}

impl SafeMethod {
    fn bit(self) -> u8 {
        match self {
            SafeMethod::Get => 1,
            SafeMethod::Head => 2,
            SafeMethod::Options => 4,
            SafeMethod::Trace => 8,
        }
    }

    fn of(method: &Method) -> Option<SafeMethod> {
        match *method {
            Method::GET => Some(SafeMethod::Get),
            Method::HEAD => Some(SafeMethod::Head),
            Method::OPTIONS => Some(SafeMethod::Options),
            Method::TRACE => Some(SafeMethod::Trace),
            _ => None,
        }
    }
}

/// The identity of an HTTP request for coalescing and caching: method, full URI, the `Host`
/// header when the URI has no authority, and the values of the chosen headers (absent and
/// empty are different). Two requests with equal keys get the same response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    headers: [Option<HeaderValue>; MAX_KEY_HEADERS],
}

impl RequestKey {
    /// The request method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI, as sent (scheme, authority, path and query where present).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

/// Builds [`RequestKey`]s from requests: the ready key function for the coalescing and cache
/// layers.
///
/// The key is the method, the **full** URI (scheme, authority, path and query), the `Host`
/// header when the URI carries no authority (server-side, origin-form requests), and the
/// values of the chosen headers: `Authorization` and `Accept` by default. Add every header
/// that changes the response (`Accept-Language`, a tenant header, ...).
///
/// One layer shared by several routes, callers or users never hands one caller's response
/// to another: the URI tells routes apart, `Authorization` tells users apart, and every other
/// request whose answer may be for it alone (its caller's session, a part, a precondition)
/// gets no key, as listed below. Two requests that differ only in a header the key leaves out
/// and that is not listed below (a trace id, `User-Agent`) do share one response: add such a
/// header to the key when it changes the response.
///
/// [`key`](Self::key) returns `None`, meaning "pass this request through, uncoalesced and
/// uncached", for:
/// - methods outside the allow-list (GET and HEAD by default; only [`SafeMethod`]s can be
///   allowed, so POST, PUT, PATCH and DELETE never get a key);
/// - a request with more than one value for a chosen header (or for `Host`), which a single
///   slot cannot represent exactly;
/// - a request carrying credentials other than `Authorization`, namely `Cookie` or
///   `Proxy-Authorization`, unless that header is one of the key's headers: its response is
///   for that caller's session. With `Cookie` in the key, only requests with the same cookie
///   string share a key (a request whose cookies come in several `Cookie` field lines, as
///   HTTP/2 sends them, has more than one value and gets none);
/// - a request carrying `Range` or a precondition (`If-None-Match`, `If-Modified-Since`,
///   `If-Match`, `If-Unmodified-Since`, `If-Range`), unless that header is one of the key's
///   headers: its answer (a `206` part, a `304` without body, a `412`) is meant for that
///   request alone, and sharing it with a plain GET of the same URI would hand that GET a
///   part or an empty body. With the header in the key, only requests carrying the same
///   value share a key ([`is_storable`](super::is_storable) still refuses `206` and `304`
///   responses, so such keys coalesce but cache only complete responses).
///
/// Building a key clones the method, URI and header values: reference-count increments for
/// `Bytes`-backed parts (a URI or header value freshly parsed from a `Vec` may allocate once
/// on its first clone).
#[derive(Debug, Clone)]
pub struct HttpKey {
    methods: u8,
    headers: [Option<HeaderName>; MAX_KEY_HEADERS],
}

impl Default for HttpKey {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpKey {
    /// GET and HEAD; headers `Authorization` and `Accept`.
    pub fn new() -> Self {
        HttpKey {
            methods: SafeMethod::Get.bit() | SafeMethod::Head.bit(),
            headers: [Some(AUTHORIZATION), Some(ACCEPT), None, None],
        }
    }

    /// Replaces the allowed methods.
    pub fn methods<const N: usize>(mut self, methods: [SafeMethod; N]) -> Self {
        self.methods = methods.iter().fold(0, |acc, m| acc | m.bit());
        self
    }

    /// Replaces the headers included in the key (at most [`MAX_KEY_HEADERS`]; more is a
    /// compile-time error). Pass an empty array to key on method and URI alone, only when
    /// no header changes the response.
    pub fn headers<const N: usize>(mut self, names: [HeaderName; N]) -> Self {
        const {
            assert!(
                N <= MAX_KEY_HEADERS,
                "an HttpKey holds at most MAX_KEY_HEADERS headers"
            )
        };
        self.headers = Default::default();
        for (slot, name) in self.headers.iter_mut().zip(names) {
            *slot = Some(name);
        }
        self
    }

    /// The headers included in the key.
    pub fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        self.headers.iter().flatten()
    }

    /// `true` if requests with `method` get a key.
    pub fn allows(&self, method: &Method) -> bool {
        SafeMethod::of(method).is_some_and(|m| self.methods & m.bit() != 0)
    }

    /// `true` if `headers` hold a `Range`, precondition or credential header (other than
    /// `Authorization`) the key does not include.
    fn is_per_request(&self, headers: &http::HeaderMap) -> bool {
        !headers.is_empty()
            && PER_REQUEST
                .iter()
                .chain(&PER_CALLER)
                .any(|h| headers.contains_key(h) && !self.header_names().any(|k| k == h))
    }

    /// The key of `req`, or `None` to pass it through (see the type docs).
    pub fn key<B>(&self, req: &Request<B>) -> Option<RequestKey> {
        if !self.allows(req.method()) || self.is_per_request(req.headers()) {
            return None;
        }
        let single = |name: &HeaderName| -> Result<Option<HeaderValue>, ()> {
            let mut all = req.headers().get_all(name).iter();
            let first = all.next().cloned();
            if all.next().is_some() {
                Err(())
            } else {
                Ok(first)
            }
        };
        let host = if req.uri().authority().is_none() {
            single(&HOST).ok()?
        } else {
            None
        };
        let mut headers: [Option<HeaderValue>; MAX_KEY_HEADERS] = Default::default();
        for (slot, name) in headers.iter_mut().zip(&self.headers) {
            if let Some(name) = name {
                *slot = single(name).ok()?;
            }
        }
        Some(RequestKey {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT_LANGUAGE;

    fn get(uri: &str) -> http::request::Builder {
        Request::get(uri)
    }

    #[test]
    fn only_allowed_safe_methods_get_a_key() {
        let k = HttpKey::new();
        for m in [Method::GET, Method::HEAD] {
            let req = Request::builder()
                .method(m.clone())
                .uri("https://a/x")
                .body(())
                .unwrap();
            assert!(k.key(&req).is_some(), "{m}");
        }
        for m in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
            Method::CONNECT,
        ] {
            let req = Request::builder()
                .method(m.clone())
                .uri("https://a/x")
                .body(())
                .unwrap();
            assert!(k.key(&req).is_none(), "{m}");
        }
        let opts = HttpKey::new().methods([SafeMethod::Options]);
        let req = Request::options("https://a/x").body(()).unwrap();
        assert!(opts.key(&req).is_some());
        assert!(opts.key(&get("https://a/x").body(()).unwrap()).is_none());
    }

    #[test]
    fn distinguishes_uris_and_the_chosen_headers() {
        let k = HttpKey::new();
        let key = |b: http::request::Builder| k.key(&b.body(()).unwrap()).unwrap();
        let base = key(get("https://risk/m/1?v=1"));
        assert_eq!(base, key(get("https://risk/m/1?v=1")));
        assert_ne!(base, key(get("https://risk/m/2?v=1")), "path");
        assert_ne!(base, key(get("https://risk/m/1?v=2")), "query");
        assert_ne!(base, key(get("http://risk/m/1?v=1")), "scheme");
        assert_ne!(base, key(get("https://other/m/1?v=1")), "authority");
        assert_ne!(
            base,
            key(get("https://risk/m/1?v=1").header(AUTHORIZATION, "Bearer a")),
            "auth"
        );
        assert_ne!(
            key(get("https://risk/m/1").header(AUTHORIZATION, "Bearer a")),
            key(get("https://risk/m/1").header(AUTHORIZATION, "Bearer b")),
            "different users never share"
        );
        assert_ne!(
            base,
            key(get("https://risk/m/1?v=1").header(ACCEPT, "text/csv")),
            "accept"
        );
        assert_ne!(
            base,
            key(get("https://risk/m/1?v=1").header(ACCEPT, "")),
            "empty != absent"
        );
        assert_eq!(
            base,
            key(get("https://risk/m/1?v=1").header(ACCEPT_LANGUAGE, "fr")),
            "headers not chosen do not count"
        );
        let lang = HttpKey::new().headers([AUTHORIZATION, ACCEPT, ACCEPT_LANGUAGE]);
        let kl = |b: http::request::Builder| lang.key(&b.body(()).unwrap()).unwrap();
        assert_ne!(
            kl(get("https://r/").header(ACCEPT_LANGUAGE, "fr")),
            kl(get("https://r/").header(ACCEPT_LANGUAGE, "de"))
        );
        assert_eq!(lang.header_names().count(), 3);
    }

    #[test]
    fn origin_form_uris_use_the_host_header() {
        let k = HttpKey::new();
        let a = k
            .key(&get("/m/1").header(HOST, "a.internal").body(()).unwrap())
            .unwrap();
        let b = k
            .key(&get("/m/1").header(HOST, "b.internal").body(()).unwrap())
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn range_conditional_and_credential_requests_pass_through_unless_keyed() {
        let k = HttpKey::new();
        assert!(k.key(&get("https://r/").body(()).unwrap()).is_some());
        for h in PER_REQUEST.into_iter().chain(PER_CALLER) {
            let req = get("https://r/").header(&h, "x").body(()).unwrap();
            assert!(k.key(&req).is_none(), "{h}");
            let keyed = HttpKey::new().headers([AUTHORIZATION, ACCEPT, h.clone()]);
            let a = keyed.key(&req).expect("keyed header");
            assert_eq!(
                Some(&a),
                keyed.key(&req).as_ref(),
                "{h}: same value, same key"
            );
            let b = get("https://r/").header(&h, "y").body(()).unwrap();
            assert_ne!(Some(a), keyed.key(&b), "{h}");
        }
        let both = get("https://r/")
            .header(RANGE, "bytes=0-3")
            .header(IF_RANGE, "\"v1\"")
            .body(())
            .unwrap();
        assert!(HttpKey::new().headers([RANGE]).key(&both).is_none());
        assert!(
            HttpKey::new()
                .headers([RANGE, IF_RANGE])
                .key(&both)
                .is_some()
        );
    }

    #[test]
    fn repeated_chosen_headers_pass_through() {
        let k = HttpKey::new();
        let split_cookies = get("https://r/")
            .header(COOKIE, "a=1")
            .header(COOKIE, "b=2")
            .body(())
            .unwrap();
        assert!(
            HttpKey::new()
                .headers([COOKIE])
                .key(&split_cookies)
                .is_none()
        );
        let req = get("https://r/")
            .header(ACCEPT, "a")
            .header(ACCEPT, "b")
            .body(())
            .unwrap();
        assert!(k.key(&req).is_none());
        let req = get("/x")
            .header(HOST, "a")
            .header(HOST, "b")
            .body(())
            .unwrap();
        assert!(k.key(&req).is_none());
    }
}
