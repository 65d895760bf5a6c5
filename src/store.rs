//! [`HitCounter`]: the only place that speaks Redis.
//!
//! One multiplexed connection (a `redis::aio::ConnectionManager`) carries every request's
//! command; concurrent commands are pipelined on it automatically. Every operation is bounded by
//! `REDIS_TIMEOUT_MS`, connecting included, so a dead or hung Redis costs a request at most that.
//!
//! The manager reconnects by itself when the socket breaks, but not when Redis merely stops
//! answering (a paused or hung server, or a peer that accepts and never replies): the old
//! socket would stay, with its queue of unanswered commands growing. So on a timeout the
//! manager is swapped for a fresh, lazily connecting one, at most once per stuck connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, RedisError};

use crate::metrics::{self, Metrics};

/// The Redis key that holds the count, as in the original.
pub const HITS_KEY: &str = "hits";

/// Why a Redis operation failed, as far as a caller needs to know.
#[derive(Debug)]
pub enum StoreError {
    /// Redis is unreachable, restarting, loading, read-only, out of memory or too slow: it may
    /// work again in a moment.
    Unavailable(String),
    /// Redis answered, but the counter cannot be incremented (it holds something that is not
    /// an integer, or it would overflow). Retrying will not help; an operator must look.
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "redis unavailable: {why}"),
            Self::Corrupt(why) => write!(f, "hit counter unusable: {why}"),
        }
    }
}

/// Counts hits in Redis. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct HitCounter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager_config: ConnectionManagerConfig,
    manager: ArcSwap<ConnectionManager>,
    timeout: Duration,
    incr: redis::Cmd,
    ping: redis::Cmd,
    metrics: Arc<Metrics>,
}

impl HitCounter {
    /// Prepares a connection to `host:port` without connecting: the service must start (and
    /// answer `/livez`) while Redis is still down.
    pub fn new(
        host: &str,
        port: u16,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RedisError> {
        let client = Client::open(ConnectionAddr::Tcp(host.to_owned(), port))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            // The whole operation is bounded below, once; a second timer per command inside
            // the connection would only cost time.
            .set_response_timeout(None)
            // No background retry loop: a failed connect is retried by the next command that
            // needs it. Requests are bounded by `timeout` anyway, and an idle replica with a
            // dead Redis then costs no CPU at all.
            .set_number_of_retries(0);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        let mut incr = redis::cmd("INCR");
        incr.arg(HITS_KEY);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                manager_config,
                manager: ArcSwap::from_pointee(manager),
                timeout,
                incr,
                ping: redis::cmd("PING"),
                metrics,
            }),
        })
    }

    /// One `INCR hits`; the reply is this visitor's number. Never retried: an INCR that timed
    /// out may still have reached Redis, and sending it again could count the visit twice.
    pub async fn incr_hits(&self) -> Result<i64, StoreError> {
        self.query("INCR", &self.inner.incr).await
    }

    /// `PING`, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>("PING", &self.inner.ping)
            .await
            .map(drop)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let inner = &*self.inner;
        let current = inner.manager.load_full();
        let mut manager = (*current).clone();
        let started = Instant::now();
        let result = match tokio::time::timeout(inner.timeout, cmd.query_async(&mut manager)).await
        {
            Ok(Ok(value)) => Ok(value),
            // Connection errors (refused, reset, connect timeout) already make the manager
            // reconnect; replacing it too would only open a second connection.
            Ok(Err(e)) => Err(classify(e)),
            Err(_elapsed) => {
                self.replace(&current);
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    inner.timeout.as_millis()
                )))
            }
        };
        let error_kind = result.as_ref().err().map(|e| match e {
            StoreError::Unavailable(_) => metrics::UNAVAILABLE,
            StoreError::Corrupt(_) => metrics::CORRUPT,
        });
        inner
            .metrics
            .redis_command(name, started.elapsed(), error_kind);
        result
    }

    /// Swaps `stale` for a fresh manager, unless another request already did.
    fn replace(&self, stale: &Arc<ConnectionManager>) {
        let inner = &*self.inner;
        match ConnectionManager::new_lazy_with_config(
            inner.client.clone(),
            inner.manager_config.clone(),
        ) {
            Ok(fresh) => {
                let previous = inner.manager.compare_and_swap(stale, Arc::new(fresh));
                if Arc::ptr_eq(&previous, stale) {
                    tracing::warn!("redis stopped answering; replacing the connection");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot create a redis connection"),
        }
    }
}

fn classify(e: RedisError) -> StoreError {
    // INCR's own refusals: the key holds a non-integer ("ERR value is not an integer or out of
    // range"), the count is at i64::MAX ("ERR increment or decrement would overflow"), or the
    // key is not a string (WRONGTYPE). Every other error, including other ERR replies such as
    // "max number of clients reached", is connection trouble or a server state Redis leaves by
    // itself (LOADING, READONLY after a failover, OOM, MASTERDOWN, BUSY...).
    let detail = e.detail().unwrap_or_default();
    let corrupt = match e.code() {
        Some("ERR") => detail.contains("not an integer") || detail.contains("overflow"),
        Some("WRONGTYPE") => true,
        _ => false,
    };
    if corrupt {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}
