//! The one integration-test binary: the real service over real HTTP against a real
//! `redis-server` per test (see `common`).

mod common;

mod api;
mod cli;
mod compose;
mod harness;
mod hostile;
mod metrics;
mod misbehaving_redis;
mod redis_failures;
mod scale_out;
mod shutdown;
mod store;
mod swarm;
