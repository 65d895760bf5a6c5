//! The tiers that need more than `redis-server`, each run by scripts/test when it can:
//!
//! - `haproxy`: replicas of the binary behind Debian's HAProxy on loopback;
//! - `compose`: the stack in a container engine through `docker compose`;
//! - `swarm`: the stack on a 3-node Docker Swarm whose nodes are containers.
//!
//! Every test is `#[ignore]`d, so `cargo test` runs none, and each also refuses to run unless
//! `HIT_COUNTER_TIERS` names its tier ([`common::tier`]), so no `cargo test` flag starts a
//! container: `HIT_COUNTER_TIERS=compose cargo test --test stack compose:: -- --ignored`.

#[path = "../common/mod.rs"]
mod common;

mod compose;
mod ha;
mod haproxy;
mod swarm;
