//! The admin API of API tokens: `POST /v1/tokens` (the token is in the answer, once),
//! `GET /v1/tokens`, `DELETE /v1/tokens/{id}`. Admin tokens only; a user token gets 403.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use pinq_core::tokens::{self, CreateTokenError, Scope, TokenRow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::backends::require_admin;
use crate::error::{ApiError, ApiResult, Problem};
use crate::input::{ApiPath, read_body};

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Unique among live tokens: 1-63 letters, digits, '.', '_' or '-'.
    pub name: String,
    /// The tenant the token acts for; defaults to `name`.
    pub owner: Option<String>,
    /// `user` (the default) or `admin`.
    #[schema(value_type = Option<String>, example = "user")]
    pub scope: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    pub id: Uuid,
    pub name: String,
    pub owner: String,
    /// `user` or `admin`.
    pub scope: String,
    /// The first characters of the token, to tell tokens apart.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for TokenView {
    fn from(r: TokenRow) -> Self {
        TokenView {
            id: r.id,
            name: r.name,
            owner: r.owner,
            scope: r.scope,
            prefix: r.prefix,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// The answer to `POST /v1/tokens`: the token itself is shown here only.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// The bearer token. Store it now: only its hash is kept.
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Include revoked tokens.
    #[serde(default)]
    pub include_revoked: bool,
}

#[utoipa::path(
    post, path = "/v1/tokens", tag = "admin",
    request_body = CreateToken,
    responses(
        (status = 201, description = "Token created; the token is in the body, once", body = CreatedToken),
        (status = 400, description = "Invalid name, owner or scope"),
        (status = 403, description = "Not an admin token"),
        (status = 409, description = "A live token has this name"),
        (status = 413, description = "Body larger than PINQ_MAX_BODY_BYTES"),
    ),
    security(("bearerAuth" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    require_admin(&caller)?;
    let body = read_body(body)?;
    let req: CreateToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            format!(
                "body must be {{\"name\": …, \"owner\"?: …, \"scope\"?: \"user\"|\"admin\"}}: {e}"
            ),
            vec![],
        )
    })?;
    let scope = match req.scope.as_deref() {
        None => Scope::User,
        Some(s) => s.parse::<Scope>().map_err(|_| {
            ApiError::invalid(
                format!("unknown scope '{s}'"),
                vec![Problem::at("/scope", "expected user or admin")],
            )
        })?,
    };
    let owner = req.owner.clone().unwrap_or_else(|| req.name.clone());
    let (row, secret) = tokens::create_token(&state.pool, &req.name, &owner, scope)
        .await
        .map_err(|e| match e {
            CreateTokenError::InvalidLabel(field, _) => ApiError::invalid(
                e.to_string(),
                vec![Problem::at(format!("/{field}"), e.to_string())],
            ),
            CreateTokenError::NameTaken(_) => ApiError::Conflict(e.to_string()),
            CreateTokenError::Db(e) => ApiError::from(e),
        })?;
    tracing::info!(token_id = %row.id, name = %row.name, owner = %row.owner, scope = %row.scope, "api token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            view: row.into(),
            token: secret,
        }),
    ))
}

#[utoipa::path(
    get, path = "/v1/tokens", tag = "admin",
    params(ListQuery),
    responses(
        (status = 200, description = "Tokens, live ones first", body = TokenList),
        (status = 403, description = "Not an admin token"),
    ),
    security(("bearerAuth" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<TokenList>> {
    require_admin(&caller)?;
    let Query(q) = query.map_err(|e| {
        ApiError::invalid(
            format!("invalid query: {e}"),
            vec![Problem::at(
                "query:include_revoked",
                "expected true or false",
            )],
        )
    })?;
    let rows = tokens::list_tokens(&state.pool, q.include_revoked).await?;
    Ok(Json(TokenList {
        tokens: rows.into_iter().map(TokenView::from).collect(),
    }))
}

#[utoipa::path(
    delete, path = "/v1/tokens/{id}", tag = "admin",
    params(("id" = String, Path, description = "Token id, or the name of a live token")),
    responses(
        (status = 200, description = "Revoked; the token no longer authenticates", body = TokenView),
        (status = 403, description = "Not an admin token"),
        (status = 404, description = "No live token with this id or name"),
    ),
    security(("bearerAuth" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TokenView>> {
    require_admin(&caller)?;
    let row = tokens::revoke_token(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no live token '{id}'")))?;
    tracing::info!(token_id = %row.id, name = %row.name, "api token revoked");
    Ok(Json(row.into()))
}
