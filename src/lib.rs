//! hit-counter: the 12-factor "Processes" hit counter, in Rust.
//!
//! Every piece of state lives in Redis, so any number of identical replicas can run behind a
//! load balancer and be started or killed at any moment without losing a count.
//!
//! Endpoints:
//! - `GET /`: one atomic `INCR hits`, answers `Hello World! N times.`; 503 when Redis is not
//!   available. `HEAD /` answers the same headers without counting.
//! - `GET /livez`: 200 while the process runs (never touches Redis).
//! - `GET /readyz`: 200 when the address leads to a Redis primary that answers in time; 503
//!   otherwise (a replica, a primary with too few replicas, no answer) and during shutdown.
//! - `GET /metrics`: Prometheus metrics.
//!
//! Layout: [`config`] reads the environment, [`routes`] holds the handlers, [`store`] is the
//! only code that speaks Redis, [`server`] accepts and limits connections, [`error`] maps
//! failures to responses, [`metrics`] and [`telemetry`] cover observability, [`healthcheck`]
//! is the container health check.

pub mod config;
pub mod error;
pub mod healthcheck;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod store;
pub mod telemetry;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;

pub use config::Config;

use crate::metrics::Metrics;
use crate::routes::AppState;
use crate::store::HitCounter;

/// A bound, not yet serving, instance of the service.
pub struct App {
    listener: TcpListener,
    port: u16,
    state: AppState,
    config: Config,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The port could not be bound (taken, or not allowed).
    #[error("cannot listen on port {port}: {source}")]
    Listen { port: u16, source: io::Error },
    /// The Redis address cannot be used at all (whether Redis is up is checked per request).
    #[error("cannot use the Redis address: {0}")]
    Redis(#[source] redis::RedisError),
}

impl App {
    /// Binds `0.0.0.0:PORT` (port 0 picks a free one) and prepares the Redis connection
    /// without connecting: the service starts even while Redis is down.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let listen = |source| StartError::Listen {
            port: config.port,
            source,
        };
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port)))
            .await
            .map_err(listen)?;
        let port = listener.local_addr().map_err(listen)?.port();
        let metrics = Arc::new(Metrics::default());
        let counter = HitCounter::new(
            &config.redis_host,
            config.redis_port,
            config.redis_timeout,
            config.redis_wait_replicas,
            metrics.store_counters(),
        )
        .map_err(StartError::Redis)?;
        tracing::info!(
            port,
            redis = %format_args!("{}:{}", config.redis_host, config.redis_port),
            log_format = config.log_format.as_str(),
            log_filter = %config.log_filter,
            redis_timeout_ms = config.redis_timeout.as_millis() as u64,
            redis_wait_replicas = config.redis_wait_replicas,
            drain_timeout_ms = config.drain_timeout.as_millis() as u64,
            header_read_timeout_ms = config.header_read_timeout.as_millis() as u64,
            idle_timeout_ms = config.idle_timeout.as_millis() as u64,
            max_connections = config.max_connections,
            max_header_bytes = config.max_header_bytes,
            version = env!("CARGO_PKG_VERSION"),
            "listening"
        );
        Ok(Self {
            listener,
            port,
            state: AppState {
                counter,
                metrics,
                shutting_down: Arc::new(AtomicBool::new(false)),
            },
            config,
        })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` completes, then turns readiness off, stops accepting and lets
    /// in-flight requests finish (bounded by `DRAIN_TIMEOUT_MS`).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let shutting_down = self.state.shutting_down.clone();
        let metrics = self.state.metrics.clone();
        let router = routes::router(self.state);
        let shutdown = async move {
            shutdown.await;
            shutting_down.store(true, Ordering::Relaxed);
            tracing::info!("shutdown requested");
        };
        server::serve(self.listener, router, &self.config, metrics, shutdown).await;
    }
}

/// Completes on SIGTERM (what Docker and Kubernetes send) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
