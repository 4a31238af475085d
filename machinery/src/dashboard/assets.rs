//! The dashboard's stylesheet and script, compiled into the binary and served by the
//! dashboard itself (no CDN, no build step, no inline code for the Content-Security-Policy to
//! allow).

use axum::http::header;
use axum::response::IntoResponse;

/// Where the stylesheet is served.
pub(crate) const CSS_PATH: &str = "/assets/dashboard.css";
/// Where the script is served.
pub(crate) const JS_PATH: &str = "/assets/dashboard.js";

const CSS: &str = include_str!("assets/dashboard.css");
/// Refreshes the overview, draws the chart, asks before a purge.
const JS: &str = include_str!("assets/dashboard.js");

/// `GET /assets/dashboard.css`.
pub(crate) async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

/// `GET /assets/dashboard.js`.
pub(crate) async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
}
