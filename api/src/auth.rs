//! Bearer-token authentication.
//!
//! Two kinds of token are accepted: the bootstrap `PINQ_ADMIN_TOKEN` (compared in
//! constant time; the caller is the owner `admin` with admin scope), and API tokens from
//! the `api_tokens` table (`pinq_<64 hex>`), found by the SHA-256 of what the client
//! presents. A hash lookup leaks nothing usable through timing: a guess's digest cannot be
//! steered towards a stored one. Revoked tokens are not found.
//!
//! A missing or unknown token is 401: as the v1 JSON error on `/v1` routes, and as the
//! Pinning Service API's `Failure` (`{"error":{"reason":"UNAUTHORIZED",…}}`) on `/pins`.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;
use crate::pins::PsaError;

/// Who is calling, as established by the token. Handlers take it from the request's
/// extensions and scope every query by it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant whose batches, jobs and pin requests this caller sees.
    pub owner: String,
    pub admin: bool,
}

impl Caller {
    /// The owner filter for queries: `None` lets an admin see every tenant's data.
    pub fn owner_filter(&self) -> Option<&str> {
        if self.admin { None } else { Some(&self.owner) }
    }
}

pub const ADMIN_OWNER: &str = "admin";

/// Why a request is not authenticated.
#[derive(Debug)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Db(sqlx::Error),
}

/// The bearer token of a request, if it carries one (`Authorization: Bearer <token>`, the
/// scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// Establishes the caller from the request's token.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, AuthFailure> {
    let presented = bearer(headers).ok_or(AuthFailure::Missing)?;
    // ct_eq on slices of different lengths is false without comparing contents; the
    // length of the bootstrap token is not a secret worth hiding.
    if bool::from(presented.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        return Ok(Caller {
            owner: ADMIN_OWNER.to_owned(),
            admin: true,
        });
    }
    if !pinq_core::tokens::looks_like_token(presented) {
        return Err(AuthFailure::Invalid);
    }
    let hash = pinq_core::tokens::hash_token(presented);
    let token = pinq_core::tokens::lookup(&state.pool, &hash)
        .await
        .map_err(AuthFailure::Db)?
        .ok_or(AuthFailure::Invalid)?;
    if pinq_core::tokens::needs_touch(token.last_used_at, chrono::Utc::now()) {
        let pool = state.pool.clone();
        let id = token.id;
        tokio::spawn(async move {
            if let Err(e) = pinq_core::tokens::touch(&pool, id).await {
                tracing::debug!(error = %e, token_id = %id, "failed to record token use");
            }
        });
    }
    Ok(Caller {
        admin: token.is_admin(),
        owner: token.owner,
    })
}

/// Middleware of the `/v1` routes.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, req.headers())
        .await
        .map_err(|e| match e {
            AuthFailure::Missing | AuthFailure::Invalid => ApiError::Unauthorized,
            AuthFailure::Db(e) => ApiError::from(e),
        })?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Middleware of the Pinning Service API (`/pins`): failures in the spec's shape.
pub async fn require_token_psa(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    match authenticate(&state, req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(AuthFailure::Missing) => PsaError::unauthorized(
            "access token is missing: send it as 'Authorization: Bearer <token>'",
        )
        .into_response(),
        Err(AuthFailure::Invalid) => {
            PsaError::unauthorized("access token is invalid or revoked").into_response()
        }
        Err(AuthFailure::Db(e)) => PsaError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
