//! The transport under the routes: the listener (connection cap, timeouts, write progress,
//! HTTP/1 and HTTP/2, drain), TLS, and the
//! mDNS advertisement of where the listener is. Nothing here knows a route or a model.

pub mod mdns;
pub mod serve;
pub mod tls;
