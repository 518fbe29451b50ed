//! The answers the router gives itself rather than a handler: no such route (404), a
//! method the route does not have (405), and a request that outlasted the request timeout
//! (503). Each is JSON: the Pinning Service API's `Failure` under `/pins`, the v1 error
//! everywhere else.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::pins::PsaError;

/// Whether a path is the Pinning Service API's.
fn is_psa(path: &str) -> bool {
    path == "/pins" || path.starts_with("/pins/")
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the README for the API".into())
}

/// A route that exists, called with a method it does not have. The router adds the
/// `Allow` header.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let message = format!("{method} is not allowed on {path}; the Allow header lists what is");
    if is_psa(path) {
        PsaError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            message,
        )
        .into_response()
    } else {
        ApiError::MethodNotAllowed(message).into_response()
    }
}

/// Answers 503 when the request outlasts `limit` (`PINQ_REQUEST_TIMEOUT_SECS`); the
/// handler is dropped.
pub async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    let psa = is_psa(req.uri().path());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(%method, %path, limit_secs = limit.as_secs(), "request timed out");
            if psa {
                PsaError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TIMEOUT",
                    "the request took longer than the server allows; retry it later",
                )
                .into_response()
            } else {
                ApiError::Timeout.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psa_paths() {
        assert!(is_psa("/pins"));
        assert!(is_psa("/pins/abc"));
        assert!(!is_psa("/pinsx"));
        assert!(!is_psa("/v1/pins"));
    }
}
