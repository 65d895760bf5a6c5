//! The fast tier (`cargo test`): the real service over real HTTP against a real
//! `redis-server` per test, nothing else (see `common`).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod cli;
mod failover;
mod harness;
mod hostile;
mod metrics;
mod misbehaving_redis;
mod redis_failures;
mod shutdown;
mod store;
