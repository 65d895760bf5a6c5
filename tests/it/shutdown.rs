//! Graceful shutdown: readiness off, no new connections, in-flight requests finish, exit 0.

use std::time::{Duration, Instant};

use crate::common::{RedisServer, ServiceProcess, accepts, send, spawn_app};

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let redis = RedisServer::start();
    let mut service = ServiceProcess::with_redis(redis.port, &[("REDIS_TIMEOUT_MS", "5000")]);
    let port = service.port;
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Arrange: Redis stalls for a second, so the next page view waits inside the service.
    let sleeping = redis.in_background(&["DEBUG", "SLEEP", "1"]);
    std::thread::sleep(Duration::from_millis(100));
    let in_flight = runtime.spawn(async move {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let response = send(port, raw).await;
        (response, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !in_flight.is_finished(),
        "the request must still be waiting on Redis"
    );

    // Act: SIGTERM while it waits.
    let signalled = Instant::now();
    service.signal("TERM");
    std::thread::sleep(Duration::from_millis(100));
    let refused_while_draining = !accepts(port);
    let (response, answered) = runtime.block_on(in_flight).unwrap();
    let status = service.wait();
    sleeping.join().unwrap();

    // Assert: it was in flight at the signal (sent before, answered after) and it completed.
    assert!(
        answered > signalled,
        "the answer came before the signal: nothing was in flight"
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.body(), "Hello World! 1 times.");
    assert!(
        refused_while_draining,
        "new connections were still accepted during the drain"
    );
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(redis.hits(), Some(1));
    let log = service.log();
    let log: Vec<&str> = log.lines().collect();
    let shutdown_at = log.iter().position(|l| l.contains("shutdown requested"));
    let request_at = log
        .iter()
        .position(|l| l.contains("request") && l.contains("status=200"));
    assert!(
        shutdown_at.is_some() && request_at > shutdown_at,
        "the request was not logged as finishing after shutdown began:\n{}",
        log.join("\n")
    );
}

#[tokio::test]
async fn readiness_turns_503_as_soon_as_shutdown_begins() {
    let redis = RedisServer::start();
    let app = spawn_app(redis.port).await;
    let port = app.port;
    assert_eq!(app.get("/readyz").await.status, 200);

    // A readiness probe waits on a stalled Redis while shutdown begins.
    let sleeping = redis.in_background(&["DEBUG", "SLEEP", "0.5"]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let probe = tokio::spawn(async move {
        send(
            port,
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!probe.is_finished());
    app.shutdown().await;

    let response = probe.await.unwrap();
    tokio::task::spawn_blocking(move || sleeping.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (response.status, response.body().as_str()),
        (503, r#"{"status":"unavailable","reason":"shutting down"}"#)
    );
    assert!(!accepts(port), "the listener is closed");
}
