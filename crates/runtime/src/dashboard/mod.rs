//! The dashboard, its JSON API under `/api/v1/` and `/metrics`, served by
//! the orchestrator on its own runtime when asked for. Everything is
//! read-only. The page is one document with its script and style inside,
//! compiled into the library, and every URL it uses is relative, so it
//! works through an SSH tunnel or behind a proxy's path prefix.
//!
//! | file | what it does |
//! |---|---|
//! | `mod.rs` | [`Dashboard`]: binding, the routes, the URL to print |
//! | `access.rs` | the token for addresses other than loopback |
//! | `api.rs` | the JSON API the page and `distripool status` read |
//! | `metrics.rs` | `/metrics` in the Prometheus (OpenMetrics) text format |
//! | `history.rs` | tasks completed per second, sampled for the last minutes |
//! | `page.html` | the page |

mod access;
mod api;

pub use api::{event_value, worker_value};
mod history;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::orchestrator::CoreLink;
use crate::{resolve, Error, Result};

/// A running dashboard: the URL to open.
#[derive(Debug, Clone)]
pub struct Dashboard {
    url: String,
}

/// What every request handler reads.
struct State {
    core: CoreLink,
    /// Required on an address other than loopback.
    token: Option<String>,
    history: history::History,
    started: Instant,
}

type Shared = Arc<State>;

impl Dashboard {
    /// Bind `addr` and serve on the current runtime. `key` is the cluster's
    /// authentication key, from which the token is derived.
    pub(crate) async fn start(addr: &str, key: &[u8], core: CoreLink) -> Result<Self> {
        let wanted = resolve(addr)?;
        let listener = tokio::net::TcpListener::bind(wanted)
            .await
            .map_err(|e| Error::Listen { addr: wanted, source: e })?;
        let addr = listener.local_addr()?;
        let token = (!addr.ip().is_loopback()).then(|| access::token(key));
        let state = Arc::new(State {
            history: history::History::start(core.stats.clone()),
            core,
            token: token.clone(),
            started: Instant::now(),
        });
        let app = Router::new()
            .route("/", get(page))
            .route("/index.html", get(page))
            .route("/metrics", get(metrics::serve))
            .route("/api/v1/overview", get(api::overview))
            .route("/api/v1/workers", get(api::workers))
            .route("/api/v1/jobs", get(api::jobs))
            .route("/api/v1/events", get(api::events))
            .route("/api/v1/status", get(api::status))
            .fallback(api::not_found)
            .layer(axum::middleware::from_fn_with_state(state.clone(), access::check))
            .with_state(state);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("the dashboard on {addr} stopped: {e}");
            }
        });
        Ok(Self { url: url_of(addr, token.as_deref()) })
    }

    /// The URL to open: this host's name for an address that is every
    /// interface, and the token in the query when one is required.
    pub fn url(&self) -> &str {
        &self.url
    }
}

fn url_of(addr: SocketAddr, token: Option<&str>) -> String {
    let host = if addr.ip().is_unspecified() {
        crate::agent::hostname()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
    format!("http://{host}:{}/{query}", addr.port())
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        include_str!("page.html"),
    )
}

/// The value of `name` in a query string (`a=1&b=2`), if present.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_a_host_that_can_be_opened_and_carries_the_token() {
        let local: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        assert_eq!(url_of(local, None), "http://127.0.0.1:8787/");
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(url_of(v6, Some("ab")), "http://[::1]:80/?token=ab");
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(!url_of(any, None).contains("0.0.0.0"));
    }

    #[test]
    fn query_values_are_found_by_their_whole_name() {
        assert_eq!(query_value(Some("since=4&token=x"), "token"), Some("x"));
        assert_eq!(query_value(Some("xtoken=y"), "token"), None);
        assert_eq!(query_value(None, "token"), None);
    }
}
