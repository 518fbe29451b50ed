//! The HTTP client every API subcommand uses: where the API is (`--api-url`), who we are
//! (`--token`), how to print (`--output`), and the mapping of transport and HTTP errors
//! to one actionable line and an exit code.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Flags shared by every command that talks to the API. Global: they may follow any
/// subcommand (`pinq batch ls --output json`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Base URL of the pinq API.
    #[arg(
        long,
        env = "PINQ_API_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        value_name = "URL"
    )]
    pub api_url: String,
    /// Bearer token for the API [default: $PINQ_ADMIN_TOKEN].
    #[arg(long, env = "PINQ_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format: tables for people, JSON for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Failures with their own exit code (see `pinq --help`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connection refused, DNS failure, timeout, or a 503 from the API: exit 3.
    #[error("{0}")]
    Unreachable(String),
    /// 401 or 403, or no token at all: exit 4.
    #[error("{0}")]
    Auth(String),
    /// The API rejected the input (400, 413, 415): exit 2.
    #[error("{0}")]
    Rejected(String),
    /// Any other error answer (404, 409, 5xx): exit 1.
    #[error("{0}")]
    Failed(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable(_) => 3,
            ClientError::Auth(_) => 4,
            ClientError::Rejected(_) => 2,
            ClientError::Failed(_) => 1,
        }
    }
}

/// The exit code a [`ClientError`] anywhere in the chain asks for.
pub fn exit_code_of(e: &anyhow::Error) -> Option<u8> {
    e.chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .map(ClientError::exit_code)
}

/// A client for one API URL and token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    pub output: Output,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let token = args
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| {
                std::env::var("PINQ_ADMIN_TOKEN")
                    .ok()
                    .filter(|t| !t.trim().is_empty())
            })
            .ok_or_else(|| {
                ClientError::Auth(
                    "no API token: set --token or PINQ_TOKEN (or PINQ_ADMIN_TOKEN)".into(),
                )
            })?;
        let base = args.api_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(crate::UsageError(format!(
                "--api-url must be an http:// URL, got '{}'",
                args.api_url
            ))
            .into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| anyhow::anyhow!("failed to build the HTTP client: {e}"))?;
        Ok(Client {
            http,
            base,
            token: token.trim().to_owned(),
            output: args.output,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        self.send(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.send(Method::POST, path, &[], body).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(Method::PATCH, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(Method::DELETE, path, &[], None).await
    }

    /// A GET that returns any status with its JSON body (for `/readyz`, whose 503 is an
    /// answer, not a failure).
    pub async fn probe(&self, path: &str) -> Result<(u16, Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Sends a request and returns the JSON body of a 2xx answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.send_inner(method, path, query, body, None).await
    }

    /// Like [`Client::send`] with a JSON body and one extra header.
    pub async fn send_with_header(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        header: (&str, &str),
    ) -> Result<Value, ClientError> {
        self.send_inner(method, path, &[], Some(body), Some(header))
            .await
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        header: Option<(&str, &str)>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| {
                ClientError::Failed(format!(
                    "{method} {path}: the API answered with invalid JSON ({e}); is {} a pinq API?",
                    self.base
                ))
            });
        }
        Err(self.http_error(&method, path, status, &text))
    }

    fn transport(&self, e: &reqwest::Error) -> ClientError {
        let why = if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "connection failed".to_owned()
        } else {
            // reqwest's top-level message is generic; its source names the cause.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        };
        ClientError::Unreachable(format!(
            "cannot reach the pinq API at {}: {why} (is it running? set --api-url or PINQ_API_URL)",
            self.base
        ))
    }

    fn http_error(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        text: &str,
    ) -> ClientError {
        let parsed: Option<Value> = serde_json::from_str(text).ok();
        let err = parsed.as_ref().map(|v| &v["error"]);
        let message = err
            .and_then(|e| e["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let t = text.trim();
                if t.is_empty() {
                    status.to_string()
                } else {
                    t.chars().take(200).collect()
                }
            });
        let details: Vec<String> = err
            .and_then(|e| e["details"].as_array())
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        let p = d["path"].as_str().unwrap_or("");
                        let m = d["message"].as_str().unwrap_or("");
                        if p.is_empty() {
                            m.to_owned()
                        } else {
                            format!("{p}: {m}")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut line = message;
        if !details.is_empty() {
            const SHOWN: usize = 5;
            let mut shown = details[..details.len().min(SHOWN)].join("; ");
            if details.len() > SHOWN {
                shown.push_str(&format!("; and {} more", details.len() - SHOWN));
            }
            line = format!("{line} ({shown})");
        }
        match status {
            StatusCode::UNAUTHORIZED => ClientError::Auth(format!(
                "the API at {} refused the token (set --token or PINQ_TOKEN)",
                self.base
            )),
            StatusCode::FORBIDDEN => ClientError::Auth(format!(
                "{line} (this needs an admin token: set --token or PINQ_TOKEN)"
            )),
            StatusCode::SERVICE_UNAVAILABLE => ClientError::Unreachable(format!(
                "the pinq API at {} is unavailable: {line} (retry shortly)",
                self.base
            )),
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::UNPROCESSABLE_ENTITY => {
                ClientError::Rejected(format!("the API rejected the request: {line}"))
            }
            StatusCode::NOT_FOUND => ClientError::Failed(format!("not found: {line}")),
            _ => ClientError::Failed(format!(
                "{method} {path} failed with {}: {line}",
                status.as_u16()
            )),
        }
    }
}
