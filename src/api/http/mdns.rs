//! The LAN advertisement: `_opta-lmx._tcp.local.` over mDNS/DNS-SD (the `mdns-sd` crate), the
//! service the coding CLI browses for when no host is set. Only a server that listens beyond
//! loopback is advertised (nobody else could reach it); the TXT record says where the APIs
//! are and whether keys are needed, never a key. Dropping the advert withdraws it.

use std::net::IpAddr;

use crate::config::ServerConfig;

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_opta-lmx._tcp.local.";

/// A running advertisement.
pub struct Advert {
    daemon: mdns_sd::ServiceDaemon,
    /// The instance's full name (`opta-lmx-HOST-PORT._opta-lmx._tcp.local.`).
    pub fullname: String,
}

/// Why there is no advertisement, or the advertisement.
pub enum Outcome {
    Advertised(Advert),
    /// `server.mdns: false`, or a loopback address.
    Off(&'static str),
    Failed(String),
}

/// Starts advertising `config`'s listener, as `hostname`, if it should be.
pub fn advertise(config: &ServerConfig, hostname: &str, auth_required: bool) -> Outcome {
    if !config.mdns {
        return Outcome::Off("server.mdns is false");
    }
    if config.host.is_loopback() {
        return Outcome::Off("the server listens on loopback only");
    }
    match start(config, hostname, auth_required) {
        Ok(a) => Outcome::Advertised(a),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn start(
    config: &ServerConfig,
    hostname: &str,
    auth_required: bool,
) -> Result<Advert, mdns_sd::Error> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    // Host labels: letters, digits and dashes.
    let host: String = hostname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let host = if host.is_empty() {
        "opta-lmx".into()
    } else {
        host
    };
    let instance = format!("opta-lmx-{host}-{}", config.port);
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let properties = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("scheme", scheme),
        ("api", "/v1"),
        ("admin", "/admin"),
        ("discovery", "/.well-known/opta-lmx"),
        ("websocket", "/v1/chat/stream"),
        ("auth", if auth_required { "required" } else { "open" }),
    ];
    let any = config.host.is_unspecified();
    let addresses: Vec<IpAddr> = if any { Vec::new() } else { vec![config.host] };
    let mut info = mdns_sd::ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &format!("{host}.local."),
        addresses.as_slice(),
        config.port,
        &properties[..],
    )?;
    // Listening on every address: advertise every interface's, as they come and go.
    if any {
        info = info.enable_addr_auto();
    }
    let fullname = info.get_fullname().to_string();
    daemon.register(info)?;
    Ok(Advert { daemon, fullname })
}

impl Drop for Advert {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
