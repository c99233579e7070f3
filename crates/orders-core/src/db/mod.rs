//! Database access: free functions over `impl PgExecutor<'_>`, so each works on a pool or inside a
//! transaction. Queries are compile-checked against the schema (`.sqlx/` holds the offline cache).

pub mod admin;
pub mod batch;
pub mod events;
pub mod login_attempts;
pub mod orders;
mod pool;
pub mod sessions;
pub mod users;

pub use pool::{
    ConnectionBudget, KeptConnections, connect, connect_lazy, ensure_database, migrate,
    pool_options,
};

/// Whether `err` is a violation of the named constraint (how unique conflicts become client errors).
pub fn is_constraint_violation(err: &sqlx::Error, constraint: &str) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.constraint() == Some(constraint))
}
