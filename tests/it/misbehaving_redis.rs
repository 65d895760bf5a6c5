//! Redis misbehaving in ways other than "down": hung, paused, read-only, full, loading,
//! holding garbage, a peer that never answers, a peer that hangs up at once.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::relay::Relay;
use crate::common::{RedisServer, ServiceProcess, eventually, http, spawn_app_with, test_config};

const TIMEOUT_MS: u64 = 300;

async fn app_with_short_timeout(redis_port: u16) -> crate::common::TestApp {
    let mut config = test_config(redis_port);
    config.redis_timeout = Duration::from_millis(TIMEOUT_MS);
    spawn_app_with(config).await
}

fn assert_503_with_retry_after(response: &crate::common::Response, context: &str) {
    assert_eq!(response.status, 503, "{context}: {}", response.body());
    assert_eq!(response.header("retry-after"), Some("1"), "{context}");
}

#[tokio::test]
async fn a_hung_redis_gives_503_within_the_timeout_and_the_service_recovers_by_itself() {
    let redis = RedisServer::start().await;
    let app = app_with_short_timeout(redis.port).await;
    assert_eq!(app.get("/").await.hits(), 1);

    // Three page views while Redis sleeps: each times out, but its INCR was sent.
    const WHILE_ASLEEP: i64 = 3;
    let sleeping = redis.asleep_for(1.5).await;
    for _ in 0..WHILE_ASLEEP {
        let started = Instant::now();
        let response = app.get("/").await;
        let took = started.elapsed();
        assert_503_with_retry_after(&response, "while Redis sleeps");
        assert!(
            took < Duration::from_millis(TIMEOUT_MS + 200),
            "took {took:?}"
        );
    }
    assert_eq!(app.get("/readyz").await.status, 503);
    tokio::task::spawn_blocking(move || sleeping.join().unwrap())
        .await
        .unwrap();
    let recovered = eventually(Duration::from_secs(1), async || {
        app.get("/").await.status == 200
    })
    .await;

    assert!(recovered.is_some(), "no 200 within 1 s of Redis waking up");
    assert_eq!(app.get("/readyz").await.status, 200);
    // A 503 after a timeout does not mean "not counted": the INCRs that timed out were
    // already sent, and Redis may run them when it wakes. Counted views are never lost, and
    // none is counted twice (the service never retries an INCR).
    let hits = redis.hits().unwrap();
    let served = 2; // the first view and the recovery probe
    assert!(
        (served..=served + WHILE_ASLEEP).contains(&hits),
        "hits {hits}"
    );
}

#[tokio::test]
async fn client_pause_is_survived_the_same_way() {
    let redis = RedisServer::start().await;
    let app = app_with_short_timeout(redis.port).await;
    assert_eq!(app.get("/").await.status, 200);

    redis.run(&["CLIENT", "PAUSE", "1000", "ALL"]);
    let started = Instant::now();
    let response = app.get("/").await;
    let took = started.elapsed();
    let recovered = eventually(Duration::from_secs(2), async || {
        app.get("/").await.status == 200
    })
    .await;

    assert_503_with_retry_after(&response, "while clients are paused");
    assert!(
        took < Duration::from_millis(TIMEOUT_MS + 200),
        "took {took:?}"
    );
    assert!(recovered.is_some(), "never recovered after the pause");
}

#[tokio::test]
async fn a_counter_that_is_not_an_integer_or_would_overflow_is_a_500_never_a_panic() {
    let redis = RedisServer::start().await;
    let app = app_with_short_timeout(redis.port).await;
    for (value, why) in [
        ("abc", "not an integer"),
        ("9223372036854775807", "at i64::MAX"),
    ] {
        redis.run(&["SET", "hits", value]);
        let response = app.get("/").await;
        assert_eq!(response.status, 500, "{why}");
        assert_eq!(
            response.body(),
            "Internal Server Error: the hit counter is broken.",
            "{why}"
        );
        assert_eq!(
            response.header("retry-after"),
            None,
            "{why}: waiting will not fix it"
        );
    }
    redis.run(&["DEL", "hits"]);
    redis.run(&["LPUSH", "hits", "x"]);
    assert_eq!(app.get("/").await.status, 500, "a list under the key");
    assert_eq!(app.get("/readyz").await.status, 200, "Redis itself is fine");

    redis.run(&["DEL", "hits"]);
    redis.run(&["SET", "hits", "41"]);
    assert_eq!(
        app.get("/").await.body(),
        "Hello World! 42 times.",
        "repaired, it counts on"
    );
}

#[tokio::test]
async fn readonly_and_out_of_memory_errors_are_503s_until_redis_is_healthy_again() {
    let redis = RedisServer::start().await;
    let app = app_with_short_timeout(redis.port).await;
    assert_eq!(app.get("/").await.hits(), 1);

    // A failover demoted this server to a replica (of a master that is not there).
    let dead_master = crate::common::free_port();
    redis.run(&["REPLICAOF", "127.0.0.1", &dead_master.to_string()]);
    assert_503_with_retry_after(&app.get("/").await, "READONLY");
    redis.run(&["REPLICAOF", "NO", "ONE"]);
    assert_eq!(app.get("/").await.hits(), 2);

    redis.run(&["CONFIG", "SET", "maxmemory", "1"]);
    assert_503_with_retry_after(&app.get("/").await, "OOM");
    redis.run(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(app.get("/").await.hits(), 3);
}

#[tokio::test]
async fn a_redis_still_loading_its_data_gives_503s_then_serves() {
    let mut redis = RedisServer::start().await;
    redis.run(&["SET", "hits", "10"]);
    redis.run(&["DEBUG", "POPULATE", "20000"]);
    redis.run(&["SAVE"]);
    redis.stop().await;
    // ~1 s of loading, answering -LOADING meanwhile.
    redis
        .restart_unready(&[
            "--key-load-delay",
            "50",
            "--loading-process-events-interval-bytes",
            "1024",
        ])
        .await;
    let app = app_with_short_timeout(redis.port).await;

    let during = app.get("/").await;
    let readyz = app.get("/readyz").await;
    let recovered = eventually(Duration::from_secs(10), async || {
        app.get("/").await.status == 200
    })
    .await;

    assert_503_with_retry_after(&during, "LOADING");
    assert_eq!(readyz.status, 503);
    assert!(recovered.is_some(), "never served after loading");
    assert_eq!(
        redis.hits(),
        Some(11),
        "the saved count survived; the 503 did not count"
    );
}

/// A fake Redis on a free port: accepts connections and either holds them silently or
/// closes them at once. Counts the connections it got.
fn fake_redis(hang_up: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::Relaxed);
            if !hang_up {
                held.push(stream);
            }
        }
    });
    (port, accepted)
}

async fn misbehaving_peer_is_survived(hang_up: bool) {
    const REQUESTS: usize = 100;
    const CLIENTS: usize = 25;
    let peer = if hang_up {
        "hang-up peer"
    } else {
        "silent peer"
    };
    let (port, accepted) = fake_redis(hang_up);
    let service =
        ServiceProcess::with_redis(port, &[("REDIS_TIMEOUT_MS", &TIMEOUT_MS.to_string())]).await;
    let rss_before = service.rss_kb();
    let started = Instant::now();
    let cpu_before = service.cpu_ticks();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let port = service.port;
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for _ in 0..REQUESTS / CLIENTS {
                    let one = Instant::now();
                    let response = http::get(port, "/").await.expect("an answer");
                    slowest = slowest.max(one.elapsed());
                    assert_503_with_retry_after(&response, peer);
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for client in clients {
        slowest = slowest.max(client.await.unwrap());
    }
    let busy_ticks = service.cpu_ticks() - cpu_before;
    let idle_from = service.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await; // an idle second, measured
    let idle_ticks = service.cpu_ticks() - idle_from;
    let rss_growth_kb = service.rss_kb().saturating_sub(rss_before);
    let connections = accepted.load(Ordering::Relaxed);

    println!(
        "{REQUESTS} requests in {:?}: slowest {slowest:?}, {connections} connections to the peer, \
         CPU {busy_ticks} ticks while serving and {idle_ticks} ticks idle over 1 s, RSS +{rss_growth_kb} KiB",
        started.elapsed()
    );
    assert!(
        slowest < Duration::from_millis(TIMEOUT_MS + 200),
        "slowest {slowest:?}"
    );
    assert!(
        idle_ticks <= 2,
        "busy while idle: {idle_ticks} ticks (10 ms each) in 1 s"
    );
    assert!(
        connections <= REQUESTS,
        "{connections} connections for {REQUESTS} requests"
    );
    assert!(rss_growth_kb < 2048, "RSS grew by {rss_growth_kb} KiB");
}

#[tokio::test]
async fn a_redis_that_accepts_but_never_answers_gives_bounded_503s_and_no_busy_loop() {
    misbehaving_peer_is_survived(false).await;
}

#[tokio::test]
async fn a_redis_that_closes_every_connection_gives_fast_503s_and_no_busy_loop() {
    misbehaving_peer_is_survived(true).await;
}

/// The case the connection swap in `store.rs` exists for: the old connection stays open and
/// silent while a new one would be answered. redis-rs never gives up on such a connection by
/// itself (this test fails with the swap removed).
#[tokio::test]
async fn a_connection_left_open_but_silent_is_replaced_by_a_fresh_one() {
    let redis = RedisServer::start().await;
    let relay = Relay::to(redis.port).await;
    let app = app_with_short_timeout(relay.port).await;
    assert_eq!(app.get("/").await.hits(), 1);

    relay.cut_open_connections();
    let stuck = app.get("/").await;
    let recovered = eventually(Duration::from_secs(2), async || {
        app.get("/").await.status == 200
    })
    .await;

    assert_503_with_retry_after(&stuck, "a silent connection");
    assert!(
        recovered.is_some(),
        "still failing: the silent connection was never replaced"
    );
    assert_eq!(
        relay.opened(),
        2,
        "one fresh connection replaced the silent one"
    );
    assert_eq!(
        redis.hits(),
        Some(2),
        "the INCR sent into the silence never arrived"
    );
}
