//! Scale-out, proven on loopback: a real redis-server (AOF, appendfsync always), 3 replicas of
//! the binary (`HIT_COUNTER_BIN`: CI points it at the static release build) and Debian's
//! HAProxy with the settings docker-compose.yml ships (deploy/haproxy/haproxy.cfg; only the
//! replicas' addresses differ). One test per scenario, each on a fresh [`Fleet`], under a
//! steady load that records every response. Bounded in time and request count; each prints
//! its row of the table in docs/testing.md (run with --nocapture to see it).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::docker::page_views;
use crate::common::load::{BURST, Load, Tally, under_load};
use crate::common::{
    RedisServer, ServiceProcess, dies_with_test, eventually, free_port, haproxy_retried, http,
    signal, tier,
};

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Debian's HAProxy in the foreground (master-worker), with the shared settings and a
/// configuration of the test's own (`site.cfg`: where it listens, which replicas).
struct Haproxy {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Haproxy {
    /// HAProxy on a free loopback port; `site` is its frontend and backend, with `{listen}`
    /// where the listening address goes. Returns once its first worker serves.
    async fn start(site: &str, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master_log = || std::fs::read_to_string(dir.path().join("master.log"));
        for _ in 0..5 {
            let port = free_port();
            let site = site.replace("{listen}", &format!("127.0.0.1:{port}"));
            std::fs::write(dir.path().join("site.cfg"), site).unwrap();
            let mut child = dies_with_test(&mut Command::new("haproxy"))
                .args(["-W", "-db", "-f"])
                .arg(repository_file("deploy/haproxy/haproxy.cfg"))
                .arg("-f")
                .arg(dir.path().join("site.cfg"))
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(std::fs::File::create(dir.path().join("access.log")).unwrap())
                .stderr(std::fs::File::create(dir.path().join("master.log")).unwrap())
                .spawn()
                .expect("haproxy must be installed (scripts/test installs it on Debian)");
            // Not just the port: a reload before the master has said so would be taken as done
            // by the first "Loading success".
            let mut exited = false;
            let up = eventually(Duration::from_secs(5), async || {
                exited = child.try_wait().unwrap().is_some();
                exited || master_log().unwrap_or_default().contains("Loading success")
            })
            .await;
            assert!(up.is_some(), "haproxy did not start:\n{:?}", master_log());
            if !exited {
                return Self { port, dir, child };
            }
            // It could not bind: another test took the port first.
        }
        panic!("haproxy did not start:\n{:?}", master_log());
    }

    /// HAProxy in front of the replicas on `ports`.
    async fn in_front_of(ports: &[u16]) -> Self {
        Self::start(&static_site(ports), &[]).await
    }

    /// Points the backend at `ports` and reloads (SIGUSR2 to the master); returns once the new
    /// worker runs. The old worker finishes its requests first.
    async fn reload(&mut self, ports: &[u16]) {
        let loads = || self.master_log().matches("Loading success").count();
        let before = loads();
        let site = static_site(ports).replace("{listen}", &format!("127.0.0.1:{}", self.port));
        std::fs::write(self.dir.path().join("site.cfg"), site).unwrap();
        signal(self.child.id(), "USR2");
        let reloaded = eventually(Duration::from_secs(5), async || loads() > before).await;
        assert!(
            reloaded.is_some(),
            "haproxy did not reload:\n{}",
            self.master_log()
        );
    }

    /// Requests HAProxy sent more than once, from its access log.
    fn retried(&self) -> usize {
        haproxy_retried(
            &std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default(),
        )
    }

    fn master_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
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
            eprintln!("---- haproxy master log ----\n{}", self.master_log());
        }
    }
}

/// The loopback proxy: the replicas as a static list (the only difference from compose, which
/// finds them through Docker's DNS), and the shared settings of haproxy.cfg.
fn static_site(ports: &[u16]) -> String {
    let servers: String = ports
        .iter()
        .map(|p| format!("    server r{p} 127.0.0.1:{p}\n"))
        .collect();
    format!("frontend http\n    bind {{listen}}\n    default_backend web\nbackend web\n{servers}")
}

async fn replica(redis_port: u16) -> ServiceProcess {
    let replica = ServiceProcess::with_redis(redis_port, &[("RUST_LOG", "warn")]).await;
    let port = replica.port;
    let ready = eventually(Duration::from_secs(5), async || {
        http::is_ok(port, "/readyz").await
    })
    .await;
    assert!(ready.is_some(), "replica on {port} never became ready");
    replica
}

/// The fixture every scenario starts from: Redis with the strictest AOF, three replicas and
/// HAProxy in front of them.
struct Fleet {
    redis: RedisServer,
    replicas: Vec<ServiceProcess>,
    proxy: Haproxy,
}

impl Fleet {
    async fn start() -> Self {
        let redis =
            RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(replica(redis.port).await);
        }
        let proxy = Haproxy::in_front_of(&ports(&replicas)).await;
        Self {
            redis,
            replicas,
            proxy,
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
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn conservation_every_request_is_one_distinct_gapless_count() {
    tier("haproxy");
    let fleet = Fleet::start().await;

    let seen = Load::run(fleet.proxy.port, BURST, 20_000, Duration::from_secs(60)).await;

    let t = Tally::of(&seen);
    let count = fleet.hits();
    t.print("conservation", count);
    assert_eq!(t.requests, 20_000, "the run was cut short");
    assert_eq!(t.ok, t.requests, "requests failed");
    assert_eq!(count, t.ok as i64);
    assert_eq!(t.numbers, (1..=count).collect(), "numbers have gaps");
}

#[tokio::test]
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn a_replica_killed_under_load_fails_no_request_and_overcounts_only_its_in_flight() {
    tier("haproxy");
    let mut fleet = Fleet::start().await;
    let killed = fleet.replicas.remove(0);

    let mut killed_at = None;
    let seen = under_load(fleet.proxy.port, BURST, Duration::from_secs(30), async {
        killed.signal("KILL");
        killed_at = Some(Instant::now());
    })
    .await;

    let t = Tally::of(&seen);
    let count = fleet.hits();
    let retried = fleet.proxy.retried();
    let in_flight = seen.iter().filter(|s| s.spans(killed_at.unwrap())).count();
    t.print("replica SIGKILL", count);
    println!(
        "retried by the proxy: {retried}; under way at the kill: {in_flight}; count - 200s = {}",
        count - t.ok as i64
    );
    t.assert_replica_loss_survived(count, retried, in_flight);
}

#[tokio::test]
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn a_rolling_restart_under_load_fails_no_request() {
    tier("haproxy");
    let mut fleet = Fleet::start().await;
    let mut exits = Vec::new();

    // Each replica in turn: start the new one (ready), point HAProxy at it, SIGTERM the old one.
    let seen = under_load(fleet.proxy.port, BURST, Duration::from_secs(60), async {
        for i in 0..fleet.replicas.len() {
            let fresh = replica(fleet.redis.port).await;
            let mut old = std::mem::replace(&mut fleet.replicas[i], fresh);
            fleet.proxy.reload(&ports(&fleet.replicas)).await;
            exits.push(old.terminate().await);
        }
    })
    .await;

    let t = Tally::of(&seen);
    let count = fleet.hits();
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
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn a_replica_cut_off_from_redis_leaves_the_rotation_and_comes_back_when_healed() {
    tier("haproxy");
    let fleet = Fleet::start().await;
    // The cut-off replica reaches Redis through a gate that holds connections but answers
    // nothing (a partition, as a replica sees one) until it starts forwarding to Redis.
    let gate = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_port = gate.local_addr().unwrap().port();
    let cut_off = ServiceProcess::with_redis(gate_port, &[("RUST_LOG", "info")]).await;
    let fleet_redis_port = fleet.redis.port;

    // Alone behind a proxy, it is never ready: the proxy answers as a replica would.
    let alone = Haproxy::in_front_of(&[cut_off.port]).await;
    let from_proxy = http::get(alone.port, "/").await.unwrap();
    let from_replica = http::get(cut_off.port, "/").await.unwrap();
    assert_eq!(from_proxy.status, 503);
    for header in ["retry-after", "content-type", "cache-control"] {
        assert_eq!(
            from_proxy.header(header),
            from_replica.header(header),
            "{header}"
        );
    }
    assert_eq!(from_proxy.body(), from_replica.body());

    // Beside three replicas that reach Redis: out of the rotation, so no visitor sees a 503.
    let mut all = ports(&fleet.replicas);
    all.push(cut_off.port);
    let proxy = Haproxy::in_front_of(&all).await;
    // HAProxy 2.6 puts a server in the rotation before its first check (no init-state yet):
    // the load starts once that check has taken it out.
    let down = format!("Server web/r{} is DOWN", cut_off.port);
    let out = eventually(Duration::from_secs(5), async || {
        proxy.master_log().contains(&down)
    })
    .await;
    assert!(
        out.is_some(),
        "the cut-off replica was never taken out:\n{}",
        proxy.master_log()
    );
    let seen = Load::run(proxy.port, BURST, 3_000, Duration::from_secs(30)).await;
    let cut = Tally::of(&seen);
    cut.print("replica cut off", fleet.hits());
    assert_eq!(cut.ok, cut.requests, "a visitor saw the cut-off replica");
    assert_eq!(page_views(&cut_off.log(), Some(200)), 0);

    // Healed: back in the rotation within the health checks' interval.
    let opened = Instant::now();
    let forward = tokio::spawn(async move {
        while let Ok((mut client, _)) = gate.accept().await {
            let to = fleet_redis_port;
            tokio::spawn(async move {
                let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", to)).await?;
                tokio::io::copy_bidirectional(&mut client, &mut redis).await
            });
        }
    });
    let mut back_after = None;
    let seen = under_load(proxy.port, BURST, Duration::from_secs(30), async {
        let back = eventually(Duration::from_secs(10), async || {
            page_views(&cut_off.log(), Some(200)) > 0
        })
        .await;
        back_after = back.map(|_| opened.elapsed());
    })
    .await;
    forward.abort();
    let healed = Tally::of(&seen);
    let count = fleet.hits();
    healed.print("healed", count);
    println!("the healed replica served again {back_after:?} after the gate opened");
    assert!(back_after.is_some(), "the healed replica never came back");
    assert_eq!(healed.ok, healed.requests, "requests failed");
    assert_eq!(count, (cut.ok + healed.ok) as i64, "conservation");
}

#[tokio::test]
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn a_redis_restart_under_load_gives_fast_503s_then_every_replica_recovers() {
    tier("haproxy");
    let mut fleet = Fleet::start().await;
    let mut recovered_after = Vec::new();

    // SIGTERM, then Redis starts again on the same port and AOF file.
    let seen = under_load(fleet.proxy.port, BURST, Duration::from_secs(60), async {
        fleet.redis.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await; // an outage, not a blip
        fleet.redis.restart().await;
        // Every replica, asked directly, serves again within a second.
        for r in &fleet.replicas {
            let back = eventually(Duration::from_secs(5), async || {
                http::is_ok(r.port, "/").await
            })
            .await;
            recovered_after.push(back.expect("a replica never recovered"));
        }
    })
    .await;

    let t = Tally::of(&seen);
    let direct = recovered_after.len() as i64;
    let count = fleet.hits();
    t.print("redis restart", count);
    println!(
        "replicas served 200 again {recovered_after:?} after Redis was back; count - 200s - {direct} probes = {}",
        count - t.ok as i64 - direct
    );
    t.assert_outage_survived(count, direct);
    assert!(
        recovered_after.iter().all(|d| *d < Duration::from_secs(1)),
        "{recovered_after:?}"
    );
    for r in &mut fleet.replicas {
        assert!(r.is_running(), "a replica crashed");
    }
}

/// Redis stalls (a slow fsync, a starved machine) shorter than `REDIS_TIMEOUT_MS` (0.5 s):
/// every page view and readiness check in them waits, and answers in time. The proxy must wait
/// for the readiness answer too: were its check to give up first, every replica would leave the
/// rotation at once and the proxy would answer 503 itself.
#[tokio::test]
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn redis_stalls_shorter_than_the_redis_timeout_cost_latency_not_errors() {
    tier("haproxy");
    let fleet = Fleet::start().await;
    let mut stalls = Vec::new();

    // Four stalls of 0.35 s, half a second apart: each replica's checks (every 250 ms) meet
    // several of them.
    let seen = under_load(fleet.proxy.port, BURST, Duration::from_secs(30), async {
        for _ in 0..4 {
            let asleep = fleet.redis.asleep_for(0.35).await;
            stalls.push(Instant::now());
            tokio::task::spawn_blocking(move || asleep.join().unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await; // paces the faults: not an event
        }
    })
    .await;

    let t = Tally::of(&seen);
    t.print("redis stalls", fleet.hits());
    let waited = seen
        .iter()
        .filter(|s| stalls.iter().any(|at| s.spans(*at)) && s.latency >= Duration::from_millis(200))
        .count();
    println!(
        "requests that waited out a stall (200 ms or more): {waited}; slowest {:.1?}",
        t.max_latency
    );
    assert!(waited > 0, "no request met a stall");
    assert_eq!(t.ok, t.requests, "requests failed");
    let master_log = fleet.proxy.master_log();
    assert!(
        !master_log.contains(" is DOWN"),
        "a replica left the rotation:\n{master_log}"
    );
    assert_eq!(fleet.hits(), t.ok as i64, "conservation");
}

/// A DNS server that answers every A query with 127.0.0.1 (and every other query with no
/// record). Counts the A queries.
fn fake_dns() -> (u16, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            // The header, then the question: the name's labels up to the empty one, type, class.
            let Some(name_len) = buf[12..n].iter().position(|&b| b == 0) else {
                continue;
            };
            let question_end = 12 + name_len + 1 + 4;
            if question_end > n {
                continue;
            }
            let is_a = buf[question_end - 4..question_end - 2] == [0, 1];
            let mut answer = buf[..question_end].to_vec(); // drops any EDNS record
            answer[2] = 0x81; // response, recursion desired
            answer[3] = 0x80; // recursion available, no error
            answer[6..8].copy_from_slice(&u16::from(is_a).to_be_bytes()); // answers
            answer[8..12].fill(0); // no authority or additional records
            if is_a {
                counter.fetch_add(1, Ordering::Relaxed);
                // name (pointer to the question), type A, class IN, TTL 5, 4 bytes: 127.0.0.1
                answer.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&answer, from);
        }
    });
    (port, queries)
}

#[tokio::test]
#[ignore = "needs HAProxy: HIT_COUNTER_TIERS=haproxy (scripts/test)"]
async fn the_compose_proxy_configuration_finds_web_through_dns() {
    tier("haproxy");
    let redis = RedisServer::start().await;
    let web = replica(redis.port).await;
    let (dns_port, queries) = fake_dns();
    let compose = std::fs::read_to_string(repository_file("deploy/haproxy/compose.cfg")).unwrap();
    // Compose's file with Docker's DNS (127.0.0.11:53) replaced by the fake one and the listening
    // address moved to loopback; nothing else changes.
    let site = compose
        .replace(
            "nameserver dns 127.0.0.11:53",
            &format!("nameserver dns 127.0.0.1:{dns_port}"),
        )
        .replace("bind :5000", "bind {listen}");
    assert!(site.contains("bind {listen}") && site.contains(&format!(":{dns_port}")));
    let proxy = Haproxy::start(&site, &[("WEB_PORT", web.port.to_string())]).await;

    // The first resolution comes within a second of start-up (the resolvers' interval).
    let answered = eventually(Duration::from_secs(3), async || {
        http::is_ok(proxy.port, "/").await
    })
    .await;

    assert!(
        answered.is_some(),
        "no page through the proxy:\n{}",
        proxy.master_log()
    );
    assert_eq!(redis.hits(), Some(1));
    assert!(
        queries.load(Ordering::Relaxed) >= 1,
        "HAProxy never asked the resolver for web"
    );
}
