//! Models on disk ([`store`]) and in memory ([`registry`]).

pub mod registry;
pub mod store;
