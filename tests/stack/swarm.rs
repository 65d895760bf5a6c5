//! The stack on a real multi-node Docker Swarm, end to end under load: `scripts/swarm up`
//! (three nodes, each a container running its own engine, the images pulled from the
//! cluster's registry, deploy/swarm/stack.yml), then Swarm itself starts, moves, replaces and
//! stops the replicas while clients count through the proxy, and every count is checked.
//!
//! One cluster for every scenario: a cluster takes a minute or more to build, so the scenarios
//! run in sequence in one test, each printing its row. `scripts/swarm down` removes the cluster
//! afterwards (a `Drop`, passed or failed) and before (what a killed run left).
//!
//! Needs a Docker engine and the stand-ins (`scripts/swarm up` runs `scripts/images`):
//!
//!   HIT_COUNTER_TIERS=swarm cargo test --locked --test stack swarm:: -- --ignored --nocapture
//!
//! Traffic goes only to the proxy's port on 127.0.0.1, published by the manager's container.
//! Docker's userland proxy on that port runs out of ports after ~28k new connections a minute,
//! so the scenarios' load keeps its connections open and is paced ([`STEADY`]); a connection
//! per request ([`BURST`]) runs only a bounded burst.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::docker::{count, docker, page_views, stdout};
use crate::common::load::{
    BURST, CLIENTS, Load, STEADY, Seen, Tally, Timeline, assert_failures_bounded,
    assert_linearizable, under_load,
};
use crate::common::{dies_with_test, eventually, free_port, haproxy_retried, settled, tier};

/// The cluster's name (`SWARM_NAME`): its containers' and network's prefix and its label, apart
/// from the default `hc-swarm` someone may be running by hand.
const NAME: &str = "hc-swarm-it";
/// Its bridge network (`SWARM_SUBNET`): node K at .(10+K).
const SUBNET_PREFIX: &str = "10.213.1";
const NODES: usize = 3;
/// scripts/swarm's layout: node 1 the manager (both proxies), each node a Redis node and a
/// Sentinel (deploy/redis-ha/SWARM.md) and a web replica; node 3 the worker the scenarios drain,
/// cut off and lose.
const WORKER: usize = 3;
const WEB: &str = "hit-counter_web";
const PROXY: &str = "hit-counter_proxy";
/// The Redis proxy (HAProxy in front of the three Redis nodes and their Sentinels): the one
/// address the web replicas know.
const REDIS: &str = "hit-counter_redis";
const REPLICAS: usize = 3;

/// HAProxy's `timeout server` (deploy/haproxy/haproxy.cfg): a request in flight on a replica
/// whose node froze is answered 504 after this long.
const PROXY_SERVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after an event the proxy may still send requests to a replica it cut off: one
/// readiness check interval (250 ms) plus its timeout (`timeout check`, 1 s), with room for a
/// busy machine.
const DETECTION: Duration = Duration::from_secs(2);

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn node_name(k: usize) -> String {
    format!("{NAME}-{k}")
}

/// One swarm task, as `docker service ps` lists it.
#[derive(Debug)]
struct Task {
    id: String,
    node: String,
    desired: String,
    /// "Running", "Starting", "Shutdown", "Failed", ... (the first word of CURRENT STATE)
    state: String,
    image: String,
    error: String,
}

impl Task {
    /// Wanted and running (and healthy: Swarm says Running only after the health check).
    fn serving(&self) -> bool {
        self.desired == "Running" && self.state == "Running"
    }
}

/// The cluster `scripts/swarm up` built, removed with `scripts/swarm down` on drop.
struct Swarm {
    port: u16,
}

impl Swarm {
    /// `scripts/swarm` with this cluster's settings.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(repository().join("scripts/swarm"));
        command
            .args(args)
            .current_dir(repository())
            .env("SWARM_NAME", NAME)
            .env("SWARM_SUBNET", format!("{SUBNET_PREFIX}.0/24"))
            .env("SWARM_PORT", self.port.to_string())
            // The stack's defaults: the page views are counted in the text log.
            .env_remove("LOG_FORMAT")
            .env_remove("RUST_LOG");
        command
    }

    async fn swarm(&self, args: &[&str]) -> String {
        stdout(self.command(args)).await
    }

    /// Removes whatever an earlier, killed run left, then builds the cluster.
    async fn up() -> Self {
        let cluster = Self { port: free_port() };
        cluster.down();
        let started = Instant::now();
        let log = cluster.swarm(&["up", &NODES.to_string()]).await;
        println!("{log}\nscripts/swarm up {NODES}: {:.1?}", started.elapsed());
        cluster
    }

    fn down(&self) {
        let mut command = self.command(&["down"]);
        dies_with_test(&mut command);
        match command.output() {
            Ok(out) if out.status.success() => {
                println!("{}", String::from_utf8_lossy(&out.stdout).trim())
            }
            Ok(out) => eprintln!(
                "scripts/swarm down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("scripts/swarm down: {e}"),
        }
    }

    /// `docker <args>` on the manager.
    async fn docker(&self, args: &[&str]) -> String {
        let mut all = vec!["docker"];
        all.extend_from_slice(args);
        self.swarm(&all).await
    }

    /// A command inside node `k`'s container.
    async fn node(&self, k: usize, args: &[&str]) -> String {
        let k = k.to_string();
        let mut all = vec!["node", &k];
        all.extend_from_slice(args);
        self.swarm(&all).await
    }

    /// Redis' `hits`, read inside the Redis task (its port is published nowhere).
    async fn hits(&self) -> i64 {
        count(&self.swarm(&["redis-cli", "GET", "hits"]).await)
    }

    /// The node (1..=3) of the Redis primary a majority of the Sentinels names, if any.
    async fn primary(&self) -> Option<usize> {
        let out = crate::common::docker::output(self.command(&["primary"])).await;
        let k = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
        k.filter(|_| out.status.success())
    }

    /// The node Sentinel `j` names as the primary (`redis-K`), asked inside its own task (no
    /// name to resolve).
    async fn named_by(&self, j: usize) -> String {
        let args = [
            "sentinel",
            &j.to_string(),
            "SENTINEL",
            "get-master-addr-by-name",
            "hits",
        ];
        let answer = self.swarm(&args).await;
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// The running task of `service` (the first, if it has several).
    async fn task(&self, service: &str) -> Task {
        self.serving(service).await.pop().expect("a running task")
    }

    /// `task`'s container, on its node: (node, container id).
    async fn container(&self, task: &Task) -> (usize, String) {
        let k = (1..=NODES)
            .find(|k| node_name(*k) == task.node)
            .expect("a node of this cluster");
        let filter = format!("label=com.docker.swarm.task.id={}", task.id);
        let id = self
            .node(k, &["docker", "ps", "-q", "--filter", &filter])
            .await;
        assert!(!id.is_empty(), "no container for task {}", task.id);
        (k, id)
    }

    /// `service`'s running task's address on the stack's network.
    async fn task_address(&self, service: &str) -> String {
        let (k, id) = self.container(&self.task(service).await).await;
        let format = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}";
        let addresses = self
            .node(k, &["docker", "inspect", "-f", format, &id])
            .await;
        addresses
            .split_whitespace()
            .next()
            .expect("an address")
            .to_owned()
    }

    /// Adds (`-I`) or removes (`-D`) rules that drop everything between `task` and `peers`,
    /// inside its container's network namespace: exactly that container is cut off, not its
    /// node.
    async fn cut(&self, task: &Task, peers: &[String], op: &str) {
        let rules: Vec<String> = peers
            .iter()
            .map(|p| {
                format!("iptables {op} OUTPUT -d {p} -j DROP && iptables {op} INPUT -s {p} -j DROP")
            })
            .collect();
        self.iptables(task, &rules.join(" && ")).await;
    }

    /// Adds (`-I`) or removes (`-D`) a rule that rejects every query `task` sends to the
    /// engine's DNS server (127.0.0.11 in each container): its names stop resolving at once,
    /// as Swarm's own DNS does for a while after a node comes back.
    async fn dns_down(&self, task: &Task, op: &str) {
        let rule = format!("iptables {op} OUTPUT -d 127.0.0.11 -j REJECT");
        self.iptables(task, &rule).await;
    }

    /// Whether Swarm's DNS, asked from inside `task`'s container, resolves `redis-1`.
    async fn dns_answers(&self, task: &Task) -> bool {
        let (k, id) = self.container(task).await;
        let k = k.to_string();
        let args = [
            "node", &k, "docker", "exec", &id, "getent", "-s", "dns", "ahostsv4", "redis-1",
        ];
        crate::common::docker::output(self.command(&args))
            .await
            .status
            .success()
    }

    /// `rules` (a shell command) run in `task`'s container's network namespace.
    async fn iptables(&self, task: &Task, rules: &str) {
        let (k, id) = self.container(task).await;
        let pid = self
            .node(k, &["docker", "inspect", "-f", "{{.State.Pid}}", &id])
            .await;
        self.node(k, &["nsenter", "-t", &pid, "-n", "sh", "-c", rules])
            .await;
    }

    /// Requests the proxy's log shows it sent more than once, since the stack started.
    async fn retried(&self) -> usize {
        haproxy_retried(&self.docker(&["service", "logs", "--raw", PROXY]).await)
    }

    /// Redis' `hits` once it has stopped moving for a second (at most 20 s): requests a frozen
    /// replica held reach Redis when it thaws, before Swarm stops it.
    async fn settled_hits(&self) -> i64 {
        self.hits_quiet_for(Duration::from_secs(1)).await
    }

    /// Redis' `hits` once it has not moved for `quiet` (at most 20 s beyond it).
    async fn hits_quiet_for(&self, quiet: Duration) -> i64 {
        let hits = settled(quiet, Duration::from_secs(20), async || self.hits().await).await;
        hits.expect("Redis' count never settled")
    }

    /// `<state> <exit code>` of each task in `ids`, a line each.
    async fn task_exits(&self, ids: &[&str]) -> String {
        if ids.is_empty() {
            return String::new();
        }
        let mut args = vec!["inspect", "--type", "task", "-f"];
        args.push("{{.Status.State}} {{with .Status.ContainerStatus}}{{.ExitCode}}{{end}}");
        args.extend(ids);
        self.docker(&args).await
    }

    async fn tasks(&self, service: &str) -> Vec<Task> {
        let format =
            "{{.ID}}\t{{.Node}}\t{{.DesiredState}}\t{{.CurrentState}}\t{{.Image}}\t{{.Error}}";
        let out = self
            .docker(&["service", "ps", "--no-trunc", "--format", format, service])
            .await;
        out.lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                Task {
                    id: f[0].to_owned(),
                    node: f[1].to_owned(),
                    desired: f[2].to_owned(),
                    state: f[3].split_whitespace().next().unwrap_or("").to_owned(),
                    image: f[4].to_owned(),
                    error: f.get(5).copied().unwrap_or("").to_owned(),
                }
            })
            .collect()
    }

    async fn serving(&self, service: &str) -> Vec<Task> {
        let mut tasks = self.tasks(service).await;
        tasks.retain(Task::serving);
        tasks
    }

    /// Tasks whose container still runs, wanted or not (a replica being removed drains first).
    async fn still_running(&self, service: &str) -> usize {
        let tasks = self.tasks(service).await;
        tasks.iter().filter(|t| t.state == "Running").count()
    }

    /// Requests for `/` a task logged: those answered `status`, or all (`None`).
    async fn page_views(&self, task: &str, status: Option<u16>) -> usize {
        let log = self.docker(&["service", "logs", "--raw", task]).await;
        page_views(&log, status)
    }

    async fn update_state(&self) -> String {
        let format = "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}";
        self.docker(&["service", "inspect", "-f", format, WEB])
            .await
    }

    async fn node_status(&self, k: usize) -> String {
        self.docker(&["node", "inspect", "-f", "{{.Status.State}}", &node_name(k)])
            .await
    }

    /// `docker service scale` without waiting (the CLI's own wait adds seconds of "verify"),
    /// then until exactly `n` replicas run: the new ones healthy, the removed ones gone.
    async fn scale(&self, n: usize) -> Duration {
        let started = Instant::now();
        self.docker(&["service", "scale", "-d", &format!("{WEB}={n}")])
            .await;
        let done = eventually(Duration::from_secs(90), async || {
            self.serving(WEB).await.len() == n && self.still_running(WEB).await == n
        })
        .await;
        assert!(done.is_some(), "{WEB} did not get to {n} replicas");
        started.elapsed()
    }

    /// One replica on each node again (after a drain or a lost node, Swarm does not move
    /// replicas back by itself): scale up by the number of empty nodes, which the scheduler
    /// fills first, then down, which removes replicas from the nodes with the most.
    async fn spread(&self) {
        for _ in 0..3 {
            let mut per_node: BTreeMap<String, usize> =
                (1..=NODES).map(|k| (node_name(k), 0)).collect();
            for task in self.serving(WEB).await {
                *per_node.entry(task.node).or_default() += 1;
            }
            let empty = per_node.values().filter(|n| **n == 0).count();
            if empty == 0 && per_node.values().sum::<usize>() == REPLICAS {
                return;
            }
            self.scale(REPLICAS + empty).await;
            self.scale(REPLICAS).await;
        }
        panic!("could not get one replica on each node");
    }

    /// The last 80 lines `service` logged, newest first, to stderr: why a scenario failed.
    async fn print_log_tail(&self, service: &str) {
        let log = self
            .docker(&["service", "logs", "--raw", "-t", service])
            .await;
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!(
            "---- {service}, last lines (newest first) ----\n{}",
            tail.join("\n")
        );
    }

    /// What the Redis proxy, the Sentinels and the Redis nodes logged (their logs are short:
    /// state changes only), and where each stands now: why a failover went as it did.
    async fn print_redis_logs(&self) {
        self.print_log_tail(REDIS).await;
        for k in 1..=NODES {
            self.print_log_tail(&format!("hit-counter_sentinel-{k}"))
                .await;
            self.print_log_tail(&format!("hit-counter_redis-{k}")).await;
        }
        eprintln!("---- now ----\n{}", self.swarm(&["redis-status"]).await);
    }

    /// No failed request, every number shown once and from this scenario's range, and Redis
    /// counted the 200s, plus at most the requests the proxy's log shows it sent again in the
    /// scenario (`retried` is its count before: a request whose connection to a replica closed
    /// before any answer is sent to another; if the first replica had counted it, it counts
    /// twice). On a failed request, prints what the proxy logged (only errors, retries and its
    /// servers going up or down: option dontlog-normal) and the replicas' warnings.
    async fn assert_nothing_lost(&self, t: &Tally, before: i64, after: i64, retried: usize) {
        if t.ok != t.requests {
            self.print_log_tail(PROXY).await;
            let web = self.docker(&["service", "logs", "--raw", WEB]).await;
            let warnings = web.lines().filter(|l| !l.contains(" INFO "));
            eprintln!(
                "---- the replicas' warnings ----\n{}",
                warnings.collect::<Vec<_>>().join("\n")
            );
        }
        assert_eq!(t.ok, t.requests, "requests failed");
        let retried = self.retried().await - retried;
        let extra = after - before - t.ok as i64;
        assert!(extra >= 0, "Redis' count is below the 200s: lost");
        assert!(
            extra as usize <= retried,
            "Redis counted {extra} more than the 200s; the proxy sent {retried} again"
        );
        let range = before + 1..=after;
        assert!(
            t.numbers.iter().all(|n| range.contains(n)),
            "a number outside the scenario's range"
        );
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let started = Instant::now();
        self.down();
        println!("scripts/swarm down: {:.1?}", started.elapsed());
    }
}

/// A scenario's result, for the summary at the end.
struct Row {
    scenario: &'static str,
    tally: Tally,
    count: i64,
    took: Duration,
}

impl Row {
    fn new(scenario: &'static str, tally: Tally, count: i64, started: Instant) -> Self {
        tally.print(scenario, count);
        Self {
            scenario,
            tally,
            count,
            took: started.elapsed(),
        }
    }
}

/// The stack as deployed: one replica on each node, each serving, every count once.
async fn deploy(c: &Swarm) -> Row {
    let started = Instant::now();
    let retried = c.retried().await;
    let before = c.hits().await; // scripts/swarm up's own GET /
    let web = c.serving(WEB).await;
    // A bounded burst with the project's generator, a connection per request.
    let seen = Load::run(c.port, BURST, 3_000, Duration::from_secs(60)).await;
    let t = Tally::of(&seen);
    let after = c.hits().await;
    let mut served = Vec::new();
    for task in &web {
        served.push(c.page_views(&task.id, Some(200)).await);
    }
    let row = Row::new("deploy", t, after - before, started);
    let nodes: BTreeSet<&str> = web.iter().map(|t| t.node.as_str()).collect();
    println!("replicas on {nodes:?}; page views each (their logs, since the start): {served:?}");
    assert_eq!(web.len(), REPLICAS);
    let all: BTreeSet<String> = (1..=NODES).map(node_name).collect();
    assert_eq!(
        nodes,
        all.iter().map(String::as_str).collect(),
        "one replica on each node"
    );
    c.assert_nothing_lost(&row.tally, before, after, retried)
        .await;
    assert!(
        served.iter().all(|n| *n > 0),
        "a replica served nothing: {served:?}"
    );
    assert_eq!(
        served.iter().sum::<usize>() as i64,
        after,
        "every page view was logged once"
    );
    // As configured, not just as written: the containers Swarm made on each node.
    let format = "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}";
    for k in 1..=NODES {
        let filter = format!("label=com.docker.swarm.service.name={WEB}");
        let id = c
            .node(k, &["docker", "ps", "-q", "--filter", &filter])
            .await;
        let config = c.node(k, &["docker", "inspect", "-f", format, &id]).await;
        assert_eq!(
            config, "10001:10001 true [ALL] 67108864 1000000000",
            "node {k}: user, read-only root, capabilities, memory and CPU limits"
        );
    }
    row
}

/// `docker service scale web=6`, then `web=2`, under load; back to 3 afterwards.
async fn scale(c: &Swarm) -> Row {
    let started = Instant::now();
    let retried = c.retried().await;
    let before = c.hits().await;
    let mut took = Vec::new();
    let sent = under_load(c.port, STEADY, Duration::from_secs(180), async {
        took.push(c.scale(6).await);
        // Traffic on all six before scaling down.
        let mut views = Vec::new();
        let all_six = eventually(Duration::from_secs(30), async || {
            views.clear();
            for task in c.serving(WEB).await {
                views.push(c.page_views(&task.id, Some(200)).await);
            }
            views.len() == 6 && views.iter().all(|n| *n > 0)
        })
        .await;
        assert!(
            all_six.is_some(),
            "not every replica got traffic: {views:?}"
        );
        took.push(c.scale(2).await);
    })
    .await;
    let after = c.hits().await;
    let row = Row::new("scale 3->6->2", Tally::of(&sent), after - before, started);
    println!(
        "scaled to 6 in {:.1?} (healthy), to 2 in {:.1?} (drained, gone)",
        took[0], took[1]
    );
    c.assert_nothing_lost(&row.tally, before, after, retried)
        .await;
    c.scale(REPLICAS).await;
    row
}

/// The worker's web replica cut off from Redis (iptables in its own network namespace: every
/// packet to and from the Redis proxy's task is dropped) while the other replicas still reach
/// it.
async fn partition(c: &Swarm) -> Row {
    c.spread().await;
    let started = Instant::now();
    let victim = c
        .serving(WEB)
        .await
        .into_iter()
        .find(|t| t.node == node_name(WORKER))
        .expect("a replica on the worker");
    let redis = [c.task_address(REDIS).await];
    let before = c.hits().await;
    let downs = async || {
        let log = c.docker(&["service", "logs", "--raw", PROXY]).await;
        log.lines().filter(|l| l.contains(" is DOWN")).count()
    };
    let downs_before = downs().await;
    let mut cut = None;
    let mut out_of_rotation = (0, 0);
    let mut back_after = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(120), async {
        let cutting = Instant::now();
        c.cut(&victim, &redis, "-I").await;
        cut = Some((cutting, Instant::now()));
        // The proxy's readiness check takes it out, and says so in its log.
        let out = eventually(Duration::from_secs(10), async || {
            downs().await > downs_before
        })
        .await;
        assert!(
            out.is_some(),
            "the proxy never took the cut-off replica out"
        );
        // Requests it had already taken end within REDIS_TIMEOUT_MS (a 503 each): wait until
        // its log stops growing for a second.
        let quiet = settled(
            Duration::from_secs(1),
            Duration::from_secs(10),
            async || c.page_views(&victim.id, None).await,
        )
        .await;
        let first = quiet.expect("the cut-off replica kept logging requests");
        // A window in which it must get no request.
        tokio::time::sleep(Duration::from_secs(4)).await;
        out_of_rotation = (first, c.page_views(&victim.id, None).await);
        c.cut(&victim, &redis, "-D").await;
        let during = out_of_rotation.1;
        back_after = eventually(Duration::from_secs(10), async || {
            c.page_views(&victim.id, None).await > during
        })
        .await;
    })
    .await;
    // The INCRs the cut-off replica sent into the cut are still in its sockets' send queues
    // (it replaced those connections, but the kernel keeps retransmitting): they reach Redis
    // a retransmission timeout after the heal, several seconds when the cut lasted several.
    // Counted in doubt here, not in the next scenario.
    let after = c.hits_quiet_for(Duration::from_secs(8)).await;
    // When the rule was being added, and when it was in place.
    let (cut_at, cut_done) = cut.unwrap();
    let t = Tally::of(&sent);
    let failed: Vec<&Seen> = sent.iter().filter(|s| s.status != 200).collect();
    let last_failure = failed
        .iter()
        .map(|s| s.at.saturating_duration_since(cut_at))
        .max();
    let row = Row::new("partition", t, after - before, started);
    println!(
        "503s: {} (the last sent {last_failure:.2?} after the cut); requests for / the cut-off replica logged 1 s and 5 s after the cut: {out_of_rotation:?}; back in the rotation {back_after:.2?} after the heal",
        row.tally.unavailable
    );
    row.tally.assert_only_fast_503s();
    // Only requests the proxy sent to the replica before its readiness check failed.
    assert!(
        failed
            .iter()
            .all(|s| s.at >= cut_at && s.at < cut_done + DETECTION),
        "a 503 after the cut-off replica should have been out of the rotation"
    );
    assert_eq!(
        out_of_rotation.0, out_of_rotation.1,
        "the cut-off replica still got requests"
    );
    assert!(
        back_after.is_some(),
        "the replica was not back in the rotation after the heal"
    );
    // Liveness never asks Redis: Swarm left the cut-off replica alone.
    let serving = c.serving(WEB).await;
    assert!(
        serving.iter().any(|t| t.id == victim.id),
        "the cut-off replica was replaced"
    );
    // A 503's INCR may have reached Redis with its answer lost.
    let (count, t) = (after - before, &row.tally);
    assert!(
        count >= t.ok as i64 && count <= (t.ok + t.unavailable) as i64,
        "count {count}"
    );
    row
}

/// `docker service update --image web:2` (the same binary, labelled as another release) under
/// load: replica by replica, the new one healthy before the old one drains.
async fn rolling_update(c: &Swarm) -> Row {
    let pushing = Instant::now();
    let image = c.swarm(&["push", "2"]).await;
    let image = image.lines().last().unwrap().to_owned();
    println!(
        "scripts/swarm push 2 (build, load, push): {:.1?}",
        pushing.elapsed()
    );
    let started = Instant::now();
    let old = c.serving(WEB).await;
    let retried = c.retried().await;
    let before = c.hits().await;
    let mut took = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(240), async {
        c.docker(&["service", "update", "-d", "--image", &image, WEB])
            .await;
        took = eventually(Duration::from_secs(180), async || {
            c.update_state().await == "completed"
        })
        .await;
    })
    .await;
    let after = c.hits().await;
    let row = Row::new("rolling update", Tally::of(&sent), after - before, started);
    let new = c.serving(WEB).await;
    let ids: Vec<&str> = old.iter().map(|t| t.id.as_str()).collect();
    let mut exits = String::new();
    let stopped = eventually(Duration::from_secs(30), async || {
        exits = c.task_exits(&ids).await;
        exits.lines().all(|l| l.starts_with("shutdown"))
    })
    .await;
    println!(
        "update completed in {took:.1?}; the old replicas: {:?}",
        exits.lines().collect::<Vec<_>>()
    );
    assert!(
        took.is_some(),
        "the update did not complete: {}",
        c.update_state().await
    );
    c.assert_nothing_lost(&row.tally, before, after, retried)
        .await;
    assert_eq!(new.len(), REPLICAS);
    let tag = image.rsplit('/').next().unwrap();
    assert!(
        new.iter()
            .all(|t| t.image.contains(&format!("/{tag}@sha256:"))),
        "a replica is not on {image}: {new:?}"
    );
    assert!(
        stopped.is_some(),
        "the old replicas did not all stop: {exits}"
    );
    assert!(
        exits.lines().all(|l| l == "shutdown 0"),
        "an old replica did not exit 0: {exits}"
    );
    row
}

/// A release that never becomes healthy (`PORT_REDIS=not-a-port`: the binary exits 2 at
/// start-up): Swarm rolls it back by itself, and the old replicas never stop.
async fn broken_release(c: &Swarm) -> Row {
    let started = Instant::now();
    let old: BTreeSet<String> = c.serving(WEB).await.into_iter().map(|t| t.id).collect();
    let image = c
        .docker(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            WEB,
        ])
        .await;
    let retried = c.retried().await;
    let before = c.hits().await;
    let mut took = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(180), async {
        c.docker(&[
            "service",
            "update",
            "-d",
            "--env-add",
            "PORT_REDIS=not-a-port",
            WEB,
        ])
        .await;
        took = eventually(Duration::from_secs(150), async || {
            c.update_state().await == "rollback_completed"
        })
        .await;
    })
    .await;
    let after = c.hits().await;
    let row = Row::new("broken release", Tally::of(&sent), after - before, started);
    let tasks = c.tasks(WEB).await;
    let now: BTreeSet<String> = tasks
        .iter()
        .filter(|t| t.serving())
        .map(|t| t.id.clone())
        .collect();
    let tried: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.error.contains("exit (2)"))
        .collect();
    let spec = c
        .docker(&[
            "service",
            "inspect",
            "-f",
            "{{json .Spec.TaskTemplate.ContainerSpec}}",
            WEB,
        ])
        .await;
    println!(
        "rolled back in {took:.1?}; tasks of the broken release that exited 2: {}",
        tried.len()
    );
    assert!(took.is_some(), "no rollback: {}", c.update_state().await);
    c.assert_nothing_lost(&row.tally, before, after, retried)
        .await;
    assert!(!tried.is_empty(), "the broken release never ran");
    assert_eq!(now, old, "the old replicas were replaced");
    assert!(
        !spec.contains("not-a-port"),
        "the spec was not rolled back: {spec}"
    );
    assert!(
        spec.contains(&format!("\"Image\":\"{image}\"")),
        "not on the old image: {spec}"
    );
    row
}

/// `docker node update --availability drain` on the worker under load, then active again.
async fn drain(c: &Swarm) -> Row {
    // One replica on each node first: after an update Swarm may have left none on the worker,
    // and a drain of nothing proves nothing (this assertion caught exactly that).
    c.spread().await;
    let started = Instant::now();
    let worker = node_name(WORKER);
    let on_worker: Vec<String> = c
        .serving(WEB)
        .await
        .into_iter()
        .filter(|t| t.node == worker)
        .map(|t| t.id)
        .collect();
    assert!(!on_worker.is_empty(), "no replica on {worker} to drain");
    let retried = c.retried().await;
    let before = c.hits().await;
    let mut took = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(120), async {
        c.docker(&["node", "update", "--availability", "drain", &worker])
            .await;
        took = eventually(Duration::from_secs(60), async || {
            let tasks = c.tasks(WEB).await;
            tasks.iter().filter(|t| t.serving()).count() == REPLICAS
                && !tasks
                    .iter()
                    .any(|t| t.node == worker && t.state == "Running")
        })
        .await;
        c.docker(&["node", "update", "--availability", "active", &worker])
            .await;
    })
    .await;
    let after = c.hits().await;
    let row = Row::new("worker drained", Tally::of(&sent), after - before, started);
    let ids: Vec<&str> = on_worker.iter().map(String::as_str).collect();
    let exits = c.task_exits(&ids).await;
    println!(
        "{worker} drained, its replicas replaced elsewhere, in {took:.1?}; its replicas: {:?}",
        exits.lines().collect::<Vec<_>>()
    );
    assert!(took.is_some(), "the drain did not move the replicas");
    c.assert_nothing_lost(&row.tally, before, after, retried)
        .await;
    assert!(
        exits.lines().all(|l| l == "shutdown 0"),
        "a drained replica did not exit 0: {exits}"
    );
    row
}

/// The worker's node frozen under load (`docker pause` of its container: the engine and the
/// replica there stop dead, no FIN, no RST, as a machine that hangs or loses its network);
/// Swarm declares it down and starts its replica elsewhere; then it comes back.
async fn worker_lost(c: &Swarm) -> Row {
    c.spread().await;
    // The worker holds a Redis replica and a Sentinel too: all three whole before it goes,
    // and its Redis node not the primary (that is the primary faults' scenario).
    c.swarm(&["redis-ready", "180"]).await;
    if c.primary().await == Some(WORKER) {
        c.swarm(&["failover"]).await;
    }
    let started = Instant::now();
    let worker = node_name(WORKER);
    let before = c.hits().await;
    let mut paused_at = None;
    let (mut down, mut moved, mut ready) = (None, None, None);
    let sent = under_load(c.port, STEADY, Duration::from_secs(180), async {
        docker(&["pause", &worker]).await;
        paused_at = Some(Instant::now());
        down = eventually(Duration::from_secs(60), async || {
            c.node_status(WORKER).await == "down"
        })
        .await;
        let paused = paused_at.unwrap();
        moved = eventually(Duration::from_secs(60), async || {
            let serving = c.serving(WEB).await;
            serving.len() == REPLICAS && serving.iter().all(|t| t.node != worker)
        })
        .await
        .map(|_| paused.elapsed());
        docker(&["unpause", &worker]).await;
        ready = eventually(Duration::from_secs(60), async || {
            c.node_status(WORKER).await == "ready"
        })
        .await;
    })
    .await;
    let paused_at = paused_at.unwrap();
    let after = c.settled_hits().await;
    let failed: Vec<&Seen> = sent.iter().filter(|s| s.status != 200).collect();
    let row = Row::new("worker lost", Tally::of(&sent), after - before, started);
    let statuses: BTreeSet<u16> = failed.iter().map(|s| s.status).collect();
    println!(
        "{worker} down after {down:.1?}; its replica running elsewhere {:.1?} after the pause; ready again {ready:.1?} after the unpause; failed: {} ({statuses:?}), the slowest {:.2?}",
        moved,
        failed.len(),
        row.tally.max_failure_latency
    );
    assert!(down.is_some(), "Swarm never saw the node down");
    assert!(
        moved.is_some(),
        "the lost replica was not started elsewhere"
    );
    assert!(ready.is_some(), "the node did not come back");
    // Only the requests in flight on the frozen replica before the proxy's check took it out:
    // each client has at most one (it waits for the proxy's timeout), each answered 504.
    assert!(failed.len() <= CLIENTS, "{} failed", failed.len());
    assert!(
        failed.iter().all(|s| s.status == 504),
        "failures other than 504: {statuses:?}"
    );
    assert!(
        failed.iter().all(|s| s.at < paused_at + DETECTION),
        "a request failed after the proxy should have taken the frozen replica out"
    );
    assert!(
        row.tally.max_failure_latency < PROXY_SERVER_TIMEOUT + Duration::from_secs(1),
        "a failure took {:?}",
        row.tally.max_failure_latency
    );
    let count = after - before;
    let t = &row.tally;
    assert!(count >= t.ok as i64, "an acknowledged count was lost");
    assert!(
        count <= (t.ok + failed.len()) as i64,
        "counted more than the requests in doubt"
    );
    row
}

/// What happens to the primary Redis.
#[derive(Clone, Copy, Debug)]
enum PrimaryFault {
    /// Its node frozen (`docker pause` of the node's container: Redis, its Sentinel, a web
    /// replica and the engine).
    NodeFrozen,
    /// Cut off from the other Redis nodes and every Sentinel, but not from the Redis proxy
    /// (its clients): the split brain across hosts.
    CutOff,
}

/// A fault of the primary Redis (on a node other than the manager, which holds the way in):
/// the fault lasts until the Sentinels have named another primary and `hold` has passed, then
/// ends, and the scenario waits until the cluster is whole again (the old primary a replica in
/// sync). Checks over every request: no number shown twice, real-time order, none lost;
/// failures only until `bound` after the fault began, or while the old primary rejoined (at
/// most one per client), and of those only 503s with `Retry-After` and the 504s of requests a
/// frozen node's web replica held.
async fn primary_fault(
    c: &Swarm,
    scenario: &'static str,
    fault: PrimaryFault,
    hold: Duration,
    bound: Duration,
) -> (Row, usize) {
    c.swarm(&["redis-ready", "180"]).await;
    let started = Instant::now();
    let mut k = c.primary().await.expect("a primary");
    if k == 1 {
        k = c
            .swarm(&["failover"])
            .await
            .parse()
            .expect("the new primary's node");
    }
    let node = node_name(k);
    let primary = c.task(&format!("hit-counter_redis-{k}")).await;
    let mut peers = Vec::new();
    for other in (1..=NODES).filter(|j| *j != k) {
        peers.push(c.task_address(&format!("hit-counter_redis-{other}")).await);
    }
    for j in 1..=NODES {
        peers.push(c.task_address(&format!("hit-counter_sentinel-{j}")).await);
    }
    // In the cut, one Sentinel (not the one the checks ask first) cannot resolve names: the
    // failover must not leave it naming the old primary (deploy/redis-ha/SWARM.md).
    let deaf = c.task("hit-counter_sentinel-3").await;
    let mut went_deaf = false;
    if let PrimaryFault::CutOff = fault {
        // Swarm's DNS may still lag after the last scenario: wait for it, within a bound.
        let answers = eventually(Duration::from_secs(60), async || c.dns_answers(&deaf).await);
        assert!(answers.await.is_some(), "sentinel-3's DNS never answered");
    }
    println!(
        "{scenario}: redis-{k} ({}) from {peers:?}",
        c.swarm(&["redis-status"]).await
    );
    let before = c.hits().await;
    let (mut began, mut failed_over, mut ended, mut whole) = (None, None, None, None);
    let mut unanimous = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(300), async {
        if let PrimaryFault::CutOff = fault {
            // Deaf before the cut: the failover must find it so.
            c.dns_down(&deaf, "-I").await;
            went_deaf = !c.dns_answers(&deaf).await;
        }
        began = Some(Instant::now());
        match fault {
            PrimaryFault::NodeFrozen => drop(docker(&["pause", &node]).await),
            PrimaryFault::CutOff => c.cut(&primary, &peers, "-I").await,
        }
        let mut new = None;
        failed_over = eventually(Duration::from_secs(60), async || {
            new = c.primary().await.filter(|p| *p != k);
            new.is_some()
        })
        .await;
        if let (PrimaryFault::CutOff, Some(new)) = (fault, new) {
            // Before the old primary answers again, every Sentinel (the deaf one too) must name
            // the new one: one left on the old primary would make the new one its replica.
            let new = format!("redis-{new}");
            unanimous = eventually(hold.saturating_sub(began.unwrap().elapsed()), async || {
                for j in 1..=NODES {
                    if c.named_by(j).await != new {
                        return false;
                    }
                }
                true
            })
            .await
            .map(|_| began.unwrap().elapsed());
        }
        // The fault's length, not a wait for an event: the cut must outlast
        // min-replicas-max-lag, the freeze stay under Swarm's node timeout.
        tokio::time::sleep(hold.saturating_sub(began.unwrap().elapsed())).await;
        match fault {
            PrimaryFault::NodeFrozen => drop(docker(&["unpause", &node]).await),
            PrimaryFault::CutOff => {
                c.cut(&primary, &peers, "-D").await;
                c.dns_down(&deaf, "-D").await;
            }
        }
        ended = Some(Instant::now());
        c.swarm(&["redis-ready", "180"]).await;
        whole = Some(Instant::now());
    })
    .await;
    let after = c.settled_hits().await;
    let (began, ended, whole) = (began.unwrap(), ended.unwrap(), whole.unwrap());
    let shown: Vec<i64> = sent
        .iter()
        .filter(|s| s.status == 200)
        .filter_map(|s| s.hits)
        .collect();
    if shown.iter().collect::<BTreeSet<_>>().len() < shown.len() {
        print_repeats(&sent, began);
        c.print_redis_logs().await; // before the check below fails on it
    }
    if let PrimaryFault::CutOff = fault {
        assert!(
            went_deaf,
            "sentinel-3's DNS still answered: the fault never happened"
        );
        println!("all three Sentinels named the new primary {unanimous:.1?} after the cut began");
        assert!(
            unanimous.is_some(),
            "a Sentinel still named the old primary when the cut ended"
        );
    }
    let row = Row::new(
        scenario,
        assert_linearizable(&sent, after),
        after - before,
        started,
    );
    let failed: Vec<&Seen> = sent.iter().filter(|s| s.status != 200).collect();
    let timeline = Timeline {
        began,
        bound,
        back: ended,
        whole,
    };
    let (window, rejoining) = assert_failures_bounded(&[timeline], &sent, STEADY.clients)[0];
    println!(
        "primary on node {k}; a new one named {failed_over:.1?} after the fault began, which ended {:.1?} after; whole again {:.1?} after; {} failed (statuses {:?}), the last within the bound sent {window:.2?} after the fault began, {rejoining} while the old primary rejoined",
        ended - began,
        whole - began,
        failed.len(),
        failed.iter().map(|s| s.status).collect::<BTreeSet<_>>(),
    );
    assert!(failed_over.is_some(), "the Sentinels never failed over");
    assert!(
        !failed.is_empty(),
        "no request failed: the fault never showed"
    );
    for s in &failed {
        // 504: a request a frozen node's web replica held, until the proxy's timeout.
        assert!(
            (s.status == 503 && s.retry_after) || (s.status == 504 && s.at < began + DETECTION),
            "a {} sent {:.2?} after the fault began",
            s.status,
            s.at - began
        );
    }
    assert!(
        failed.iter().filter(|s| s.status == 504).count() <= CLIENTS,
        "more 504s than requests in flight"
    );
    // 503s whose INCR ran, and the frozen replica's requests that ran when it thawed.
    assert!(
        (after - before) as usize <= row.tally.ok + failed.len(),
        "counted more than sent"
    );
    (row, k)
}

/// When the numbers shown twice were sent, from `began`: a rollback shows as a range of
/// numbers first shown before some moment and shown again after it.
fn print_repeats(sent: &[Seen], began: Instant) {
    let mut first: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut repeats = Vec::new();
    for s in sent.iter().filter(|s| s.status == 200) {
        let Some(n) = s.hits else { continue };
        if let Some(at) = first.insert(n, s.at) {
            repeats.push((n, at.min(s.at), at.max(s.at)));
        }
    }
    let span = |times: &mut dyn Iterator<Item = Instant>| {
        let times: Vec<f64> = times
            .map(|t| t.saturating_duration_since(began).as_secs_f64())
            .collect();
        let (lo, hi) = times
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
        format!("{lo:.2}..{hi:.2} s")
    };
    eprintln!(
        "{} numbers shown twice, {:?}..{:?}; first sent {}, again {} after the fault began",
        repeats.len(),
        repeats.iter().map(|r| r.0).min(),
        repeats.iter().map(|r| r.0).max(),
        span(&mut repeats.iter().map(|r| r.1)),
        span(&mut repeats.iter().map(|r| r.2)),
    );
}

/// The primary's node frozen for `hold`, then thawed: the Sentinels fail over, and the old
/// primary rejoins as a replica. 8 s is less than Swarm takes to declare a node down (11 to
/// 16 s here): the node's tasks thaw in place. 20 s is more: Swarm replaces them, and the
/// new Redis and Sentinel tasks have new addresses.
async fn primary_node_lost(c: &Swarm, hold: Duration) -> Row {
    let bound = Duration::from_secs(10);
    let scenario = if hold < Duration::from_secs(11) {
        "primary node lost"
    } else {
        "primary node gone"
    };
    primary_fault(c, scenario, PrimaryFault::NodeFrozen, hold, bound)
        .await
        .0
}

/// The primary cut off for 10 s, longer than `min-replicas-max-lag` (5 s). Without `WAIT`, it
/// would acknowledge writes that are thrown away when it rejoins. Meanwhile one Sentinel's
/// names do not resolve: it must follow the failover all the same.
async fn primary_cut_off(c: &Swarm) -> (Row, usize) {
    let (hold, bound) = (Duration::from_secs(10), Duration::from_secs(15));
    primary_fault(c, "primary cut off", PrimaryFault::CutOff, hold, bound).await
}

/// The old primary's data lost (node `k`'s Redis, a replica since the last failover): its task
/// stopped (`scale redis-K=0`), its volume removed on its node, the task started again empty.
/// It must not be promoted before it has synced (`replica-priority 0` until then), and the
/// count survives: the primary and the other replica hold it.
async fn old_primary_volume_lost(c: &Swarm, k: usize) -> Row {
    c.swarm(&["redis-ready", "180"]).await;
    let started = Instant::now();
    let primary = c.primary().await.expect("a primary");
    assert_ne!(primary, k, "node {k} is the primary again");
    let service = format!("hit-counter_redis-{k}");
    let volume = format!("hit-counter_redis-{k}-data");
    let before = c.hits().await;
    let mut whole = None;
    let sent = under_load(c.port, STEADY, Duration::from_secs(300), async {
        c.docker(&["service", "scale", "-d", &format!("{service}=0")])
            .await;
        let stopped = eventually(Duration::from_secs(60), async || {
            c.still_running(&service).await == 0
        })
        .await;
        assert!(stopped.is_some(), "{service} did not stop");
        // The stopped task's container still holds the volume.
        let filter = format!("label=com.docker.swarm.service.name={service}");
        let ids = c
            .node(k, &["docker", "ps", "-aq", "--filter", &filter])
            .await;
        for id in ids.split_whitespace() {
            c.node(k, &["docker", "rm", "-f", id]).await;
        }
        c.node(k, &["docker", "volume", "rm", &volume]).await;
        c.docker(&["service", "scale", "-d", &format!("{service}=1")])
            .await;
        let ready = Instant::now();
        c.swarm(&["redis-ready", "180"]).await;
        whole = Some(ready.elapsed());
    })
    .await;
    let after = c.settled_hits().await;
    let row = Row::new(
        "old primary data lost",
        assert_linearizable(&sent, after),
        after - before,
        started,
    );
    let synced = c.swarm(&["redis", &k.to_string(), "GET", "hits"]).await;
    println!(
        "redis-{k} (the primary: redis-{primary}) lost its volume; whole again {whole:.1?} after it started empty; it holds {synced}"
    );
    row.tally.assert_only_fast_503s();
    assert!(
        after >= before + row.tally.ok as i64,
        "an acknowledged count was lost"
    );
    assert_eq!(
        c.primary().await,
        Some(primary),
        "the emptied replica was promoted"
    );
    row
}

#[tokio::test]
#[ignore = "starts containers: HIT_COUNTER_TIERS=swarm (scripts/test)"]
async fn a_3_node_swarm_loses_no_count_through_scaling_updates_rollbacks_drains_and_lost_nodes() {
    tier("swarm");
    let started = Instant::now();
    let swarm = Swarm::up().await;
    let mut rows = Vec::new();
    rows.push(deploy(&swarm).await);
    rows.push(scale(&swarm).await);
    rows.push(partition(&swarm).await);
    rows.push(rolling_update(&swarm).await);
    rows.push(broken_release(&swarm).await);
    rows.push(drain(&swarm).await);
    // SWARM_ROUNDS=N (a soak, not in CI): the lost worker (its Redis node and Sentinel
    // replaced) and both primary faults N times over, the primary's node frozen 8 s in odd
    // rounds and 20 s (its tasks replaced) in even ones.
    let rounds: usize = std::env::var("SWARM_ROUNDS").map_or(1, |n| {
        n.parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("SWARM_ROUNDS={n:?} is not a whole number above 0"))
    });
    let mut old_primary = 0;
    for round in 1..=rounds {
        if rounds > 1 {
            println!("== round {round} of {rounds}");
        }
        rows.push(worker_lost(&swarm).await);
        let hold = if round % 2 == 1 { 8 } else { 20 };
        rows.push(primary_node_lost(&swarm, Duration::from_secs(hold)).await);
        let row;
        (row, old_primary) = primary_cut_off(&swarm).await;
        rows.push(row);
    }
    rows.push(old_primary_volume_lost(&swarm, old_primary).await);

    println!(
        "\n| scenario         | requests |    200s |  503s | other |  max lat.  | hits (Δ)    | took    |"
    );
    println!(
        "|------------------|---------:|--------:|------:|------:|-----------:|------------:|--------:|"
    );
    for Row {
        scenario,
        tally: t,
        count,
        took,
    } in &rows
    {
        println!(
            "| {scenario:<16} | {:>8} | {:>7} | {:>5} | {:>5} | {:>10.1?} | {:>11} | {:>7.1?} |",
            t.requests, t.ok, t.unavailable, t.other, t.max_latency, count, took
        );
    }
    drop(swarm);
    println!(
        "the whole swarm test, cluster up and down included: {:.1?}",
        started.elapsed()
    );
}
