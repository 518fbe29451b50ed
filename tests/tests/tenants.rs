//! Tenant isolation and token scopes, end to end: a user token sees and changes only its
//! owner's pin requests, batches and jobs (anything else is 404, never 403, so nothing
//! leaks), admin routes are 403 for it, tokens made by the CLI work and stop working when
//! revoked, and the bootstrap admin token keeps seeing everything.

use std::process::Command;
use std::time::{Duration, Instant};

use pinq_e2e::{Stack, TOKEN, bin_path, unique_contents};
use reqwest::Method;
use serde_json::{Value, json};

async fn token(stack: &Stack, name: &str, owner: &str) -> anyhow::Result<String> {
    let resp = stack
        .req(Method::POST, "/v1/tokens")
        .json(&json!({"name": name, "owner": owner}))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 201, "create token: {}", resp.status());
    let v: Value = resp.json().await?;
    assert_eq!(v["scope"], "user");
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

async fn call(
    stack: &Stack,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = stack
        .http
        .request(method, format!("{}{path}", stack.api_url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn cli(stack: &Stack, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(bin_path("pinq"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &stack.db.url)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_b_cannot_see_or_touch_tenant_a() -> anyhow::Result<()> {
    let stack = Stack::full(1).await?;
    let a = token(&stack, "alice-laptop", "alice").await?;
    let a2 = token(&stack, "alice-ci", "alice").await?;
    let b = token(&stack, "bob", "bob").await?;

    // Tenant A: a PSA pin and a batch.
    let cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    let (code, pin) = call(
        &stack,
        &a,
        Method::POST,
        "/pins",
        Some(json!({"cid": cids[0], "name": "alice-secret", "meta": {"team": "a"}})),
    )
    .await?;
    assert_eq!(code, 202, "{pin}");
    let rid = pin["requestid"].as_str().unwrap_or_default().to_owned();
    let (code, batch) = call(
        &stack,
        &a,
        Method::POST,
        "/v1/batches",
        Some(json!({"ops": [{"op": "pin", "cid": cids[1]}]})),
    )
    .await?;
    assert_eq!(code, 202, "{batch}");
    let batch_id = batch["id"].as_str().unwrap_or_default().to_owned();
    stack
        .wait_done(batch_id.parse()?, Duration::from_secs(60))
        .await?;
    let (_, jobs) = call(
        &stack,
        &a,
        Method::GET,
        &format!("/v1/batches/{batch_id}/jobs"),
        None,
    )
    .await?;
    let job_id = jobs["jobs"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!job_id.is_empty(), "{jobs}");

    // Another token of the same owner sees A's things.
    let (code, v) = call(&stack, &a2, Method::GET, &format!("/pins/{rid}"), None).await?;
    assert_eq!(code, 200, "same tenant, other token: {v}");
    let (code, _) = call(
        &stack,
        &a2,
        Method::GET,
        &format!("/v1/batches/{batch_id}"),
        None,
    )
    .await?;
    assert_eq!(code, 200);

    // Tenant B: every read and write of A's pin request is 404, by id or by filter.
    let all = "status=queued,pinning,pinned,failed";
    for (m, path, body) in [
        (Method::GET, format!("/pins/{rid}"), None),
        (
            Method::POST,
            format!("/pins/{rid}"),
            Some(json!({"cid": cids[2]})),
        ),
        (Method::DELETE, format!("/pins/{rid}"), None),
    ] {
        let (code, v) = call(&stack, &b, m.clone(), &path, body).await?;
        assert_eq!(code, 404, "B {m} {path}: {v}");
        assert_eq!(v["error"]["reason"], "NOT_FOUND", "{v}");
    }
    for q in [
        all.to_owned(),
        format!("{all}&cid={}", cids[0]),
        format!("{all}&name=alice-secret"),
        format!("{all}&name=alice&match=ipartial"),
        format!("{all}&meta=%7B%22team%22%3A%22a%22%7D"),
    ] {
        let (code, v) = call(&stack, &b, Method::GET, &format!("/pins?{q}"), None).await?;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["count"], 0, "B lists nothing of A's ({q}): {v}");
        assert_eq!(v["results"], json!([]));
    }

    // Tenant B: A's batch and job are 404 on every route; lists hold none of them.
    for (m, path) in [
        (Method::GET, format!("/v1/batches/{batch_id}")),
        (Method::GET, format!("/v1/batches/{batch_id}/jobs")),
        (Method::POST, format!("/v1/batches/{batch_id}/cancel")),
        (Method::POST, format!("/v1/batches/{batch_id}/retry-failed")),
        (Method::GET, format!("/v1/jobs/{job_id}")),
        (Method::POST, format!("/v1/jobs/{job_id}/cancel")),
        (Method::POST, format!("/v1/jobs/{job_id}/retry")),
    ] {
        let (code, v) = call(&stack, &b, m.clone(), &path, None).await?;
        assert_eq!(code, 404, "B {m} {path}: {v}");
        assert_eq!(v["error"]["code"], "not_found", "{v}");
    }
    let (code, v) = call(&stack, &b, Method::GET, "/v1/batches", None).await?;
    assert_eq!(code, 200);
    assert_eq!(v["batches"], json!([]), "B lists no batch of A's: {v}");
    // List routes by filter (where present) never show A's ids to B.
    for path in [
        "/v1/jobs".to_owned(),
        format!("/v1/jobs?batch={batch_id}"),
        format!("/v1/jobs?cid={}", cids[1]),
        "/v1/pin-index".to_owned(),
    ] {
        let (code, v) = call(&stack, &b, Method::GET, &path, None).await?;
        let text = v.to_string();
        assert!(
            !text.contains(&job_id) && !text.contains(&batch_id) && !text.contains(&rid),
            "B {path} ({code}) leaks A's ids: {text}"
        );
    }
    // A retry of A's job by A is a 409 (it succeeded), proving B's 404 hid a real job.
    let (code, _) = call(
        &stack,
        &a,
        Method::POST,
        &format!("/v1/jobs/{job_id}/retry"),
        None,
    )
    .await?;
    assert_eq!(code, 409);

    // A's things are intact after B's attempts.
    let (code, v) = call(&stack, &a, Method::GET, &format!("/pins/{rid}"), None).await?;
    assert_eq!(code, 200, "B's delete and replace changed nothing: {v}");
    assert_eq!(v["pin"]["cid"], cids[0]);

    // Admin routes are 403 for user tokens; the admin token sees every tenant.
    for (m, path) in [
        (Method::GET, "/v1/backends"),
        (Method::GET, "/v1/workers"),
        (Method::GET, "/v1/schedules"),
        (Method::GET, "/v1/tokens"),
        (Method::POST, "/v1/tokens"),
        (Method::GET, "/v1/backends/local/health"),
    ] {
        let (code, v) = call(&stack, &b, m.clone(), path, Some(json!({"name": "x"}))).await?;
        assert_eq!(code, 403, "B {m} {path}: {v}");
    }
    let (code, v) = call(&stack, TOKEN, Method::GET, &format!("/pins?{all}"), None).await?;
    assert_eq!(code, 200);
    assert_eq!(v["count"], 1, "admin sees A's request: {v}");
    let (code, _) = call(
        &stack,
        TOKEN,
        Method::GET,
        &format!("/v1/jobs/{job_id}"),
        None,
    )
    .await?;
    assert_eq!(code, 200);

    // Tokens listed through the admin API never carry secrets or hashes.
    let (_, v) = call(&stack, TOKEN, Method::GET, "/v1/tokens", None).await?;
    let text = v.to_string();
    assert!(
        !text.contains(&a) && !text.contains(&b),
        "no secrets listed"
    );
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(3), "{v}");

    // Revoked through the API: 401 at once.
    let (code, v) = call(&stack, TOKEN, Method::DELETE, "/v1/tokens/bob", None).await?;
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(&stack, &b, Method::GET, "/pins", None).await?;
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["error"]["reason"], "UNAUTHORIZED");
    let (code, v) = call(&stack, &b, Method::GET, "/v1/batches", None).await?;
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tokens_create_list_revoke() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;

    let (ok, out, err) = cli(&stack, &["tokens", "create", "--name", "carol"])?;
    assert!(ok, "{err}");
    let secret = out.trim().to_owned();
    assert!(secret.starts_with("pinq_") && secret.len() == 69, "{out}");
    // Stored only as a hash.
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_tokens WHERE token_hash = $1")
        .bind(pinq_core::tokens::hash_token(&secret))
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(stored, 1);
    let (leaked,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM api_tokens WHERE token_hash = $1 OR prefix = $1 OR name = $1",
    )
    .bind(&secret)
    .fetch_one(&stack.db.pool)
    .await?;
    assert_eq!(leaked, 0);

    let (ok, _, err) = cli(
        &stack,
        &[
            "tokens", "create", "--name", "ops", "--owner", "platform", "--admin",
        ],
    )?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&stack, &["tokens", "create", "--name", "carol"])?;
    assert!(!ok, "a live name is unique");
    assert!(err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&stack, &["tokens", "create", "--name", "bad name"])?;
    assert!(!ok);
    assert!(err.contains("invalid"), "{err}");

    let (ok, out, _) = cli(&stack, &["tokens", "ls", "--output", "json"])?;
    assert!(ok);
    let list: Value = serde_json::from_str(&out)?;
    let rows = list.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows.iter()
            .any(|r| r["name"] == "ops" && r["scope"] == "admin" && r["owner"] == "platform")
    );
    assert!(!out.contains(&secret));
    let (ok, table, _) = cli(&stack, &["tokens", "ls"])?;
    assert!(
        ok && table.contains("carol") && table.contains("SCOPE"),
        "{table}"
    );

    // The CLI-made token works on both APIs, as tenant carol, and is a user token.
    let (code, v) = call(&stack, &secret, Method::GET, "/pins", None).await?;
    assert_eq!(code, 200, "{v}");
    let (code, _) = call(&stack, &secret, Method::GET, "/v1/batches", None).await?;
    assert_eq!(code, 200);
    let (code, _) = call(&stack, &secret, Method::GET, "/v1/backends", None).await?;
    assert_eq!(code, 403);
    // last_used_at is recorded (in the background).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (used,): (bool,) =
            sqlx::query_as("SELECT last_used_at IS NOT NULL FROM api_tokens WHERE name = 'carol'")
                .fetch_one(&stack.db.pool)
                .await?;
        if used {
            break;
        }
        assert!(Instant::now() < deadline, "last_used_at never set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (ok, out, err) = cli(&stack, &["tokens", "revoke", "carol"])?;
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (code, _) = call(&stack, &secret, Method::GET, "/pins", None).await?;
    assert_eq!(code, 401);
    let (ok, _, _) = cli(&stack, &["tokens", "revoke", "carol"])?;
    assert!(!ok, "revoking twice fails");
    Ok(())
}

/// Submits a batch with `token` and waits until every job of it has ended.
async fn run_batch(stack: &Stack, token: &str, body: Value) -> anyhow::Result<()> {
    let (code, v) = call(stack, token, Method::POST, "/v1/batches", Some(body)).await?;
    anyhow::ensure!(code == 202, "batch answered {code}: {v}");
    let id: uuid::Uuid = v["id"].as_str().unwrap_or_default().parse()?;
    let done = stack.wait_done(id, Duration::from_secs(60)).await?;
    anyhow::ensure!(done["counts"]["succeeded"] == done["jobs"], "{done}");
    Ok(())
}

/// The owners holding a reference to `cid` in the pin index, sorted (empty: no row).
async fn owners_of(stack: &Stack, cid: &str) -> anyhow::Result<Vec<String>> {
    let key = pinq_core::cid::canonical_of(cid).expect("valid CID");
    let row: Option<(Vec<String>,)> = sqlx::query_as(
        "SELECT array_remove(ARRAY[owner] || coalesce(others, '{}'), NULL) FROM pins WHERE cid = $1",
    )
    .bind(key)
    .fetch_optional(&stack.db.pool)
    .await?;
    let mut owners = row.map(|r| r.0).unwrap_or_default();
    owners.sort();
    Ok(owners)
}

async fn on_node(stack: &Stack, cid: &str) -> anyhow::Result<bool> {
    let key = pinq_core::cid::canonical_of(cid).expect("valid CID");
    Ok(stack.ipfs().pins().await?.contains(&key))
}

/// Adds a `/pins` request for `cid` and waits until it is pinned; returns its id.
async fn psa_add(stack: &Stack, token: &str, cid: &str) -> anyhow::Result<String> {
    let (code, v) = call(
        stack,
        token,
        Method::POST,
        "/pins",
        Some(json!({"cid": cid})),
    )
    .await?;
    anyhow::ensure!(code == 202, "add answered {code}: {v}");
    let id = v["requestid"].as_str().unwrap_or_default().to_owned();
    stack
        .wait_pin_status(token, &id, "pinned", Duration::from_secs(60))
        .await?;
    Ok(id)
}

/// Deletes a `/pins` request and waits until every job has ended; returns how many unpin
/// jobs the delete wrote (all of them succeeded).
async fn psa_delete(stack: &Stack, token: &str, id: &str) -> anyhow::Result<i64> {
    let unpins = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs WHERE op = 'unpin'")
            .fetch_one(&stack.db.pool)
            .await?;
        anyhow::Ok(n)
    };
    let before = unpins().await?;
    let (code, v) = call(stack, token, Method::DELETE, &format!("/pins/{id}"), None).await?;
    anyhow::ensure!(code == 202, "delete answered {code}: {v}");
    stack.wait_jobs_settled(Duration::from_secs(60)).await?;
    let (failed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE op = 'unpin' AND state <> 'succeeded'")
            .fetch_one(&stack.db.pool)
            .await?;
    anyhow::ensure!(failed == 0, "an unpin did not succeed");
    Ok(unpins().await? - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_pinning_one_cid_each_hold_a_reference() -> anyhow::Result<()> {
    let stack = Stack::full(1).await?;
    let a = token(&stack, "a-pins", "tenant-a").await?;
    let b = token(&stack, "b-pins", "tenant-b").await?;
    let c = token(&stack, "c-pins", "tenant-c").await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    let (x, y, z) = (cids[0].clone(), cids[1].clone(), cids[2].clone());
    let pin = |cid: &str, name: &str| json!({"ops": [{"op": "pin", "cid": cid, "name": name}]});
    let unpin = |cid: &str| json!({"ops": [{"op": "unpin", "cid": cid}]});

    // A and B pin the same content: each holds a reference.
    run_batch(&stack, &a, pin(&x, "a-private-name")).await?;
    run_batch(&stack, &b, pin(&x, "b-name")).await?;
    assert_eq!(owners_of(&stack, &x).await?, ["tenant-a", "tenant-b"]);
    // B sees the pin as its own, and nothing of A's.
    let (code, v) = call(&stack, &b, Method::GET, "/v1/pin-index", None).await?;
    assert_eq!(code, 200, "{v}");
    let rows = v["pins"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["owner"], "tenant-b");
    assert_eq!(rows[0]["owners"], json!(["tenant-b"]));
    for hidden in ["name", "job_id", "pinned_at", "updated_at"] {
        assert!(rows[0][hidden].is_null(), "{hidden}: {v}");
    }
    // A's own view has them.
    let (_, v) = call(&stack, &a, Method::GET, "/v1/pin-index", None).await?;
    for shown in ["name", "job_id", "pinned_at", "updated_at"] {
        assert!(!v["pins"][0][shown].is_null(), "{shown}: {v}");
    }
    // The admin sees both references.
    let v: Value = stack
        .req(Method::GET, "/v1/pin-index")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(v["pins"][0]["owners"], json!(["tenant-a", "tenant-b"]));
    assert_eq!(v["pins"][0]["name"], "a-private-name");

    // C holds none: it may not remove the pin, by unpin or by replace; nothing is stored.
    let jobs_before = stack.db.count("jobs").await;
    for body in [
        unpin(&x),
        json!({"ops": [{"op": "replace", "cid": y, "replaces": x}]}),
    ] {
        let (code, v) = call(&stack, &c, Method::POST, "/v1/batches", Some(body)).await?;
        assert_eq!(code, 400, "{v}");
        assert!(
            v["error"]["details"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("only your own pins")),
            "{v}"
        );
    }
    assert_eq!(stack.db.count("jobs").await, jobs_before);

    // A's unpin takes A's reference: the node keeps the content for B.
    run_batch(&stack, &a, unpin(&x)).await?;
    assert!(on_node(&stack, &x).await?, "B's pin survives A's unpin");
    assert_eq!(owners_of(&stack, &x).await?, ["tenant-b"]);
    // B's is the last: the node unpins.
    run_batch(&stack, &b, unpin(&x)).await?;
    assert!(!on_node(&stack, &x).await?);
    assert!(owners_of(&stack, &x).await?.is_empty());

    // A pin through `/v1/batches` is a reference a Pinning Service API delete respects:
    // B pins y through the batch API, A through `/pins`, and A deletes its request.
    run_batch(&stack, &b, pin(&y, "b-y")).await?;
    let request = psa_add(&stack, &a, &y).await?;
    assert_eq!(owners_of(&stack, &y).await?, ["tenant-a", "tenant-b"]);
    assert_eq!(
        psa_delete(&stack, &a, &request).await?,
        1,
        "A's reference goes"
    );
    assert!(on_node(&stack, &y).await?, "B's pin survives A's delete");
    assert_eq!(owners_of(&stack, &y).await?, ["tenant-b"]);

    // Through `/pins` alone: A holds w by two requests, B by one. A's first delete keeps
    // A's reference (its other request holds w), its second removes it and the node keeps
    // w for B, and B's delete unpins it.
    let w = stack
        .ipfs()
        .add_unpinned(&unique_contents(1))
        .await?
        .remove(0);
    let (a1, a2, b1) = (
        psa_add(&stack, &a, &w).await?,
        psa_add(&stack, &a, &w).await?,
        psa_add(&stack, &b, &w).await?,
    );
    assert_eq!(owners_of(&stack, &w).await?, ["tenant-a", "tenant-b"]);
    assert_eq!(
        psa_delete(&stack, &a, &a1).await?,
        0,
        "held by A's other request"
    );
    assert_eq!(owners_of(&stack, &w).await?, ["tenant-a", "tenant-b"]);
    assert_eq!(psa_delete(&stack, &a, &a2).await?, 1);
    assert!(on_node(&stack, &w).await?, "B's request still holds w");
    assert_eq!(owners_of(&stack, &w).await?, ["tenant-b"]);
    assert_eq!(psa_delete(&stack, &b, &b1).await?, 1);
    assert!(!on_node(&stack, &w).await?);
    assert!(owners_of(&stack, &w).await?.is_empty());

    // An admin's unpin removes the pin for every owner.
    run_batch(&stack, &a, pin(&z, "a-z")).await?;
    run_batch(&stack, &b, pin(&z, "b-z")).await?;
    run_batch(&stack, TOKEN, unpin(&z)).await?;
    assert!(!on_node(&stack, &z).await?);
    assert!(owners_of(&stack, &z).await?.is_empty());
    stack.db.check_tallies().await?;
    Ok(())
}
