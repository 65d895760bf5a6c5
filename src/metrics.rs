//! Prometheus metrics, served at `GET /metrics`.
//!
//! Each [`App`](crate::App) owns its own registry (prometheus-client has no global recorder),
//! so tests can start many apps in one process without them sharing or double-installing one.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::store::{ErrorKind, StoreCounters};

/// The route label of a request: one of the router's own paths, or `other`, so scanners
/// cannot create one time series per URL they try.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// The `kind` label of `redis_errors_total`.
fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Corrupt => "corrupt",
    }
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    redis_duration: Family<CommandLabels, Histogram>,
    redis_errors: Family<ErrorLabels, Counter>,
    redis_up: Gauge,
    connections_open: Gauge,
    connections_rejected: Counter,
    store: StoreCounters,
}

/// Latency buckets from 100 µs to ~1.6 s: a loopback Redis answers in well under a
/// millisecond, and the slowest answer is bounded by `REDIS_TIMEOUT_MS`.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 15,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head, by route",
            request_duration.clone(),
        );
        let redis_duration = Family::<CommandLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        registry.register(
            "redis_command_duration_seconds",
            "Time a request waited for its Redis command (batching included), failures and timeouts included",
            redis_duration.clone(),
        );
        let redis_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "redis_errors",
            "Failed Redis commands: kind is unavailable (unreachable, timeout, LOADING, READONLY, OOM...) or corrupt (hits is not an integer, or would overflow)",
            redis_errors.clone(),
        );
        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "1 if the last Redis command succeeded, 0 if it failed because Redis was unavailable",
            redis_up.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "http_connections_open",
            "Client connections currently open",
            connections_open.clone(),
        );
        let connections_rejected = Counter::default();
        registry.register(
            "http_connections_rejected",
            "Connections answered 503 and closed because MAX_CONNECTIONS were open",
            connections_rejected.clone(),
        );
        let store = StoreCounters::default();
        registry.register(
            "redis_connections_replaced",
            "Redis connections dropped for a fresh one, by reason: timeout (no answer), not_primary (readiness found a replica), or the refusal that said the node cannot take writes (readonly, noreplicas, masterdown, loading)",
            store.replaced.clone(),
        );
        registry.register(
            "page_views_unreplicated",
            "Page views answered 503 because fewer than REDIS_WAIT_REPLICAS replicas acknowledged their INCR in time (each was counted, not shown)",
            store.unreplicated.clone(),
        );
        for reason in StoreCounters::reasons() {
            drop(store.replaced(reason));
        }
        registry.register(
            "hit_counter_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Series that exist from the start, at zero, so dashboards and alerts see them before
        // the first failure rather than "no data".
        for command in ["INCR", "ROLE"] {
            drop(redis_duration.get_or_create(&CommandLabels { command }));
        }
        for kind in [ErrorKind::Unavailable, ErrorKind::Corrupt] {
            let kind = kind_label(kind);
            drop(redis_errors.get_or_create(&ErrorLabels { kind }));
        }
        Self {
            registry,
            requests,
            request_duration,
            redis_duration,
            redis_errors,
            redis_up,
            connections_open,
            connections_rejected,
            store,
        }
    }
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(took.as_secs_f64());
    }

    /// Records one Redis command that took `took`; `failure` is `None` on success.
    pub fn redis_command(&self, command: &'static str, took: Duration, failure: Option<ErrorKind>) {
        self.redis_duration
            .get_or_create(&CommandLabels { command })
            .observe(took.as_secs_f64());
        if let Some(kind) = failure {
            self.redis_errors
                .get_or_create(&ErrorLabels {
                    kind: kind_label(kind),
                })
                .inc();
        }
        // A corrupt counter means Redis answered: it is up.
        self.redis_up
            .set(i64::from(failure != Some(ErrorKind::Unavailable)));
    }

    /// The counters the store updates itself (they share this registry).
    pub fn store_counters(&self) -> StoreCounters {
        self.store.clone()
    }

    /// A connection was accepted (`true`) or closed (`false`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections_open.inc();
        } else {
            self.connections_open.dec();
        }
    }

    /// A connection was turned away because the connection cap was reached.
    pub fn connection_rejected(&self) {
        self.connections_rejected.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
