//! The router and its handlers, named after their routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body::Body as _;
use serde::Serialize;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::error::AppError;
use crate::metrics::Metrics;
use crate::store::{HitCounter, StoreError};

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub counter: HitCounter,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown begins, so `/readyz` turns 503 and load balancers move away.
    pub shutting_down: Arc<AtomicBool>,
}

impl AppState {
    /// Runs one Redis operation and records its duration and outcome in the metrics.
    async fn timed<T>(
        &self,
        command: &'static str,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = operation.await;
        let failure = result.as_ref().err().map(|e| e.kind);
        self.metrics
            .redis_command(command, started.elapsed(), failure);
        result
    }
}

/// Access-log lines show at most this much of a path; scanners send very long ones.
const LOGGED_PATH_MAX: usize = 200;

/// The routes, by path; metrics label requests with these (anything else is `other`).
const ROOT: &str = "/";
const LIVEZ: &str = "/livez";
const READYZ: &str = "/readyz";
const METRICS: &str = "/metrics";

/// The service's routes; the binary and the tests both use this.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(ROOT, get(hello).head(hello_head))
        .route(LIVEZ, get(livez))
        .route(READYZ, get(readyz))
        .route(METRICS, get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn(require_host))
        // No proxy or browser may keep a copy of any answer: every view must reach the counter.
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// `GET /`: one `INCR hits`, and the visitor's number.
async fn hello(State(state): State<AppState>, body: Body) -> Result<Html<String>, AppError> {
    // A browser's page view never carries a body. One that does is a scanner or a smuggling
    // attempt (Content-Length plus Transfer-Encoding): refused without reading it, not counted.
    if !body.is_end_stream() {
        return Err(AppError::BodyNotAllowed);
    }
    let hits = state.timed("INCR", state.counter.incr_hits()).await?;
    // Built by hand: `format!` costs more than everything else in this handler but the INCR.
    let mut body = String::with_capacity(40);
    body.push_str("Hello World! ");
    body.push_str(itoa::Buffer::new().format(hits));
    body.push_str(" times.");
    Ok(Html(body))
}

/// `HEAD /`: the same headers as `GET /` for uptime monitors, without counting a view.
async fn hello_head() -> Html<Body> {
    // Without a count there is no length to announce, and `Content-Length: 0` would be wrong
    // (RFC 9110 §8.6), so the body claims no length and none is sent.
    Html(Body::new(UnknownLength))
}

/// An empty body that does not say it is empty.
struct UnknownLength;

impl http_body::Body for UnknownLength {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(None)
    }
}

/// `GET /livez`: the process runs. Never touches Redis, so a Redis outage does not get every
/// replica restarted.
async fn livez() -> &'static str {
    "ok"
}

/// `GET /readyz`: the address leads to a Redis primary that answers in time (with
/// `REDIS_WAIT_REPLICAS` replicas), and shutdown has not begun. The JSON body
/// says why not, for the person reading a probe failure.
async fn readyz(State(state): State<AppState>) -> Response {
    let shutting_down = || state.shutting_down.load(Ordering::Relaxed);
    if shutting_down() {
        return readiness(Some("shutting down"));
    }
    let writable = state.timed("ROLE", state.counter.writable()).await;
    // Shutdown may have begun while ROLE was out; the answer must say so.
    if shutting_down() {
        return readiness(Some("shutting down"));
    }
    match writable {
        Ok(()) => readiness(None),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            readiness(Some("redis unavailable"))
        }
    }
}

/// The `/readyz` body: `{"status":"ready"}`, or `{"status":"unavailable","reason":...}`.
#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

fn readiness(unavailable_because: Option<&'static str>) -> Response {
    let (status, body) = match unavailable_because {
        None => (StatusCode::OK, "ready"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    let body = Readiness {
        status: body,
        reason: unavailable_because,
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus / OpenMetrics text. Scraping counts nothing.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "Not Found")
}

/// RFC 9112 §3.2: an HTTP/1.1 request without exactly one `Host` header gets 400. hyper
/// accepts such requests; a page view from something that broken is not counted. (HTTP/1.0
/// predates `Host`, so it may omit it.)
async fn require_host(request: Request, next: Next) -> Response {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    let valid = match request.version() {
        Version::HTTP_10 | Version::HTTP_09 => hosts <= 1,
        _ => hosts == 1,
    };
    if valid {
        next.run(request).await
    } else {
        let refusal = "Bad Request: exactly one Host header is required";
        (StatusCode::BAD_REQUEST, refusal).into_response()
    }
}

/// One log line and one metrics sample per request.
async fn access_log(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let matched = request.extensions().get::<MatchedPath>();
    let route = [ROOT, LIVEZ, READYZ, METRICS]
        .into_iter()
        .find(|route| matched.is_some_and(|m| m.as_str() == *route))
        .unwrap_or("other");
    // Cheap clones: a standard method is inline and a URI shares its bytes.
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = next.run(request).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .request(route, method_label(&method), status, took);
    tracing::info!(
        method = %method,
        path = truncated(uri.path()),
        status,
        latency_us = took.as_micros() as u64,
        "request"
    );
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn truncated(path: &str) -> &str {
    &path[..path.floor_char_boundary(LOGGED_PATH_MAX)]
}
