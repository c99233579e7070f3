//! The api's integration tests: the real app on a real port, against real PostgreSQL (a fresh database per
//! test) and real Redis (a fresh queue per test).

// Test helpers unwrap freely: a panic here is a failed test with its message.
#![allow(clippy::unwrap_used)]

mod admin;
mod auth;
mod backlog;
mod browser;
mod chaos;
mod console;
mod events;
mod events_listener;
mod hardening;
mod healthcheck;
mod helpers;
mod observability;
mod openapi;
mod orders;
mod overload;
#[path = "../../../worker/tests/it/own_redis.rs"]
mod own_redis;
mod pgbouncer;
mod rate_limits;
mod scale_out;
mod serve;
mod stream_authority;
mod stream_races;
mod tls;
mod validation;
mod worker;
