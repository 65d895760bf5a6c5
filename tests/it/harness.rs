//! The harness itself: nothing a test starts outlives the test binary, however it ends.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{RedisServer, ServiceProcess, dies_with_test, listens_on};

/// In the environment of the test binary that the harness test starts and kills.
const HOLDER: &str = "HIT_COUNTER_TEST_HOLDER";
const HOLDER_TEST: &str = "harness::holds_a_service_and_a_redis_server_until_killed";

#[tokio::test]
#[ignore = "a fixture: the harness test below runs it in a test binary of its own, then kills it"]
async fn holds_a_service_and_a_redis_server_until_killed() {
    if std::env::var_os(HOLDER).is_none() {
        return;
    }
    let redis = RedisServer::start().await;
    let service = ServiceProcess::with_redis(redis.port, &[]).await;
    println!(
        "holding {} {} {} {}",
        redis.pid().unwrap(),
        redis.port,
        service.pid(),
        service.port
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Gone: no such process, or one that has exited and waits to be reaped (its sockets are
/// closed then).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_test_binary_killed_with_sigkill_leaves_no_process_and_no_port_behind() {
    let mut holder = dies_with_test(&mut Command::new(std::env::current_exe().unwrap()))
        .args([HOLDER_TEST, "--exact", "--ignored", "--nocapture"])
        .env(HOLDER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = holder.stdout.take().unwrap();
    let (line, holding) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = l.strip_prefix("holding ") {
                let _ = line.send(rest.to_owned());
            }
        }
    });
    let holding = holding
        .recv_timeout(Duration::from_secs(30))
        .expect("the holder never started its servers");
    let numbers: Vec<u32> = holding.split(' ').map(|n| n.parse().unwrap()).collect();
    let started = [
        (numbers[0], numbers[1] as u16),
        (numbers[2], numbers[3] as u16),
    ];
    for (pid, port) in started {
        assert!(listens_on(pid, port), "{pid} is not listening on {port}");
    }

    holder.kill().unwrap(); // SIGKILL: no Drop runs in the holder
    holder.wait().unwrap();
    let killed = Instant::now();
    let mut left: Vec<(u32, u16)> = started.to_vec();
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(1) {
        left.retain(|&(pid, port)| !gone(pid) || accepts(port));
        std::thread::sleep(Duration::from_millis(10));
    }

    for &(pid, _) in &left {
        // SAFETY: plain kill(2), of a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "still running or listening 1 s after the test binary was killed (pid, port): {left:?}"
    );
}

#[test]
fn an_older_redis_server_is_named_once_and_ends_the_run() {
    // A redis-server 6 first on PATH: what an older Debian or Ubuntu installs.
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("redis-server");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc-5.2.1 bits=64'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let run = dies_with_test(&mut Command::new(std::env::current_exe().unwrap()))
        .args([HOLDER_TEST, "--exact", "--ignored"])
        .env(HOLDER, "1")
        .env("PATH", path)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("need redis-server 7 or later").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("v=6.0.16"),
        "the version found is named: {stderr}"
    );
}
