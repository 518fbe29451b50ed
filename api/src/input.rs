//! Reading client input at the edge: path parameters (whose rejections leave as JSON, in
//! each API's shape), request bodies (413 when too large), and the checks that text and
//! timestamps pass before they can reach PostgreSQL, which stores no NUL character (in
//! neither `text` nor `jsonb`) and no time before 4713 BC.

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequestParts, Path, RawPathParams};
use axum::http::StatusCode;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult, Problem};
use crate::pins::PsaError;

/// What every NUL check says.
pub(crate) const NUL: &str = "must not contain the NUL character (U+0000)";

/// The earliest time PostgreSQL's `timestamptz` holds, 4714-11-24 00:00 UTC BC (Julian day
/// 0), in microseconds since the Unix epoch. Its latest, in 294276 AD, is beyond the last
/// time chrono represents (year 262143), so only this end needs a check.
const PG_EARLIEST_MICROS: i64 = -210_866_803_200_000_000;

/// What every time range check says.
pub(crate) const TIME_RANGE: &str =
    "is outside the times that can be stored (4713 BC to 294276 AD)";

/// Whether PostgreSQL can store this time.
pub(crate) fn storable_time(t: &DateTime<Utc>) -> bool {
    t.timestamp_micros() >= PG_EARLIEST_MICROS
}

/// A problem at `path` if `s` holds a NUL character.
pub(crate) fn check_text(path: &str, s: &str) -> Result<(), Problem> {
    if s.contains('\0') {
        Err(Problem::at(path, NUL))
    } else {
        Ok(())
    }
}

/// The JSON pointers, below `base`, of every member of `map` (at any depth) whose key or
/// string value holds a NUL character.
pub(crate) fn nul_paths(map: &Map<String, Value>, base: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut path = base.to_owned();
    walk_object(map, &mut path, &mut out);
    out
}

fn walk_object(map: &Map<String, Value>, path: &mut String, out: &mut Vec<String>) {
    for (key, value) in map {
        let len = path.len();
        path.push('/');
        // RFC 6901 escapes: `~` is `~0` and `/` is `~1`.
        path.push_str(&key.replace('~', "~0").replace('/', "~1"));
        if key.contains('\0') {
            out.push(path.clone());
        } else {
            walk(value, path, out);
        }
        path.truncate(len);
    }
}

fn walk(value: &Value, path: &mut String, out: &mut Vec<String>) {
    match value {
        Value::String(s) if s.contains('\0') => out.push(path.clone()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                walk(item, path, out);
                path.truncate(len);
            }
        }
        Value::Object(map) => walk_object(map, path, out),
        _ => {}
    }
}

/// A request body, or 413 if it is larger than `PINQ_MAX_BODY_BYTES`.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(
                "request body is larger than the server accepts (PINQ_MAX_BODY_BYTES)".into(),
            )
        } else {
            ApiError::invalid(format!("could not read the request body: {e}"), vec![])
        }
    })
}

/// Why a path parameter was refused.
enum PathProblem {
    Invalid(Problem),
    /// The route and the extractor disagree: a bug, not the client's doing.
    Internal(String),
}

/// Reads the path parameters as `T`, refusing any that holds a NUL character.
async fn read_path<T, S>(parts: &mut Parts, state: &S) -> Result<T, PathProblem>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    let Path(value) = Path::<T>::from_request_parts(parts, state)
        .await
        .map_err(path_problem)?;
    // The parameters decoded as UTF-8 above, so they read here too.
    if let Ok(raw) = RawPathParams::from_request_parts(parts, state).await {
        for (key, value) in &raw {
            check_text(&format!("path:{key}"), value).map_err(PathProblem::Invalid)?;
        }
    }
    Ok(value)
}

fn path_problem(e: PathRejection) -> PathProblem {
    match e {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => PathProblem::Invalid(Problem::at(
                format!("path:{key}"),
                "not valid UTF-8 once percent-decoded",
            )),
            ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
                PathProblem::Invalid(Problem::at(format!("path:{key}"), e.body_text()))
            }
            _ => PathProblem::Invalid(Problem::at("path", e.body_text())),
        },
        other => PathProblem::Internal(other.body_text()),
    }
}

/// `Path<T>` for the v1 routes: a parameter that does not decode, or holds a NUL
/// character, is a JSON 400 naming it (`path:name`).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match read_path(parts, state).await {
            Ok(v) => Ok(ApiPath(v)),
            Err(PathProblem::Invalid(p)) => Err(ApiError::invalid(
                format!("invalid path parameter '{}': {}", param(&p), p.message),
                vec![p],
            )),
            Err(PathProblem::Internal(e)) => Err(ApiError::Internal(anyhow::anyhow!(
                "path parameters do not fit the route: {e}"
            ))),
        }
    }
}

/// `Path<T>` for the Pinning Service API: the same checks, answered as a `Failure`.
pub struct PsaPath<T>(pub T);

impl<T, S> FromRequestParts<S> for PsaPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = PsaError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match read_path(parts, state).await {
            Ok(v) => Ok(PsaPath(v)),
            Err(PathProblem::Invalid(p)) => Err(PsaError::bad_request(format!(
                "invalid path parameter '{}': {}",
                param(&p),
                p.message
            ))),
            Err(PathProblem::Internal(e)) => {
                tracing::error!(error = %e, "path parameters do not fit the route");
                Err(PsaError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL_SERVER_ERROR",
                    "internal error; the server log has the details",
                ))
            }
        }
    }
}

/// The parameter's name in a `path:name` problem.
fn param(p: &Problem) -> &str {
    p.path.strip_prefix("path:").unwrap_or(&p.path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(v: Value) -> Vec<String> {
        match v {
            Value::Object(m) => nul_paths(&m, "/meta"),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn nul_paths_point_at_every_key_and_string_holding_nul() {
        assert!(paths(json!({"a": "b", "c": [1, {"d": null}], "e": {"f": "g"}})).is_empty());
        assert_eq!(
            paths(json!({
                "a": "x\u{0}",
                "b\u{0}": 1,
                "c": [1, "\u{0}", {"d": ["\u{0}"]}],
                "e/f~": {"g": "\u{0}"},
                "h": "fine",
            })),
            [
                "/meta/a",
                "/meta/b\u{0}",
                "/meta/c/1",
                "/meta/c/2/d/0",
                "/meta/e~1f~0/g",
            ]
        );
    }

    #[test]
    fn check_text_names_the_path() {
        assert!(check_text("/ops/0/name", "ok").is_ok());
        let p = check_text("/ops/0/name", "a\u{0}").unwrap_err();
        assert_eq!(p.path, "/ops/0/name");
        assert!(p.message.contains("NUL"), "{}", p.message);
    }

    #[test]
    fn storable_times_start_at_julian_day_zero() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert!(storable_time(&at("-4713-11-24T00:00:00Z")));
        assert!(!storable_time(&at("-4713-11-23T23:59:59.999999Z")));
        assert!(!storable_time(&at("-5000-01-01T00:00:00Z")));
        assert!(storable_time(&at("2026-01-01T00:00:00Z")));
        assert!(storable_time(&DateTime::<Utc>::MAX_UTC));
        assert!(!storable_time(&DateTime::<Utc>::MIN_UTC));
        let earliest = DateTime::from_timestamp_micros(PG_EARLIEST_MICROS).unwrap();
        assert_eq!(earliest, at("-4713-11-24T00:00:00Z"));
    }
}
