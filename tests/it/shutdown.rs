//! Graceful shutdown: readiness off, no new connections, in-flight requests finish, exit 0.

use std::time::{Duration, Instant};

use crate::common::{
    RedisServer, ServiceProcess, accepts, eventually, http, spawn_app_with, test_config,
};

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let redis = RedisServer::start().await;
    let mut service = ServiceProcess::with_redis(redis.port, &[("REDIS_TIMEOUT_MS", "5000")]).await;
    let port = service.port;

    // Arrange: Redis stalls for a second, so the next page view waits inside the service.
    let sleeping = redis.asleep_for(1.0).await;
    let in_flight = tokio::spawn(async move {
        let response = http::get(port, "/").await;
        (response, Instant::now())
    });
    // The page view's connection is open in the service (the scrape's own is the other one);
    // with Redis asleep, the service cannot answer it before Redis wakes.
    let waiting = eventually(Duration::from_millis(500), async || {
        let metrics = http::get(port, "/metrics").await.unwrap().body();
        let open = http::metric(&metrics, "http_connections_open");
        open.is_some_and(|open| open >= 2.0) // the page view and this scrape
    })
    .await;
    assert!(waiting.is_some(), "the page view never reached the service");
    assert!(
        !in_flight.is_finished(),
        "the request must still be waiting on Redis"
    );

    // Act: SIGTERM while it waits.
    let signalled = Instant::now();
    service.signal("TERM");
    let refused = eventually(Duration::from_millis(500), async || !accepts(port).await).await;
    let (response, answered) = in_flight.await.unwrap();
    let status = service.wait().await;
    sleeping.join().unwrap();

    // Assert: it was in flight at the signal (sent before, answered after) and it completed.
    assert!(
        answered > signalled,
        "the answer came before the signal: nothing was in flight"
    );
    let response = response.expect("the in-flight request was answered");
    assert_eq!(response.status, 200);
    assert_eq!(response.body(), "Hello World! 1 times.");
    assert!(
        refused.is_some(),
        "new connections were still accepted during the drain"
    );
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(redis.hits(), Some(1));
    let log = service.log();
    let log: Vec<&str> = log.lines().collect();
    let shutdown_at = log.iter().position(|l| l.contains("shutdown requested"));
    let request_at = log
        .iter()
        .position(|l| l.contains(r#"path="/" status=200"#));
    assert!(
        shutdown_at.is_some() && request_at > shutdown_at,
        "the request was not logged as finishing after shutdown began:\n{}",
        log.join("\n")
    );
}

#[tokio::test]
async fn readiness_turns_503_as_soon_as_shutdown_begins() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.redis_timeout = Duration::from_secs(5);
    let app = spawn_app_with(config).await;
    let port = app.port;
    assert_eq!(app.get("/readyz").await.status, 200);

    // A readiness probe waits on a stalled Redis (asleep for longer than the wait for the
    // probe to arrive may take on a busy machine) while shutdown begins.
    let sleeping = redis.asleep_for(3.0).await;
    let probe = tokio::spawn(async move { http::get(port, "/readyz").await });
    let waiting = eventually(Duration::from_secs(2), async || {
        let metrics = app.get("/metrics").await.body();
        http::metric(&metrics, "http_connections_open").is_some_and(|open| open >= 2.0)
    })
    .await;
    assert!(waiting.is_some(), "the probe never reached the service");
    assert!(!probe.is_finished());
    app.shutdown().await;

    let response = probe.await.unwrap().expect("the probe was answered");
    tokio::task::spawn_blocking(move || sleeping.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (response.status, response.body().as_str()),
        (503, r#"{"status":"unavailable","reason":"shutting down"}"#)
    );
    assert!(!accepts(port).await, "the listener is closed");
}
