//! Bad input at the HTTP edge, end to end against the running API and a real PostgreSQL:
//! every rejection is a 4xx with a JSON body that says what is wrong and where (the v1
//! `{"error":{"code","message","details"}}`, or the Pinning Service API's
//! `{"error":{"reason","details"}}` under `/pins`), never a 500 and never an empty body.

use std::net::TcpListener;

use pinq_e2e::Stack;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

const V0: &str = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";

/// An answer: status, `Content-Type`, `Allow`, and the body as JSON (`Null` if it is not).
struct Answer {
    status: u16,
    content_type: String,
    allow: String,
    text: String,
    body: Value,
}

async fn send(stack: &Stack, method: Method, path: &str, body: Option<String>) -> Answer {
    let mut req = stack.req(method.clone(), path);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (content_type, allow) = (header("content-type"), header("allow"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        allow,
        text,
        body,
    }
}

impl Answer {
    /// A v1 error: this status and code, JSON, and (if given) a problem at `path`.
    fn v1(&self, what: &str, status: u16, code: &str, path: Option<&str>) -> &Self {
        assert_eq!(self.status, status, "{what}: {}", self.text);
        assert!(
            self.content_type.starts_with("application/json"),
            "{what}: content type '{}': {}",
            self.content_type,
            self.text
        );
        assert_eq!(self.body["error"]["code"], code, "{what}: {}", self.text);
        assert!(
            self.body["error"]["message"].is_string(),
            "{what}: {}",
            self.text
        );
        if let Some(path) = path {
            assert!(
                self.problem_paths().contains(&path.to_owned()),
                "{what}: no problem at {path:?}: {}",
                self.text
            );
        }
        self
    }

    /// A Pinning Service API `Failure`: this status and reason, JSON, and details that
    /// mention `needle`.
    fn psa(&self, what: &str, status: u16, reason: &str, needle: &str) -> &Self {
        assert_eq!(self.status, status, "{what}: {}", self.text);
        assert!(
            self.content_type.starts_with("application/json"),
            "{what}: content type '{}': {}",
            self.content_type,
            self.text
        );
        assert_eq!(
            self.body["error"]["reason"], reason,
            "{what}: {}",
            self.text
        );
        let details = self.body["error"]["details"].as_str().unwrap_or_default();
        assert!(
            details.contains(needle),
            "{what}: details should mention {needle:?}: {}",
            self.text
        );
        self
    }

    fn problem_paths(&self) -> Vec<String> {
        self.body["error"]["details"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["path"].as_str().map(str::to_owned))
            .collect()
    }

    fn no_internals(&self, what: &str) -> &Self {
        let lower = self.text.to_lowercase();
        for word in ["sql", "postgres", "22021", "22p05", "22008", "sqlstate"] {
            assert!(!lower.contains(word), "{what}: names {word}: {}", self.text);
        }
        self
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A NUL character (U+0000), which PostgreSQL stores in neither text nor jsonb, is
/// rejected where it is read, wherever it is: batch op names and meta (values and keys, at
/// any depth), PSA pin fields, query strings and path segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_rejected_at_their_path() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    // Never called: nothing here is accepted. It exists so that, but for the checks, the
    // requests would reach the database.
    stack
        .register_backend("local", "http://127.0.0.1:9")
        .await?;

    let ops = json!([
        {"op": "pin", "cid": V0},
        {"op": "pin", "cid": V0, "name": "a\u{0}b"},
        {"op": "pin", "cid": V0, "meta": {"k": "v\u{0}"}},
        {"op": "pin", "cid": V0, "meta": {"a\u{0}": "x"}},
        {"op": "pin", "cid": V0, "meta": {"n": {"deep": [1, "\u{0}"]}}},
        {"op": "pin", "cid": V0, "name": "ok", "meta": {"k": "v"}},
    ]);
    let a = send(
        &stack,
        Method::POST,
        "/v1/batches",
        Some(json!({"ops": ops}).to_string()),
    )
    .await;
    a.v1("batch", 400, "invalid_request", Some("/ops/1/name"))
        .no_internals("batch");
    let mut paths = a.problem_paths();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/ops/1/name",
            "/ops/2/meta/k",
            "/ops/3/meta/a\u{0}",
            "/ops/4/meta/n/deep/1"
        ],
        "{}",
        a.text
    );
    let indexes: Vec<u64> = a.body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["index"].as_u64())
        .collect();
    assert_eq!(indexes.len(), 4, "every problem names its op: {}", a.text);
    assert!(a.text.contains("NUL"), "{}", a.text);
    assert_eq!(stack.db.count("batches").await, 0);

    // The Pinning Service API: the body's fields and the list's filters.
    let requestid = Uuid::new_v4();
    for (what, path, body, needle) in [
        (
            "pin name",
            "/pins".to_owned(),
            json!({"cid": V0, "name": "a\u{0}"}),
            "name",
        ),
        (
            "pin origin",
            "/pins".to_owned(),
            json!({"cid": V0, "origins": ["/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4\u{0}"]}),
            "origins[1]",
        ),
        (
            "pin meta value",
            "/pins".to_owned(),
            json!({"cid": V0, "meta": {"app": "\u{0}"}}),
            "meta",
        ),
        (
            "pin meta key",
            "/pins".to_owned(),
            json!({"cid": V0, "meta": {"\u{0}": "x"}}),
            "meta",
        ),
        (
            "replaced pin name",
            format!("/pins/{requestid}"),
            json!({"cid": V0, "name": "\u{0}"}),
            "name",
        ),
    ] {
        send(&stack, Method::POST, &path, Some(body.to_string()))
            .await
            .psa(what, 400, "BAD_REQUEST", needle)
            .psa(what, 400, "BAD_REQUEST", "NUL")
            .no_internals(what);
    }
    assert_eq!(stack.db.count("pin_requests").await, 0);
    for (what, query, needle) in [
        ("name filter", "name=%00".to_owned(), "name"),
        (
            "meta filter value",
            format!("meta={}", encode(r#"{"app":"\u0000"}"#)),
            "meta",
        ),
        (
            "meta filter key",
            format!("meta={}", encode(r#"{"\u0000":"x"}"#)),
            "meta",
        ),
    ] {
        send(&stack, Method::GET, &format!("/pins?{query}"), None)
            .await
            .psa(what, 400, "BAD_REQUEST", needle)
            .no_internals(what);
    }

    // v1 query strings, path segments and admin bodies.
    for (what, method, path, body, problem) in [
        (
            "pin-index backend",
            Method::GET,
            "/v1/pin-index?backend=%00",
            None,
            "query:backend",
        ),
        (
            "pin-index cursor",
            Method::GET,
            "/v1/pin-index?after=local/%00",
            None,
            "query:after",
        ),
        (
            "backend name in the path",
            Method::GET,
            "/v1/backends/%00/health",
            None,
            "path:name",
        ),
        (
            "backend to check",
            Method::POST,
            "/v1/backends/a%00/check",
            None,
            "path:name",
        ),
        (
            "backend to delete",
            Method::DELETE,
            "/v1/backends/%00",
            None,
            "path:name",
        ),
        (
            "token to revoke",
            Method::DELETE,
            "/v1/tokens/%00",
            None,
            "path:id",
        ),
        (
            "schedule to change",
            Method::PATCH,
            "/v1/schedules/%00",
            Some(json!({"enabled": true})),
            "path:name",
        ),
        (
            "schedule to run",
            Method::POST,
            "/v1/schedules/%00/run",
            None,
            "path:name",
        ),
        (
            "schedule runs",
            Method::GET,
            "/v1/schedules/%00/runs",
            None,
            "path:name",
        ),
        (
            "schedule args",
            Method::PATCH,
            "/v1/schedules/prune",
            Some(json!({"args": {"chunk_size": 10, "note": "\u{0}"}})),
            "/args/note",
        ),
        (
            "backend url",
            Method::POST,
            "/v1/backends",
            Some(json!({"name": "nul", "kind": "kubo", "url": "http://127.0.0.1:9/\u{0}"})),
            "/url",
        ),
    ] {
        send(&stack, method, path, body.map(|b| b.to_string()))
            .await
            .v1(what, 400, "invalid_request", Some(problem))
            .no_internals(what);
    }
    Ok(())
}

/// Timestamps PostgreSQL cannot store (it covers 4713 BC to 294276 AD) are a 400 naming
/// the parameter; the earliest one it can store is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_postgres_range_are_rejected() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    stack.register_backend("x", "http://127.0.0.1:9").await?;

    let zero = Uuid::nil();
    for (what, path, problem) in [
        (
            "job cursor",
            format!("/v1/jobs?after=-300000000000000000_{zero}"),
            "query:after",
        ),
        (
            "probe history",
            "/v1/backends/x/health?before=-5000-01-01T00:00:00Z".to_owned(),
            "query:before",
        ),
        (
            "schedule runs",
            "/v1/schedules/prune/runs?before=-5000-01-01T00:00:00Z".to_owned(),
            "query:before",
        ),
        (
            "a second before the earliest",
            "/v1/schedules/prune/runs?before=-4713-11-23T23:59:59Z".to_owned(),
            "query:before",
        ),
    ] {
        send(&stack, Method::GET, &path, None)
            .await
            .v1(what, 400, "invalid_request", Some(problem))
            .no_internals(what);
    }
    // The Pinning Service API's times are RFC 3339, whose four-digit years PostgreSQL
    // all stores: a time before them is not RFC 3339, and refused as such.
    for (what, param) in [("pins before", "before"), ("pins after", "after")] {
        send(
            &stack,
            Method::GET,
            &format!("/pins?{param}=-5000-01-01T00:00:00Z"),
            None,
        )
        .await
        .psa(what, 400, "BAD_REQUEST", param)
        .no_internals(what);
    }

    // The edges PostgreSQL accepts.
    let earliest_micros = -210_866_803_200_000_000_i64;
    for path in [
        "/v1/schedules/prune/runs?before=-4713-11-24T00:00:00Z".to_owned(),
        "/v1/backends/x/health?before=-4713-11-24T00:00:00Z".to_owned(),
        format!("/v1/jobs?after={earliest_micros}_{zero}"),
        "/pins?before=0001-01-01T00:00:00Z".to_owned(),
    ] {
        let a = send(&stack, Method::GET, &path, None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
    }
    Ok(())
}

/// A path segment that is not UTF-8 once percent-decoded is a JSON 400 naming it, in each
/// API's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_segments_that_are_not_utf8_answer_json() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    for (what, method, path, problem) in [
        ("batch", Method::GET, "/v1/batches/%FF", "path:id"),
        ("batch jobs", Method::GET, "/v1/batches/%FF/jobs", "path:id"),
        (
            "job cancel",
            Method::POST,
            "/v1/jobs/%C3%28/cancel",
            "path:id",
        ),
        ("backend", Method::DELETE, "/v1/backends/%FF", "path:name"),
        ("token", Method::DELETE, "/v1/tokens/%FE", "path:id"),
    ] {
        send(&stack, method, path, None)
            .await
            .v1(what, 400, "invalid_request", Some(problem));
    }
    for method in [Method::GET, Method::DELETE] {
        send(&stack, method.clone(), "/pins/%FF", None).await.psa(
            &format!("{method} pin"),
            400,
            "BAD_REQUEST",
            "requestid",
        );
    }
    Ok(())
}

/// A method a route does not have is a JSON 405 with an `Allow` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_answer_json_405() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    let a = send(&stack, Method::DELETE, "/v1/batches", None).await;
    a.v1("DELETE batches", 405, "method_not_allowed", None);
    assert!(
        a.allow.contains("GET") && a.allow.contains("POST"),
        "{}",
        a.allow
    );
    send(&stack, Method::PUT, "/v1/tokens/abc", None).await.v1(
        "PUT token",
        405,
        "method_not_allowed",
        None,
    );
    let a = send(&stack, Method::PUT, "/pins", None).await;
    a.psa("PUT pins", 405, "METHOD_NOT_ALLOWED", "PUT");
    assert!(
        a.allow.contains("GET") && a.allow.contains("POST"),
        "{}",
        a.allow
    );
    send(
        &stack,
        Method::PATCH,
        &format!("/pins/{}", Uuid::new_v4()),
        None,
    )
    .await
    .psa("PATCH pin", 405, "METHOD_NOT_ALLOWED", "PATCH");
    Ok(())
}

/// A request that outlasts `PINQ_REQUEST_TIMEOUT_SECS` is a JSON 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_answers_json_503() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_REQUEST_TIMEOUT_SECS".into(), "1".into()));
    stack.start_api().await?;
    // A node that accepts connections (the kernel completes them) and never answers: the
    // probe waits for its own 5 s timeout, and a PSA response for the node's identity (2 s).
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", silent.local_addr()?);
    stack.register_backend("silent", &url).await?;

    let a = send(&stack, Method::POST, "/v1/backends/silent/check", None).await;
    a.v1("slow check", 503, "timeout", None);
    let a = send(
        &stack,
        Method::POST,
        "/pins",
        Some(json!({"cid": V0}).to_string()),
    )
    .await;
    a.psa("slow pin", 503, "TIMEOUT", "took longer");
    drop(silent);
    Ok(())
}

/// Bodies over `PINQ_MAX_BODY_BYTES` are a 413 on every route that takes a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413_on_every_route() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack
        .env
        .push(("PINQ_MAX_BODY_BYTES".into(), "1024".into()));
    stack.start_api().await?;
    let big = "x".repeat(2048);
    for (what, method, path, body) in [
        (
            "batch",
            Method::POST,
            "/v1/batches",
            json!({"ops": [{"op": "pin", "cid": V0, "name": big}]}),
        ),
        (
            "backend",
            Method::POST,
            "/v1/backends",
            json!({"name": "b", "kind": "kubo", "url": format!("http://{big}")}),
        ),
        (
            "token",
            Method::POST,
            "/v1/tokens",
            json!({"name": "t", "owner": big}),
        ),
        (
            "schedule",
            Method::PATCH,
            "/v1/schedules/prune",
            json!({"args": {"pad": big}}),
        ),
    ] {
        send(&stack, method, path, Some(body.to_string())).await.v1(
            what,
            413,
            "payload_too_large",
            None,
        );
    }
    send(
        &stack,
        Method::POST,
        "/pins",
        Some(json!({"cid": V0, "name": big}).to_string()),
    )
    .await
    .psa("pin", 413, "PAYLOAD_TOO_LARGE", "larger");
    Ok(())
}

/// An `Idempotency-Key` sent again with the same request (the same body) answers the first
/// batch (200, nothing stored twice); with a different request it is a JSON 422 and nothing
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_answers_only_its_own_request() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    stack.register_backend("b", "http://127.0.0.1:9").await?;
    let submit = |body: Value| {
        let req = stack
            .req(Method::POST, "/v1/batches")
            .header("idempotency-key", "k-1")
            .json(&body);
        async move {
            let resp = req.send().await.expect("submit");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("JSON");
            (status, body)
        }
    };
    let request = json!({"ops": [{"op": "pin", "cid": V0, "name": "a"}]});
    let (status, first) = submit(request.clone()).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = submit(request.clone()).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "{again}");
    // A retry is the same request even if the server changed meanwhile: a new backend
    // would be a target of the request now, but the first batch is still its answer.
    stack.register_backend("c", "http://127.0.0.1:9").await?;
    let (status, again) = submit(request).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "{again}");

    let (status, other) = submit(json!({"ops": [{"op": "pin", "cid": V0, "name": "b"}]})).await;
    assert_eq!(status, 422, "{other}");
    assert_eq!(other["error"]["code"], "idempotency_key_reused", "{other}");
    assert!(
        other["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(first["id"].as_str().unwrap_or("?"))),
        "the answer names the first batch: {other}"
    );
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(jobs, 1, "only the first request's job is stored");
    Ok(())
}
