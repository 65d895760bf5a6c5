//! A Redis failover behind the one address the service knows (a relay here, as a proxy in
//! front of Sentinel, a DNS name or a Kubernetes Service would be): a replica promoted, the old
//! primary demoted, new connections sent to the new primary, the old connection left open on
//! the old one. The service follows by itself; with `REDIS_WAIT_REPLICAS`, it shows only
//! numbers a replica holds.

use std::time::{Duration, Instant};

use crate::common::relay::Relay;
use crate::common::{RedisServer, TestApp, eventually, http, signal, spawn_app_with, test_config};

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Two Redis servers, A the primary and B its replica, caught up, and the service reaching A
/// through a relay, having counted to 3.
async fn a_primary_and_its_replica(
    wait_replicas: u32,
) -> (RedisServer, RedisServer, Relay, TestApp) {
    let (a, b) = (RedisServer::start().await, RedisServer::start().await);
    b.run(&["REPLICAOF", "127.0.0.1", &a.port.to_string()]);
    let relay = Relay::to(a.port).await;
    let mut config = test_config(relay.port);
    config.redis_wait_replicas = wait_replicas;
    // WAIT gives up after half of it: 1 s, which a replica's acknowledgement meets even on a
    // busy machine (250 ms, the default's half, did not always beside two busy loops).
    config.redis_timeout = REDIS_TIMEOUT;
    let app = spawn_app_with(config).await;
    let synced = eventually(Duration::from_secs(10), async || {
        // The replication link is up (the full sync done), and the service sees the primary.
        role(&b)[..4] == ["slave", "127.0.0.1", &a.port.to_string(), "connected"]
            && app.get("/readyz").await.status == 200
    })
    .await;
    assert!(synced.is_some(), "B never became A's replica");
    for n in 1..=3 {
        assert_eq!(app.get("/").await.hits(), n);
    }
    let caught_up = eventually(Duration::from_secs(5), async || b.hits() == Some(3)).await;
    assert!(caught_up.is_some(), "B never caught up");
    (a, b, relay, app)
}

/// `ROLE`, its words: `["master", ...]`, or `["slave", host, port, link state, ...]`.
fn role(redis: &RedisServer) -> Vec<String> {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut redis.conn()).unwrap();
    role.iter()
        .filter_map(|word| match word {
            redis::Value::BulkString(word) => Some(String::from_utf8_lossy(word).into_owned()),
            redis::Value::Int(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// `redis_connections_replaced_total` for `reason`.
async fn replaced(app: &TestApp, reason: &str) -> f64 {
    let metrics = app.get("/metrics").await.body();
    let series = format!("redis_connections_replaced_total{{reason=\"{reason}\"}}");
    http::metric(&metrics, &series).unwrap_or_else(|| panic!("no {series}"))
}

/// B promoted, A demoted to its replica: what Sentinel does.
fn fail_over(a: &RedisServer, b: &RedisServer) {
    b.run(&["REPLICAOF", "NO", "ONE"]);
    a.run(&["REPLICAOF", "127.0.0.1", &b.port.to_string()]);
}

#[tokio::test]
async fn after_a_failover_behind_the_same_address_page_views_follow_within_a_second() {
    let (a, b, relay, app) = a_primary_and_its_replica(0).await;

    fail_over(&a, &b);
    relay.send_new_to(b.port);
    let switched = Instant::now();
    let mut statuses = Vec::new();
    let mut number = None;
    let back = eventually(Duration::from_secs(3), async || {
        let page = app.get("/").await;
        statuses.push(page.status);
        number = http::hits_in(&page.raw_body);
        page.status == 200
    })
    .await;

    println!(
        "after the switch: {statuses:?}, 200 after {:?}",
        switched.elapsed()
    );
    // Without the replacement on READONLY, every page view stays on A and fails.
    let back = back.expect("page views never followed the failover");
    assert!(
        back < Duration::from_secs(1),
        "200 again only after {back:?}"
    );
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(number, Some(4), "the count continues from what B holds");
    assert_eq!(b.hits(), Some(4));
    assert_eq!(role(&a)[0], "slave");
    assert_eq!(
        replaced(&app, "readonly").await,
        1.0,
        "one swap, for READONLY"
    );
}

#[tokio::test]
async fn a_quiet_failover_turns_readiness_off_then_on_by_itself_and_the_next_page_view_works() {
    let (a, b, relay, app) = a_primary_and_its_replica(0).await;

    // A demoted while the address still leads to it: no node to write to behind the address.
    fail_over(&a, &b);
    let off = eventually(Duration::from_secs(2), async || {
        app.get("/readyz").await.status == 503
    })
    .await;
    let unready = app.get("/readyz").await;
    relay.send_new_to(b.port);
    let on = eventually(Duration::from_secs(2), async || {
        app.get("/readyz").await.status == 200
    })
    .await;
    let page = app.get("/").await;

    // Without ROLE, readiness stays on (a replica answers PING); without the replacement on
    // "not a primary", it never comes back (the connection stays on A).
    assert!(
        off.is_some(),
        "still ready while the address led to a replica"
    );
    assert_eq!(
        unready.status, 503,
        "ready again before the address changed"
    );
    assert!(
        on.is_some(),
        "never ready again once the address led to the new primary"
    );
    assert_eq!(page.status, 200, "ready, but the next page view failed");
    assert_eq!(page.hits(), 4);
    assert!(
        replaced(&app, "not_primary").await >= 1.0,
        "no swap for a replica"
    );
}

#[tokio::test]
async fn with_wait_replicas_a_replica_that_stops_acknowledging_gives_503s_and_no_number_it_lacks() {
    let (_a, b, _relay, app) = a_primary_and_its_replica(1).await;
    let pid = b.pid().unwrap();

    // B frozen: connected, acknowledging nothing.
    signal(pid, "STOP");
    let mut pages = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        pages.push((app.get("/").await, started.elapsed()));
    }
    let metrics = app.get("/metrics").await.body();
    signal(pid, "CONT");
    let mut number = None;
    let back = eventually(Duration::from_secs(5), async || {
        number = http::hits_in(&app.get("/").await.raw_body);
        number.is_some()
    })
    .await;

    for (page, took) in &pages {
        // Without WAIT these are 200s carrying numbers B does not hold.
        assert_eq!(page.status, 503, "a number B does not hold was shown");
        assert!(page.header("retry-after").is_some());
        // WAIT gives up at half of REDIS_TIMEOUT_MS (500 ms); a busy machine adds some.
        assert!(
            *took < Duration::from_millis(1500),
            "a refusal took {took:?}"
        );
    }
    assert_eq!(
        http::metric(&metrics, "page_views_unreplicated_total"),
        Some(3.0)
    );
    assert!(back.is_some(), "never served again once B acknowledged");
    // The refused page views were counted all the same (the in-doubt rule): after 3, 3
    // refused, then at least one more.
    assert!(number >= Some(7), "{number:?}");
}

#[tokio::test]
async fn with_wait_replicas_a_replica_slow_to_acknowledge_is_waited_for() {
    let (_a, b, _relay, app) = a_primary_and_its_replica(1).await;

    // B busy for 0.3 s: its acknowledgement comes late, but within WAIT's 1 s.
    let sleeping = b.asleep_for(0.3).await;
    let page = app.get("/").await;
    tokio::task::spawn_blocking(move || sleeping.join().unwrap())
        .await
        .unwrap();

    // A WAIT that gave up at once would refuse this page view.
    assert_eq!(
        page.status, 200,
        "a late acknowledgement was not waited for"
    );
    assert_eq!(page.hits(), 4);
    assert_eq!(b.hits(), Some(4));
}

#[tokio::test]
async fn with_wait_replicas_a_primary_without_replicas_is_not_ready() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.redis_wait_replicas = 1;
    let app = spawn_app_with(config).await;

    let ready = app.get("/readyz").await;
    let page = app.get("/").await;

    assert_eq!(ready.status, 503);
    assert_eq!(page.status, 503, "a number no replica holds was shown");
}
