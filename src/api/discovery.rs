//! Zero-config pairing: `/.well-known/opta-lmx` and `/v1/discovery` tell a client on the LAN
//! (the coding CLI's `onboard`, `doctor`, an empty host setting) where this server can be
//! reached and whether it needs keys, in the first Opta-LMX's discovery shape. Open to anyone
//! who can reach the port, so it says whether a key is needed and never which.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// The discovery schema the CLI reads (`schema_version`).
const SCHEMA_VERSION: &str = "2026-03-02";

/// `GET /.well-known/opta-lmx` and `GET /v1/discovery`.
pub async fn discovery(State(state): State<AppState>) -> Json<Value> {
    let server = &state.config().server;
    let hardware = tokio::task::spawn_blocking(crate::system::Hardware::read)
        .await
        .ok();
    let hostname = hardware.as_ref().map(|h| h.hostname.clone());
    let hosts = candidate_hosts(server.host, hostname.as_deref());
    let tls = server.tls.is_some();
    let (http, ws) = if tls {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let url = |scheme: &str, host: &str| format!("{scheme}://{}:{}", bracket(host), server.port);
    let preferred = preferred_host(&hosts);
    let base = url(http, &preferred);
    let models = state.registry.loaded();
    let loaded: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    let in_flight: u32 = models
        .iter()
        .map(|m| {
            let s = m.engine.stats();
            s.active_sequences + s.queued_requests
        })
        .sum();
    let inference_key = super::auth::inference_key_required(&state.config());
    let admin_key = server.admin_key.is_some() || server.api_key.is_some();
    Json(json!({
        "service": "opta-lmx",
        "version": env!("CARGO_PKG_VERSION"),
        "schema_version": SCHEMA_VERSION,
        "instance_id": format!("{}:{}", hostname.as_deref().unwrap_or("unknown"), server.port),
        "security_profile": if inference_key || admin_key { "local-key" } else { "open" },
        "ready": !loaded.is_empty(),
        "loaded_model_count": loaded.len(),
        "loaded_models": loaded,
        "in_flight_requests": in_flight,
        // Admin events (`/admin/events`) start from now; a reconnect does not replay.
        "continuity": {"event_resume_supported": false},
        "mdns": {
            "service_type": super::http::mdns::SERVICE_TYPE,
            "advertised": state.mdns.is_some(),
            "instance": state.mdns,
        },
        "auth": {
            "admin_key_required": admin_key,
            "inference_key_required": inference_key,
            "supabase_jwt_enabled": false,
        },
        "endpoints": {
            "preferred_base_url": base,
            "base_urls": hosts.iter().map(|h| url(http, h)).collect::<Vec<_>>(),
            "openai_base_url": format!("{base}/v1"),
            "admin_base_url": format!("{base}/admin"),
            "websocket_url": format!("{}/v1/chat/stream", url(ws, &preferred)),
        },
        "client_probe_order": ["/.well-known/opta-lmx", "/v1/discovery", "/healthz", "/v1/models"],
        "hardware_summary": hardware.map(|h| json!({
            "chip": h.chip_name,
            "memory_gb": h.memory_gb,
            "metal": h.metal_available,
        })),
    }))
}

/// Where clients may reach a server listening on `bind`: itself when it is one address;
/// for a wildcard, loopback, the machine's name (and its mDNS `.local` name) and its LAN
/// address.
fn candidate_hosts(bind: IpAddr, hostname: Option<&str>) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    let mut add = |h: String| {
        if !h.is_empty() && !hosts.contains(&h) {
            hosts.push(h);
        }
    };
    if !bind.is_unspecified() {
        add(bind.to_string());
        if bind.is_loopback() {
            add("localhost".into());
        }
        return hosts;
    }
    add("localhost".into());
    add("127.0.0.1".into());
    if let Some(name) = hostname {
        let name = name.to_lowercase();
        add(format!("{name}.local"));
        add(name);
    }
    if let Some(ip) = lan_address() {
        add(ip.to_string());
    }
    hosts
}

/// The address this machine reaches the LAN from: the source a datagram to a documentation
/// address would leave with (nothing is sent; `connect` on UDP only picks a route).
fn lan_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The host a client should try first: an mDNS name, then a private address, then anything
/// but loopback, else loopback.
fn preferred_host(hosts: &[String]) -> String {
    let private = |h: &String| match h.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_private(),
        _ => false,
    };
    let loopback =
        |h: &String| h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    hosts
        .iter()
        .find(|h| h.ends_with(".local"))
        .or_else(|| hosts.iter().find(|h| private(h)))
        .or_else(|| hosts.iter().find(|h| !loopback(h)))
        .or_else(|| hosts.first())
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// An IPv6 literal in brackets, as URLs spell it.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_bind_is_reached_on_loopback_only() {
        let hosts = candidate_hosts("127.0.0.1".parse().unwrap(), Some("box"));
        assert_eq!(hosts, ["127.0.0.1", "localhost"]);
        assert_eq!(preferred_host(&hosts), "127.0.0.1");
    }

    #[test]
    fn a_wildcard_bind_offers_the_machine_s_names_and_prefers_mdns() {
        let hosts = candidate_hosts("0.0.0.0".parse().unwrap(), Some("Studio"));
        assert_eq!(
            &hosts[..4],
            ["localhost", "127.0.0.1", "studio.local", "studio"]
        );
        assert_eq!(preferred_host(&hosts), "studio.local");
        let lan = vec!["localhost".to_string(), "10.0.0.5".to_string()];
        assert_eq!(preferred_host(&lan), "10.0.0.5");
        assert_eq!(bracket("::1"), "[::1]");
    }
}
