//! The API's error type. Every error leaves as JSON with a stable `code`, a `message` a
//! person can act on, and, for invalid input, `details` naming each problem and where it
//! is. Internals (SQL, broker errors) are logged, never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One problem in a request, located by a JSON pointer-like path (`/ops/3/cid`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Where the problem is: `/priority`, `/ops/17/cid`, `/backends/0`.
    pub path: String,
    /// The index of the operation in `ops`, when the problem is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            index: None,
            message: message.into(),
        }
    }

    pub fn op(index: usize, field: &str, message: impl Into<String>) -> Self {
        let path = if field.is_empty() {
            format!("/ops/{index}")
        } else {
            format!("/ops/{index}/{field}")
        };
        Problem {
            path,
            index: Some(index),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        details: Vec<Problem>,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A dependency (PostgreSQL) is unreachable; the client should retry.
    #[error("service temporarily unavailable")]
    Unavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "<[Problem]>::is_empty")]
    details: &'a [Problem],
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, details: Vec<Problem>) -> Self {
        ApiError::Invalid {
            code: "invalid_request",
            message: message.into(),
            details,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        // A foreign key that no longer resolves: something the request names (a backend)
        // was deleted while the request ran.
        if matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23503")) {
            return ApiError::Conflict(
                "something this request refers to (e.g. a backend) was deleted meanwhile; check and retry".into(),
            );
        }
        if pinq_core::db::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::Unavailable
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("database query failed"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Unavailable => {
                "the database is unreachable; retry after the interval in Retry-After".to_owned()
            }
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                "internal error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let details: &[Problem] = match &self {
            ApiError::Invalid { details, .. } => details,
            _ => &[],
        };
        let mut resp = (
            status,
            Json(Body {
                error: ErrorBody {
                    code,
                    message,
                    details,
                },
            }),
        )
            .into_response();
        match self {
            ApiError::Unavailable => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A query string that does not parse, as a JSON 400 naming the problem.
pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::invalid(
        format!("invalid query string: {}", e.body_text()),
        vec![Problem::at("query", e.body_text())],
    )
}
