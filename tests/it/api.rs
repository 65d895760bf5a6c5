//! The page, the probes and what counts as a view.

use std::collections::BTreeSet;

use crate::common::{RedisServer, http, spawn_app};

#[tokio::test]
async fn get_root_answers_the_exact_page_and_headers() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    let response = app.get("/").await;

    assert_eq!(response.status, 200);
    assert_eq!(response.raw_body, b"Hello World! 1 times.");
    assert_eq!(
        response.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(response.header("content-length"), Some("21"));
}

#[tokio::test]
async fn each_get_counts_exactly_one() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(app.get("/").await.hits());
    }

    assert_eq!(seen, [1, 2, 3, 4, 5]);
    assert_eq!(redis.hits(), Some(5));
}

#[tokio::test]
async fn the_count_continues_from_what_redis_holds() {
    let redis = RedisServer::start().await;
    redis.run(&["SET", "hits", "41"]);
    let app = spawn_app(redis.port).await;

    assert_eq!(app.get("/").await.body(), "Hello World! 42 times.");
}

#[tokio::test]
async fn head_other_methods_and_unknown_paths_do_not_count() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    let head = app.request("HEAD", "/").await;
    assert_eq!(head.status, 200);
    assert!(head.raw_body.is_empty());
    assert_eq!(
        head.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(head.header("cache-control"), Some("no-store"));
    assert_eq!(
        head.header("content-length"),
        None,
        "HEAD cannot know the page's length"
    );

    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let response = app.request(method, "/").await;
        assert_eq!(response.status, 405, "{method} /");
        let allow = response
            .header("allow")
            .unwrap_or_default()
            .replace(' ', "");
        assert_eq!(allow, "GET,HEAD", "{method} /");
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    for path in ["/favicon.ico", "/robots.txt", "/index.html", "/hits"] {
        let response = app.get(path).await;
        assert_eq!(response.status, 404, "GET {path}");
        assert_eq!(response.body(), "Not Found");
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    for path in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(app.get(path).await.status, 200, "GET {path}");
    }

    assert_eq!(redis.hits(), None, "nothing above is a page view");
    assert_eq!(app.get("/").await.hits(), 1);
}

#[tokio::test]
async fn concurrent_visitors_see_distinct_gapless_numbers() {
    const CLIENTS: usize = 8;
    const EACH: usize = 50;
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;
    let port = app.port;

    let all = http::visitors(port, CLIENTS, EACH).await;

    let total = (CLIENTS * EACH) as i64;
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "two visitors saw the same number"
    );
    assert_eq!(distinct, (1..=total).collect(), "the numbers have gaps");
    assert_eq!(redis.hits(), Some(total));
}

#[tokio::test]
async fn livez_and_readyz_answer_ok_when_redis_is_up() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    let livez = app.get("/livez").await;
    let readyz = app.get("/readyz").await;

    assert_eq!((livez.status, livez.body().as_str()), (200, "ok"));
    assert_eq!(
        (readyz.status, readyz.body().as_str()),
        (200, r#"{"status":"ready"}"#)
    );
    assert_eq!(livez.header("cache-control"), Some("no-store"));
}
