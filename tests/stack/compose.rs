//! The stack in a real container engine, end to end: the repository's docker-compose.yml with
//! the stand-in images (deploy/standin/compose.yml) and the proxy published on a free
//! 127.0.0.1 port, nothing else changed. One test per scenario, each on a compose project of
//! its own that is removed afterwards (containers, network, volume, image), failed or not.
//!
//! They need a Docker engine, Compose and the stand-ins (`scripts/images`): `scripts/test` runs
//! them one at a time when an engine answers (`HIT_COUNTER_TIERS=compose`). Traffic goes only to the proxy's port on 127.0.0.1. Each prints its row of the
//! table in docs/testing.md (run with --nocapture to see it).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::docker::{count, docker, output, page_views, stdout, unix_seconds};
use crate::common::load::{BURST, Load, Tally, under_load};
use crate::common::{eventually, free_port, haproxy_retried, http, tier};

const REPLICAS: usize = 3;

/// What every container, network, volume and image these tests create carries, so that what a
/// killed run left behind can be found, and nothing else is ever touched.
const LABEL: &str = "org.hit-counter.test=compose";

/// Labels the stack's containers, network, volumes and image (a compose file added to the
/// project's), and publishes the proxy on `port` of 127.0.0.1 only, Prometheus and
/// Alertmanager (profile monitoring) on free ports of 127.0.0.1.
fn test_overrides(port: u16) -> String {
    let (key, value) = LABEL.split_once('=').unwrap();
    let label = format!("labels:\n      {key}: \"{value}\"");
    format!(
        "services:
  redis:
    {label}
  web:
    {label}
    build:
      labels:
        {key}: \"{value}\"
  proxy:
    {label}
    ports: !override
      - \"127.0.0.1:{port}:5000\"
  prometheus:
    {label}
    ports: !override
      - \"127.0.0.1::9090\"
  alertmanager:
    {label}
    ports: !override
      - \"127.0.0.1::9093\"
  redis-exporter:
    {label}
networks:
  default:
    {label}
volumes:
  redis-data:
    {label}
  prometheus-data:
    {label}
"
    )
}

/// Removes every container, network, volume and image with [`LABEL`]: what an earlier run
/// left when it was killed before its `Drop`s ran. Once per test binary, before the first
/// stack. Returns how many it removed.
async fn remove_leftovers() -> usize {
    let filter = format!("label={LABEL}");
    let mut removed = 0;
    for (list, remove) in [
        (&["ps", "-aq"][..], &["rm", "-f", "-v"][..]),
        (&["network", "ls", "-q"], &["network", "rm"]),
        (&["volume", "ls", "-q"], &["volume", "rm", "-f"]),
        (&["images", "-q"], &["rmi", "-f"]),
    ] {
        let listed = docker(&[list, &["--filter", &filter]].concat()).await;
        let ids: BTreeSet<&str> = listed.split_whitespace().collect();
        if !ids.is_empty() {
            docker(&[remove, &ids.iter().copied().collect::<Vec<_>>()].concat()).await;
            removed += ids.len();
        }
    }
    removed
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// How to run Compose: `COMPOSE` if set (e.g. `docker compose`), else the Compose that
/// scripts/test installs into .ci/venv, else the docker CLI plugin.
fn compose_command() -> Vec<String> {
    if let Ok(command) = std::env::var("COMPOSE") {
        return command.split_whitespace().map(str::to_owned).collect();
    }
    let venv = repository().join(".ci/venv/bin/docker-compose");
    if venv.exists() {
        vec![venv.display().to_string()]
    } else {
        vec!["docker".to_owned(), "compose".to_owned()]
    }
}

async fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, id]).await
}

/// One compose project: the stack as the README runs it, with the stand-ins and the proxy on a
/// free loopback port. `down -v --rmi local` on drop.
struct Stack {
    project: String,
    port: u16,
    /// Compose and its options (`-p`, every `-f`), for any subcommand.
    compose: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// `up -d --build --scale web=N --wait` on a project named after the scenario.
    async fn up(scenario: &str, replicas: usize) -> Self {
        Self::up_with(scenario, replicas, &[]).await
    }

    /// The same, with more compose files (after the test's own) and options of `up`.
    async fn up_with(scenario: &str, replicas: usize, more: &[&str]) -> Self {
        static LEFTOVERS: tokio::sync::OnceCell<usize> = tokio::sync::OnceCell::const_new();
        let removed = *LEFTOVERS.get_or_init(remove_leftovers).await;
        if removed > 0 {
            println!("removed {removed} leftovers of an earlier, killed run");
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let published = dir.path().join("test.yml");
        std::fs::write(&published, test_overrides(port)).unwrap();
        let project = format!("hc-e2e-{scenario}");
        let mut compose = compose_command();
        compose.extend(["-p", &project, "-f", "docker-compose.yml", "-f"].map(str::to_owned));
        compose.push("deploy/standin/compose.yml".to_owned());
        compose.extend(["-f".to_owned(), published.display().to_string()]);
        compose.extend(more.iter().map(|s| s.to_string()));
        let stack = Self {
            project,
            port,
            compose,
            _dir: dir,
        };
        let scale = format!("web={replicas}");
        stack
            .ok(&["up", "-d", "--build", "--scale", &scale, "--wait"])
            .await;
        stack
    }

    /// `compose <args>` for this project.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(&self.compose[0]);
        command
            .args(&self.compose[1..])
            .args(args)
            .current_dir(repository());
        command
    }

    /// Runs `compose <args>` for this project; it must succeed. Its stdout, trimmed.
    async fn ok(&self, args: &[&str]) -> String {
        stdout(self.command(args)).await
    }

    /// `up -d --no-recreate --scale web=N --wait`: replicas added or removed, the others left
    /// alone.
    async fn scale(&self, replicas: usize) {
        let scale = format!("web={replicas}");
        let args = [
            "up",
            "-d",
            "--no-deps",
            "--no-recreate",
            "--scale",
            &scale,
            "--wait",
            "web",
        ];
        self.ok(&args).await;
    }

    /// The ids of a service's running containers.
    async fn ids(&self, service: &str) -> BTreeSet<String> {
        let out = self.ok(&["ps", "-q", service]).await;
        out.lines().map(str::to_owned).collect()
    }

    async fn one(&self, service: &str) -> String {
        self.ids(service)
            .await
            .pop_first()
            .expect("a running container")
    }

    /// Redis' `hits`, read inside the Redis container (its port is not published).
    async fn hits(&self) -> i64 {
        count(
            &self
                .ok(&["exec", "-T", "redis", "redis-cli", "GET", "hits"])
                .await,
        )
    }

    /// Exit codes of this project's containers that stopped since `since` (RFC 3339).
    async fn exits_since(&self, since: &str) -> Vec<(String, String)> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let until = engine_now().await;
        let events = docker(&[
            "events",
            "--since",
            since,
            "--until",
            &until,
            "--filter",
            &label,
            "--filter",
            "event=die",
            "--format",
            "{{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}",
        ])
        .await;
        events
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, code)| (name.to_owned(), code.to_owned()))
            .collect()
    }

    /// The proxy's access log.
    async fn proxy_log(&self) -> String {
        self.ok(&["logs", "--no-log-prefix", "proxy"]).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Containers, network, volume and this project's image, whether the test passed or not.
        let down = [
            "down",
            "-v",
            "--rmi",
            "local",
            "--remove-orphans",
            "-t",
            "20",
        ];
        let _ = self.command(&down).output();
    }
}

/// The engine's clock, for `docker events --since`.
async fn engine_now() -> String {
    docker(&["info", "-f", "{{.SystemTime}}"]).await
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn scaling_3_to_5_to_2_under_load_fails_no_request() {
    tier("compose");
    let stack = Stack::up("scale", REPLICAS).await;
    let before = stack.ids("web").await;
    let load = Load::start(stack.port, BURST, usize::MAX, Duration::from_secs(180));
    load.ends(200).await;

    stack.scale(5).await;
    let added: Vec<String> = stack
        .ids("web")
        .await
        .difference(&before)
        .cloned()
        .collect();
    // Each new replica gets traffic within the proxy's DNS interval (1 s) and health checks.
    let mut first_traffic = Vec::new();
    for id in &added {
        let served = eventually(Duration::from_secs(10), async || {
            page_views(&docker(&["logs", id]).await, Some(200)) > 0
        })
        .await;
        assert!(served.is_some(), "new replica {id} got no traffic");
        let started = inspect(id, "{{.State.StartedAt}}").await;
        let log = docker(&["logs", id]).await;
        let first = log.lines().find(|l| l.contains(r#"path="/""#)).unwrap();
        first_traffic.push(unix_seconds(first) - unix_seconds(&started));
    }
    let scaled_down_at = engine_now().await;
    stack.scale(2).await;
    load.ends(200).await; // and on, with two
    let seen = load.stop().await;

    let t = Tally::of(&seen);
    let count = stack.hits().await;
    let exits = stack.exits_since(&scaled_down_at).await;
    t.print("scale 3 -> 5 -> 2", count);
    println!(
        "new replicas' first page view, after their start: {first_traffic:.2?} s; removed: {exits:?}"
    );
    assert_eq!(added.len(), 2);
    assert!(
        first_traffic.iter().all(|s| (0.0..5.0).contains(s)),
        "new replicas waited for traffic: {first_traffic:?} s"
    );
    assert_eq!(t.ok, t.requests, "requests failed while scaling");
    assert_eq!(count, t.ok as i64);
    assert_eq!(t.numbers, (1..=count).collect());
    assert_eq!(exits.len(), 3, "three replicas removed: {exits:?}");
    assert!(
        exits.iter().all(|(_, code)| code == "0"),
        "a removed replica did not exit 0: {exits:?}"
    );
    assert_eq!(stack.ids("web").await.len(), 2);
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn a_replica_killed_under_load_fails_no_request_and_overcounts_only_what_was_sent_twice() {
    tier("compose");
    let stack = Stack::up("kill", REPLICAS).await;
    let victim = stack.one("web").await;

    let mut killed_at = None;
    let seen = under_load(stack.port, BURST, Duration::from_secs(60), async {
        docker(&["kill", &victim]).await;
        killed_at = Some(std::time::Instant::now());
    })
    .await;

    let t = Tally::of(&seen);
    let count = stack.hits().await;
    let retried = haproxy_retried(&stack.proxy_log().await);
    // `docker kill` returns once the container is dead: what was under way then.
    let in_flight = seen.iter().filter(|s| s.spans(killed_at.unwrap())).count();
    let restarts = inspect(&victim, "{{.RestartCount}}").await;
    t.print("docker kill", count);
    println!(
        "sent twice by the proxy: {retried}; under way at the kill: {in_flight}; count - 200s = {}; the killed replica restarted {restarts} time(s)",
        count - t.ok as i64
    );
    t.assert_replica_loss_survived(count, retried, in_flight);
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn redis_restarted_and_killed_under_load_gives_fast_503s_and_keeps_the_count() {
    tier("compose");
    let stack = Stack::up("redis", REPLICAS).await;
    let web_before = stack.ids("web").await;
    let mut started_before = Vec::new();
    for id in &web_before {
        started_before.push(inspect(id, "{{.State.StartedAt}}").await);
    }
    let mut back_after = Vec::new();

    let seen = under_load(stack.port, BURST, Duration::from_secs(120), async {
        for how in [&["restart", "redis"][..], &["kill", "redis"][..]] {
            stack.ok(how).await;
            if how[0] == "kill" {
                stack.ok(&["start", "redis"]).await;
            }
            let served = eventually(Duration::from_secs(10), async || {
                http::is_ok(stack.port, "/").await
            })
            .await;
            back_after.push(served.expect("never served again"));
        }
    })
    .await;

    let t = Tally::of(&seen);
    let count = stack.hits().await;
    let probes = back_after.len() as i64;
    t.print("redis restart+kill", count);
    println!(
        "200 again {back_after:.2?} after Redis was started; count - 200s - {probes} probes = {}",
        count - t.ok as i64 - probes
    );
    t.assert_outage_survived(count, probes);
    // The replicas were not touched: the same containers, never restarted.
    assert_eq!(stack.ids("web").await, web_before);
    for (id, started) in web_before.iter().zip(&started_before) {
        assert_eq!(&inspect(id, "{{.State.StartedAt}}").await, started);
    }
    // The AOF on the volume kept every acknowledged count across the kill: without it Redis
    // would start again from nothing and end below the highest number already served.
    let highest = *t.numbers.last().expect("200s");
    assert!(
        count >= highest,
        "count {count} below a number served, {highest}: the AOF lost counts"
    );
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn a_redeploy_under_load_fails_no_request_and_a_broken_one_is_rolled_back() {
    tier("compose");
    let stack = Stack::up("redeploy", REPLICAS).await;
    let old = stack.ids("web").await;
    let since = engine_now().await;
    let compose = stack.compose.join(" ");
    let redeploy = |broken: bool| {
        let mut command = std::process::Command::new(repository().join("scripts/redeploy"));
        command.env("COMPOSE", &compose).current_dir(repository());
        if broken {
            // New replicas that exit at start-up (exit 2: bad configuration), never healthy.
            command
                .env("PORT_REDIS", "not-a-port")
                .env("REDEPLOY_TIMEOUT", "20");
        }
        output(command)
    };

    let seen = under_load(stack.port, BURST, Duration::from_secs(240), async {
        let out = redeploy(false).await;
        assert!(
            out.status.success(),
            "scripts/redeploy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;

    let t = Tally::of(&seen);
    let count = stack.hits().await;
    let new = stack.ids("web").await;
    let exits = stack.exits_since(&since).await;
    t.print("redeploy", count);
    assert_eq!(t.ok, t.requests, "requests failed during the redeploy");
    assert_eq!(count, t.ok as i64);
    assert_eq!(new.len(), REPLICAS);
    assert!(new.is_disjoint(&old), "every replica was replaced");
    assert_eq!(exits.len(), REPLICAS, "{exits:?}");
    assert!(
        exits.iter().all(|(_, code)| code == "0"),
        "an old replica did not exit 0: {exits:?}"
    );

    // A release that never becomes healthy: the new replicas are removed again, the running
    // ones serve on, and a second try does not pile up more.
    let mut outs = Vec::new();
    let seen = under_load(stack.port, BURST, Duration::from_secs(240), async {
        for _ in 0..2 {
            outs.push(redeploy(true).await);
        }
    })
    .await;
    let broken = Tally::of(&seen);
    broken.print("broken redeploy", stack.hits().await);
    for out in &outs {
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a broken redeploy succeeded: {said}");
        assert!(said.contains("did not become healthy"), "{said}");
    }
    assert_eq!(
        broken.ok, broken.requests,
        "requests failed during the broken redeploy"
    );
    assert_eq!(
        stack.ids("web").await,
        new,
        "the running replicas were touched"
    );
    let all = stack.ok(&["ps", "-aq", "web"]).await;
    assert_eq!(
        all.lines().count(),
        REPLICAS,
        "new replicas were left behind: {all}"
    );
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn the_count_survives_down_and_up_resets_with_down_v_and_stop_drains_to_exit_0() {
    tier("compose");
    let stack = Stack::up("lifecycle", 2).await;
    let page = async || http::get(stack.port, "/").await.expect("an answer").hits();
    for n in 1..=3 {
        assert_eq!(page().await, n);
    }

    stack.ok(&["down"]).await;
    stack.ok(&["up", "-d", "--scale", "web=2", "--wait"]).await;
    let after_down_up = page().await;
    stack.ok(&["down", "-v"]).await;
    stack.ok(&["up", "-d", "--scale", "web=2", "--wait"]).await;
    let after_down_v = page().await;
    let web = stack.ids("web").await;
    let stopping = Instant::now();
    stack.ok(&["stop"]).await;
    let stop_took = stopping.elapsed();

    println!("down/up: {after_down_up}; down -v/up: {after_down_v}; stop took {stop_took:.1?}");
    assert_eq!(
        after_down_up, 4,
        "the count survives down and up (named volume, AOF)"
    );
    assert_eq!(after_down_v, 1, "down -v resets it");
    assert!(
        stop_took < Duration::from_secs(10),
        "stop waited for the grace period: {stop_took:?}"
    );
    for id in &web {
        assert_eq!(
            inspect(id, "{{.State.ExitCode}}").await,
            "0",
            "{id} was not stopped cleanly"
        );
        let log = docker(&["logs", "--tail", "3", id]).await;
        assert!(
            log.contains("all connections closed"),
            "{id} did not drain:\n{log}"
        );
    }
}

/// Counters of the TCP stack a process sees (its network namespace): `ActiveOpens` of
/// /proc/<pid>/net/snmp, and the sockets in TIME_WAIT in /proc/<pid>/net/tcp.
fn tcp_counters(pid: &str) -> (u64, usize) {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "ActiveOpens")
        .unwrap();
    let opens = values.split_whitespace().nth(at).unwrap().parse().unwrap();
    let sockets = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let time_wait = sockets
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("06"))
        .count();
    (opens, time_wait)
}

/// What wrk reported: requests, requests per second, and errors (non-2xx answers and socket
/// errors of every kind). A report it cannot read fails the test.
fn wrk_report(report: &str) -> (i64, f64, i64) {
    let after = |needle: &str| {
        report
            .lines()
            .find_map(|l| Some(l.split_once(needle)?.1.trim()))
    };
    let number = |text: &str| {
        text.trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number in wrk's report: {text:?}\n{report}"))
    };
    let requests = report
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .map(number);
    let rate = after("Requests/sec:").map(number);
    let (Some(requests), Some(rate)) = (requests, rate) else {
        panic!("not a wrk report:\n{report}");
    };
    // Both lines appear only when there are such errors.
    let non_2xx = after("Non-2xx or 3xx responses:").map_or(0.0, number);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: f64 = after("Socket errors:").map_or(0.0, |counts| {
        counts
            .split(',')
            .map(|kind| number(kind.split_whitespace().last().unwrap_or_default()))
            .sum()
    });
    (requests as i64, rate, (non_2xx + socket) as i64)
}

#[test]
fn wrk_reports_are_read_or_fail() {
    let report = "  1000 requests in 2.00s, 1.2MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:    500.25\n";
    assert_eq!(wrk_report(report), (1000, 500.25, 7));
    let garbled = std::panic::catch_unwind(|| wrk_report("Requests/sec: n/a\n"));
    assert!(garbled.is_err(), "an unreadable report read as something");
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn two_minutes_of_load_through_the_proxy_without_an_error() {
    tier("compose");
    let seconds: u64 = std::env::var("E2E_SUSTAINED_SECS")
        .map_or(120, |s| s.parse().expect("E2E_SUSTAINED_SECS: seconds"));
    let stack = Stack::up("sustained", REPLICAS).await;
    let proxy_pid = inspect(&stack.one("proxy").await, "{{.State.Pid}}").await;
    let before = stack.hits().await;
    let (opens_before, _) = tcp_counters(&proxy_pid);

    let url = format!("http://127.0.0.1:{}/", stack.port);
    let mut wrk = std::process::Command::new("wrk");
    wrk.args([
        "-t2",
        "-c32",
        &format!("-d{seconds}s"),
        "--timeout",
        "5s",
        &url,
    ]);
    let out = output(wrk).await;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();

    let (opens_after, time_wait) = tcp_counters(&proxy_pid);
    let (requests, rate, errors) = wrk_report(&report);
    let count = stack.hits().await - before;
    let per_1000 = (opens_after - opens_before) as f64 * 1000.0 / requests.max(1) as f64;
    println!("{report}");
    println!(
        "sustained {seconds} s: {requests} requests, {rate:.0} req/s, {errors} errors; proxy opened {} connections ({per_1000:.2} per 1,000 requests, health checks included); {time_wait} in TIME_WAIT at the end; Redis counted {count}",
        opens_after - opens_before
    );
    assert!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(requests > 0, "wrk's report: {report}");
    assert_eq!(errors, 0, "errors under sustained load");
    // wrk stops with up to 32 requests in flight: counted by Redis, not by wrk.
    assert!(
        (0..=32).contains(&(count - requests)),
        "count {count}, requests {requests}"
    );
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn leftovers_of_a_killed_run_are_removed_and_nothing_unlabelled_is_touched() {
    tier("compose");
    let labelled = "hc-e2e-leftover";
    let unlabelled = format!("hc-e2e-unlabelled-{}", std::process::id());
    docker(&["network", "create", "--label", LABEL, labelled]).await;
    docker(&["network", "create", &unlabelled]).await;

    let removed = remove_leftovers().await;
    let networks = docker(&["network", "ls", "--format", "{{.Name}}"]).await;
    docker(&["network", "rm", &unlabelled]).await;

    assert!(removed >= 1, "nothing removed");
    assert!(
        !networks.lines().any(|n| n == labelled),
        "the labelled network is still there"
    );
    assert!(
        networks.lines().any(|n| n == unlabelled),
        "an unlabelled network was removed"
    );
}

/// One notification Alertmanager posted to [`AlertSink`]: when it came, and each alert in it
/// as (alertname, "firing" or "resolved").
#[derive(Debug)]
struct Notification {
    at: Instant,
    alerts: Vec<(String, String)>,
}

/// The test's own webhook receiver: axum on the host's address that `host-gateway` names
/// inside a container (docker0's), recording every notification. A body it cannot read is
/// recorded as an error, which fails the test.
struct AlertSink {
    address: String,
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Result<Notification, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AlertSink {
    async fn start() -> Self {
        // What `host-gateway` is, asked of the engine (the default bridge's IPAM may not say).
        let args = [
            "run",
            "--rm",
            "--network",
            "none",
            "--add-host",
            "alert-sink:host-gateway",
        ];
        let image = "hit-counter-standin/debian:bookworm-slim";
        let hosts = docker(&[&args[..], &[image, "getent", "hosts", "alert-sink"]].concat()).await;
        let address = hosts
            .split_whitespace()
            .next()
            .expect("an address")
            .to_owned();
        let listener = tokio::net::TcpListener::bind((address.as_str(), 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = received.clone();
        let receive = move |body: String| {
            record.lock().unwrap().push(Self::read(&body));
            std::future::ready(())
        };
        let app = axum::Router::new().route("/", axum::routing::post(receive));
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            address,
            port,
            received,
            task,
        }
    }

    /// Alertmanager's webhook JSON: each alert's name and status.
    fn read(body: &str) -> Result<Notification, String> {
        let json: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        let alerts = json["alerts"].as_array().ok_or("no alerts")?;
        let alerts = alerts
            .iter()
            .map(
                |a| match (a["labels"]["alertname"].as_str(), a["status"].as_str()) {
                    (Some(name), Some(status)) => Ok((name.to_owned(), status.to_owned())),
                    _ => Err(format!("an alert without alertname or status: {a}")),
                },
            )
            .collect::<Result<_, _>>()?;
        Ok(Notification {
            at: Instant::now(),
            alerts,
        })
    }

    /// When the first notification since `since` that says `alert` is `status` came, if one
    /// has.
    fn first(&self, alert: &str, status: &str, since: Instant) -> Option<Instant> {
        let received = self.received.lock().unwrap();
        let errors: Vec<&String> = received.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(errors.is_empty(), "unreadable notifications: {errors:?}");
        received
            .iter()
            .flatten()
            .find(|n| n.at >= since && n.alerts.iter().any(|(a, s)| a == alert && s == status))
            .map(|n| n.at)
    }
}

impl Drop for AlertSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The compose file that makes the monitoring stack send its notifications to `sink`: the
/// name alert-sink points at the docker0 gateway, and alertmanager.yml's URL at the sink's
/// port (Alertmanager reads no variables; the file is otherwise the repository's).
fn alert_sink_override(dir: &Path, sink: &AlertSink) -> std::path::PathBuf {
    let shipped =
        std::fs::read_to_string(repository().join("deploy/prometheus/alertmanager.yml")).unwrap();
    let url = "url: http://alert-sink:9095/";
    assert!(shipped.contains(url), "alertmanager.yml posts elsewhere");
    let config = dir.join("alertmanager.yml");
    let ours = shipped.replace(url, &format!("url: http://alert-sink:{}/", sink.port));
    std::fs::write(&config, ours).unwrap();
    let file = dir.join("alert-sink.yml");
    let yaml = format!(
        "services:
  alertmanager:
    extra_hosts: [\"alert-sink:{}\"]
    volumes: !override
      - \"{}:/etc/alertmanager/alertmanager.yml:ro\"
",
        sink.address,
        config.display()
    );
    std::fs::write(&file, yaml).unwrap();
    file
}

/// `GET path` of a server on 127.0.0.1:`port`, as JSON. HTTP/1.0: the answer is not chunked.
async fn json(port: u16, path: &str) -> serde_json::Value {
    let raw = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let response = http::send(port, raw.as_bytes()).await.unwrap();
    assert_eq!(response.status, 200, "{path}: {}", response.body());
    serde_json::from_str(&response.body()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

impl Stack {
    /// The loopback port compose published for `service`'s `port`.
    async fn published(&self, service: &str, port: &str) -> u16 {
        let out = self.ok(&["port", service, port]).await;
        let (_, port) = out.rsplit_once(':').expect("host:port");
        port.parse().expect("a port number")
    }

    /// The web replicas' addresses on the stack's network.
    async fn web_addresses(&self) -> BTreeSet<String> {
        let mut addresses = BTreeSet::new();
        for id in self.ids("web").await {
            let format = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}";
            addresses.insert(inspect(&id, format).await);
        }
        addresses
    }
}

/// Prometheus' active targets of `job` that are up, by address, and how many there are in all.
async fn targets_up(prometheus: u16, job: &str) -> (BTreeSet<String>, usize) {
    let targets = json(prometheus, "/api/v1/targets?state=active").await;
    let all: Vec<&serde_json::Value> = targets["data"]["activeTargets"]
        .as_array()
        .expect("activeTargets")
        .iter()
        .filter(|t| t["labels"]["job"] == job)
        .collect();
    let up = all
        .iter()
        .filter(|t| t["health"] == "up")
        .map(|t| {
            let instance = t["labels"]["instance"].as_str().expect("an instance");
            instance
                .rsplit_once(':')
                .expect("address:port")
                .0
                .to_owned()
        })
        .collect();
    (up, all.len())
}

/// The monitoring profile end to end: Prometheus scrapes each web replica as the stack scales
/// 3 -> 5 -> 2, and the proxy and Redis; Redis stopped under load makes RedisUnavailable and
/// the burn-rate page fire and reach the test's webhook; Redis back resolves RedisUnavailable.
#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=compose (scripts/test)"]
async fn monitoring_follows_the_replicas_and_pages_on_a_redis_outage() {
    tier("compose");
    let sink = AlertSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sink_file = alert_sink_override(dir.path(), &sink).display().to_string();
    let more = ["-f", &sink_file, "--profile", "monitoring"];
    let stack = Stack::up_with("monitoring", REPLICAS, &more).await;
    let prometheus = stack.published("prometheus", "9090").await;
    let alertmanager = stack.published("alertmanager", "9093").await;

    // Every replica scraped, each by its own address, and nothing else in the job.
    let mut followed = Vec::new();
    for n in [REPLICAS, 5, 2] {
        let started = Instant::now();
        if n != REPLICAS {
            stack.scale(n).await;
        }
        let addresses = stack.web_addresses().await;
        assert_eq!(addresses.len(), n);
        let mut seen = (BTreeSet::new(), 0);
        let all_up = eventually(Duration::from_secs(60), async || {
            seen = targets_up(prometheus, "web").await;
            seen == (addresses.clone(), n)
        })
        .await;
        assert!(
            all_up.is_some(),
            "at {n} replicas Prometheus scrapes {seen:?}, not {addresses:?}"
        );
        followed.push((n, started.elapsed()));
    }
    for job in ["haproxy", "redis"] {
        let up = eventually(Duration::from_secs(30), async || {
            targets_up(prometheus, job).await.0.len() == 1
        })
        .await;
        assert!(up.is_some(), "the {job} target is not up");
    }

    // Load through the proxy: 2 keep-alive clients, 20 page views a second each.
    let shape = crate::common::load::Shape {
        clients: 2,
        keep_alive: true,
        pace: Some(Duration::from_millis(50)),
    };
    // E2E_BURN_RESOLVED=1 (not in scripts/test) also waits, up to 40 minutes under the same
    // load, for the burn-rate page to be resolved: its 6x leg holds an outage for 30 minutes.
    let burn_resolved = std::env::var_os("E2E_BURN_RESOLVED").is_some();
    let max_time = Duration::from_secs(if burn_resolved { 3000 } else { 400 });
    let load = Load::start(stack.port, shape, usize::MAX, max_time);
    load.ends(400).await;
    // Quiet before the outage: neither page pending nor firing.
    let pages = ["RedisUnavailable", "PageViewErrorBudgetBurn"];
    let before = json(prometheus, "/api/v1/alerts").await;
    let active: Vec<&str> = before["data"]["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str())
        .collect();
    assert!(
        !active.iter().any(|a| pages.contains(a)),
        "a page was active before Redis stopped: {active:?}"
    );
    stack.ok(&["stop", "redis"]).await;
    let stopped = Instant::now();
    let fired = eventually(Duration::from_secs(150), async || {
        pages
            .iter()
            .all(|a| sink.first(a, "firing", stopped).is_some())
    })
    .await;
    let alerts_now = json(alertmanager, "/api/v2/alerts").await;
    assert!(
        fired.is_some(),
        "not every page reached the webhook within 150 s; Alertmanager has: {alerts_now}"
    );
    stack.ok(&["start", "redis"]).await;
    let started = Instant::now();
    let resolved = eventually(Duration::from_secs(90), async || {
        sink.first("RedisUnavailable", "resolved", started)
            .is_some()
    })
    .await;
    let burn_ended = if burn_resolved {
        eventually(Duration::from_secs(2400), async || {
            sink.first("PageViewErrorBudgetBurn", "resolved", started)
                .is_some()
        })
        .await
    } else {
        None
    };
    load.ends(400).await;
    let seen = load.stop().await;

    let t = Tally::of(&seen);
    let after = |at: Option<Instant>, from: Instant| at.map(|at| at.duration_since(from));
    t.print("monitoring", stack.hits().await);
    println!(
        "Prometheus scraped every replica, and only those, within {followed:.1?} of each step"
    );
    for alert in pages {
        println!(
            "{alert}: webhook firing {:.1?} after `stop redis`, resolved {:.1?} after `start redis`",
            after(sink.first(alert, "firing", stopped), stopped),
            after(sink.first(alert, "resolved", started), started),
        );
    }
    assert!(
        t.unavailable > 0 && t.ok > 0,
        "the load saw no outage: {} 200s, {} 503s",
        t.ok,
        t.unavailable
    );
    assert!(
        burn_ended.is_some() || !burn_resolved,
        "the burn-rate page was not resolved within 40 minutes"
    );
    assert!(
        resolved.is_some(),
        "RedisUnavailable was not resolved within 90 s of Redis' start; Alertmanager has: {}",
        json(alertmanager, "/api/v2/alerts").await
    );
}
