//! The worker's HTTP side: wire types, errors, handlers, connections.

pub mod app;
pub mod auth;
pub mod errors;
pub mod handlers;
pub mod head_guard;
pub mod metrics;
pub mod openapi;
pub mod pages;
pub mod routes;
pub mod server;
pub mod types;
