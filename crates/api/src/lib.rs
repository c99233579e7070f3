//! The orders HTTP API as a library: the `api` binary and the integration tests both build it through
//! [`startup::App`].

pub mod admin;
pub mod auth;
pub mod config;
pub mod console;
pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod rate_limit;
pub mod routes;
pub mod serve;
pub mod startup;
pub mod state;
pub mod timestamp;

pub use config::Config;
pub use startup::App;
