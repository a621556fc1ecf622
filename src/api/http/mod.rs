//! The transport under the routes: the listener (connection cap, timeouts, write progress,
//! HTTP/1 and HTTP/2, drain) and TLS. Nothing here knows a route or a model.

pub mod serve;
pub mod tls;
