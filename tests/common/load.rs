//! The end-to-end tests' one load generator: [`CLIENTS`] concurrent clients sending `GET /`,
//! recording every outcome; and the tally each scenario checks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{eventually, http};

pub const CLIENTS: usize = 16;

/// How the clients send.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Clients, each sending one request after another.
    pub clients: usize,
    /// One connection per client, kept open, rather than one per request.
    pub keep_alive: bool,
    /// Each client sends at most one request this often.
    pub pace: Option<Duration>,
}

/// A new connection per request, as fast as answers come: what a proxy does to its idle client
/// connections (a reload closes them) is never mistaken for a failure of the service behind it.
pub const BURST: Shape = Shape {
    clients: CLIENTS,
    keep_alive: false,
    pace: None,
};

/// Kept-open connections, each client at most every 20 ms (800 requests a second): Docker's
/// userland proxy runs out of ports after ~28k new connections a minute.
pub const STEADY: Shape = Shape {
    clients: CLIENTS,
    keep_alive: true,
    pace: Some(Duration::from_millis(20)),
};

/// One request's outcome: `status` 0 means no response at all.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When it was sent.
    pub at: Instant,
    pub status: u16,
    pub hits: Option<i64>,
    pub latency: Duration,
    /// The response said when to retry (`Retry-After`).
    pub retry_after: bool,
}

impl Seen {
    /// What `response` says (`None`: there was none) of a request sent `at`.
    pub fn of(response: Option<http::Response>, at: Instant) -> Self {
        Self {
            at,
            status: response.as_ref().map_or(0, |r| r.status),
            retry_after: response
                .as_ref()
                .is_some_and(|r| r.header("retry-after").is_some()),
            hits: response.and_then(|r| http::hits_in(&r.raw_body)),
            latency: at.elapsed(),
        }
    }

    /// Was it under way at `instant` (sent before, answered after)?
    pub fn spans(&self, instant: Instant) -> bool {
        self.at <= instant && instant <= self.at + self.latency
    }
}

/// A load running in the background until [`stop`](Self::stop)ped, `max_requests` were
/// sent, or `max_time` passed.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<Vec<Seen>>>,
}

impl Load {
    pub fn start(port: u16, shape: Shape, max_requests: usize, max_time: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let deadline = Instant::now() + max_time;
        let clients = (0..shape.clients)
            .map(|_| {
                let (stop, sent, done) = (stop.clone(), sent.clone(), done.clone());
                tokio::spawn(async move {
                    let mut client = http::Client::new(port, shape.keep_alive);
                    let mut pace = shape.pace.map(|every| {
                        let mut pace = tokio::time::interval(every);
                        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        pace
                    });
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && sent.fetch_add(1, Ordering::Relaxed) < max_requests
                    {
                        if let Some(pace) = &mut pace {
                            pace.tick().await;
                        }
                        let at = Instant::now();
                        let response = client.get("/").await.ok();
                        seen.push(Seen::of(response, at));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    seen
                })
            })
            .collect();
        Self {
            stop,
            done,
            clients,
        }
    }

    /// Runs until `max_requests` were sent or `max_time` passed.
    pub async fn run(
        port: u16,
        shape: Shape,
        max_requests: usize,
        max_time: Duration,
    ) -> Vec<Seen> {
        Self::start(port, shape, max_requests, max_time)
            .stop_when_done()
            .await
    }

    /// Waits until `n` more requests have ended, answered or not: the load is under way.
    pub async fn ends(&self, n: usize) {
        let target = self.done.load(Ordering::Relaxed) + n;
        let under_way = eventually(Duration::from_secs(30), async || {
            self.done.load(Ordering::Relaxed) >= target
        })
        .await;
        assert!(
            under_way.is_some(),
            "the load stalled: fewer than {n} requests in 30 s"
        );
    }

    /// Stops the clients now and returns every outcome.
    pub async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.stop_when_done().await
    }

    async fn stop_when_done(self) -> Vec<Seen> {
        let mut seen = Vec::new();
        for client in self.clients {
            seen.extend(client.await.unwrap());
        }
        seen
    }
}

/// Requests ended before and after the event of [`under_load`]: the event happens under way,
/// and its aftermath is measured too.
const AROUND: usize = 200;

/// Runs `during` while a load runs, with [`AROUND`] requests ended before and after it.
pub async fn under_load(
    port: u16,
    shape: Shape,
    max_time: Duration,
    during: impl Future<Output = ()>,
) -> Vec<Seen> {
    let load = Load::start(port, shape, usize::MAX, max_time);
    load.ends(AROUND).await;
    during.await;
    load.ends(AROUND).await;
    load.stop().await
}

/// One fault of the backing service: when it began, how long after that page views may fail
/// (`bound`), when the failed node was back (restarted, thawed, healed) and when the cluster
/// was whole again (the old primary a replica in sync).
pub struct Timeline {
    pub began: Instant,
    pub bound: Duration,
    pub back: Instant,
    pub whole: Instant,
}

/// Every failed request was sent within its fault's bound, or while the old primary rejoined
/// (between `back` and a second after `whole`: Sentinel demotes it, and it syncs from the new
/// primary), and there at most `clients` per fault: one stall's worth, each client's request
/// in flight at that moment, not an outage. Returns, per fault, how long after it began the
/// last failure within its bound was sent (its failure window), and how many failures came
/// while the old primary rejoined.
pub fn assert_failures_bounded(
    timelines: &[Timeline],
    seen: &[Seen],
    clients: usize,
) -> Vec<(Duration, usize)> {
    let mut windows = vec![(Duration::ZERO, 0); timelines.len()];
    // Failures outside both: (fault, second after it began, status): count.
    let mut late = std::collections::BTreeMap::<(usize, u64, u16), usize>::new();
    for s in seen.iter().filter(|s| s.status != 200) {
        let Some((i, t)) = timelines.iter().enumerate().rfind(|(_, t)| t.began <= s.at) else {
            *late.entry((usize::MAX, 0, s.status)).or_default() += 1;
            continue;
        };
        let after = s.at - t.began;
        if after < t.bound {
            windows[i].0 = windows[i].0.max(after);
        } else if t.back <= s.at && s.at <= t.whole + Duration::from_secs(1) {
            windows[i].1 += 1;
        } else {
            *late.entry((i, after.as_secs(), s.status)).or_default() += 1;
        }
    }
    assert!(
        late.is_empty(),
        "failures past their fault's bound ((fault, second after it began, status): count; fault {} is before the first): {late:?}",
        usize::MAX
    );
    let rejoining: Vec<usize> = windows.iter().map(|(_, n)| *n).collect();
    assert!(
        rejoining.iter().all(|n| *n <= clients),
        "more failures than {clients} clients while an old primary rejoined (per fault): {rejoining:?}"
    );
    windows
}

/// The checks of a run in which the count must survive whatever happened to Redis, over
/// every request: no number shown twice ([`Tally::of`]); a page view that ended before
/// another began shows a smaller number (real-time order); Redis' final `count` is at least
/// the highest number shown (none was lost).
pub fn assert_linearizable(seen: &[Seen], count: i64) -> Tally {
    let tally = Tally::of(seen);
    let mut shown: Vec<(Instant, Instant, i64)> = seen
        .iter()
        .filter_map(|s| Some((s.at, s.at + s.latency, s.hits.filter(|_| s.status == 200)?)))
        .collect();
    // By end: the highest number of every view that had ended by a given instant.
    shown.sort_by_key(|(_, end, _)| *end);
    let mut highest_by_end = Vec::with_capacity(shown.len());
    let mut highest = i64::MIN;
    for (_, end, n) in &shown {
        highest = highest.max(*n);
        highest_by_end.push((*end, highest));
    }
    for (start, _, n) in &shown {
        let ended_before = highest_by_end.partition_point(|(end, _)| end < start);
        if let Some((_, before)) = ended_before.checked_sub(1).map(|i| highest_by_end[i]) {
            assert!(
                before < *n,
                "real-time order broken: {n} shown after {before} had been shown"
            );
        }
    }
    if let Some(highest) = tally.numbers.last() {
        assert!(
            count >= *highest,
            "count {count} below a number shown, {highest}: lost"
        );
    }
    tally
}

/// What a scenario saw, summed up.
pub struct Tally {
    pub requests: usize,
    pub ok: usize,
    pub unavailable: usize,
    /// `503`s without `Retry-After`.
    pub unavailable_without_retry_after: usize,
    pub other: usize,
    pub max_latency: Duration,
    pub max_failure_latency: Duration,
    pub max_503_latency: Duration,
    /// The numbers the `200`s carried: checked distinct.
    pub numbers: BTreeSet<i64>,
}

impl Tally {
    pub fn of(seen: &[Seen]) -> Self {
        let ok: Vec<&Seen> = seen.iter().filter(|s| s.status == 200).collect();
        let numbers: BTreeSet<i64> = ok.iter().filter_map(|s| s.hits).collect();
        assert_eq!(numbers.len(), ok.len(), "two 200s carried the same number");
        Self {
            requests: seen.len(),
            ok: ok.len(),
            unavailable: seen.iter().filter(|s| s.status == 503).count(),
            unavailable_without_retry_after: seen
                .iter()
                .filter(|s| s.status == 503 && !s.retry_after)
                .count(),
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
            max_503_latency: seen
                .iter()
                .filter(|s| s.status == 503)
                .map(|s| s.latency)
                .max()
                .unwrap_or_default(),
            numbers,
        }
    }

    /// Every `503` came with `Retry-After`, each within a second.
    pub fn assert_503s_fast(&self) {
        assert_eq!(
            self.unavailable_without_retry_after, 0,
            "a 503 without Retry-After"
        );
        assert!(
            self.max_503_latency < Duration::from_secs(1),
            "a 503 took {:?}",
            self.max_503_latency
        );
    }

    /// Every failure is a `503` with `Retry-After`, each within a second.
    pub fn assert_only_fast_503s(&self) {
        assert_eq!(self.other, 0, "failures other than 503");
        self.assert_503s_fast();
    }

    /// What a Redis outage under load may look like, and no worse: only `503`s with
    /// `Retry-After`, each within a second; some, or the outage never showed; no acknowledged
    /// count lost (`count`: what Redis' count grew by; `probes`: `200`s the load did not see);
    /// and nothing counted beyond the `503`s whose `INCR` may have run.
    pub fn assert_outage_survived(&self, count: i64, probes: i64) {
        self.assert_only_fast_503s();
        assert!(
            self.unavailable > 0,
            "Redis was never seen down: the scenario did not happen"
        );
        let ok = self.ok as i64 + probes;
        assert!(count >= ok, "an acknowledged count was lost");
        assert!(
            count - ok <= self.unavailable as i64,
            "counted more than could have run"
        );
    }

    /// What losing a replica under load may look like, and no worse: no failed request (the
    /// proxy moves them to the others), no acknowledged count lost, and nothing counted twice
    /// beyond what may have reached the lost replica and been sent again: requests the proxy's
    /// log shows as sent more than once (`retried`) and, of every request, those under way when
    /// the replica died (`in_flight`). Both are counted, neither assumed.
    pub fn assert_replica_loss_survived(&self, count: i64, retried: usize, in_flight: usize) {
        assert_eq!(
            self.ok, self.requests,
            "requests failed although other replicas were up"
        );
        assert!(count >= self.ok as i64, "an acknowledged count was lost");
        let twice = count - self.ok as i64;
        assert!(
            twice <= retried.min(in_flight) as i64,
            "counted {twice} twice; sent again {retried}, under way {in_flight}"
        );
    }

    /// Prints the table head and this scenario's row (`count`: what Redis' count grew by).
    pub fn print(&self, scenario: &str, count: i64) {
        println!(
            "\n| scenario         | requests |    200s |  503s | other |  max lat.  | hits (Δ)    |"
        );
        println!(
            "|------------------|---------:|--------:|------:|------:|-----------:|------------:|"
        );
        println!(
            "| {scenario:<16} | {:>8} | {:>7} | {:>5} | {:>5} | {:>10.1?} | {:>11} |",
            self.requests, self.ok, self.unavailable, self.other, self.max_latency, count
        );
    }
}

#[test]
fn failures_are_bounded_by_the_fault_and_by_one_stall_while_the_old_primary_rejoins() {
    let t0 = Instant::now();
    let s = |secs: u64| t0 + Duration::from_secs(secs);
    let timeline = [Timeline {
        began: s(0),
        bound: Duration::from_secs(10),
        back: s(12),
        whole: s(20),
    }];
    let failed = |at: Instant| Seen {
        at,
        status: 503,
        hits: None,
        latency: Duration::ZERO,
        retry_after: true,
    };
    let check = |seen: Vec<Seen>| {
        std::panic::catch_unwind(|| assert_failures_bounded(&timeline, &seen, 2)).ok()
    };
    let within = vec![failed(s(3)), failed(s(14)), failed(s(15))];
    assert_eq!(check(within), Some(vec![(Duration::from_secs(3), 2)]));
    assert_eq!(check(vec![failed(s(14)); 3]), None, "three while rejoining");
    assert_eq!(
        check(vec![failed(s(11))]),
        None,
        "past the bound, before it was back"
    );
    assert_eq!(check(vec![failed(s(22))]), None, "after it was whole again");
}
