//! The binary itself: configuration errors, the health check, log formats.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{RedisServer, ServiceProcess, binary, blocking_get, free_port};

/// Runs the binary with `vars` and returns (exit code, stderr), failing if it does not exit.
fn run_to_exit(vars: &[(&str, &str)], args: &[&str]) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut child = binary()
        .envs(vars.iter().copied())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.code().unwrap_or(-1), stderr, started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("hit-counter {args:?} with {vars:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_configuration_stops_start_up_with_exit_2_and_one_clear_line() {
    let cases = [
        (
            "PORT_REDIS",
            "abc",
            r#"PORT_REDIS="abc" is not a port number (1-65535)"#,
        ),
        (
            "PORT_REDIS",
            "70000",
            r#"PORT_REDIS="70000" is not a port number (1-65535)"#,
        ),
        ("PORT", "-1", r#"PORT="-1" is not a port number (1-65535)"#),
        ("PORT", "", r#"PORT="" is not a port number (1-65535)"#),
        (
            "PORT",
            " 5000",
            r#"PORT=" 5000" is not a port number (1-65535)"#,
        ),
        (
            "LOG_FORMAT",
            "xml",
            r#"LOG_FORMAT="xml" is not a log format (text or json)"#,
        ),
        (
            "HOST_REDIS",
            "",
            r#"HOST_REDIS="" is not a host name or IP address"#,
        ),
        (
            "HOST_REDIS",
            "red is",
            r#"HOST_REDIS="red is" is not a host name or IP address"#,
        ),
        (
            "REDIS_TIMEOUT_MS",
            "0",
            r#"REDIS_TIMEOUT_MS="0" is not a whole number from 1 to 60000"#,
        ),
        (
            "MAX_CONNECTIONS",
            "lots",
            r#"MAX_CONNECTIONS="lots" is not a whole number from 1 to 1000000"#,
        ),
    ];
    for (var, value, message) in cases {
        let (code, stderr, _) = run_to_exit(&[(var, value)], &[]);
        assert_eq!(code, 2, "{var}={value:?}");
        assert_eq!(
            stderr,
            format!("hit-counter: configuration error: {message}\n")
        );
    }
}

#[test]
fn every_variable_rejects_empty_whitespace_and_out_of_range_values() {
    let long_host = "h".repeat(254);
    let cases: &[(&str, &[&str])] = &[
        ("HOST_REDIS", &["", " ", " redis", "redis ", &long_host]),
        ("PORT_REDIS", &["", " ", "6379 ", "0", "65536"]),
        ("PORT", &["", " ", "\t5000", "0", "65536"]),
        ("LOG_FORMAT", &["", " ", "text ", "Text"]),
        ("RUST_LOG", &["", " ", "info,["]),
        ("REDIS_TIMEOUT_MS", &["", " ", "0", "60001"]),
        ("DRAIN_TIMEOUT_MS", &["", " ", "0", "600001"]),
        ("HEADER_READ_TIMEOUT_MS", &["", " ", "0", "600001"]),
        ("IDLE_TIMEOUT_MS", &["", " ", "0", "3600001"]),
        ("MAX_CONNECTIONS", &["", " ", "0", "1000001"]),
        ("MAX_HEADER_BYTES", &["", " ", "1023", "1048577"]),
    ];
    for (var, values) in cases {
        for value in *values {
            let (code, stderr, _) = run_to_exit(&[(var, value)], &[]);
            assert_eq!(code, 2, "{var}={value:?}");
            assert!(
                stderr.starts_with(&format!("hit-counter: configuration error: {var}=")),
                "{var}={value:?}: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{var}={value:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn a_bad_rust_log_is_a_configuration_error_too() {
    let (code, stderr, _) = run_to_exit(&[("RUST_LOG", "info,[")], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with(r#"hit-counter: configuration error: RUST_LOG="info,[""#),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
}

#[test]
fn unknown_arguments_are_a_usage_error() {
    let (code, stderr, _) = run_to_exit(&[], &["serve", "--now"]);
    assert_eq!(code, 2);
    assert!(stderr.starts_with("usage: hit-counter"), "{stderr}");
}

#[test]
fn an_unresolvable_redis_host_does_not_stop_start_up() {
    let mut service = ServiceProcess::start(&[("HOST_REDIS", "no-such-host.invalid")]);
    let port = service.port;
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (livez, readyz, page, took) = runtime.block_on(async {
        let livez = crate::common::send(
            port,
            b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let readyz = crate::common::send(
            port,
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let started = Instant::now();
        let page = crate::common::send(
            port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        (livez, readyz, page, started.elapsed())
    });
    let status = service.terminate();

    assert_eq!(livez.status, 200);
    assert_eq!(readyz.status, 503);
    assert_eq!(page.status, 503);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(status.success());
}

#[test]
fn healthcheck_exits_0_against_a_running_service_and_1_against_a_closed_port() {
    let mut service = ServiceProcess::start(&[("HOST_REDIS", "127.0.0.1"), ("PORT_REDIS", "1")]);
    let port = service.port.to_string();

    let (healthy, _, _) = run_to_exit(&[("PORT", &port)], &["healthcheck"]);
    service.terminate();
    let (unhealthy, stderr, took) =
        run_to_exit(&[("PORT", &free_port().to_string())], &["healthcheck"]);

    assert_eq!(
        healthy, 0,
        "against a live service (whose Redis is down: liveness only)"
    );
    assert_eq!(unhealthy, 1);
    assert!(stderr.starts_with("hit-counter: unhealthy:"), "{stderr}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

#[test]
fn healthcheck_gives_up_after_two_seconds_on_a_silent_port() {
    // Accepts connections (the kernel backlog does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();

    let (code, stderr, took) = run_to_exit(&[("PORT", &port)], &["healthcheck"]);

    assert_eq!(code, 1, "{stderr}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_the_request_fields() {
    let redis = RedisServer::start();
    let mut service = ServiceProcess::with_redis(redis.port, &[("LOG_FORMAT", "json")]);
    assert_eq!(blocking_get(service.port, "/").unwrap().status, 200);
    assert!(service.terminate().success());

    let lines: Vec<serde_json::Value> = service
        .log()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect();
    let startup: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "listening")
        .collect();
    assert_eq!(startup.len(), 1, "the configuration is logged once");
    assert_eq!(startup[0]["redis"], format!("127.0.0.1:{}", redis.port));
    let request = lines
        .iter()
        .find(|l| l["message"] == "request")
        .expect("a request line");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["path"], "/");
    assert_eq!(request["status"], 200);
    assert!(request["latency_us"].is_u64());
}
