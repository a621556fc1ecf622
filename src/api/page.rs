//! The status page at `/` and `/ui`: one self-contained HTML file (no CDN, no build step)
//! that polls `/admin/status` and draws what it knows. It holds no data itself, so it needs
//! no key; the admin API it calls does, and the page asks for that key when it is refused.

use axum::response::Html;

/// `GET /` and `GET /ui`.
pub async fn status_page() -> Html<&'static str> {
    Html(include_str!("../../web/status.html"))
}
