//! The binary itself: its arguments and exit codes, configuration errors as the user sees
//! them, the health check, log formats. (Every variable's validation is unit-tested in
//! `src/config.rs`; here only what the binary adds.)

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{RedisServer, ServiceProcess, binary, free_port, http};

/// What a run of the binary that exits by itself left behind.
struct Exit {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the binary with `vars` and `args` until it exits (failing after 5 s).
fn run_to_exit(vars: &[(&str, &str)], args: &[&str]) -> Exit {
    let started = Instant::now();
    let mut child = binary()
        .envs(vars.iter().copied())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hit-counter {args:?} with {vars:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().unwrap();
    Exit {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

#[test]
fn bad_configuration_stops_start_up_with_exit_2_and_one_clear_line() {
    let exit = run_to_exit(&[("PORT_REDIS", "abc")], &[]);

    assert_eq!(exit.code, 2);
    assert_eq!(
        exit.stderr,
        "hit-counter: configuration error: PORT_REDIS=\"abc\" is not a port number (1-65535)\n"
    );
}

#[test]
fn help_and_version_print_to_stdout_and_exit_0() {
    let help = run_to_exit(&[], &["--help"]);
    let version = run_to_exit(&[], &["--version"]);

    assert_eq!((help.code, help.stderr.as_str()), (0, ""));
    assert!(
        help.stdout.starts_with("usage: hit-counter"),
        "{}",
        help.stdout
    );
    assert!(help.stdout.contains("healthcheck"), "{}", help.stdout);
    assert_eq!((version.code, version.stderr.as_str()), (0, ""));
    assert_eq!(
        version.stdout,
        format!("hit-counter {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_arguments_are_a_usage_error() {
    let exit = run_to_exit(&[], &["serve", "--now"]);

    assert_eq!(exit.code, 2);
    assert!(
        exit.stderr.starts_with("usage: hit-counter"),
        "{}",
        exit.stderr
    );
    assert_eq!(exit.stdout, "");
}

#[tokio::test]
async fn an_unresolvable_redis_host_does_not_stop_start_up() {
    let mut service = ServiceProcess::start(&[("HOST_REDIS", "no-such-host.invalid")]).await;
    let port = service.port;

    let livez = http::get(port, "/livez").await.unwrap();
    let readyz = http::get(port, "/readyz").await.unwrap();
    let started = Instant::now();
    let page = http::get(port, "/").await.unwrap();
    let took = started.elapsed();
    let status = service.terminate().await;

    assert_eq!(livez.status, 200);
    assert_eq!(readyz.status, 503);
    assert_eq!(page.status, 503);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(status.success());
}

#[tokio::test]
async fn healthcheck_exits_0_against_a_running_service_and_1_against_a_closed_port() {
    let mut service =
        ServiceProcess::start(&[("HOST_REDIS", "127.0.0.1"), ("PORT_REDIS", "1")]).await;
    let port = service.port.to_string();

    let healthy = run_to_exit(&[("PORT", &port)], &["healthcheck"]);
    // The check needs only PORT: a bad unrelated variable must not make a replica unhealthy.
    let despite_bad_vars = run_to_exit(
        &[
            ("PORT", &port),
            ("HOST_REDIS", "red is"),
            ("LOG_FORMAT", "xml"),
        ],
        &["healthcheck"],
    );
    service.terminate().await;
    let unhealthy = run_to_exit(&[("PORT", &free_port().to_string())], &["healthcheck"]);
    let bad_port = run_to_exit(&[("PORT", "abc")], &["healthcheck"]);

    assert_eq!(
        healthy.code, 0,
        "against a live service (whose Redis is down: liveness only)"
    );
    assert_eq!(despite_bad_vars.code, 0, "{}", despite_bad_vars.stderr);
    assert_eq!(unhealthy.code, 1);
    assert!(
        unhealthy.stderr.starts_with("hit-counter: unhealthy:"),
        "{}",
        unhealthy.stderr
    );
    assert!(
        unhealthy.took < Duration::from_millis(2500),
        "took {:?}",
        unhealthy.took
    );
    assert_eq!(bad_port.code, 2, "{}", bad_port.stderr);
}

#[test]
fn healthcheck_gives_up_after_two_seconds_on_a_silent_port() {
    // Accepts connections (the kernel backlog does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();

    let exit = run_to_exit(&[("PORT", &port)], &["healthcheck"]);

    assert_eq!(exit.code, 1, "{}", exit.stderr);
    assert!(
        exit.took >= Duration::from_millis(1900) && exit.took < Duration::from_secs(3),
        "took {:?}",
        exit.took
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_request_fields() {
    let redis = RedisServer::start().await;
    let mut service = ServiceProcess::with_redis(redis.port, &[("LOG_FORMAT", "json")]).await;
    assert_eq!(http::get(service.port, "/").await.unwrap().status, 200);
    let scanner_path = format!("/{}", "a".repeat(300));
    assert_eq!(
        http::get(service.port, &scanner_path).await.unwrap().status,
        404
    );
    assert!(service.terminate().await.success());

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
    assert_eq!(startup[0]["log_format"], "json");
    let request = lines
        .iter()
        .find(|l| l["message"] == "request")
        .expect("a request line");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["path"], "/");
    assert_eq!(request["status"], 200);
    assert!(request["latency_us"].is_u64());
    let long = lines
        .iter()
        .find(|l| l["message"] == "request" && l["status"] == 404)
        .expect("the long path's line");
    assert_eq!(
        long["path"],
        scanner_path[..200],
        "long paths are cut to 200 bytes in the log"
    );
    assert_eq!(
        lines.last().unwrap()["message"],
        "stopped",
        "every line is written by a normal exit"
    );
}

#[test]
fn a_taken_port_stops_start_up_with_exit_1_and_says_which() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();

    let exit = run_to_exit(&[("PORT", &port), ("HOST_REDIS", "127.0.0.1")], &[]);

    assert_eq!(exit.code, 1);
    assert!(
        exit.stdout
            .contains(&format!("cannot listen on port {port}")),
        "{}",
        exit.stdout
    );
}

#[tokio::test]
async fn a_stdout_nobody_reads_never_blocks_serving_and_dropped_lines_are_counted() {
    const REQUESTS: usize = 8_000; // lines: far more than the pipe and the log queue hold
    const CLIENTS: usize = 16;
    let mut service = ServiceProcess::with_redis_piped(1, &[]).await;
    let port = service.port;

    // Nobody reads stdout while these are served: the log writer soon blocks on the full pipe.
    let started = Instant::now();
    let request = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(http::send_pipelined(port, request, REQUESTS / CLIENTS)))
        .collect();
    for client in clients {
        let statuses = client.await.unwrap().expect("answers");
        assert_eq!(statuses.len(), REQUESTS / CLIENTS);
        assert!(statuses.iter().all(|s| *s == 200));
    }
    let served_in = started.elapsed();
    let mut pipe = service.take_stdout();
    let reader = std::thread::spawn(move || {
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut stdout).map(|_| stdout)
    });
    let status = service.terminate().await;
    let stdout = reader.join().unwrap().expect("the service's stdout");

    println!(
        "{REQUESTS} requests in {served_in:?}; last line: {:?}",
        stdout.lines().last()
    );
    assert!(status.success());
    let dropped: u64 = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("WARN log output fell behind: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the last line reports the dropped lines");
    let written = stdout
        .lines()
        .filter(|l| l.contains("path=\"/livez\""))
        .count() as u64;
    assert!(
        dropped > 0,
        "nothing was dropped: the test did not fill the queue"
    );
    // Every request's line written or counted as dropped; the few shutdown lines may be among
    // the dropped ones too.
    let accounted = written + dropped;
    assert!(
        (REQUESTS as u64..REQUESTS as u64 + 8).contains(&accounted),
        "{written} written + {dropped} dropped for {REQUESTS} requests"
    );
}
