//! `GET /metrics`: names, types, and counters that move with real traffic and real failures.

use std::time::Duration;

use crate::common::http::metric as sample;
use crate::common::{RedisServer, eventually, spawn_app};

#[tokio::test]
async fn metrics_export_every_family_and_scraping_counts_nothing() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    let first = app.get("/metrics").await;
    let metrics = app.get("/metrics").await.body();

    assert_eq!(first.status, 200);
    assert!(
        first
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        first.header("content-type")
    );
    for (name, kind) in [
        ("http_requests", "counter"),
        ("http_request_duration_seconds", "histogram"),
        ("redis_command_duration_seconds", "histogram"),
        ("redis_errors", "counter"),
        ("redis_up", "gauge"),
        ("http_connections_open", "gauge"),
        ("http_connections_rejected", "counter"),
        ("hit_counter_build", "info"),
        ("redis_connections_replaced", "counter"),
        ("page_views_unreplicated", "counter"),
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} ({kind}) missing:\n{metrics}"
        );
    }
    let version = format!(
        "hit_counter_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&metrics, &version), Some(1.0));
    // Every reason's series exists from the start, so a rate over it is 0, not absent.
    for reason in [
        "timeout",
        "not_primary",
        "readonly",
        "noreplicas",
        "masterdown",
        "loading",
    ] {
        let series = format!("redis_connections_replaced_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    assert_eq!(sample(&metrics, "page_views_unreplicated_total"), Some(0.0));
    assert!(metrics.ends_with("# EOF\n"));
    assert_eq!(redis.hits(), None, "scraping is not a page view");
}

#[tokio::test]
async fn counters_move_with_page_views_and_redis_failures() {
    let mut redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    for _ in 0..3 {
        app.get("/").await;
    }
    app.request("HEAD", "/").await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"] {
        assert_eq!(app.request(method, "/").await.status, 405, "{method}");
    }
    app.get("/nope").await;
    let up = app.get("/metrics").await.body();
    redis.kill();
    app.get("/").await;
    let down = app.get("/metrics").await.body();
    redis.restart().await;
    // The first command after the restart may find the old connection dead (one more 503).
    let recovered = eventually(Duration::from_secs(2), async || {
        app.get("/").await.status == 200
    })
    .await;
    assert!(recovered.is_some());
    let back = app.get("/metrics").await.body();

    let ok = r#"http_requests_total{route="/",method="GET",status="200"}"#;
    assert_eq!(sample(&up, ok), Some(3.0));
    assert_eq!(
        sample(
            &up,
            r#"http_requests_total{route="/",method="HEAD",status="200"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &up,
            r#"http_requests_total{route="other",method="GET",status="404"}"#
        ),
        Some(1.0)
    );
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let series = format!(r#"http_requests_total{{route="/",method="{method}",status="405"}}"#);
        assert_eq!(sample(&up, &series), Some(1.0), "{method}");
    }
    let unusual = r#"http_requests_total{route="/",method="other",status="405"}"#;
    assert_eq!(
        sample(&up, unusual),
        Some(1.0),
        "any other method is one series"
    );
    assert_eq!(
        sample(&up, r#"http_request_duration_seconds_count{route="/"}"#),
        Some(10.0),
        "3 GET, 1 HEAD, 6 refused methods"
    );
    assert_eq!(
        sample(
            &up,
            r#"redis_command_duration_seconds_count{command="INCR"}"#
        ),
        Some(3.0)
    );
    assert_eq!(sample(&up, "redis_up"), Some(1.0));

    assert_eq!(
        sample(
            &down,
            r#"http_requests_total{route="/",method="GET",status="503"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&down, r#"redis_errors_total{kind="unavailable"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&down, "redis_up"), Some(0.0));

    assert_eq!(sample(&back, ok), Some(4.0));
    let unavailable = sample(&back, r#"redis_errors_total{kind="unavailable"}"#).unwrap();
    assert_eq!(
        sample(
            &back,
            r#"http_requests_total{route="/",method="GET",status="503"}"#
        ),
        Some(unavailable),
        "every 503 is one unavailable-Redis error"
    );
    assert_eq!(sample(&back, "redis_up"), Some(1.0));
    let incr_after = sample(
        &back,
        r#"redis_command_duration_seconds_count{command="INCR"}"#,
    )
    .unwrap();
    let errors_after = sample(&back, r#"redis_errors_total{kind="unavailable"}"#).unwrap();
    let ok_after = sample(&back, ok).unwrap();
    assert_eq!(
        incr_after,
        ok_after + errors_after,
        "every INCR is timed, failed or not"
    );
}
