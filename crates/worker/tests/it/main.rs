//! The worker's tests: the handler driven step by step, then real workers (in-process and spawned binaries)
//! against real PostgreSQL (a fresh database per test) and real Redis (a fresh queue per test).

mod end_to_end;
mod handler;
mod helpers;
mod processes;
