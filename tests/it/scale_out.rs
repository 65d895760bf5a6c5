//! Scale-out, proven on loopback: a real redis-server (AOF, appendfsync always), 3 replicas of
//! the binary (`HIT_COUNTER_BIN`: CI points it at the static release build) and Debian's nginx
//! with the proxy settings docker-compose.yml ships (deploy/nginx/hit-counter/proxy.conf; only
//! the upstream addresses differ). One test per scenario, each on a fresh [`Cluster`], under a
//! steady load that records every response. Bounded in time and request count; each prints
//! its row of the README's table (run with --nocapture to see it).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::load::{Load, Tally, under_load};
use crate::common::{RedisServer, ServiceProcess, accepts, eventually, free_port, http, signal};

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx must be installed (scripts/test installs it on Debian)")
}

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
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
    async fn start(http: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hit-counter")).unwrap();
        std::fs::copy(
            repository_file("deploy/nginx/hit-counter/proxy.conf"),
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
        let up = eventually(Duration::from_secs(5), async || accepts(port).await).await;
        assert!(up.is_some(), "nginx did not start:\n{}", nginx.error_log());
        nginx
    }

    /// nginx in front of the replicas on `ports`.
    async fn in_front_of(ports: &[u16]) -> Self {
        Self::start(&static_upstream(ports)).await
    }

    /// Points the upstream at `ports` and reloads (SIGHUP); returns once a worker with the new
    /// configuration runs (old workers finish their requests first).
    async fn reload(&mut self, ports: &[u16]) {
        let workers_started = || self.error_log().matches("start worker process").count();
        let before = workers_started();
        let http = static_upstream(ports).replace("{listen}", &format!("127.0.0.1:{}", self.port));
        write_conf(self.dir.path(), &http);
        signal(self.child.id(), "HUP");
        let reloaded =
            eventually(Duration::from_secs(5), async || workers_started() > before).await;
        assert!(
            reloaded.is_some(),
            "nginx did not reload:\n{}",
            self.error_log()
        );
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
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
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

async fn replica(redis_port: u16) -> ServiceProcess {
    let replica = ServiceProcess::with_redis(redis_port, &[("RUST_LOG", "warn")]).await;
    let port = replica.port;
    let ready = eventually(Duration::from_secs(5), async || {
        http::get(port, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(ready.is_some(), "replica on {port} never became ready");
    replica
}

/// The fixture every scenario starts from: Redis with the strictest AOF, three replicas and
/// nginx in front of them.
struct Cluster {
    redis: RedisServer,
    replicas: Vec<ServiceProcess>,
    nginx: Nginx,
}

impl Cluster {
    async fn start() -> Self {
        let redis =
            RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(replica(redis.port).await);
        }
        let nginx = Nginx::in_front_of(&ports(&replicas)).await;
        Self {
            redis,
            replicas,
            nginx,
        }
    }

    fn hits(&self) -> i64 {
        self.redis.hits().unwrap_or(0)
    }
}

fn ports(replicas: &[ServiceProcess]) -> Vec<u16> {
    replicas.iter().map(|r| r.port).collect()
}

#[tokio::test]
async fn conservation_every_request_is_one_distinct_gapless_count() {
    let cluster = Cluster::start().await;

    let seen = Load::run(cluster.nginx.port, 20_000, Duration::from_secs(60)).await;

    let t = Tally::of(&seen);
    let count = cluster.hits();
    t.print("conservation", count);
    assert_eq!(t.requests, 20_000, "the run was cut short");
    assert_eq!(t.ok, t.requests, "requests failed");
    assert_eq!(count, t.ok as i64);
    assert_eq!(t.numbers, (1..=count).collect(), "numbers have gaps");
}

#[tokio::test]
async fn a_replica_killed_under_load_fails_no_request_and_overcounts_only_its_in_flight() {
    let mut cluster = Cluster::start().await;
    let killed = cluster.replicas.remove(0);
    let killed_addr = format!("127.0.0.1:{}", killed.port);

    let seen = under_load(cluster.nginx.port, 15_000, Duration::from_secs(30), async {
        killed.signal("KILL");
    })
    .await;

    let t = Tally::of(&seen);
    let count = cluster.hits();
    // Requests that reached the killed replica and got no answer: nginx connected (a connect
    // time is logged) but read no response header. Their INCR may have run.
    let in_flight = cluster
        .nginx
        .access_log()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split('|').collect();
            f[0].split(", ").next() == Some(killed_addr.as_str())
                && f[1].split(", ").next() != Some("-")
                && f[2].split(", ").next() == Some("-")
        })
        .count() as i64;
    t.print("replica SIGKILL", count);
    println!(
        "in flight on the killed replica: {in_flight}; count - 200s = {}",
        count - t.ok as i64
    );
    assert_eq!(
        t.unavailable + t.other,
        0,
        "requests failed although two replicas were up"
    );
    assert!(count >= t.ok as i64, "an acknowledged count was lost");
    assert!(
        count - t.ok as i64 <= in_flight,
        "counted more than the requests in flight"
    );
}

#[tokio::test]
async fn a_rolling_restart_under_load_fails_no_request() {
    let mut cluster = Cluster::start().await;
    let mut exits = Vec::new();

    // Each replica in turn: start the new one (ready), point nginx at it, SIGTERM the old one.
    let seen = under_load(
        cluster.nginx.port,
        100_000,
        Duration::from_secs(60),
        async {
            for i in 0..cluster.replicas.len() {
                let fresh = replica(cluster.redis.port).await;
                let mut old = std::mem::replace(&mut cluster.replicas[i], fresh);
                cluster.nginx.reload(&ports(&cluster.replicas)).await;
                exits.push(old.terminate().await);
            }
        },
    )
    .await;

    let t = Tally::of(&seen);
    let count = cluster.hits();
    t.print("rolling restart", count);
    assert!(
        exits.iter().all(|e| e.success()),
        "a replica did not exit cleanly: {exits:?}"
    );
    assert_eq!(
        t.ok, t.requests,
        "requests failed during the rolling restart"
    );
    assert_eq!(count, t.ok as i64, "conservation");
}

#[tokio::test]
async fn a_redis_restart_under_load_gives_fast_503s_then_every_replica_recovers() {
    let mut cluster = Cluster::start().await;
    let mut recovered_after = Vec::new();

    // SIGTERM, then Redis starts again on the same port and AOF file.
    let seen = under_load(
        cluster.nginx.port,
        100_000,
        Duration::from_secs(60),
        async {
            cluster.redis.stop().await;
            tokio::time::sleep(Duration::from_millis(300)).await; // an outage, not a blip
            cluster.redis.restart().await;
            // Every replica, asked directly, serves again within a second.
            for r in &cluster.replicas {
                let back = eventually(Duration::from_secs(5), async || {
                    http::get(r.port, "/")
                        .await
                        .is_ok_and(|resp| resp.status == 200)
                })
                .await;
                recovered_after.push(back.expect("a replica never recovered"));
            }
        },
    )
    .await;

    let t = Tally::of(&seen);
    let direct = recovered_after.len() as i64;
    let count = cluster.hits();
    t.print("redis restart", count);
    println!(
        "replicas served 200 again {recovered_after:?} after Redis was back; count - 200s - {direct} probes = {}",
        count - t.ok as i64 - direct
    );
    assert_eq!(t.other, 0, "failures other than 503");
    assert!(
        t.unavailable > 0,
        "Redis was never seen down: the scenario did not happen"
    );
    assert!(
        t.max_failure_latency < Duration::from_secs(1),
        "a 503 took {:?}",
        t.max_failure_latency
    );
    assert!(
        recovered_after.iter().all(|d| *d < Duration::from_secs(1)),
        "{recovered_after:?}"
    );
    for r in &mut cluster.replicas {
        assert!(r.is_running(), "a replica crashed");
    }
    assert!(
        count >= t.ok as i64 + direct,
        "an acknowledged count was lost"
    );
    assert!(
        count - t.ok as i64 - direct <= t.unavailable as i64,
        "counted more than could have run"
    );
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

#[tokio::test]
async fn the_compose_proxy_template_resolves_web_through_dns_at_request_time() {
    let redis = RedisServer::start().await;
    let web = replica(redis.port).await;
    let (dns_port, queries) = fake_dns();
    let template = std::fs::read_to_string(repository_file(
        "deploy/nginx/templates/default.conf.template",
    ))
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
    let nginx = Nginx::start(&rendered).await;

    let response = http::get(nginx.port, "/")
        .await
        .expect("an answer through nginx");

    assert_eq!(response.status, 200);
    assert_eq!(response.body(), "Hello World! 1 times.");
    assert!(
        queries.load(Ordering::Relaxed) >= 1,
        "nginx never asked the resolver for web"
    );
}
