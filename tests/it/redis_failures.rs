//! Redis down, restarting, or not there yet: fast 503s, and recovery without a restart.

use std::time::{Duration, Instant};

use crate::common::{RedisServer, eventually, free_port, spawn_app};

/// What a visitor may wait, at most, when Redis is gone.
const FAIL_FAST: Duration = Duration::from_secs(1);
/// How soon after Redis is back the page must work again ("about a second").
const RECOVERY: Duration = Duration::from_millis(1500);

fn assert_is_the_fixed_503(response: &crate::common::Response) {
    assert_eq!(response.status, 503);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(
        response.body(),
        "Service Unavailable: the hit counter cannot be reached. Try again in a moment."
    );
}

#[tokio::test]
async fn redis_killed_gives_a_fast_503_while_livez_stays_up() {
    let mut redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;
    assert_eq!(app.get("/").await.status, 200);

    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let response = app.get("/").await;
        assert!(
            started.elapsed() < FAIL_FAST,
            "took {:?}",
            started.elapsed()
        );
        assert_is_the_fixed_503(&response);
    }

    assert_eq!(app.get("/livez").await.status, 200);
    let readyz = app.get("/readyz").await;
    assert_eq!(
        (readyz.status, readyz.body().as_str()),
        (
            503,
            r#"{"status":"unavailable","reason":"redis unavailable"}"#
        )
    );
}

#[tokio::test]
async fn the_service_recovers_by_itself_when_redis_restarts() {
    let mut redis =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let app = spawn_app(redis.port).await;
    for expected in 1..=3 {
        assert_eq!(app.get("/").await.hits(), expected);
    }

    redis.stop().await;
    assert_is_the_fixed_503(&app.get("/").await);
    redis.restart().await;
    let back = Instant::now();
    let recovered = eventually(RECOVERY, async || app.get("/").await.status == 200).await;

    assert!(
        recovered.is_some(),
        "still failing {:?} after redis came back",
        back.elapsed()
    );
    // The successful probe above was the 4th view; AOF kept the first three.
    assert_eq!(app.get("/").await.hits(), 5);
    assert_eq!(app.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn the_service_starts_before_redis_and_serves_once_it_appears() {
    let port = free_port();
    let app = spawn_app(port).await;

    assert_eq!(app.get("/livez").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 503);
    let started = Instant::now();
    assert_is_the_fixed_503(&app.get("/").await);
    assert!(started.elapsed() < FAIL_FAST);

    let mut redis = RedisServer::not_started(port);
    redis.restart().await;
    let recovered = eventually(RECOVERY, async || app.get("/").await.status == 200).await;

    assert!(recovered.is_some(), "never served 200 after redis started");
    assert_eq!(redis.hits(), Some(1), "the 503s did not count");
}
