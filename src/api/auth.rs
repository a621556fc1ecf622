//! Who may call what: the inference key on `/v1` (and the dialects beside it), the admin key
//! on everything that changes what is loaded or on disk (`/admin`, and LM Studio's own load
//! and unload, which do the same things under other names), loopback-only admin when no key
//! is configured. One place, so a route added under another dialect's name cannot forget it.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{observe, AppState};
use crate::config::{ClientConfig, Config, ServerConfig};

/// The key a request presented, from `Authorization: Bearer` or `X-Admin-Key`.
pub(super) fn presented_key(headers: &HeaderMap, admin: bool) -> Option<&str> {
    if admin {
        if let Some(k) = headers.get("x-admin-key").and_then(|v| v.to_str().ok()) {
            return Some(k);
        }
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        // Anthropic's clients send their key as `x-api-key`.
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110, 11.1): `bearer` and `BEARER` are the same scheme, and clients send them.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time comparison so keys cannot be guessed byte by byte from timings.
fn keys_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether the inference routes need a key: the server's API key or any client's is set.
pub(crate) fn inference_key_required(config: &Config) -> bool {
    config.server.api_key.is_some() || config.clients.iter().any(|c| c.key.is_some())
}

/// Whether the request carries a key that opens the inference routes: the server's API key
/// or a configured client's; with no key configured at all, every request does.
fn api_key_ok(config: &Config, headers: &HeaderMap) -> bool {
    let mut keys = config
        .server
        .api_key
        .iter()
        .chain(config.clients.iter().filter_map(|c| c.key.as_ref()))
        .peekable();
    if keys.peek().is_none() {
        return true;
    }
    presented_key(headers, false).is_some_and(|p| keys.any(|k| keys_match(p, k)))
}

/// The configured client whose key the request carries, if any.
pub(super) fn client_of_key<'c>(
    config: &'c Config,
    headers: &HeaderMap,
) -> Option<&'c ClientConfig> {
    let presented = presented_key(headers, false)?;
    config
        .clients
        .iter()
        .find(|c| c.key.as_deref().is_some_and(|k| keys_match(presented, k)))
}

/// Route layer of [`super::routes::Access::Api`]: the API key, when one is configured.
pub(super) async fn require_api_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if api_key_ok(&state.config(), req.headers()) {
        return next.run(req).await;
    }
    observe::auth_failed(&state, &req, "api", StatusCode::UNAUTHORIZED);
    ApiError::Unauthorized("missing or invalid API key".into()).into_response()
}

/// Who may use `/admin`: with an admin key, its holders; else with an API key, its holders;
/// with no key at all, loopback clients only (unless `server.admin_open`), because loading,
/// unloading and deleting models is not for anyone on the LAN.
fn admin_access(
    server: &ServerConfig,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let key = server.admin_key.as_ref().or(server.api_key.as_ref());
    match key {
        Some(key) if presented_key(headers, true).is_some_and(|k| keys_match(k, key)) => Ok(()),
        Some(_) if server.admin_key.is_some() => Err(ApiError::Unauthorized(
            "missing or invalid admin key (X-Admin-Key or Authorization: Bearer)".into(),
        )),
        Some(_) => Err(ApiError::Unauthorized(
            "missing or invalid key: with no admin key configured, /admin needs the API key".into(),
        )),
        None if server.admin_open || peer.is_some_and(is_loopback) => Ok(()),
        None => Err(ApiError::Other {
            status: StatusCode::FORBIDDEN,
            message: "the admin API answers only this machine when no key is configured; set an admin key (OPTA_LMX_ADMIN_KEY) or server.admin_open".into(),
            code: "admin_forbidden",
        }),
    }
}

/// Loopback, including IPv4 loopback mapped into IPv6 (a dual-stack listener).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

/// Route layer of [`super::routes::Access::Admin`]: see [`admin_access`].
pub(super) async fn require_admin_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let peer = peer_ip(&req);
    match admin_access(&state.config().server, peer, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            observe::auth_failed(&state, &req, "admin", e.status());
            e.into_response()
        }
    }
}

/// `/metrics`: open when configured for a scraper, else guarded like `/admin`.
pub(super) async fn require_metrics_access(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.config().server.metrics_open {
        return next.run(req).await;
    }
    require_admin_key(State(state), req, next).await
}

/// Marks a LM Studio load that is let through without the admin key because it changes
/// nothing: the model it names is loaded already.
#[derive(Clone, Copy, Debug)]
pub struct AlreadyLoaded;

/// LM Studio's `POST /api/v1/models/load`: a load is an admin action (it evicts other
/// models and sizes memory), so it takes the same check as `/admin`. OpenClaw's bundled
/// provider preloads its model before turns with the inference key alone; a load of a
/// model that is loaded already changes nothing, so that one passes with the inference key
/// (marked [`AlreadyLoaded`], and the handler then changes nothing).
pub(super) async fn require_admin_unless_loaded(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let server = &state.config().server;
    let Err(admin_err) = admin_access(server, peer_ip(&req), req.headers()) else {
        return next.run(req).await;
    };
    if api_key_ok(&state.config(), req.headers()) {
        let (parts, body) = req.into_parts();
        let bytes = match super::read_body_of(body, &state).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let named = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("model")?.as_str().map(String::from));
        req = Request::from_parts(parts, axum::body::Body::from(bytes));
        if named.is_some_and(|m| state.registry.get(&m).is_some()) {
            req.extensions_mut().insert(AlreadyLoaded);
            return next.run(req).await;
        }
    }
    observe::auth_failed(&state, &req, "admin", admin_err.status());
    admin_err.into_response()
}

/// Who a request comes from, as far as the server can tell without trusting a header: its
/// address and the fingerprint of the key it presented. Used to share bounded stores fairly.
pub fn client_of(req: &Request) -> String {
    let ip = peer_ip(req).map_or_else(|| "-".into(), |ip| ip.to_string());
    let key =
        presented_key(req.headers(), false).map_or_else(|| "-".into(), crate::audit::fingerprint);
    format!("{ip} {key}")
}

fn peer_ip(req: &Request) -> Option<IpAddr> {
    observe::peer(req).map(|p| p.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_checks() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h, false), None);
        h.insert(header::AUTHORIZATION, "Bearer sk-1".parse().unwrap());
        assert_eq!(presented_key(&h, false), Some("sk-1"));
        // The scheme is case-insensitive; other schemes and empty tokens are no key.
        for (value, key) in [
            ("bearer sk-2", Some("sk-2")),
            ("BEARER  sk-3 ", Some("sk-3")),
            ("Basic c2stMQ==", None),
            ("Bearer ", None),
            ("Bearersk-4", None),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(presented_key(&h, false), key, "{value}");
        }
        h.insert("x-admin-key", "adm".parse().unwrap());
        assert_eq!(presented_key(&h, true), Some("adm"));
        assert!(keys_match("abc", "abc"));
        assert!(!keys_match("abc", "abd"));
        assert!(!keys_match("abc", "abcd"));
    }

    fn server(api: Option<&str>, admin: Option<&str>, open: bool) -> ServerConfig {
        ServerConfig {
            api_key: api.map(String::from),
            admin_key: admin.map(String::from),
            admin_open: open,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn admin_needs_a_key_when_any_is_set_and_loopback_when_none() {
        let lan: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        let local: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let mapped: Option<IpAddr> = Some("::ffff:127.0.0.1".parse().unwrap());
        let none = HeaderMap::new();
        let bearer = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {k}").parse().unwrap(),
            );
            h
        };
        let (api_key, admin_key) = (bearer("api"), bearer("adm"));
        let status = |r: Result<(), ApiError>| r.err().map(|e| e.status().as_u16());

        // Only an API key: it opens /admin too; nothing else does, not even from loopback.
        let c = server(Some("api"), None, false);
        assert_eq!(status(admin_access(&c, local, &none)), Some(401));
        assert_eq!(status(admin_access(&c, local, &admin_key)), Some(401));
        assert_eq!(status(admin_access(&c, lan, &api_key)), None);
        // An admin key: only it.
        let c = server(Some("api"), Some("adm"), false);
        assert_eq!(status(admin_access(&c, local, &api_key)), Some(401));
        assert_eq!(status(admin_access(&c, lan, &admin_key)), None);
        let mut x = HeaderMap::new();
        x.insert("x-admin-key", "adm".parse().unwrap());
        assert_eq!(status(admin_access(&c, lan, &x)), None);
        // No keys: loopback only, unless configured open.
        let c = server(None, None, false);
        assert_eq!(status(admin_access(&c, lan, &none)), Some(403));
        assert_eq!(status(admin_access(&c, None, &none)), Some(403));
        assert_eq!(status(admin_access(&c, local, &none)), None);
        assert_eq!(status(admin_access(&c, mapped, &none)), None);
        let c = server(None, None, true);
        assert_eq!(status(admin_access(&c, lan, &none)), None);
    }
}
