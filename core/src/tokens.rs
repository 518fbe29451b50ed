//! API tokens: generation, hashing, and their table.
//!
//! A token is `pinq_` followed by 64 hex digits (32 random bytes). Only its SHA-256 (hex)
//! is stored, with a short display prefix; the token itself is shown once, when it is
//! created. A token is found by the hash of what a client presents: the comparison is an
//! index lookup of a SHA-256 digest, which leaks nothing usable about a token through
//! timing (an attacker cannot steer the digest of a guess towards a stored one).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::model::UnknownVariant;

/// What every generated token starts with.
pub const TOKEN_PREFIX: &str = "pinq_";
/// Characters of a token kept for display (`pinq_` and 8 hex digits).
const DISPLAY_PREFIX_LEN: usize = 13;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Its owner's pins, batches and jobs.
    User,
    /// Everything: every tenant's data, backends, schedules, workers, tokens.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Scope::User),
            "admin" => Ok(Scope::Admin),
            other => Err(UnknownVariant(other.to_owned())),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A freshly generated token: the secret (shown once) and what is stored of it.
pub struct GeneratedToken {
    pub secret: String,
    pub hash: String,
    pub prefix: String,
}

impl fmt::Debug for GeneratedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedToken")
            .field("secret", &"<redacted>")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A new random token.
pub fn generate() -> GeneratedToken {
    let bytes: [u8; 32] = rand::random();
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    GeneratedToken {
        hash: hash_token(&secret),
        prefix: display_prefix(&secret),
        secret,
    }
}

/// SHA-256 of a token, lower-case hex: the form stored and looked up.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether a presented string has the shape of a generated token (worth a lookup).
pub fn looks_like_token(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn display_prefix(secret: &str) -> String {
    secret.chars().take(DISPLAY_PREFIX_LEN).collect()
}

/// Validates a token name or owner: 1-63 letters, digits, '.', '_' or '-', starting with
/// a letter or digit (the same rule as the table's CHECK constraints).
pub fn valid_label(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A token as listed (never with its secret or hash).
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct TokenRow {
    pub id: Uuid,
    pub name: String,
    pub owner: String,
    pub scope: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const TOKEN_COLUMNS: &str = "id, name, owner, scope, prefix, created_at, last_used_at, revoked_at";

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateTokenError {
    #[error(
        "{0} '{1}' is invalid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidLabel(&'static str, String),
    #[error("a live token named '{0}' already exists; revoke it first or pick another name")]
    NameTaken(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Creates a token; returns its row and the secret, which is not stored.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    owner: &str,
    scope: Scope,
) -> Result<(TokenRow, String), CreateTokenError> {
    if !valid_label(name) {
        return Err(CreateTokenError::InvalidLabel("name", name.to_owned()));
    }
    if !valid_label(owner) {
        return Err(CreateTokenError::InvalidLabel("owner", owner.to_owned()));
    }
    let token = generate();
    let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_tokens (id, name, owner, scope, token_hash, prefix)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TOKEN_COLUMNS}"
    )))
    .bind(Uuid::new_v4())
    .bind(name)
    .bind(owner)
    .bind(scope.as_str())
    .bind(&token.hash)
    .bind(&token.prefix)
    .fetch_one(pool)
    .await
    .map_err(|e| {
        if crate::db::is_unique_violation(&e) {
            CreateTokenError::NameTaken(name.to_owned())
        } else {
            CreateTokenError::Db(e)
        }
    })?;
    Ok((row, token.secret))
}

/// Every token, live ones first, newest first.
pub async fn list_tokens(
    pool: &PgPool,
    include_revoked: bool,
) -> Result<Vec<TokenRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens
         WHERE $1 OR revoked_at IS NULL
         ORDER BY revoked_at IS NOT NULL, created_at DESC"
    )))
    .bind(include_revoked)
    .fetch_all(pool)
    .await
}

/// Revokes the live token with this id, or else the live token with this name. `None`:
/// no live token matches.
pub async fn revoke_token(
    pool: &PgPool,
    id_or_name: &str,
) -> Result<Option<TokenRow>, sqlx::Error> {
    let id = id_or_name.parse::<Uuid>().ok();
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE api_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL AND (id = $1 OR ($1 IS NULL AND name = $2))
         RETURNING {TOKEN_COLUMNS}"
    )))
    .bind(id)
    .bind(id_or_name)
    .fetch_optional(pool)
    .await
}

/// The live token whose hash this is.
#[derive(Debug, Clone, FromRow)]
pub struct TokenIdentity {
    pub id: Uuid,
    pub owner: String,
    pub scope: String,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl TokenIdentity {
    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin.as_str()
    }
}

pub async fn lookup(pool: &PgPool, hash: &str) -> Result<Option<TokenIdentity>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, owner, scope, last_used_at FROM api_tokens
         WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await
}

/// Records a use of the token, at most once a minute (a write per request would be waste).
pub async fn touch(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a last use is old enough that [`touch`] would write.
pub fn needs_touch(last_used_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    last_used_at.is_none_or(|t| now - t > chrono::Duration::minutes(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_random_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_token(&a.secret), "{}", a.secret);
        assert_eq!(a.secret.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(a.hash, hash_token(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(a.secret.starts_with(&a.prefix));
        assert_eq!(a.prefix.len(), 13);
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn token_shape() {
        assert!(!looks_like_token("pinq_xyz"));
        assert!(!looks_like_token(&format!("pinq_{}", "g".repeat(64))));
        assert!(!looks_like_token(&"a".repeat(69)));
    }

    #[test]
    fn labels_and_scopes() {
        assert!(valid_label("alice"));
        assert!(valid_label("team-1.ci_bot"));
        assert!(!valid_label(""));
        assert!(!valid_label("-x"));
        assert!(!valid_label("a b"));
        assert!(!valid_label(&"a".repeat(64)));
        assert_eq!("admin".parse::<Scope>().unwrap(), Scope::Admin);
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn touch_is_rate_limited() {
        let now = Utc::now();
        assert!(needs_touch(None, now));
        assert!(!needs_touch(Some(now - chrono::Duration::seconds(10)), now));
        assert!(needs_touch(Some(now - chrono::Duration::seconds(90)), now));
    }
}
