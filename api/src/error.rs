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
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    /// An `Idempotency-Key` used again with a different request.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A dependency (PostgreSQL) is unreachable; the client should retry.
    #[error("service temporarily unavailable")]
    Unavailable,
    /// The request outlasted `PINQ_REQUEST_TIMEOUT_SECS`.
    #[error(
        "the request took longer than the server allows (PINQ_REQUEST_TIMEOUT_SECS); retry it later"
    )]
    Timeout,
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
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::IdempotencyKeyReused(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// What a client hears when its input reached the database and was refused there.
pub(crate) const UNSTORABLE: &str = "the request holds a value that cannot be stored: text with a NUL character (U+0000), or a time outside 4713 BC to 294276 AD";

/// Whether PostgreSQL refused a value the client sent: a NUL character in `text` (22021)
/// or in `jsonb` (22P05), or a time out of range (22008). The handlers check for these
/// where they read input; this is the safety net for a check that is missing, and the
/// callers log it so that the check gets added.
pub(crate) fn unstorable_input(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("22021" | "22P05" | "22008")))
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
        if unstorable_input(&e) {
            tracing::warn!(error = %e, "the database refused a value of the request; check it where it is read");
            return ApiError::invalid(UNSTORABLE, vec![]);
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with a given SQLSTATE, as PostgreSQL would report it.
    #[derive(Debug)]
    struct Refused(&'static str);

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "invalid byte sequence for encoding \"UTF8\": 0x00")
        }
    }

    impl std::error::Error for Refused {}

    impl sqlx::error::DatabaseError for Refused {
        fn message(&self) -> &str {
            "invalid byte sequence for encoding \"UTF8\": 0x00"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn values_the_database_refuses_are_a_400_that_names_no_sql() {
        for code in ["22021", "22P05", "22008"] {
            let e = ApiError::from(sqlx::Error::Database(Box::new(Refused(code))));
            let ApiError::Invalid {
                code: c, message, ..
            } = &e
            else {
                panic!("{code}: {e:?}");
            };
            assert_eq!(*c, "invalid_request", "{code}");
            assert_eq!(message, UNSTORABLE);
            assert!(!message.contains("UTF8") && !message.contains(code));
            assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST);
        }
        // Other database errors stay internal.
        let e = ApiError::from(sqlx::Error::Database(Box::new(Refused("42P01"))));
        assert!(matches!(e, ApiError::Internal(_)), "{e:?}");
    }
}
