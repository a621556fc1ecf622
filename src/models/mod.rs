//! Models on disk ([`store`]), in memory ([`registry`], sized by [`guard`]) and on their way
//! from the Hub ([`hub`], [`downloads`]).

pub mod compat;
pub mod downloads;
pub mod guard;
pub mod hub;
pub mod loader;
pub mod quantize;
pub mod registry;
pub mod store;
