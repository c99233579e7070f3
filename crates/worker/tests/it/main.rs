//! The worker's tests: the handler driven step by step, then real workers (in-process and spawned binaries)
//! against real PostgreSQL (a fresh database per test) and real Redis (a fresh queue per test).

// Test helpers unwrap freely: a panic here is a failed test with its message.
#![allow(clippy::unwrap_used)]

mod end_to_end;
mod handler;
mod helpers;
mod own_redis;
mod parking;
mod partial_loss;
mod processes;
mod queue_at_scale;
