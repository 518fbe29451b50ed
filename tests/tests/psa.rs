//! The IPFS Pinning Service API at `/pins`, walked end to end against the running API, the
//! workers and a real IPFS node. Every response body is validated against the spec's own
//! schemas (the copy committed at `api/openapi/pinning-service-api.yaml`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pinq_core::cid::canonical_of;
use pinq_e2e::{Stack, TOKEN, unique_contents};
use reqwest::Method;
use serde_json::{Value, json};

/// Validates bodies against the spec's component schemas.
struct Spec {
    components: Value,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../api/openapi/pinning-service-api.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the spec copy is in the repository");
        let spec: Value = serde_norway::from_str(&text).expect("the spec parses");
        Spec {
            components: spec["components"].clone(),
        }
    }

    /// Panics with every violation if `body` is not a valid `schema`.
    fn check(&self, schema: &str, body: &Value) {
        let root = json!({
            "$ref": format!("#/components/schemas/{schema}"),
            "components": self.components,
        });
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .expect("the spec's schemas compile");
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "response is not a valid {schema}: {errors:?}\n{body:#}"
        );
    }
}

/// A user token made through the admin API.
async fn user_token(stack: &Stack, name: &str) -> anyhow::Result<String> {
    let resp = stack
        .req(Method::POST, "/v1/tokens")
        .json(&json!({"name": name}))
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 201, "create token: {}", resp.status());
    let v: Value = resp.json().await?;
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

/// One `/pins` call; returns (status, body or Null).
async fn call(
    stack: &Stack,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = stack
        .http
        .request(method, format!("{}{path}", stack.api_url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, v))
}

const ALL: &str = "status=queued,pinning,pinned,failed";

async fn wait_node<F: Fn(&HashSet<String>) -> bool>(stack: &Stack, what: &str, f: F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pins = stack.ipfs().pins().await.expect("pin/ls");
        if f(&pins) {
            return;
        }
        assert!(Instant::now() < deadline, "node never {what}: {pins:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn failure(spec: &Spec, code: u16, v: &Value, want_code: u16, reason: &str, what: &str) {
    assert_eq!(code, want_code, "{what}: {v}");
    spec.check("Failure", v);
    assert_eq!(v["error"]["reason"], reason, "{what}: {v}");
    assert!(
        v["error"]["details"].as_str().is_some_and(|d| d.len() > 10),
        "{what}: details a person can act on: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_walk_auth_add_get_list_replace_delete() -> anyhow::Result<()> {
    let spec = Spec::load();
    let stack = Stack::full(1).await?;
    let token = user_token(&stack, "walker").await?;
    let t = Some(token.as_str());

    // Auth: no token, a malformed one, a well-formed unknown one → 401 Failure.
    let bogus = format!("pinq_{}", "0".repeat(64));
    for (tok, what) in [
        (None, "no token"),
        (Some("nope"), "bad token"),
        (Some(bogus.as_str()), "unknown token"),
    ] {
        for (m, p) in [(Method::GET, "/pins"), (Method::POST, "/pins")] {
            let (code, v) = call(&stack, tok, m, p, Some(json!({"cid": "x"}))).await?;
            failure(&spec, code, &v, 401, "UNAUTHORIZED", what);
        }
        let (code, v) = call(&stack, tok, Method::DELETE, "/pins/abc", None).await?;
        failure(&spec, code, &v, 401, "UNAUTHORIZED", what);
    }

    let (code, start) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(code, 200);
    spec.check("PinResults", &start);
    let start_count = start["count"].as_i64().unwrap_or(-1);
    assert_eq!(start_count, 0);

    // Add: a CID nobody provides is accepted as queued at once, never blocking.
    let nobody = stack.ipfs().unprovided_cid();
    let began = Instant::now();
    let (code, added) = call(
        &stack,
        t,
        Method::POST,
        "/pins",
        Some(json!({"cid": nobody, "name": "Unprovided.bin", "meta": {"app": "walk"},
                    "origins": ["/ip4/127.0.0.1/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]})),
    )
    .await?;
    let took = began.elapsed();
    assert_eq!(code, 202, "{added}");
    spec.check("PinStatus", &added);
    assert_eq!(added["status"], "queued", "{added}");
    assert!(took < Duration::from_secs(5), "add took {took:?}");
    assert_eq!(added["pin"]["cid"], nobody);
    assert_eq!(added["pin"]["meta"]["app"], "walk");
    let delegates = added["delegates"].as_array().cloned().unwrap_or_default();
    assert!(!delegates.is_empty(), "{added}");
    assert!(
        delegates
            .iter()
            .all(|d| d.as_str().is_some_and(|d| d.contains("/p2p/"))),
        "{added}"
    );
    let rid = added["requestid"].as_str().unwrap_or_default().to_owned();

    // Get.
    let (code, got) = call(&stack, t, Method::GET, &format!("/pins/{rid}"), None).await?;
    assert_eq!(code, 200);
    spec.check("PinStatus", &got);
    assert_eq!(got["requestid"], rid);
    assert_eq!(got["created"], added["created"]);
    assert!(["queued", "pinning"].contains(&got["status"].as_str().unwrap_or("")));

    // Content the node has: pinned, and in the node's pin/ls.
    let cids = stack.ipfs().add_unpinned(&unique_contents(2)).await?;
    let (code, have) = call(
        &stack,
        t,
        Method::POST,
        "/pins",
        Some(json!({"cid": cids[0], "name": "Report-2026.PDF"})),
    )
    .await?;
    assert_eq!(code, 202, "{have}");
    let have_id = have["requestid"].as_str().unwrap_or_default().to_owned();
    let pinned = stack
        .wait_pin_status(&token, &have_id, "pinned", Duration::from_secs(60))
        .await?;
    spec.check("PinStatus", &pinned);
    let c0 = canonical_of(&cids[0]).unwrap_or_default();
    wait_node(&stack, "pinned cids[0]", |p| p.contains(&c0)).await;

    // List: default is pinned only; every status filter; count is the total.
    let (_, v) = call(&stack, t, Method::GET, "/pins", None).await?;
    spec.check("PinResults", &v);
    assert_eq!(v["count"], 1, "default lists pinned only: {v}");
    assert_eq!(v["results"][0]["requestid"], have_id);
    for st in ["queued", "pinning", "pinned", "failed"] {
        let (code, v) = call(&stack, t, Method::GET, &format!("/pins?status={st}"), None).await?;
        assert_eq!(code, 200, "{v}");
        spec.check("PinResults", &v);
        assert!(
            v["results"]
                .as_array()
                .is_some_and(|r| r.iter().all(|p| p["status"] == st)),
            "{st}: {v}"
        );
    }
    let (_, v) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(v["results"][0]["requestid"], have_id, "newest first: {v}");
    let (_, v) = call(
        &stack,
        t,
        Method::GET,
        &format!("/pins?{ALL}&cid={nobody},{}", cids[1]),
        None,
    )
    .await?;
    assert_eq!(v["count"], 1, "cid filter: {v}");
    let (_, v) = call(
        &stack,
        t,
        Method::GET,
        &format!("/pins?{ALL}&meta=%7B%22app%22%3A%22walk%22%7D"),
        None,
    )
    .await?;
    assert_eq!(v["count"], 1, "meta filter: {v}");
    assert_eq!(v["results"][0]["requestid"], rid);
    // Name matching, all four modes, against "Report-2026.PDF".
    for (q, want) in [
        ("name=Report-2026.PDF", 1),
        ("name=report-2026.pdf", 0),
        ("name=report-2026.pdf&match=iexact", 1),
        ("name=Report-2026.PDF&match=exact", 1),
        ("name=2026.P&match=partial", 1),
        ("name=2026.p&match=partial", 0),
        ("name=2026.p&match=ipartial", 1),
        ("name=REPORT&match=iexact", 0),
    ] {
        let (code, v) = call(&stack, t, Method::GET, &format!("/pins?{ALL}&{q}"), None).await?;
        assert_eq!(code, 200, "{q}: {v}");
        assert_eq!(v["count"], want, "{q}: {v}");
    }

    // Bad input: 400 Failure with the spec's reason and details.
    let eleven: Vec<String> = (0..11).map(|_| stack.ipfs().unprovided_cid()).collect();
    for q in [
        "limit=0".to_owned(),
        "limit=1001".to_owned(),
        "limit=ten".to_owned(),
        format!("cid={}", eleven.join(",")),
        "cid=notacid".to_owned(),
        format!("name={}", "n".repeat(256)),
        "status=done".to_owned(),
        "match=fuzzy".to_owned(),
        "before=yesterday".to_owned(),
        "meta=%7B%22n%22%3A1%7D".to_owned(),
        "meta=notjson".to_owned(),
    ] {
        let (code, v) = call(&stack, t, Method::GET, &format!("/pins?{q}"), None).await?;
        failure(&spec, code, &v, 400, "BAD_REQUEST", &q);
    }
    for body in [
        json!({}),
        json!({"cid": "QmNotACid"}),
        json!({"cid": format!("/ipfs/{nobody}")}),
        json!({"cid": nobody, "name": "n".repeat(256)}),
        json!({"cid": nobody, "meta": {"k": 1}}),
        json!({"cid": nobody, "origins": "x"}),
        json!([nobody]),
    ] {
        let (code, v) = call(&stack, t, Method::POST, "/pins", Some(body.clone())).await?;
        failure(&spec, code, &v, 400, "BAD_REQUEST", &body.to_string());
    }
    let (code, v) = call(
        &stack,
        t,
        Method::GET,
        "/pins/00000000-0000-0000-0000-000000000000",
        None,
    )
    .await?;
    failure(&spec, code, &v, 404, "NOT_FOUND", "unknown requestid");
    let (code, v) = call(&stack, t, Method::GET, "/pins/not-a-uuid", None).await?;
    failure(&spec, code, &v, 404, "NOT_FOUND", "malformed requestid");

    // Replace: a new requestid; the old one is gone; the new CID is pinned and the old
    // one released on the node.
    let (code, rep) = call(
        &stack,
        t,
        Method::POST,
        &format!("/pins/{have_id}"),
        Some(json!({"cid": cids[1], "name": "Report-2027.PDF"})),
    )
    .await?;
    assert_eq!(code, 202, "{rep}");
    spec.check("PinStatus", &rep);
    let rep_id = rep["requestid"].as_str().unwrap_or_default().to_owned();
    assert_ne!(rep_id, have_id);
    let (code, v) = call(&stack, t, Method::GET, &format!("/pins/{have_id}"), None).await?;
    failure(&spec, code, &v, 404, "NOT_FOUND", "replaced request");
    let (code, v) = call(
        &stack,
        t,
        Method::POST,
        &format!("/pins/{have_id}"),
        Some(json!({"cid": cids[0]})),
    )
    .await?;
    failure(
        &spec,
        code,
        &v,
        404,
        "NOT_FOUND",
        "replacing a replaced request",
    );
    stack
        .wait_pin_status(&token, &rep_id, "pinned", Duration::from_secs(60))
        .await?;
    let c1 = canonical_of(&cids[1]).unwrap_or_default();
    wait_node(&stack, "swapped cids[0] for cids[1]", |p| {
        p.contains(&c1) && !p.contains(&c0)
    })
    .await;
    let (code, v) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(code, 200);
    assert_eq!(v["count"], 2, "replace keeps one request: {v}");

    // Delete: 202 with no body, then 404; the node releases the pin.
    for id in [&rid, &rep_id] {
        let (code, v) = call(&stack, t, Method::DELETE, &format!("/pins/{id}"), None).await?;
        assert_eq!(code, 202, "{v}");
        assert_eq!(v, Value::Null, "DELETE answers no body");
        let (code, v) = call(&stack, t, Method::GET, &format!("/pins/{id}"), None).await?;
        failure(&spec, code, &v, 404, "NOT_FOUND", "deleted request");
        let (code, v) = call(&stack, t, Method::DELETE, &format!("/pins/{id}"), None).await?;
        failure(&spec, code, &v, 404, "NOT_FOUND", "deleting twice");
    }
    wait_node(&stack, "released cids[1]", |p| !p.contains(&c1)).await;
    let (_, v) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(v["count"], start_count, "back to the starting count: {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_over_25_pins_with_before_has_no_overlap_or_gap() -> anyhow::Result<()> {
    let spec = Spec::load();
    let stack = Stack::full(1).await?;
    let token = user_token(&stack, "pager").await?;
    let t = Some(token.as_str());
    let cids = stack.ipfs().add_unpinned(&unique_contents(25)).await?;
    let mut ids = Vec::new();
    for (i, c) in cids.iter().enumerate() {
        let (code, v) = call(
            &stack,
            t,
            Method::POST,
            "/pins",
            Some(json!({"cid": c, "name": format!("page-{i:02}")})),
        )
        .await?;
        assert_eq!(code, 202, "{v}");
        ids.push(v["requestid"].as_str().unwrap_or_default().to_owned());
    }
    for id in &ids {
        stack
            .wait_pin_status(&token, id, "pinned", Duration::from_secs(90))
            .await?;
    }
    let expected: HashSet<String> = cids.iter().filter_map(|c| canonical_of(c)).collect();
    let on_node = stack.ipfs().pins().await?;
    assert!(expected.is_subset(&on_node), "every pin is on the node");

    // Pages of 10 by `before`: 10 + 10 + 5, newest first, no overlap, no gap.
    let mut seen: Vec<String> = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let mut path = "/pins?limit=10".to_owned();
        if let Some(b) = &before {
            path.push_str(&format!("&before={}", urlencode(b)));
        }
        let (code, v) = call(&stack, t, Method::GET, &path, None).await?;
        assert_eq!(code, 200, "{v}");
        spec.check("PinResults", &v);
        let results = v["results"].as_array().cloned().unwrap_or_default();
        if results.is_empty() {
            assert_eq!(v["count"], 0, "{v}");
            break;
        }
        assert_eq!(
            v["count"].as_u64(),
            Some(25 - seen.len() as u64),
            "count is the total matching the filters, before included"
        );
        let created: Vec<&str> = results
            .iter()
            .filter_map(|r| r["created"].as_str())
            .collect();
        let mut sorted = created.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(created, sorted, "newest first");
        pages.push(results.len());
        for r in &results {
            seen.push(r["requestid"].as_str().unwrap_or_default().to_owned());
        }
        before = created.last().map(|s| (*s).to_owned());
    }
    assert_eq!(pages, vec![10, 10, 5]);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 25, "no overlap");
    let all: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique, all, "no gap");
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        seen, newest_first,
        "pages run from the newest to the oldest"
    );

    // `after` pages the other way; limit bounds the page.
    let (_, v) = call(&stack, t, Method::GET, "/pins?limit=1000", None).await?;
    assert_eq!(v["results"].as_array().map(Vec::len), Some(25));
    let oldest = v["results"][24]["created"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (_, v) = call(
        &stack,
        t,
        Method::GET,
        &format!("/pins?after={}", urlencode(&oldest)),
        None,
    )
    .await?;
    assert_eq!(v["count"], 24, "{v}");
    assert_eq!(v["results"].as_array().map(Vec::len), Some(10));

    // Cleanup back to the starting count, and off the node.
    for id in &ids {
        let (code, _) = call(&stack, t, Method::DELETE, &format!("/pins/{id}"), None).await?;
        assert_eq!(code, 202);
    }
    let (_, v) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(v["count"], 0, "{v}");
    wait_node(&stack, "released all 25", |p| p.is_disjoint(&expected)).await;

    // The admin token keeps working on /pins and sees the (now empty) list.
    let (code, v) = call(&stack, Some(TOKEN), Method::GET, "/pins", None).await?;
    assert_eq!(code, 200, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_serves_the_spec_and_v1() -> anyhow::Result<()> {
    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    let doc: Value = stack
        .http
        .get(format!("{}/openapi.json", stack.api_url))
        .send()
        .await?
        .json()
        .await?;
    let spec = Spec::load();
    for s in ["Pin", "PinStatus", "PinResults", "Failure", "Status"] {
        assert_eq!(
            doc["components"]["schemas"][s], spec.components["schemas"][s],
            "{s}"
        );
    }
    for p in ["/pins", "/pins/{requestid}", "/v1/batches", "/v1/tokens"] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
    let docs = stack
        .http
        .get(format!("{}/docs", stack.api_url))
        .send()
        .await?;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await?.contains("/openapi.json"));
    Ok(())
}

/// A delete's unpin and the pin of a request made right after it (or of the request it
/// deletes, still pinning) touch one CID: the node ends as the last request says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_then_an_add_of_one_cid_leaves_it_pinned_and_the_reverse_unpinned()
-> anyhow::Result<()> {
    let stack = Stack::full(2).await?;
    let token = user_token(&stack, "churn").await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(40)).await?;
    let (readd, dropped) = cids.split_at(20);
    let add = |cid: &String| {
        call(
            &stack,
            Some(&token),
            Method::POST,
            "/pins",
            Some(json!({"cid": cid})),
        )
    };
    let remove = |id: String| {
        let token = token.clone();
        let stack = &stack;
        async move {
            let (code, v) = call(
                stack,
                Some(&token),
                Method::DELETE,
                &format!("/pins/{id}"),
                None,
            )
            .await?;
            anyhow::ensure!(code == 202, "delete {id}: {code} {v}");
            anyhow::Ok(())
        }
    };
    let mut first = Vec::new();
    for cid in readd {
        let (code, v) = add(cid).await?;
        assert_eq!(code, 202, "{v}");
        first.push(v["requestid"].as_str().unwrap_or_default().to_owned());
    }
    for id in &first {
        stack
            .wait_pin_status(&token, id, "pinned", Duration::from_secs(60))
            .await?;
    }

    // Each pinned CID is deleted and at once added again; each of the others is added and
    // at once deleted, while its pin may still be queued or running.
    let mut again = Vec::new();
    for (id, cid) in first.iter().zip(readd) {
        remove(id.to_owned()).await?;
        let (code, v) = add(cid).await?;
        assert_eq!(code, 202, "{v}");
        again.push(v["requestid"].as_str().unwrap_or_default().to_owned());
    }
    for cid in dropped {
        let (code, v) = add(cid).await?;
        assert_eq!(code, 202, "{v}");
        let id = v["requestid"].as_str().unwrap_or_default();
        remove(id.to_owned()).await?;
    }
    for id in &again {
        stack
            .wait_pin_status(&token, id, "pinned", Duration::from_secs(60))
            .await?;
    }
    stack.wait_jobs_settled(Duration::from_secs(60)).await?;

    let expected: HashSet<String> = readd
        .iter()
        .map(|c| canonical_of(c).expect("valid CID"))
        .collect();
    assert_eq!(
        stack.ipfs().pins().await?,
        expected,
        "the node holds the re-added CIDs only"
    );
    assert_eq!(
        stack.pin_index("local").await?,
        expected,
        "the pin index agrees"
    );
    stack.db.check_tallies().await?;
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// `PINQ_PSA_DELEGATES`: the operator's addresses are every pin request's `delegates`,
/// in order, on add, get and list, even while the placement backend has never answered
/// (without the setting, such a backend's delegates cannot be known). A value that is not
/// a list of peer multiaddrs stops the API at start, naming the setting and the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_delegates_are_named_even_for_a_backend_never_reached() -> anyhow::Result<()> {
    let spec = Spec::load();
    let mine = [
        "/dns4/pin.example.net/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
        "/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
    ];
    let mut stack = Stack::new().await?;
    stack.env.push((
        "PINQ_PSA_DELEGATES".into(),
        format!("{}, {}", mine[0], mine[1]),
    ));
    stack.start_api().await?;
    // Nothing listens on port 9: no `id` call or health probe ever reaches this node.
    stack
        .register_backend("unreached", "http://127.0.0.1:9")
        .await?;
    let token = user_token(&stack, "delegated").await?;
    let t = Some(token.as_str());

    let cid = pinq_e2e::random_cid();
    let (code, added) = call(&stack, t, Method::POST, "/pins", Some(json!({"cid": cid}))).await?;
    assert_eq!(code, 202, "{added}");
    spec.check("PinStatus", &added);
    assert_eq!(added["delegates"], json!(mine), "{added}");
    let rid = added["requestid"].as_str().unwrap_or_default().to_owned();
    let (code, got) = call(&stack, t, Method::GET, &format!("/pins/{rid}"), None).await?;
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["delegates"], json!(mine), "{got}");
    let (code, list) = call(&stack, t, Method::GET, &format!("/pins?{ALL}"), None).await?;
    assert_eq!(code, 200, "{list}");
    spec.check("PinResults", &list);
    assert_eq!(list["results"][0]["delegates"], json!(mine), "{list}");

    let mut bad = Stack::new().await?;
    bad.env.push((
        "PINQ_PSA_DELEGATES".into(),
        format!("{},/ip4/203.0.113.7/tcp/4001", mine[0]),
    ));
    let err = bad
        .start_api()
        .await
        .expect_err("the API refuses delegates without a peer id");
    let text = format!("{err:#}");
    assert!(
        text.contains("invalid PINQ_PSA_DELEGATES") && text.contains("'/ip4/203.0.113.7/tcp/4001'"),
        "{text}"
    );
    Ok(())
}
