//! The heart of the orders service, shared by the `api` and `worker` binaries: domain types that can only hold
//! valid values, database functions over `impl PgExecutor`, the queue contract, configuration parts and
//! telemetry. Nothing here knows about HTTP.

pub mod config;
pub mod db;
pub mod domain;
pub mod queue;
pub mod telemetry;

/// The schema migrations, embedded at compile time and applied at start by both binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
