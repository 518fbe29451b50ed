//! TEST DOUBLE of the Kubo RPC (instant backend), for load and fault injection only.
//!
//! [`KuboDouble`] is an axum server on `127.0.0.1:0` that answers the six Kubo RPC calls
//! pinq makes (`pin/add`, `pin/rm`, `pin/ls`, `id`, `version`, `repo/stat`) in Kubo's
//! shapes, keeping its pins in an in-memory set. It fetches nothing and stores no blocks:
//! a pin is a string in a set. It exists because a real node cannot answer at once (a
//! benchmark needs a backend that is never the bottleneck) and cannot be told to be slow
//! or to fail a given fraction of calls (fault tests need that). Everything else in the
//! suite runs against a real js-ipfs node; do not use this double to test pinning itself.
//!
//! What can be set, also while it runs: a latency (fixed or uniform in a range) and an
//! error rate (the fraction of calls answered `500` with a transient Kubo error), both
//! applied to `pin/add` and `pin/rm` only, so that health probes and `pin/ls` stay
//! instant. Counters record every call, the injected errors, and the pins in flight.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cid::Cid;
use cid::multihash::Multihash;
use rand::Rng;
use serde_json::{Value, json};

/// The label every output of the double carries (its `AgentVersion`, its `version`, the
/// benchmark's report), so that nobody mistakes its figures for a real node's.
pub const LABEL: &str =
    "TEST DOUBLE of the Kubo RPC (instant backend), for load and fault injection only";

/// The version string `version` reports.
pub const VERSION: &str = "0.0.0-pinq-test-double";

/// A well-formed libp2p peer id (Ed25519, identity multihash), the same for every double.
pub const PEER_ID: &str = "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf";

/// How long `pin/add` and `pin/rm` take before they answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Answer at once.
    None,
    Fixed(Duration),
    /// Uniform in `[min, max]`.
    Uniform(Duration, Duration),
}

impl Latency {
    fn sample(&self) -> Duration {
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Uniform(lo, hi) if hi > lo => {
                let span = (hi - lo).as_micros() as u64;
                lo + Duration::from_micros(rand::rng().random_range(0..=span))
            }
            Latency::Uniform(lo, _) => lo,
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Latency::None => write!(f, "none"),
            Latency::Fixed(d) => write!(f, "{} ms", d.as_millis()),
            Latency::Uniform(lo, hi) => write!(f, "{}-{} ms", lo.as_millis(), hi.as_millis()),
        }
    }
}

/// The double's behaviour; changeable while it runs with [`KuboDouble::configure`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DoubleConfig {
    pub latency: Latency,
    /// Fraction (0.0 to 1.0) of `pin/add` and `pin/rm` calls answered 500 (transient).
    pub error_rate: f64,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            latency: Latency::None,
            error_rate: 0.0,
        }
    }
}

/// Calls the double received, by endpoint, and what it did with them.
#[derive(Debug, Default)]
pub struct Counters {
    pub pin_add: AtomicU64,
    /// The CIDs those `pin/add` calls named (a call may name several, as in Kubo).
    pub pin_add_cids: AtomicU64,
    pub pin_rm: AtomicU64,
    pub pin_ls: AtomicU64,
    pub id: AtomicU64,
    pub version: AtomicU64,
    pub repo_stat: AtomicU64,
    /// Calls answered with an injected transient error.
    pub injected_errors: AtomicU64,
    /// Pins and unpins under way right now (the CIDs of the `pin/add` and `pin/rm` calls
    /// under way: a call may name several).
    pub in_flight: AtomicU64,
    /// The most pins and unpins ever under way at once.
    pub max_in_flight: AtomicU64,
}

impl Counters {
    /// The counters as JSON, for reports.
    pub fn snapshot(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "pin_add": g(&self.pin_add),
            "pin_add_cids": g(&self.pin_add_cids),
            "pin_rm": g(&self.pin_rm),
            "pin_ls": g(&self.pin_ls),
            "id": g(&self.id),
            "version": g(&self.version),
            "repo_stat": g(&self.repo_stat),
            "injected_errors": g(&self.injected_errors),
            "max_in_flight": g(&self.max_in_flight),
        })
    }
}

struct Inner {
    config: RwLock<DoubleConfig>,
    // A std mutex: it is never held across an await.
    pins: Mutex<HashSet<String>>,
    counters: Counters,
}

/// A running TEST DOUBLE of the Kubo RPC; the server stops when this is dropped.
pub struct KuboDouble {
    /// Base URL to register as a backend, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl KuboDouble {
    /// Starts the double on a free port of 127.0.0.1.
    pub async fn start(config: DoubleConfig) -> anyhow::Result<KuboDouble> {
        let inner = Arc::new(Inner {
            config: RwLock::new(config),
            pins: Mutex::new(HashSet::new()),
            counters: Counters::default(),
        });
        let app = Router::new()
            .route("/api/v0/pin/add", post(pin_add))
            .route("/api/v0/pin/rm", post(pin_rm))
            .route("/api/v0/pin/ls", post(pin_ls))
            .route("/api/v0/id", post(id))
            .route("/api/v0/version", post(version))
            .route("/api/v0/repo/stat", post(repo_stat))
            .fallback(unknown)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(KuboDouble { url, inner, task })
    }

    /// Changes latency and error rate for the calls that start from now on.
    pub fn configure(&self, config: DoubleConfig) {
        if let Ok(mut c) = self.inner.config.write() {
            *c = config;
        }
    }

    pub fn config(&self) -> DoubleConfig {
        self.inner.config.read().map(|c| *c).unwrap_or_default()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// How many CIDs are pinned.
    pub fn pin_count(&self) -> usize {
        self.inner.pins.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether `cid` (as it was sent) is pinned.
    pub fn is_pinned(&self, cid: &str) -> bool {
        self.inner.pins.lock().is_ok_and(|p| p.contains(cid))
    }

    /// Pins or unpins behind pinq's back, e.g. to make reconciliation find a drift.
    pub fn set_pinned(&self, cid: &str, pinned: bool) {
        if let Ok(mut p) = self.inner.pins.lock() {
            if pinned {
                p.insert(cid.to_owned());
            } else {
                p.remove(cid);
            }
        }
    }
}

impl Drop for KuboDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The i-th synthetic CID of a series (CIDv1, raw codec, a made-up sha2-256 digest), in
/// canonical base32. Different salts give disjoint series. Only the double "has" them.
///
/// The digest starts with `i` scrambled (times an odd constant, one-to-one), so that a
/// series' CIDs are spread over the key space in no particular order, as real digests
/// are: an index on CIDs sees inserts all over it, not appended in order.
pub fn synthetic_cid(salt: u64, i: u64) -> String {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes());
    digest[8..16].copy_from_slice(&salt.to_be_bytes());
    digest[16..24].copy_from_slice(&i.to_be_bytes());
    match Multihash::<64>::wrap(0x12, &digest) {
        Ok(mh) => Cid::new_v1(0x55, mh).to_string(),
        // A 32-byte digest always fits a 64-byte multihash.
        Err(e) => panic!("multihash: {e}"),
    }
}

type Shared = State<Arc<Inner>>;
type Params = Query<HashMap<String, String>>;

/// Kubo's error body: `{"Message","Code","Type":"error"}`; code 1 is a client error.
fn rpc_error(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"Message": message, "Code": code, "Type": "error"})),
    )
        .into_response()
}

fn missing_arg() -> Response {
    rpc_error(
        StatusCode::BAD_REQUEST,
        1,
        "argument \"ipfs-path\" is required",
    )
}

/// Counts the CIDs of a pin call in flight until dropped.
struct InFlight<'a>(&'a Counters, u64);

impl<'a> InFlight<'a> {
    fn enter(c: &'a Counters, cids: u64) -> Self {
        let now = c.in_flight.fetch_add(cids, Ordering::Relaxed) + cids;
        c.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(c, cids)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Applies the configured latency, then decides whether to inject an error.
async fn work(inner: &Inner) -> Option<Response> {
    let config = inner.config.read().map(|c| *c).unwrap_or_default();
    let delay = config.latency.sample();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if config.error_rate > 0.0 && rand::rng().random_bool(config.error_rate.clamp(0.0, 1.0)) {
        inner
            .counters
            .injected_errors
            .fetch_add(1, Ordering::Relaxed);
        // Kubo's code 0 on a 500: transient. (No "timeout" wording: that is a timeout class.)
        return Some(rpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            0,
            "injected transient failure (TEST DOUBLE of the Kubo RPC)",
        ));
    }
    None
}

/// Pins every `arg` of the call, as Kubo does (all or, on an error, an unknown part).
async fn pin_add(State(inner): Shared, Query(q): Query<Vec<(String, String)>>) -> Response {
    inner.counters.pin_add.fetch_add(1, Ordering::Relaxed);
    let cids: Vec<String> = q
        .into_iter()
        .filter(|(k, _)| k == "arg")
        .map(|(_, v)| v)
        .collect();
    if cids.is_empty() {
        return missing_arg();
    }
    inner
        .counters
        .pin_add_cids
        .fetch_add(cids.len() as u64, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&inner.counters, cids.len() as u64);
    if let Some(err) = work(&inner).await {
        return err;
    }
    if let Ok(mut pins) = inner.pins.lock() {
        pins.extend(cids.iter().cloned());
    }
    axum::Json(json!({ "Pins": cids })).into_response()
}

async fn pin_rm(State(inner): Shared, Query(q): Params) -> Response {
    inner.counters.pin_rm.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&inner.counters, 1);
    let Some(cid) = q.get("arg").cloned() else {
        return missing_arg();
    };
    if let Some(err) = work(&inner).await {
        return err;
    }
    let removed = inner.pins.lock().is_ok_and(|mut p| p.remove(&cid));
    if removed {
        axum::Json(json!({"Pins": [cid]})).into_response()
    } else {
        rpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            0,
            &format!("{cid} is not pinned or pinned indirectly: not pinned"),
        )
    }
}

async fn pin_ls(State(inner): Shared, Query(q): Params) -> Response {
    inner.counters.pin_ls.fetch_add(1, Ordering::Relaxed);
    let kind = q.get("type").map(String::as_str).unwrap_or("all");
    if !matches!(kind, "all" | "recursive") {
        // The double only holds recursive pins.
        return (StatusCode::OK, "").into_response();
    }
    let stream = q.get("stream").is_some_and(|s| s == "true");
    let pins: Vec<String> = match q.get("arg") {
        Some(cid) => {
            if !inner.pins.lock().is_ok_and(|p| p.contains(cid)) {
                return rpc_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    0,
                    &format!("path '{cid}' is not pinned"),
                );
            }
            vec![cid.clone()]
        }
        None => inner
            .pins
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default(),
    };
    if stream {
        let mut body = String::with_capacity(pins.len() * 90);
        for cid in &pins {
            body.push_str(&json!({"Cid": cid, "Type": "recursive"}).to_string());
            body.push('\n');
        }
        ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
    } else {
        let keys: serde_json::Map<String, Value> = pins
            .into_iter()
            .map(|c| (c, json!({"Type": "recursive"})))
            .collect();
        axum::Json(json!({"Keys": keys})).into_response()
    }
}

async fn id(State(inner): Shared) -> Response {
    inner.counters.id.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "ID": PEER_ID,
        "PublicKey": "CAESIGqYAAAAAAAAdGVzdC1kb3VibGUAAAAAAAAAAAAAAAAA",
        "Addresses": [format!("/ip4/127.0.0.1/tcp/4001/p2p/{PEER_ID}")],
        "AgentVersion": format!("pinq-kubo-double/{VERSION} ({LABEL})"),
        "Protocols": [],
    }))
    .into_response()
}

async fn version(State(inner): Shared) -> Response {
    inner.counters.version.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "Version": VERSION,
        "Commit": "test-double",
        "Repo": "15",
        "System": LABEL,
        "Golang": "none",
    }))
    .into_response()
}

async fn repo_stat(State(inner): Shared) -> Response {
    inner.counters.repo_stat.fetch_add(1, Ordering::Relaxed);
    let n = inner.pins.lock().map(|p| p.len() as u64).unwrap_or(0);
    axum::Json(json!({
        "RepoSize": n * 1024,
        "StorageMax": 10_000_000_000u64,
        "NumObjects": n,
        "RepoPath": "/nonexistent/pinq-kubo-test-double",
        "Version": "fs-repo@15",
    }))
    .into_response()
}

async fn unknown() -> Response {
    rpc_error(
        StatusCode::NOT_FOUND,
        0,
        "the TEST DOUBLE of the Kubo RPC serves pin/add, pin/rm, pin/ls, id, version and repo/stat only",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use pinq_core::kubo::KuboClient;

    #[tokio::test]
    async fn speaks_enough_kubo_for_the_client() -> anyhow::Result<()> {
        let double = KuboDouble::start(DoubleConfig::default()).await?;
        let client = KuboClient::new(KuboClient::http_client(), &double.url);
        let cid = synthetic_cid(7, 1);
        let t = Duration::from_secs(5);
        client.pin_add(&cid, t).await?;
        assert!(double.is_pinned(&cid));
        let mut listed = Vec::new();
        let mut stream = client.pin_ls_recursive(t).await?;
        while let Some(c) = stream.next().await {
            listed.push(c?);
        }
        assert_eq!(listed, vec![cid.clone()]);
        // Several CIDs in one call, as Kubo takes them.
        let more = [synthetic_cid(7, 2), synthetic_cid(7, 3)];
        let refs: Vec<&str> = more.iter().map(String::as_str).collect();
        client.pin_add_local_many(&refs, t).await?;
        assert!(more.iter().all(|c| double.is_pinned(c)));
        assert_eq!(double.counters().pin_add_cids.load(Ordering::Relaxed), 3);
        for c in &more {
            client.pin_rm(c, t).await?;
        }
        client.pin_rm(&cid, t).await?;
        // Unpinning what is not pinned: Kubo's 500 "not pinned", which the client accepts.
        client.pin_rm(&cid, t).await?;
        assert_eq!(double.pin_count(), 0);
        assert!(
            client
                .id()
                .await?
                .agent_version
                .unwrap_or_default()
                .contains(LABEL)
        );
        assert_eq!(client.version().await?, VERSION);
        assert_eq!(client.repo_stat().await?.num_objects, 0);

        double.configure(DoubleConfig {
            latency: Latency::Fixed(Duration::from_millis(1)),
            error_rate: 1.0,
        });
        let e = client.pin_add(&cid, t).await.err();
        assert!(e.is_some_and(|e| e.is_transient()));
        assert_eq!(double.counters().injected_errors.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
