//! Scale-out, proven on loopback: a real redis-server (AOF, appendfsync always), 3 replicas of
//! the binary (`HIT_COUNTER_BIN`: CI points it at the static release build) and Debian's nginx
//! with the proxy settings docker-compose.yml ships (deploy/nginx/hit-counter/proxy.conf; only
//! the upstream addresses differ). A load generator keeps a steady stream of requests going
//! through nginx and records every response while replicas are killed, replaced one by one,
//! and Redis restarts. Each scenario is bounded in time and request count and prints a table
//! (run with --nocapture to see it).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{RedisServer, ServiceProcess, blocking_get, free_port, signal};

const CONNECTIONS: usize = 16;

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx must be installed (scripts/test installs it on Debian)")
}

fn shared_proxy_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/hit-counter/proxy.conf")
}

/// Debian's nginx in the foreground, configured in a temporary prefix.
struct Nginx {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// nginx on a free loopback port; `http` is the inside of the `http {}` block, with
    /// `{listen}` where the server's listen address goes.
    fn start(http: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hit-counter")).unwrap();
        std::fs::copy(
            shared_proxy_conf(),
            dir.path().join("hit-counter/proxy.conf"),
        )
        .unwrap();
        let port = free_port();
        write_conf(
            dir.path(),
            &http.replace("{listen}", &format!("127.0.0.1:{port}")),
        );
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let nginx = Self { port, dir, child };
        let started = Instant::now();
        while !crate::common::accepts(port) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "nginx did not start:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        nginx
    }

    /// nginx in front of the replicas on `ports`.
    fn in_front_of(ports: &[u16]) -> Self {
        Self::start(&static_upstream(ports))
    }

    /// Points the upstream at `ports` and reloads (SIGHUP): new workers use the new list, old
    /// ones finish their requests first.
    fn reload(&mut self, ports: &[u16]) {
        let http = static_upstream(ports).replace("{listen}", &format!("127.0.0.1:{}", self.port));
        write_conf(self.dir.path(), &http);
        signal(self.child.id(), "HUP");
        std::thread::sleep(Duration::from_millis(300));
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would orphan them.
        signal(self.child.id(), "TERM");
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nginx error log ----\n{}", self.error_log());
        }
    }
}

/// The main configuration around `http`, everything inside the private prefix `dir`.
fn write_conf(dir: &Path, http: &str) {
    let d = dir.display();
    // As root, workers would otherwise run as nobody and could not read this private prefix.
    let user = if running_as_root() { "user root;" } else { "" };
    let conf = format!(
        "{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format e2e '$upstream_addr|$upstream_connect_time|$upstream_header_time|$upstream_status|$status';
    access_log {d}/access.log e2e;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The e2e proxy: the replicas as a static upstream (the only difference from compose, which
/// finds them through Docker's DNS), then exactly the shared settings.
fn static_upstream(ports: &[u16]) -> String {
    let servers: String = ports
        .iter()
        .map(|p| format!("server 127.0.0.1:{p}; "))
        .collect();
    format!(
        "upstream hit_counter {{ {servers}}}
server {{
    listen {{listen}};
    location / {{
        proxy_pass http://hit_counter;
        include hit-counter/proxy.conf;
    }}
}}"
    )
}

fn replica(redis_port: u16) -> ServiceProcess {
    ServiceProcess::with_redis(redis_port, &[("RUST_LOG", "warn")])
}

fn wait_ready(port: u16) {
    let started = Instant::now();
    while blocking_get(port, "/readyz").map(|r| r.status) != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "replica on {port} never became ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One response the load generator saw: status 0 means the request failed without one.
#[derive(Clone, Debug)]
struct Seen {
    status: u16,
    hits: Option<i64>,
    latency: Duration,
}

/// Keeps `CONNECTIONS` clients sending `GET /` through nginx until `stop` is set,
/// `max_requests` were sent, or `max_time` passed; returns every outcome.
///
/// One connection per request: reloading nginx (how this test swaps replicas) closes the
/// old workers' idle keep-alive connections, and a request racing that close fails before
/// reaching anything. Real clients retry those; a fresh connection avoids the race instead of
/// retrying around it.
fn load(port: u16, max_requests: usize, max_time: Duration, stop: Arc<AtomicBool>) -> Vec<Seen> {
    let sent = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + max_time;
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (sent, stop) = (sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && sent.fetch_add(1, Ordering::Relaxed) < max_requests
                {
                    let started = Instant::now();
                    let (status, hits) = exchange(port).unwrap_or((0, None));
                    seen.push(Seen {
                        status,
                        hits,
                        latency: started.elapsed(),
                    });
                }
                seen
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

/// One request on its own connection; `None` if it failed without a complete response.
fn exchange(port: u16) -> Option<(u16, Option<i64>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut bytes = Vec::with_capacity(256);
    stream.read_to_end(&mut bytes).ok()?;
    let response = crate::common::parse(&bytes)?;
    let hits = std::str::from_utf8(&response.raw_body).ok().and_then(|b| {
        b.strip_prefix("Hello World! ")?
            .strip_suffix(" times.")?
            .parse()
            .ok()
    });
    Some((response.status, hits))
}

/// What a scenario printed and checked.
struct Tally {
    requests: usize,
    ok: usize,
    unavailable: usize,
    other: usize,
    max_latency: Duration,
    max_failure_latency: Duration,
    numbers: BTreeSet<i64>,
}

fn tally(seen: &[Seen]) -> Tally {
    let ok: Vec<&Seen> = seen.iter().filter(|s| s.status == 200).collect();
    let numbers: BTreeSet<i64> = ok.iter().filter_map(|s| s.hits).collect();
    assert_eq!(numbers.len(), ok.len(), "two 200s carried the same number");
    Tally {
        requests: seen.len(),
        ok: ok.len(),
        unavailable: seen.iter().filter(|s| s.status == 503).count(),
        other: seen
            .iter()
            .filter(|s| s.status != 200 && s.status != 503)
            .count(),
        max_latency: seen.iter().map(|s| s.latency).max().unwrap_or_default(),
        max_failure_latency: seen
            .iter()
            .filter(|s| s.status != 200)
            .map(|s| s.latency)
            .max()
            .unwrap_or_default(),
        numbers,
    }
}

fn print_row(scenario: &str, t: &Tally, count: i64) {
    println!(
        "| {scenario:<16} | {:>8} | {:>7} | {:>5} | {:>5} | {:>10.1?} | {:>11} |",
        t.requests, t.ok, t.unavailable, t.other, t.max_latency, count
    );
}

/// Runs `during` on this thread while the load runs on others; returns what the load saw.
fn under_load(
    port: u16,
    max_requests: usize,
    max_time: Duration,
    during: impl FnOnce(),
) -> Vec<Seen> {
    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let stop = stop.clone();
        std::thread::spawn(move || load(port, max_requests, max_time, stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    during();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    generator.join().unwrap()
}

#[test]
fn replicas_behind_nginx_survive_kills_rolling_restarts_and_redis_restarts() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut replicas: Vec<ServiceProcess> = (0..3).map(|_| replica(redis.port)).collect();
    let mut nginx = Nginx::in_front_of(&replicas.iter().map(|r| r.port).collect::<Vec<_>>());
    let started = Instant::now();
    println!(
        "\n| scenario         | requests |    200s |  503s | other |  max lat.  | hits (Δ)    |"
    );
    println!(
        "|------------------|---------:|--------:|------:|------:|-----------:|------------:|"
    );

    // 1. Conservation: 20,000 requests, every one a distinct 200, and Redis agrees exactly.
    let before = redis.hits().unwrap_or(0);
    let seen = load(
        nginx.port,
        20_000,
        Duration::from_secs(60),
        Arc::new(AtomicBool::new(false)),
    );
    let t = tally(&seen);
    let delta = redis.hits().unwrap_or(0) - before;
    print_row("conservation", &t, delta);
    assert_eq!(t.requests, 20_000, "the run was cut short");
    assert_eq!(t.ok, t.requests, "requests failed");
    assert_eq!(delta, t.ok as i64);
    assert_eq!(
        t.numbers,
        (before + 1..=before + delta).collect(),
        "numbers have gaps"
    );

    // 2. Replica loss: SIGKILL one replica under load.
    let before = redis.hits().unwrap();
    let killed = replicas.remove(0);
    let killed_addr = format!("127.0.0.1:{}", killed.port);
    let log_offset = nginx.access_log().len();
    let seen = under_load(nginx.port, 15_000, Duration::from_secs(30), || {
        signal(killed.pid(), "KILL");
    });
    drop(killed);
    let t = tally(&seen);
    let delta = redis.hits().unwrap() - before;
    // Requests that reached the killed replica and got no answer: nginx connected (a connect
    // time is logged) but read no response header. Their INCR may have run.
    let in_flight = nginx.access_log()[log_offset..]
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split('|').collect();
            f[0].split(", ").next() == Some(killed_addr.as_str())
                && f[1].split(", ").next() != Some("-")
                && f[2].split(", ").next() == Some("-")
        })
        .count();
    print_row("replica SIGKILL", &t, delta);
    println!(
        "|   in flight on the killed replica: {in_flight}; count - 200s = {}",
        delta - t.ok as i64
    );
    assert_eq!(
        t.unavailable + t.other,
        0,
        "requests failed although two replicas were up"
    );
    assert!(delta >= t.ok as i64, "an acknowledged count was lost");
    assert!(
        delta - t.ok as i64 <= in_flight as i64,
        "counted more than the requests in flight"
    );
    // Back to three replicas.
    replicas.push(replica(redis.port));
    wait_ready(replicas[2].port);
    nginx.reload(&replicas.iter().map(|r| r.port).collect::<Vec<_>>());

    // 3. Rolling restart: start the new replica, wait for /readyz, point nginx at it, SIGTERM
    //    the old one (it drains), for each of the three.
    let before = redis.hits().unwrap();
    let mut exits = Vec::new();
    let seen = under_load(nginx.port, 100_000, Duration::from_secs(60), || {
        for i in 0..replicas.len() {
            let fresh = replica(redis.port);
            wait_ready(fresh.port);
            let mut old = std::mem::replace(&mut replicas[i], fresh);
            nginx.reload(&replicas.iter().map(|r| r.port).collect::<Vec<_>>());
            exits.push(old.terminate());
        }
    });
    let t = tally(&seen);
    let delta = redis.hits().unwrap() - before;
    print_row("rolling restart", &t, delta);
    assert!(
        exits.iter().all(|e| e.success()),
        "a replica did not exit cleanly: {exits:?}"
    );
    let failures: Vec<u16> = seen
        .iter()
        .map(|s| s.status)
        .filter(|s| *s != 200)
        .collect();
    assert!(
        failures.is_empty(),
        "requests failed during the rolling restart: {failures:?}"
    );
    assert_eq!(delta, t.ok as i64, "conservation");

    // 4. Redis restart: SIGTERM, then start again on the same port and AOF file.
    let before = redis.hits().unwrap();
    let mut back_at = None;
    let mut recovered_after = Vec::new();
    let seen = under_load(nginx.port, 100_000, Duration::from_secs(60), || {
        redis.stop();
        std::thread::sleep(Duration::from_millis(300));
        redis.restart();
        let back = Instant::now();
        back_at = Some(back);
        // Every replica, asked directly, serves again within a second.
        for r in &replicas {
            while blocking_get(r.port, "/").map(|resp| resp.status) != Some(200) {
                assert!(
                    back.elapsed() < Duration::from_secs(5),
                    "replica {} never recovered",
                    r.port
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            recovered_after.push(back.elapsed());
        }
    });
    let t = tally(&seen);
    let direct = recovered_after.len() as i64;
    let delta = redis.hits().unwrap() - before;
    print_row("redis restart", &t, delta);
    println!(
        "|   replicas served 200 again {:?} after Redis was back; count - 200s = {}",
        recovered_after,
        delta - t.ok as i64 - direct
    );
    assert!(back_at.is_some());
    assert_eq!(t.other, 0, "failures other than 503");
    assert!(
        t.max_failure_latency < Duration::from_secs(1),
        "a 503 took {:?}",
        t.max_failure_latency
    );
    assert!(
        recovered_after.iter().all(|d| *d < Duration::from_secs(1)),
        "{recovered_after:?}"
    );
    for r in &mut replicas {
        assert!(r.is_running(), "a replica crashed");
    }
    assert!(
        delta >= t.ok as i64 + direct,
        "an acknowledged count was lost"
    );
    assert!(
        delta - t.ok as i64 - direct <= t.unavailable as i64,
        "counted more than could have run"
    );

    println!("all scenarios in {:?}", started.elapsed());
}

/// A DNS server for one name: answers every A query with 127.0.0.1. Counts the queries.
fn fake_dns() -> (u16, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            counter.fetch_add(1, Ordering::Relaxed);
            let mut answer = buf[..n].to_vec();
            answer[2] = 0x81; // response, recursion desired
            answer[3] = 0x80; // recursion available, no error
            answer[6..8].copy_from_slice(&1u16.to_be_bytes()); // one answer
            answer[8..12].fill(0);
            // name (pointer to the question), type A, class IN, TTL 5, 4 bytes: 127.0.0.1
            answer.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
            let _ = socket.send_to(&answer, from);
        }
    });
    (port, queries)
}

#[test]
fn the_compose_proxy_template_resolves_web_through_dns_at_request_time() {
    let redis = RedisServer::start();
    let web = replica(redis.port);
    let (dns_port, queries) = fake_dns();
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/templates/default.conf.template"),
    )
    .unwrap();
    // What the nginx image renders, with Docker's DNS (127.0.0.11:53) replaced by the fake one
    // and the listen address moved to loopback; nothing else changes.
    let rendered = template
        .replace("${WEB_PORT}", &web.port.to_string())
        .replace(
            "resolver 127.0.0.11 ",
            &format!("resolver 127.0.0.1:{dns_port} "),
        )
        .replace("listen 5000;", "listen {listen};");
    assert!(rendered.contains("listen {listen};"));
    assert!(rendered.contains(&format!("resolver 127.0.0.1:{dns_port} ")));
    let nginx = Nginx::start(&rendered);

    let response = blocking_get(nginx.port, "/").expect("an answer through nginx");

    assert_eq!(response.status, 200);
    assert_eq!(response.body(), "Hello World! 1 times.");
    assert!(
        queries.load(Ordering::Relaxed) >= 1,
        "nginx never asked the resolver for web"
    );
}
