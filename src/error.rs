//! [`AppError`]: every way `GET /` can fail, and the response each one gets.
//!
//! Bodies are short and fixed: the real cause is logged here, once, and never sent to the
//! client (it may name hosts, ports or Redis internals).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::{ErrorKind, StoreError};

/// A failed page view.
#[derive(Debug)]
pub enum AppError {
    /// Redis failed: unavailable (worth retrying soon) or the counter is unusable.
    Store(StoreError),
    /// `GET /` came with a body: not a page view.
    BodyNotAllowed,
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            Self::Store(e) => match e.kind {
                ErrorKind::Unavailable => {
                    tracing::warn!(error = %e, "page view not counted (or not known to be)");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Service Unavailable: the hit counter cannot be reached. Try again in a moment.",
                    )
                }
                // Not a 503: waiting will not fix it, an operator must (docs/operations.md).
                ErrorKind::Corrupt => {
                    tracing::error!(error = %e, "the hits key cannot be incremented");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal Server Error: the hit counter is broken.",
                    )
                }
            },
            Self::BodyNotAllowed => (
                StatusCode::BAD_REQUEST,
                "Bad Request: GET / must not carry a body.",
            ),
        };
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = HeaderValue::from_static("1");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        response
    }
}
