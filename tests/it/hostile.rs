//! Hostile clients over real sockets: malformed and smuggled requests, oversized heads, bodies
//! on GET /, slowloris, clients that stop reading, connection floods. The service must answer
//! correctly, keep its memory flat, and count only real page views.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::http::{self, parse};
use crate::common::{
    RedisServer, ServiceProcess, eventually, spawn_app, spawn_app_with, test_config,
};

/// Requests that are not page views, and every status the service may answer them with.
/// "none" means the server closes the connection without an answer (not HTTP/1.x at all).
const NOT_PAGE_VIEWS: &[(&str, &[u8], &[u16])] = &[
    ("garbage", b"GARBAGE\r\n\r\n", &[400]),
    ("HTTP/0.9 request line", b"GET /\r\n\r\n", &[400]),
    ("unknown version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", &[400, 505]),
    ("NUL bytes", b"\x00\x01\x02\r\n\r\n", &[400]),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", &[400]),
    ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n  b\r\n\r\n", &[400]),
    ("invalid UTF-8 in the path", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", &[400]),
    ("invalid percent-encoding", b"GET /%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &[404]),
    ("encoded slash", b"GET /%2F HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &[404]),
    ("double slash", b"GET // HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &[404]),
    ("absurd method", b"FOOBAR / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &[405]),
    ("control character in the method", b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", &[400]),
    ("CONNECT", b"CONNECT x:80 HTTP/1.1\r\nHost: x:80\r\nConnection: close\r\n\r\n", &[400, 404, 405]),
    ("asterisk form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &[400, 404]),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", &[400]),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", &[400]),
    (
        "smuggling: Content-Length and Transfer-Encoding",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[400],
    ),
    (
        "smuggling: two Content-Lengths",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        &[400],
    ),
    (
        "smuggling: unknown transfer coding",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        &[400, 501],
    ),
    (
        "GET / with a body",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        &[400],
    ),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &[]),
];

/// Requests that are page views, each decided and documented in the README.
const PAGE_VIEWS: &[(&str, &[u8])] = &[
    ("query string", b"GET /?utm_source=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("empty query string", b"GET /? HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("fragment (dropped by the parser)", b"GET /#top HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n"),
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: x\nConnection: close\n\n"),
    ("absolute form", b"GET http://x/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("Content-Length: 0", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    (
        "h2c upgrade offer (ignored)",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    ),
];

#[tokio::test]
async fn malformed_and_smuggled_requests_get_an_error_and_never_count() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    for (name, raw, allowed) in NOT_PAGE_VIEWS {
        match http::send(app.port, raw).await {
            Ok(response) => assert!(
                allowed.contains(&response.status),
                "{name}: got {}, expected one of {allowed:?}",
                response.status
            ),
            Err(e) => assert!(
                allowed.is_empty() && e.kind() != std::io::ErrorKind::TimedOut,
                "{name}: no answer ({e})"
            ),
        }
    }

    assert_eq!(redis.hits(), None, "none of these is a page view");
    assert_eq!(app.get("/").await.hits(), 1, "and the service still counts");
}

#[tokio::test]
async fn the_documented_edge_cases_count_as_page_views() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await;

    for (n, (name, raw)) in PAGE_VIEWS.iter().enumerate() {
        let response = http::send(app.port, raw).await.unwrap();
        assert_eq!(response.status, 200, "{name}");
        assert_eq!(response.hits(), n as i64 + 1, "{name}");
    }
    let many_params: String = (0..1500).map(|i| format!("a{i}=1&")).collect();
    let raw = format!("GET /?{many_params} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(
        http::send(app.port, raw.as_bytes()).await.unwrap().status,
        200,
        "1500 query parameters"
    );

    assert_eq!(redis.hits(), Some(PAGE_VIEWS.len() as i64 + 1));
}

#[tokio::test]
async fn request_heads_over_the_limit_get_431() {
    let redis = RedisServer::start().await;
    let app = spawn_app(redis.port).await; // MAX_HEADER_BYTES=16384

    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(20_000));
    let many: String = (0..150).map(|i| format!("X-{i}: 1\r\n")).collect();
    let many_headers = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let fits = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(15_000)
    );

    for raw in [&big_header, &long_path, &many_headers] {
        assert_eq!(
            http::send(app.port, raw.as_bytes()).await.unwrap().status,
            431
        );
    }
    assert_eq!(
        http::send(app.port, fits.as_bytes()).await.unwrap().status,
        404,
        "a 15 KB path is within the limit"
    );
    assert_eq!(redis.hits(), None);
}

#[tokio::test]
async fn a_huge_or_endless_body_on_get_root_is_refused_without_being_read() {
    let redis = RedisServer::start().await;
    let service = ServiceProcess::with_redis(redis.port, &[]).await;

    // Announces 10 GB; the answer must come without the body being sent.
    let started = Instant::now();
    let huge = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\nabc";
    assert_eq!(http::send(service.port, huge).await.unwrap().status, 400);
    assert!(started.elapsed() < Duration::from_secs(1));

    // An endless chunked body: the client keeps sending until the server hangs up on it.
    let endless = TcpStream::connect(("127.0.0.1", service.port)).unwrap();
    let mut writer = endless.try_clone().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let feeder = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let _ = writer
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
            let chunk = format!("{:x}\r\n{}\r\n", 4096, "x".repeat(4096));
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if writer.write_all(chunk.as_bytes()).is_err() {
                    return true; // hung up on
                }
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            false
        })
    };
    let (answer, hung_up) = tokio::task::spawn_blocking(move || {
        let mut reader = endless;
        reader
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = [0u8; 512];
        let n = reader.read(&mut head).unwrap();
        let answer = parse(&head[..n]).expect("an answer");
        (answer, feeder.join().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(answer.status, 400);
    assert!(hung_up, "the server read the endless body for 5 s");
    // What the sockets' buffers hold, and no more: the server did not keep reading.
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < 32 << 20, "{sent} bytes of body were accepted");

    let rss_mb = service.rss_kb() / 1024;
    assert!(rss_mb < 20, "the body was buffered: RSS {rss_mb} MB");
    assert_eq!(redis.hits(), None);
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_read_timeout() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.header_read_timeout = Duration::from_millis(1000);
    config.idle_timeout = Duration::from_secs(5); // so only the header timeout can fire
    let app = spawn_app_with(config).await;
    let port = app.port;

    let closed_after = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let started = Instant::now();
        let head =
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head.iter().cycle() {
            if stream.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    })
    .await
    .unwrap();

    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}"
    );
    assert_eq!(redis.hits(), None);
}

#[tokio::test]
async fn a_slow_but_steady_client_is_not_mistaken_for_an_idle_one() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.idle_timeout = Duration::from_millis(300);
    let app = spawn_app_with(config).await;
    let port = app.port;

    // Eight bytes of the head every 100 ms, for most of a second: never 300 ms without a byte.
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Slow: aaaa\r\n\r\n";
        for piece in head.chunks(8) {
            stream.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        parse(&bytes)
    })
    .await
    .unwrap();

    let response = answer.expect("the slow client was cut off");
    assert_eq!(response.hits(), 1);
}

#[tokio::test]
async fn a_request_waiting_on_redis_longer_than_the_idle_timeout_is_not_cut_off() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.idle_timeout = Duration::from_millis(200);
    config.redis_timeout = Duration::from_secs(3);
    let app = spawn_app_with(config).await;

    // Redis answers only after 0.8 s: four idle timeouts with no byte on the connection.
    let sleeping = redis.asleep_for(0.8).await;
    let started = Instant::now();
    let response = app.get("/").await;
    let waited = started.elapsed();
    tokio::task::spawn_blocking(move || sleeping.join().unwrap())
        .await
        .unwrap();

    assert_eq!(response.hits(), 1, "cut off after {waited:?}");
    assert!(
        waited > Duration::from_millis(200),
        "Redis did not make it wait: {waited:?}"
    );
}

/// `http_connections_open` as the service reports it (the scrape's own connection included).
async fn open_connections(port: u16) -> f64 {
    let metrics = http::get(port, "/metrics").await.unwrap().body();
    http::metric(&metrics, "http_connections_open").expect("http_connections_open is exported")
}

#[tokio::test]
async fn idle_connections_and_clients_that_stop_reading_are_closed_after_the_idle_timeout() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.idle_timeout = Duration::from_millis(500);
    let app = spawn_app_with(config).await;
    let port = app.port;

    // Silent from the start, and silent after one keep-alive request.
    let silent = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        let n = stream.read(&mut [0u8; 16]).unwrap_or(0);
        (n, started.elapsed())
    });
    let keep_alive = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let started = Instant::now();
        let n = stream.read(&mut buf).unwrap_or(0);
        (n, started.elapsed())
    });
    for (n, after) in [silent.await.unwrap(), keep_alive.await.unwrap()] {
        assert_eq!(n, 0, "expected the server to close the connection");
        assert!(
            after >= Duration::from_millis(400) && after < Duration::from_millis(1500),
            "closed after {after:?}"
        );
    }

    // A client that pipelines requests for big responses and never reads them: the server's
    // writes stall, and the connection is dropped one idle timeout later.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
            while !stop.load(Ordering::Relaxed) {
                let stalled = |e: &std::io::Error| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                };
                match stream.write_all(request) {
                    Err(e) if !stalled(&e) => return true, // the server hung up
                    _ => {}
                }
            }
            false
        })
    };
    let connected = eventually(Duration::from_secs(1), async || {
        open_connections(port).await >= 2.0
    })
    .await;
    assert!(connected.is_some(), "the non-reading client is connected");
    let dropped = eventually(Duration::from_secs(5), async || {
        open_connections(port).await == 1.0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    assert!(
        dropped.is_some(),
        "the non-reading client was never disconnected"
    );
}

/// The p99 latency of `n` page views sent one after another, and their numbers; before each,
/// `drip` runs (at most every 200 ms).
async fn trickle(port: u16, n: usize, mut drip: impl FnMut()) -> (Duration, Vec<i64>) {
    let mut latencies = Vec::with_capacity(n);
    let mut numbers = Vec::with_capacity(n);
    let mut last_drip = Instant::now();
    for _ in 0..n {
        if last_drip.elapsed() > Duration::from_millis(200) {
            drip();
            last_drip = Instant::now();
        }
        let started = Instant::now();
        let response = http::get(port, "/")
            .await
            .expect("a normal client got no answer");
        latencies.push(started.elapsed());
        numbers.push(response.hits());
        tokio::time::sleep(Duration::from_millis(5)).await; // a steady trickle, not a burst
    }
    latencies.sort();
    (latencies[n * 99 / 100], numbers)
}

#[tokio::test]
async fn hundreds_of_slow_clients_do_not_slow_down_normal_ones() {
    const SLOW: usize = 300;
    const NORMAL: usize = 200;
    let redis = RedisServer::start().await;
    let service = ServiceProcess::with_redis(redis.port, &[]).await;
    let port = service.port;
    // The same page views alone first: the baseline of this machine, now.
    let (alone, mut numbers) = trickle(port, NORMAL, || {}).await;

    // Slowloris: each connection dribbles a header byte every 200 ms (never completing a
    // head within this test, so only their weight on the event loop is measured).
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let (beside, more) = trickle(port, NORMAL, || {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
    })
    .await;

    println!(
        "p99 of {NORMAL} page views alone: {alone:?}; beside {SLOW} slowloris connections: {beside:?}"
    );
    // Blocked by them, each page view would wait for the dribbles (ms each); a busy machine
    // moves both runs alike.
    assert!(
        beside < alone * 5 + Duration::from_millis(50),
        "p99 {beside:?} against {alone:?}"
    );
    numbers.extend(more);
    assert_eq!(numbers, (1..=2 * NORMAL as i64).collect::<Vec<_>>());
}

#[tokio::test]
async fn beyond_max_connections_new_clients_get_a_fast_503() {
    let redis = RedisServer::start().await;
    let mut config = test_config(redis.port);
    config.max_connections = 20;
    let app = spawn_app_with(config).await;
    let port = app.port;

    let held: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHo").unwrap(); // an unfinished head keeps it open
            s
        })
        .collect();
    // The kernel queues connections in order and the service accepts them in order: this one
    // comes after the 20 above, whatever the timing.
    let started = Instant::now();
    let shed = http::get(port, "/").await.unwrap();
    let took = started.elapsed();
    drop(held);

    assert_eq!(shed.status, 503);
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert!(took < Duration::from_millis(200), "took {took:?}");
    let served = eventually(Duration::from_secs(2), async || {
        app.get("/").await.status == 200
    })
    .await;
    assert!(served.is_some(), "capacity never came back");
    assert_eq!(redis.hits(), Some(1), "the shed request did not count");
}

#[tokio::test]
async fn a_storm_of_connection_close_requests_counts_exactly() {
    const CLIENTS: usize = 16;
    const EACH: usize = 200;
    let redis = RedisServer::start().await;
    let service = ServiceProcess::with_redis(redis.port, &[]).await;
    let port = service.port;

    let numbers: BTreeSet<i64> = http::visitors(port, CLIENTS, EACH)
        .await
        .into_iter()
        .collect();

    let total = (CLIENTS * EACH) as i64;
    assert_eq!(numbers, (1..=total).collect());
    assert_eq!(redis.hits(), Some(total));
    let rss_mb = service.rss_kb() / 1024;
    assert!(rss_mb < 20, "RSS {rss_mb} MB");
}

/// One generated request that must not count as a page view, and whether the client should
/// wait for an answer (a truncated request gets none: the client hangs up instead).
fn bad_request(rng: &mut fastrand::Rng) -> (Vec<u8>, bool) {
    let request = match rng.u64(..13) {
        0 => (0..1 + rng.u64(..200))
            .map(|_| rng.u64(..256) as u8)
            .chain(*b"\r\n\r\n")
            .collect(),
        1 => {
            let method = rng
                .choice([
                    "POST", "PUT", "DELETE", "PATCH", "TRACE", "OPTIONS", "BREW", "get", "G3T",
                ])
                .unwrap();
            format!("{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").into_bytes()
        }
        2 => format!(
            "GET /p{} HTTP/1.1\r\nHost: x\r\n\r\n",
            ascii(rng, 1, 60).replace(['?', '#'], "")
        )
        .into_bytes(),
        3 => format!(
            "GET / HTTP/1.1\r\nHost: x\r\nBad{}\r\n\r\n",
            ascii(rng, 0, 40).replace(':', "")
        )
        .into_bytes(),
        4 => format!(
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            1 + rng.u64(..64),
            ascii(rng, 10, 10)
        )
        .into_bytes(),
        5 => {
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
                .to_vec()
        }
        6 => b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n".to_vec(),
        7 => format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(17_000 + rng.u64(..20_000) as usize)
        )
        .into_bytes(),
        8 => format!(
            "GET / {}\r\nHost: x\r\n\r\n",
            rng.choice(["HTTP/2.0", "HTTP/1.2", "HTTX/1.1", "HTTP/1", "http/1.1"])
                .unwrap()
        )
        .into_bytes(),
        9 => {
            // A control character somewhere in the line or the Host header. Never in place of
            // CR or LF, and never tab (both would still make a valid request).
            let mut line = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            let at = loop {
                let at = rng.u64(..line.len() as u64) as usize;
                if !matches!(line[at], b'\r' | b'\n') {
                    break at;
                }
            };
            line[at] = loop {
                let c = rng.u64(..32) as u8;
                if !matches!(c, b'\t' | b'\r' | b'\n') {
                    break c;
                }
            };
            line
        }
        10 => {
            let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            let cut = 1 + rng.u64(..full.len() as u64 - 2) as usize;
            return (full[..cut].to_vec(), false);
        }
        11 => {
            let many: String = (0..101 + rng.u64(..100))
                .map(|i| format!("X-{i}: 1\r\n"))
                .collect();
            format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes()
        }
        _ => format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{}",
            ascii(rng, 3, 3)
        )
        .into_bytes(),
    };
    (request, true)
}

/// Printable ASCII, `min..=max` characters.
fn ascii(rng: &mut fastrand::Rng, min: u64, max: u64) -> String {
    let n = min + rng.u64(..max - min + 1);
    (0..n)
        .map(|_| (b'!' + rng.u64(..94) as u8) as char)
        .collect()
}

/// Sends one generated request: the status of the answer, or `None` when the client hung up
/// without waiting (`expect_answer` false) or got no answer.
async fn fire(port: u16, request: &[u8], expect_answer: bool) -> Option<u16> {
    if expect_answer {
        return http::send(port, request).await.ok().map(|r| r.status);
    }
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, request).await;
    None
}

#[tokio::test]
async fn ten_thousand_generated_bad_requests_and_a_slowloris_batch_change_nothing() {
    const BAD: usize = 10_000;
    const WORKERS: usize = 8;
    const GOOD_EVERY: usize = 20;
    const SLOWLORIS: usize = 200;
    let redis = RedisServer::start().await;
    let mut service = ServiceProcess::with_redis(
        redis.port,
        &[
            ("HEADER_READ_TIMEOUT_MS", "2000"),
            ("IDLE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let port = service.port;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rss_before = service.rss_kb();

    let max_rss = Arc::new(AtomicU64::new(rss_before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (max_rss, done, pid) = (max_rss.clone(), done.clone(), service.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                max_rss.fetch_max(
                    crate::common::proc_status_kb(pid, "VmRSS"),
                    Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The slowloris batch, dribbling one byte a second until the server cuts them off.
    let slowloris = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..SLOWLORIS)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
            .collect();
        for c in &mut conns {
            let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n");
        }
        let started = Instant::now();
        let mut open = conns.len();
        while open > 0 && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_secs(1));
            open = conns
                .iter_mut()
                .map(|c| c.write_all(b"X").is_ok())
                .filter(|ok| *ok)
                .count();
        }
        (open, started.elapsed())
    });

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(42 + w as u64);
                let mut good = Vec::new();
                let mut statuses = BTreeMap::<Option<u16>, usize>::new();
                for i in 0..BAD / WORKERS {
                    assert!(Instant::now() < deadline, "the test ran out of time");
                    let (request, expect_answer) = bad_request(&mut rng);
                    let status = fire(port, &request, expect_answer).await;
                    assert_ne!(
                        status,
                        Some(200),
                        "a bad request was served as a page: {:?}",
                        String::from_utf8_lossy(&request)
                    );
                    *statuses.entry(status).or_default() += 1;
                    if i % GOOD_EVERY == 0 {
                        let started = Instant::now();
                        let response = http::get(port, "/")
                            .await
                            .expect("a good request got no answer");
                        assert_eq!(response.status, 200, "a good request failed");
                        good.push((response.hits(), started.elapsed()));
                    }
                }
                (good, statuses)
            })
        })
        .collect();
    let mut good = Vec::new();
    let mut statuses = BTreeMap::<Option<u16>, usize>::new();
    for worker in workers {
        let (g, s) = worker.await.unwrap();
        good.extend(g);
        for (status, n) in s {
            *statuses.entry(status).or_default() += n;
        }
    }
    let (still_open, slow_for) = slowloris.join().unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let numbers: BTreeSet<i64> = good.iter().map(|(n, _)| *n).collect();
    let mut latencies: Vec<Duration> = good.iter().map(|(_, t)| *t).collect();
    latencies.sort();
    let max_rss_mb = max_rss.load(Ordering::Relaxed) as f64 / 1024.0;
    println!(
        "{BAD} bad requests ({:?}), {} good (p99 {:?}), {SLOWLORIS} slowloris cut after {slow_for:?}, RSS {:.1} -> max {max_rss_mb:.1} MB",
        statuses,
        good.len(),
        latencies[latencies.len() * 99 / 100],
        rss_before as f64 / 1024.0,
    );
    assert!(service.is_running(), "the service died");
    assert_eq!(
        still_open, 0,
        "slowloris connections outlived the header timeout"
    );
    assert_eq!(
        numbers.len(),
        good.len(),
        "two good requests saw the same number"
    );
    assert_eq!(
        redis.hits(),
        Some(good.len() as i64),
        "a bad request was counted"
    );
    assert!(max_rss_mb < 30.0, "RSS reached {max_rss_mb:.1} MB");
    assert_eq!(http::get(port, "/livez").await.unwrap().status, 200);
    assert!(service.terminate().await.success());
}
