//! `/openapi.json` and the `/docs` page.
//!
//! The document is built once at start. pinq's own `/v1` API is generated with utoipa from
//! `#[utoipa::path]` annotations (the token handlers, and descriptors below for the routes
//! of modules that carry no annotations yet). The Pinning Service API part is not
//! re-described: its paths and components are taken verbatim from the spec file
//! (`api/openapi/pinning-service-api.yaml`, embedded at build time), so it cannot drift
//! from the spec.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::Html;
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::AppState;

/// The Pinning Service API 1.0.0 spec, a copy of the upstream file.
pub const PSA_SPEC_YAML: &str = include_str!("../openapi/pinning-service-api.yaml");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pinq",
        description = "pinq: IPFS pinning jobs on PostgreSQL and RabbitMQ. `/v1` is pinq's own API; `/pins` is the IPFS Pinning Service API 1.0.0 exactly as its spec defines it."
    ),
    paths(
        crate::tokens::create,
        crate::tokens::list,
        crate::tokens::revoke,
        v1::submit_batch,
        v1::list_batches,
        v1::get_batch,
        v1::batch_jobs,
        v1::cancel_batch,
        v1::retry_failed,
        v1::get_job,
        v1::cancel_job,
        v1::retry_job,
        v1::create_backend,
        v1::list_backends,
        v1::backend_health,
        v1::list_schedules,
        v1::patch_schedule,
        v1::run_schedule,
        v1::schedule_runs,
        v1::list_workers,
    ),
    components(schemas(
        crate::tokens::CreateToken,
        crate::tokens::CreatedToken,
        crate::tokens::TokenView,
        crate::tokens::TokenList,
    )),
    tags(
        (name = "batches", description = "Batches of pin, unpin and replace operations"),
        (name = "jobs", description = "Jobs and their attempts"),
        (name = "admin", description = "Admin scope only: backends, schedules, workers, tokens"),
        (name = "pins", description = "IPFS Pinning Service API 1.0.0"),
    )
)]
struct V1Doc;

/// Descriptors of the `/v1` routes whose handlers carry no annotation.
#[allow(dead_code)]
mod v1 {
    #[utoipa::path(post, path = "/v1/batches", tag = "batches",
        description = "Submit up to PINQ_MAX_BATCH_OPS operations {op, cid, replaces?, name?, meta?} with priority, backends and retry; optional Idempotency-Key header.",
        responses((status = 202, description = "Accepted: {id, jobs}"), (status = 200, description = "Same Idempotency-Key and body: the first batch"), (status = 400, description = "Invalid; every problem listed"), (status = 422, description = "Idempotency-Key already used with a different body (code idempotency_key_reused); nothing stored"), (status = 413, description = "Too many operations, or a body larger than PINQ_MAX_BODY_BYTES")),
        security(("bearerAuth" = [])))]
    fn submit_batch() {}
    #[utoipa::path(get, path = "/v1/batches", tag = "batches", description = "The caller's newest batches.",
        params(("limit" = Option<i64>, Query, description = "Page size")),
        responses((status = 200, description = "{batches: [...]}")), security(("bearerAuth" = [])))]
    fn list_batches() {}
    #[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches", description = "A batch with counts per job state.",
        params(("id" = String, Path)), responses((status = 200, description = "The batch"), (status = 404, description = "No such batch for this token")),
        security(("bearerAuth" = [])))]
    fn get_batch() {}
    #[utoipa::path(get, path = "/v1/batches/{id}/jobs", tag = "batches", description = "A page of the batch's jobs in submission order.",
        params(("id" = String, Path), ("limit" = Option<i64>, Query), ("after" = Option<String>, Query), ("state" = Option<String>, Query)),
        responses((status = 200, description = "{jobs, next}"), (status = 404, description = "No such batch for this token")),
        security(("bearerAuth" = [])))]
    fn batch_jobs() {}
    #[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", params(("id" = String, Path)),
        responses((status = 202, description = "Cancelled"), (status = 404, description = "No such batch for this token")), security(("bearerAuth" = [])))]
    fn cancel_batch() {}
    #[utoipa::path(post, path = "/v1/batches/{id}/retry-failed", tag = "batches", params(("id" = String, Path)),
        responses((status = 202, description = "Failed jobs re-driven"), (status = 404, description = "No such batch for this token")), security(("bearerAuth" = [])))]
    fn retry_failed() {}
    #[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", description = "A job with every attempt.", params(("id" = String, Path)),
        responses((status = 200, description = "The job"), (status = 404, description = "No such job for this token")), security(("bearerAuth" = [])))]
    fn get_job() {}
    #[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
        responses((status = 202, description = "Cancelled or stop requested"), (status = 404, description = "No such job for this token"), (status = 409, description = "Already finished")), security(("bearerAuth" = [])))]
    fn cancel_job() {}
    #[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path)),
        responses((status = 202, description = "Re-driven"), (status = 404, description = "No such job for this token"), (status = 409, description = "Not failed")), security(("bearerAuth" = [])))]
    fn retry_job() {}
    #[utoipa::path(post, path = "/v1/backends", tag = "admin", description = "Register a backend {name, kind, url}.",
        responses((status = 201, description = "Created"), (status = 403, description = "Not an admin token"), (status = 413, description = "Body larger than PINQ_MAX_BODY_BYTES")), security(("bearerAuth" = [])))]
    fn create_backend() {}
    #[utoipa::path(get, path = "/v1/backends", tag = "admin",
        responses((status = 200, description = "Backends with health"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn list_backends() {}
    #[utoipa::path(get, path = "/v1/backends/{name}/health", tag = "admin", params(("name" = String, Path)),
        responses((status = 200, description = "Health and probe history"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn backend_health() {}
    #[utoipa::path(get, path = "/v1/schedules", tag = "admin",
        responses((status = 200, description = "Schedules"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn list_schedules() {}
    #[utoipa::path(patch, path = "/v1/schedules/{name}", tag = "admin", params(("name" = String, Path)),
        responses((status = 200, description = "Updated"), (status = 403, description = "Not an admin token"), (status = 413, description = "Body larger than PINQ_MAX_BODY_BYTES")), security(("bearerAuth" = [])))]
    fn patch_schedule() {}
    #[utoipa::path(post, path = "/v1/schedules/{name}/run", tag = "admin", params(("name" = String, Path)),
        responses((status = 202, description = "Run requested"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn run_schedule() {}
    #[utoipa::path(get, path = "/v1/schedules/{name}/runs", tag = "admin", params(("name" = String, Path)),
        responses((status = 200, description = "Runs, newest first"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn schedule_runs() {}
    #[utoipa::path(get, path = "/v1/workers", tag = "admin",
        responses((status = 200, description = "The worker fleet"), (status = 403, description = "Not an admin token")), security(("bearerAuth" = [])))]
    fn list_workers() {}
}

/// The whole document: generated `/v1` plus the spec's `/pins`.
pub fn document() -> anyhow::Result<Value> {
    let mut doc = serde_json::to_value(V1Doc::openapi())?;
    let spec: Value = serde_norway::from_str(PSA_SPEC_YAML)?;
    merge_psa(&mut doc, &spec);
    Ok(doc)
}

/// Copies the spec's paths and components into `doc`, and declares both bearer schemes.
fn merge_psa(doc: &mut Value, spec: &Value) {
    if let (Some(paths), Some(psa_paths)) = (
        doc.get_mut("paths").and_then(Value::as_object_mut),
        spec.get("paths").and_then(Value::as_object),
    ) {
        for (k, v) in psa_paths {
            paths.insert(k.clone(), v.clone());
        }
    }
    let components = doc
        .as_object_mut()
        .map(|d| d.entry("components").or_insert_with(|| json!({})));
    if let (Some(Value::Object(components)), Some(Value::Object(psa))) =
        (components, spec.get("components"))
    {
        for (section, entries) in psa {
            let target = components
                .entry(section.clone())
                .or_insert_with(|| json!({}));
            if let (Value::Object(target), Value::Object(entries)) = (target, entries) {
                for (k, v) in entries {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
        if let Value::Object(schemes) = components
            .entry("securitySchemes")
            .or_insert_with(|| json!({}))
        {
            schemes.insert(
                "bearerAuth".into(),
                json!({"type": "http", "scheme": "bearer", "description": "A pinq API token or the bootstrap admin token"}),
            );
        }
    }
    // The spec's top-level requirement covers its own operations.
    let security = spec.get("security").cloned().unwrap_or(Value::Null);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (k, item) in paths.iter_mut() {
            if !k.starts_with("/pins") {
                continue;
            }
            if let Some(item) = item.as_object_mut() {
                for (method, op) in item.iter_mut() {
                    if method != "parameters"
                        && let Some(op) = op.as_object_mut()
                    {
                        op.entry("security").or_insert_with(|| security.clone());
                    }
                }
            }
        }
    }
}

pub async fn openapi_json(State(state): State<AppState>) -> Json<Arc<Value>> {
    Json(state.openapi.clone())
}

pub async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pinq API</title>
<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
code{background:#f3f3f3;padding:0 .3em}.op{margin:.2em 0}.m{display:inline-block;width:4.5em;font-weight:bold}
h2{border-bottom:1px solid #ddd}</style></head>
<body><h1>pinq API</h1>
<p>The machine-readable description is <a href="/openapi.json"><code>/openapi.json</code></a> (OpenAPI).
<code>/v1</code> is pinq's own API; <code>/pins</code> is the
<a href="https://ipfs.github.io/pinning-services-api-spec/">IPFS Pinning Service API 1.0.0</a>.
Every route needs <code>Authorization: Bearer &lt;token&gt;</code>.</p>
<div id="ops">Loading…</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const [m, op] of Object.entries(item)) {
      if (m === 'parameters') continue;
      const tag = (op.tags || ['other'])[0];
      (byTag[tag] = byTag[tag] || []).push([m.toUpperCase(), path, op.summary || op.description || '']);
    }
  }
  const el = document.getElementById('ops'); el.textContent = '';
  for (const [tag, ops] of Object.entries(byTag)) {
    const h = document.createElement('h2'); h.textContent = tag; el.appendChild(h);
    for (const [m, p, s] of ops) {
      const d = document.createElement('div'); d.className = 'op';
      const a = document.createElement('span'); a.className = 'm'; a.textContent = m;
      const c = document.createElement('code'); c.textContent = p;
      d.append(a, c, document.createTextNode(' ' + s)); el.appendChild(d);
    }
  }
}).catch(e => { document.getElementById('ops').textContent = 'could not load /openapi.json: ' + e; });
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_v1_and_the_spec_verbatim() {
        let doc = document().expect("document builds");
        let spec: Value = serde_norway::from_str(PSA_SPEC_YAML).expect("spec parses");
        assert_eq!(doc["paths"]["/pins"]["get"]["operationId"], "getPins");
        for name in ["Pin", "PinStatus", "PinResults", "Failure", "Delegates"] {
            assert_eq!(
                doc["components"]["schemas"][name], spec["components"]["schemas"][name],
                "{name} is the spec's"
            );
        }
        assert_eq!(
            doc["components"]["parameters"],
            spec["components"]["parameters"]
        );
        assert!(doc["paths"]["/v1/tokens"]["post"].is_object());
        assert!(doc["paths"]["/v1/batches"]["post"].is_object());
        assert!(doc["components"]["schemas"]["CreatedToken"].is_object());
        assert!(doc["components"]["securitySchemes"]["accessToken"].is_object());
    }
}
