//! [`HitCounter`]: the only place that speaks Redis.
//!
//! One multiplexed connection (a `redis::aio::ConnectionManager`) carries every request's
//! command. Page views that arrive together are sent together: each still gets its own
//! `INCR hits` and its own reply, but the `INCR`s waiting when the batcher runs go out as one
//! pipeline, so the per-call work and the timer are paid once per batch, and Redis does less
//! per page view (docs/architecture.md has the figures). Every batch is bounded by
//! `REDIS_TIMEOUT_MS`, connecting included, so a dead or hung Redis costs a request at most
//! that.
//!
//! The manager reconnects by itself when the socket breaks, but not when the socket stays open
//! and nothing comes back (a hung server, or a connection left half-open by a failover or a
//! network fault): its queue of unanswered commands would only grow. Nor when the node behind
//! the address can no longer take writes (a primary demoted to replica by a failover, while
//! the address now leads to the new primary): every command would be refused for as long as
//! the process lives. So on a timeout, or a reply that means "not here, not now", the manager
//! is swapped for a fresh, lazily connecting one, at most once per connection, and the next
//! command goes wherever the address leads now.
//!
//! With `REDIS_WAIT_REPLICAS` = N > 0, each batch ends with `WAIT N`: its page views are shown
//! their numbers only once N replicas hold them, so a failover to one of them cannot lose a
//! number a visitor has seen (docs/architecture.md says how far that goes).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, RedisError, Value};
use tokio::sync::{mpsc, oneshot};

/// The Redis key that holds the count, as in the original.
pub const HITS_KEY: &str = "hits";

/// Error replies that mean the node behind the address cannot take the write now, but another
/// node the address may lead to can: a replica (after a failover), a primary that lost its
/// replicas (`min-replicas-to-write`), a replica cut off from its primary, a node still loading
/// its data. Each replaces the connection.
/// Each with its `reason` label.
const NOT_HERE: &[(&str, &str)] = &[
    ("READONLY", "readonly"),
    ("NOREPLICAS", "noreplicas"),
    ("MASTERDOWN", "masterdown"),
    ("LOADING", "loading"),
];

/// Why a connection was replaced: `timeout`, `not_primary` (readiness found a replica), or the
/// reason of a [`NOT_HERE`] reply.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplacedLabels {
    reason: &'static str,
}

/// What the store counts, registered by the metrics: connections replaced, by reason, and
/// page views refused because fewer than `REDIS_WAIT_REPLICAS` replicas acknowledged them.
#[derive(Clone, Default)]
pub struct StoreCounters {
    pub replaced: Family<ReplacedLabels, Counter>,
    pub unreplicated: Counter,
}

impl StoreCounters {
    /// Every reason, so each series exists from the start, at zero.
    pub fn reasons() -> impl Iterator<Item = &'static str> {
        ["timeout", "not_primary"]
            .into_iter()
            .chain(NOT_HERE.iter().map(|(_, reason)| *reason))
    }

    pub fn replaced(&self, reason: &'static str) -> Counter {
        self.replaced
            .get_or_create(&ReplacedLabels { reason })
            .clone()
    }
}

/// What kind of failure a Redis operation had: what callers and metrics decide on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Redis is unreachable, restarting, loading, read-only, out of memory or too slow: it may
    /// work again in a moment.
    Unavailable,
    /// Redis answered, but the counter cannot be incremented (it holds something that is not
    /// an integer, or it would overflow). Retrying will not help; an operator must look.
    Corrupt,
}

/// A failed Redis operation: its kind, and Redis' own words for the log.
#[derive(Clone, Debug)]
pub struct StoreError {
    pub kind: ErrorKind,
    detail: String,
}

impl StoreError {
    fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Unavailable => write!(f, "redis unavailable: {}", self.detail),
            ErrorKind::Corrupt => write!(f, "hit counter unusable: {}", self.detail),
        }
    }
}

impl std::error::Error for StoreError {}

/// Counts hits in Redis. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct HitCounter {
    redis: Arc<Redis>,
    /// Page views waiting for their `INCR`; the batcher task owns the other end.
    waiting: mpsc::UnboundedSender<Reply>,
}

/// Where one page view's count goes.
type Reply = oneshot::Sender<Result<i64, StoreError>>;

/// Most `INCR`s in one pipeline; more waiting page views go in the next one.
const MAX_BATCH: usize = 512;

struct Redis {
    client: Client,
    manager_config: ConnectionManagerConfig,
    manager: ArcSwap<ConnectionManager>,
    timeout: Duration,
    /// `REDIS_WAIT_REPLICAS`; 0: no `WAIT`.
    wait_replicas: u32,
    counters: StoreCounters,
}

/// Where Redis' `WAIT` gives up: half of `REDIS_TIMEOUT_MS`, so its answer always comes before
/// the batch's own timeout, which would replace a connection that is fine.
fn wait_millis(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64 / 2).max(1)
}

impl HitCounter {
    /// Prepares a connection to `host:port` without connecting: the service must start (and
    /// answer `/livez`) while Redis is still down. Must be called inside the Tokio runtime.
    pub fn new(
        host: &str,
        port: u16,
        timeout: Duration,
        wait_replicas: u32,
        counters: StoreCounters,
    ) -> Result<Self, RedisError> {
        let client = Client::open(ConnectionAddr::Tcp(host.to_owned(), port))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            // The whole batch is bounded below, once; a second timer per command inside
            // the connection would only cost time.
            .set_response_timeout(None)
            // No background retry loop: a failed connect is retried by the next command that
            // needs it. Requests are bounded by `timeout` anyway, and an idle replica with a
            // dead Redis then costs no CPU at all.
            .set_number_of_retries(0);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        let redis = Arc::new(Redis {
            client,
            manager_config,
            manager: ArcSwap::from_pointee(manager),
            timeout,
            wait_replicas,
            counters,
        });
        let (waiting, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_in_batches(redis.clone(), queue));
        Ok(Self { redis, waiting })
    }

    /// One `INCR hits`; the reply is this visitor's number. Never retried: an INCR that timed
    /// out may still have reached Redis, and sending it again could count the visit twice.
    pub async fn incr_hits(&self) -> Result<i64, StoreError> {
        let (reply, count) = oneshot::channel();
        // The batcher lives as long as any HitCounter: sending and answering cannot fail
        // unless it panicked, which is then an unavailable Redis to the visitor.
        let gone = || StoreError::unavailable("the Redis batcher stopped");
        self.waiting.send(reply).map_err(|_| gone())?;
        count.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Would Redis take a page view now? `ROLE`, for readiness: the address leads to a primary
    /// with at least `REDIS_WAIT_REPLICAS` replicas. A replica also replaces the connection, so
    /// the next check (or page view) reaches wherever the address leads by then: readiness
    /// notices the end of a failover by itself. Sent on its own, not batched.
    pub async fn writable(&self) -> Result<(), StoreError> {
        // PING first: a node loading its data answers ROLE, but refuses PING (and writes).
        let mut check = redis::pipe();
        check.cmd("PING").cmd("ROLE");
        let current = self.redis.manager.load_full();
        let (_pong, role): (String, Vec<Value>) = self.redis.query(&check).await?;
        match role.as_slice() {
            [Value::BulkString(role), _, Value::Array(replicas), ..] if role == b"master" => {
                let (have, want) = (replicas.len(), self.redis.wait_replicas as usize);
                if have < want {
                    return Err(StoreError::unavailable(format!(
                        "the primary has {have} replicas, REDIS_WAIT_REPLICAS is {want}"
                    )));
                }
                Ok(())
            }
            _ => {
                self.redis.replace(&current, "not_primary");
                Err(StoreError::unavailable(format!(
                    "the address leads to a node that is not a primary: {role:?}"
                )))
            }
        }
    }
}

/// Takes every page view waiting when it runs and sends their `INCR`s as one pipeline, in its
/// own task, so the next batch does not wait for this one's replies.
async fn send_in_batches(redis: Arc<Redis>, mut queue: mpsc::UnboundedReceiver<Reply>) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let replies = std::mem::take(&mut batch);
        tokio::spawn(redis.clone().incr_batch(replies));
    }
}

impl Redis {
    async fn incr_batch(self: Arc<Self>, replies: Vec<Reply>) {
        let mut pipe = redis::pipe();
        for _ in &replies {
            pipe.cmd("INCR").arg(HITS_KEY);
        }
        let waiting = self.wait_replicas > 0;
        if waiting {
            // On the same connection, after the INCRs: waits for the replicas to hold them.
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(wait_millis(self.timeout));
        }
        match self.query::<Vec<i64>>(&pipe).await {
            Ok(mut counts) => {
                let acknowledged = if waiting { counts.pop() } else { None };
                if let Some(acknowledged) = acknowledged.filter(|n| *n < self.wait_replicas.into())
                {
                    // Counted, but not safe to show: a failover now could lose these numbers.
                    self.counters.unreplicated.inc_by(replies.len() as u64);
                    let e = StoreError::unavailable(format!(
                        "{acknowledged} of {} replicas acknowledged within {} ms",
                        self.wait_replicas,
                        wait_millis(self.timeout)
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
                for (reply, count) in replies.into_iter().zip(counts) {
                    // The visitor may have gone; the count stands.
                    let _ = reply.send(Ok(count));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Sends `pipe`, bounded by the timeout.
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let current = self.manager.load_full();
        let mut manager = (*current).clone();
        match tokio::time::timeout(self.timeout, pipe.query_async(&mut manager)).await {
            Ok(Ok(value)) => Ok(value),
            // Connection errors (refused, reset, connect timeout) already make the manager
            // reconnect; replacing it too would only open a second connection.
            Ok(Err(e)) => {
                let (error, not_here) = classify(e);
                if let Some(reason) = not_here {
                    self.replace(&current, reason);
                }
                Err(error)
            }
            Err(_elapsed) => {
                self.replace(&current, "timeout");
                Err(StoreError::unavailable(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    /// Swaps `stale` for a fresh manager, unless another batch already did.
    fn replace(&self, stale: &Arc<ConnectionManager>, reason: &'static str) {
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(fresh) => {
                let previous = self.manager.compare_and_swap(stale, Arc::new(fresh));
                if Arc::ptr_eq(&previous, stale) {
                    self.counters.replaced(reason).inc();
                    tracing::warn!(reason, "replacing the redis connection");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot create a redis connection"),
        }
    }
}

/// The kind of a failed command, and the reason of a [`NOT_HERE`] reply among its replies, if
/// any: the connection is then replaced.
fn classify(e: RedisError) -> (StoreError, Option<&'static str>) {
    let message = e.to_string();
    // INCR's own refusals: the key holds a non-integer ("ERR value is not an integer or out of
    // range"), the count is at i64::MAX ("ERR increment or decrement would overflow"), or the
    // key is not a string (WRONGTYPE). Every other error, including other ERR replies such as
    // "max number of clients reached", is connection trouble or a server state Redis leaves by
    // itself (LOADING, READONLY after a failover, OOM, MASTERDOWN, BUSY...). In a pipeline the
    // server errors come per command.
    let errors = e.into_server_errors().unwrap_or_else(|| Arc::from([]));
    let corrupt = errors.iter().any(|(_, error)| {
        let detail = error.details().unwrap_or_default();
        match error.code() {
            "ERR" => detail.contains("not an integer") || detail.contains("overflow"),
            "WRONGTYPE" => true,
            _ => false,
        }
    });
    let not_here = errors.iter().find_map(|(_, error)| {
        NOT_HERE
            .iter()
            .find(|(code, _)| *code == error.code())
            .map(|(_, reason)| *reason)
    });
    let kind = if corrupt {
        ErrorKind::Corrupt
    } else {
        ErrorKind::Unavailable
    };
    (
        StoreError {
            kind,
            detail: message,
        },
        not_here,
    )
}
