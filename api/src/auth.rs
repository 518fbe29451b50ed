//! Bearer-token authentication. For now one bootstrap admin token (`PINQ_ADMIN_TOKEN`),
//! compared in constant time; the caller is the owner `admin`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Who is calling, as established by the token. Handlers take it from the request's
/// extensions and scope every query by it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant whose batches and jobs this caller sees.
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

pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let expected = state.admin_token.as_bytes();
    // ct_eq on slices of different lengths is false without comparing contents; the
    // length of the bootstrap token is not a secret worth hiding.
    if !bool::from(presented.as_bytes().ct_eq(expected)) {
        return Err(ApiError::Unauthorized);
    }
    req.extensions_mut().insert(Caller {
        owner: ADMIN_OWNER.to_owned(),
        admin: true,
    });
    Ok(next.run(req).await)
}
