//! Who may use the dashboard, and which requests may change state.
//!
//! - Without a token (loopback only), requests must name a loopback host in `Host`, so a page
//!   on another site cannot reach the dashboard through DNS rebinding.
//! - With a token (`DASHBOARD_TOKEN`, required for a non-loopback address), every request
//!   carries it: an `Authorization: Bearer` header, the session cookie set by the login form,
//!   or `?token=` once (answered with the cookie and a redirect to the same page without it).
//!   Tokens are compared in constant time.
//! - Every state-changing request is a POST whose form carries the CSRF token, a random value
//!   drawn when the dashboard starts and written into each page's forms; a POST without it or
//!   with a wrong one gets 403.

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

use super::AppState;

/// The name of the session cookie that carries the token after a login.
pub(crate) const COOKIE: &str = "machinery_dashboard";

/// The security settings of one running dashboard.
#[derive(Clone)]
pub(crate) struct Security {
    /// The access token, when one is required.
    pub(crate) token: Option<String>,
    /// The CSRF token every POST must carry.
    pub(crate) csrf: String,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Security {
    pub(crate) fn new(token: Option<String>) -> Security {
        Security {
            token,
            csrf: random_token(),
        }
    }

    /// Whether `given` is the access token (constant time in the token's content).
    pub(crate) fn token_matches(&self, given: &str) -> bool {
        match &self.token {
            Some(token) => bool::from(token.as_bytes().ct_eq(given.as_bytes())),
            None => true,
        }
    }

    /// Whether `given` is this dashboard's CSRF token.
    pub(crate) fn csrf_matches(&self, given: Option<&str>) -> bool {
        given.is_some_and(|given| bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes())))
    }
}

/// 244 random bits from the operating system's generator (through UUID v4), as 64 hex digits.
pub(crate) fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether an address may be served without a token.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a `Host` header names this machine's loopback interface.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(is_loopback)
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The `token` query parameter, and the query without it.
fn query_token(uri: &Uri) -> Option<(String, String)> {
    let query = uri.query()?;
    let mut token = None;
    let mut rest = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "token" {
            token = Some(value.into_owned());
        } else {
            rest.push((name.into_owned(), value.into_owned()));
        }
    }
    let rest = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(rest)
        .finish();
    token.map(|token| (token, rest))
}

/// The cookie that keeps a session logged in: not readable by scripts, sent only to this
/// site's own requests.
pub(crate) fn session_cookie(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    ))
    .ok()
}

/// The access check in front of every route but `/login`.
pub(crate) async fn require_access(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let security = &state.security;
    if security.token.is_none() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or_default();
        if !loopback_host(host) {
            return (
                StatusCode::FORBIDDEN,
                "this dashboard answers to loopback host names only",
            )
                .into_response();
        }
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = bearer_token(headers).or_else(|| cookie_token(headers));
    if presented.is_some_and(|given| security.token_matches(given)) {
        return next.run(request).await;
    }
    if request.method() == Method::GET {
        if let Some((token, rest)) = query_token(request.uri()) {
            if security.token_matches(&token) {
                let path = request.uri().path();
                let target = if rest.is_empty() {
                    path.to_owned()
                } else {
                    format!("{path}?{rest}")
                };
                let mut response = Redirect::to(&target).into_response();
                if let Some(cookie) = session_cookie(&token) {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                }
                return response;
            }
        }
        if !request.uri().path().starts_with("/api/")
            && !request.uri().path().starts_with("/partials/")
        {
            return Redirect::to("/login").into_response();
        }
    }
    let mut response = Response::new(Body::from("a valid DASHBOARD_TOKEN is required\n"));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response
}

/// What every response says about how a browser may use it: no inline or foreign code
/// (`script-src 'self'`: even a value that escaped escaping could not run), no framing (no
/// clickjacking of the requeue and purge buttons), forms post only here, no referrer (a
/// `?token=` address never leaks), and nothing cached.
pub(crate) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
             form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The largest form body accepted.
const MAX_FORM: usize = 64 * 1024;

/// The CSRF check in front of every request that is not a GET or HEAD: its form (or an
/// `X-CSRF-Token` header) must carry the dashboard's CSRF token, else 403.
pub(crate) async fn require_csrf(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "form too large\n").into_response();
    };
    let header = parts
        .headers
        .get("x-csrf-token")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let field = form_urlencoded::parse(&bytes)
        .find(|(name, _)| name == "csrf")
        .map(|(_, value)| value.into_owned());
    if !state.security.csrf_matches(header.or(field).as_deref()) {
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token\n").into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.1.2.3",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "[::2]:80",
            "localhost.evil",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn tokens_compare_by_content() {
        let security = Security::new(Some("s3cret".to_owned()));
        assert!(security.token_matches("s3cret"));
        assert!(!security.token_matches("s3cre"));
        assert!(!security.token_matches("s3cret!"));
        assert!(security.csrf_matches(Some(&security.csrf.clone())));
        assert!(!security.csrf_matches(Some("")));
        assert!(!security.csrf_matches(None));
        assert_eq!(security.csrf.len(), 64);
        assert_ne!(security.csrf, Security::new(None).csrf);
    }

    #[test]
    fn query_token_is_taken_out() {
        let uri: Uri = "/tasks?state=SUCCESS&token=abc&page=2"
            .parse()
            .unwrap_or_default();
        let (token, rest) = query_token(&uri).unwrap_or_default();
        assert_eq!(token, "abc");
        assert_eq!(rest, "state=SUCCESS&page=2");
    }
}
