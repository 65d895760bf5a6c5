//! `HitCounter` on its own: what its errors say, and its background batcher's lifetime.

use std::time::Duration;

use hit_counter::store::{ErrorKind, HitCounter, StoreCounters};
use tokio::runtime::Handle;

use crate::common::{RedisServer, eventually, free_port};

#[tokio::test]
async fn errors_say_their_kind_and_carry_redis_own_words() {
    let redis = RedisServer::start().await;
    redis.run(&["SET", "hits", "abc"]);
    let broken = counter(redis.port);
    let nowhere = counter(free_port());

    let corrupt = broken.incr_hits().await.unwrap_err();
    let unavailable = nowhere.incr_hits().await.unwrap_err();

    assert_eq!(corrupt.kind, ErrorKind::Corrupt);
    let message = corrupt.to_string();
    assert!(
        message.starts_with("hit counter unusable: ") && message.contains("not an integer"),
        "{message}"
    );
    assert_eq!(unavailable.kind, ErrorKind::Unavailable);
    let message = unavailable.to_string();
    assert!(
        message.starts_with("redis unavailable: ") && message.len() > "redis unavailable: ".len(),
        "{message}"
    );
}

#[tokio::test]
async fn the_batcher_stops_when_the_last_counter_is_dropped() {
    let tasks = || Handle::current().metrics().num_alive_tasks();
    let counter = counter(free_port());
    let clone = counter.clone();

    drop(counter);
    let still_served = clone.incr_hits().await.unwrap_err().to_string();
    drop(clone);
    let stopped = eventually(Duration::from_secs(1), async || tasks() == 0).await;

    assert!(
        !still_served.contains("batcher stopped"),
        "a remaining clone lost its batcher: {still_served}"
    );
    assert!(
        stopped.is_some(),
        "a task outlived every counter: {} alive",
        tasks()
    );
}

/// A counter of the Redis on 127.0.0.1:`port`, with a 300 ms timeout and no `WAIT`.
fn counter(port: u16) -> HitCounter {
    HitCounter::new(
        "127.0.0.1",
        port,
        Duration::from_millis(300),
        0,
        StoreCounters::default(),
    )
    .unwrap()
}
