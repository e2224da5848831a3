//! Who may read the dashboard. On a loopback address, anyone who can reach
//! it (the machine's own users, or an SSH tunnel). On any other address, a
//! request must carry the token: in the query (`?token=...`, as in the URL
//! printed at start), which also sets it as a cookie for the page's own
//! requests, in that cookie, or as `Authorization: Bearer ...` (Prometheus,
//! `distripool status`). The token is derived from the cluster's key, so
//! whoever holds the key can compute it, and it says nothing of the key.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{query_value, Shared};

const COOKIE: &str = "distripool_token";

/// The dashboard token of `key`: 32 hex digits of HMAC-SHA256(key, a
/// label of its own). Without a key (TLS alone), a random one.
pub(super) fn token(key: &[u8]) -> String {
    let bytes: [u8; 16] = if key.is_empty() {
        crate::random_bytes()
    } else {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(b"distripool dashboard token v1");
        mac.finalize().into_bytes()[..16].try_into().expect("16 bytes")
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn from_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.split(';').find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('=')))
}

fn from_bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

pub(super) async fn check(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(req).await;
    };
    let in_query = query_value(req.uri().query(), "token").is_some_and(|t| same(t, token));
    let headers = req.headers();
    let held = from_cookie(headers).is_some_and(|t| same(t, token))
        || from_bearer(headers).is_some_and(|t| same(t, token));
    if !in_query && !held {
        return (
            StatusCode::UNAUTHORIZED,
            "this distripool dashboard needs its token: open the URL it printed when it started \
             (it ends in ?token=...), or send the header 'Authorization: Bearer TOKEN'\n",
        )
            .into_response();
    }
    let mut response = next.run(req).await;
    if in_query && !held {
        let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_follows_the_key_and_reveals_nothing_of_it() {
        let a = token(b"secret key");
        assert_eq!(a, token(b"secret key"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, token(b"another key"));
        assert!(!a.contains(&"secret key".bytes().map(|b| format!("{b:02x}")).collect::<String>()));
        assert_ne!(token(b""), token(b""), "without a key, a random token");
    }

    #[test]
    fn the_token_is_read_from_the_cookie_or_the_bearer_header() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; distripool_token=xyz"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t0k"));
        assert_eq!(from_cookie(&h), Some("xyz"));
        assert_eq!(from_bearer(&h), Some("t0k"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
