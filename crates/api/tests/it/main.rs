//! The api's integration tests: the real app on a real port, against real PostgreSQL (a fresh database per
//! test) and real Redis (a fresh queue per test).

mod auth;
mod helpers;
mod openapi;
mod orders;
mod rate_limits;
mod validation;
