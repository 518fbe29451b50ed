//! A client for Kubo's RPC API (`/api/v0`), which js-ipfs also serves.
//!
//! Every call is a POST with `?arg=` parameters. Errors come back as
//! `{"Message", "Code", "Type"}`. Kubo and js-ipfs differ in details (js-ipfs reports some
//! numbers as strings and CIDv1 in base58btc), so responses are read leniently and CIDs
//! are compared after parsing. Every call carries a timeout: pinning a CID that nobody
//! provides otherwise blocks forever.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::Value;

/// Why a backend call failed, classified for the retry policy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The call (or the backend's own `timeout`) ran out of time.
    #[error("backend timed out: {0}")]
    Timeout(String),
    /// The backend could not be reached at all (no connection): it never saw the request.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The connection broke while the request was under way: the backend may have
    /// started the work.
    #[error("connection to the backend broke: {0}")]
    Interrupted(String),
    /// The backend failed in a way that may pass (5xx, shutting down, 408, 429).
    #[error("backend error (HTTP {status}): {message}")]
    Transient { status: u16, message: String },
    /// The backend rejected the request; repeating it will not help.
    #[error("backend rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// The backend answered something this client cannot read.
    #[error("unexpected backend response: {0}")]
    Protocol(String),
}

impl BackendError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, BackendError::Rejected { .. })
    }

    /// Whether the backend itself looks down (rather than this one request failing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, BackendError::Unreachable(_))
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        // The backend's URL stays out of the message: it ends up in job errors that
        // tenants read, and a URL can carry credentials.
        let e = e.without_url();
        // A connection that was never made, however it failed (refused, or out of time
        // while connecting: such an error is a timeout too), never reached the backend:
        // the job waits without spending an attempt.
        if e.is_connect() {
            BackendError::Unreachable(e.to_string())
        } else if e.is_timeout() {
            BackendError::Timeout(e.to_string())
        } else if e.is_decode() {
            BackendError::Protocol(e.to_string())
        } else {
            // Resets and broken bodies mid-request: the backend went away under us.
            BackendError::Interrupted(e.to_string())
        }
    }
}

/// The error body Kubo and js-ipfs return.
#[derive(Debug, Deserialize)]
struct RpcError {
    #[serde(rename = "Message", default)]
    message: String,
    #[serde(rename = "Code", default)]
    code: Value,
}

/// Kubo's command error codes (go-ipfs-cmds): 1 is a client error.
const CODE_CLIENT: i64 = 1;

/// Node identity, as `id` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeId {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Addresses", default)]
    pub addresses: Option<Vec<String>>,
    #[serde(rename = "AgentVersion", default)]
    pub agent_version: Option<String>,
}

/// Repository size figures, as `repo/stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoStat {
    pub repo_size: u64,
    pub num_objects: u64,
}

/// A client for one backend URL (e.g. `http://127.0.0.1:5001`).
#[derive(Debug, Clone)]
pub struct KuboClient {
    http: reqwest::Client,
    base: String,
    /// `{base}/api/v0/`, parsed once: a call joins its path to it, which reads neither the
    /// scheme nor the host again. `None` if the base is not a URL (each call then fails as
    /// the HTTP client reports it).
    api: Option<reqwest::Url>,
}

/// The timeout of calls that should answer at once (id, version, repo/stat, pin/rm).
const QUICK_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time given to the HTTP request beyond the backend-side pin timeout, so the
/// backend's own timeout error (which names the cause) normally wins the race.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);

impl KuboClient {
    pub fn new(http: reqwest::Client, base_url: &str) -> Self {
        let base = base_url.trim_end_matches('/').to_owned();
        let api = reqwest::Url::parse(&format!("{base}/api/v0/")).ok();
        KuboClient { http, base, api }
    }

    /// A `reqwest::Client` suited to backend calls, to share between clients.
    pub fn http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default()
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The URL of an RPC call: `{base}/api/v0/{path}?{query}`, the query form-encoded.
    fn url(&self, path: &str, query: &[(&str, &str)]) -> Option<reqwest::Url> {
        let mut url = self.api.as_ref()?.join(path).ok()?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Some(url)
    }

    async fn call(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<reqwest::Response, BackendError> {
        let request = match self.url(path, query) {
            Some(url) => self.http.post(url),
            None => self
                .http
                .post(format!("{}/api/v0/{}", self.base, path))
                .query(query),
        };
        // Boxed: the request's future is large, and the futures that await a call are
        // moved (into the worker's groups of jobs, for one) before they first run.
        let resp = Box::pin(request.timeout(timeout).send())
            .await
            .map_err(BackendError::from_reqwest)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(classify(status.as_u16(), &body))
    }

    async fn call_json(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Value, BackendError> {
        let resp = self.call(path, query, timeout).await?;
        let text = resp.text().await.map_err(BackendError::from_reqwest)?;
        // Some commands stream several JSON values (e.g. pin/add progress); the last wins.
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(last)
            .map_err(|e| BackendError::Protocol(format!("{path}: {e}: {}", truncate(last, 200))))
    }

    /// Pins `cid` recursively. Pinning what is already pinned succeeds.
    pub async fn pin_add(&self, cid: &str, timeout: Duration) -> Result<(), BackendError> {
        let t = go_duration(timeout);
        let v = self
            .call_json(
                "pin/add",
                &[("arg", cid), ("recursive", "true"), ("timeout", &t)],
                timeout + TIMEOUT_SLACK,
            )
            .await?;
        match v.get("Pins") {
            Some(Value::Array(_)) => Ok(()),
            _ => Err(BackendError::Protocol(format!(
                "pin/add answered without Pins: {}",
                truncate(&v.to_string(), 200)
            ))),
        }
    }

    /// Pins every CID of `cids` recursively in one call, from what the node already holds
    /// (`offline`: a CID whose blocks are not all on the node fails the call at once
    /// instead of being fetched). `Ok` only if the node answered that it pinned each of
    /// them; on any error some may be pinned and others not, so the caller pins them one
    /// by one (which is idempotent). js-ipfs ignores `offline`; Kubo honours it per call.
    pub async fn pin_add_local_many(
        &self,
        cids: &[&str],
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let t = go_duration(timeout);
        let mut query: Vec<(&str, &str)> = cids.iter().map(|c| ("arg", *c)).collect();
        query.extend([("recursive", "true"), ("offline", "true"), ("timeout", &t)]);
        let v = self
            .call_json("pin/add", &query, timeout + TIMEOUT_SLACK)
            .await?;
        if pins_name_all(&v, cids) {
            Ok(())
        } else {
            Err(BackendError::Protocol(format!(
                "pin/add of {} CIDs answered without naming each of them in Pins: {}",
                cids.len(),
                truncate(&v.to_string(), 200)
            )))
        }
    }

    /// Removes the recursive pin on `cid`. Unpinning what is not pinned succeeds.
    pub async fn pin_rm(&self, cid: &str, timeout: Duration) -> Result<(), BackendError> {
        let t = go_duration(timeout);
        match self
            .call_json(
                "pin/rm",
                &[("arg", cid), ("recursive", "true"), ("timeout", &t)],
                timeout + TIMEOUT_SLACK,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(
                BackendError::Transient { message, .. } | BackendError::Rejected { message, .. },
            ) if is_not_pinned(&message) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Streams the CIDs of every recursive pin, one by one, without holding them all.
    pub async fn pin_ls_recursive(
        &self,
        timeout: Duration,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<String, BackendError>> + Send>>, BackendError>
    {
        let resp = self
            .call(
                "pin/ls",
                &[("type", "recursive"), ("stream", "true")],
                timeout,
            )
            .await?;
        let bytes = resp.bytes_stream().map_err(BackendError::from_reqwest);
        let lines = ndjson_lines(bytes);
        Ok(Box::pin(lines.flat_map(|line| {
            let items: Vec<Result<String, BackendError>> = match line {
                Err(e) => vec![Err(e)],
                Ok(line) => parse_pin_ls_line(&line),
            };
            futures::stream::iter(items)
        })))
    }

    pub async fn id(&self) -> Result<NodeId, BackendError> {
        let v = self.call_json("id", &[], QUICK_TIMEOUT).await?;
        serde_json::from_value(v).map_err(|e| BackendError::Protocol(format!("id: {e}")))
    }

    pub async fn version(&self) -> Result<String, BackendError> {
        let v = self.call_json("version", &[], QUICK_TIMEOUT).await?;
        v.get("Version")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| BackendError::Protocol("version: no Version field".into()))
    }

    pub async fn repo_stat(&self) -> Result<RepoStat, BackendError> {
        let v = self.call_json("repo/stat", &[], QUICK_TIMEOUT).await?;
        Ok(RepoStat {
            repo_size: lenient_u64(v.get("RepoSize")).unwrap_or(0),
            num_objects: lenient_u64(v.get("NumObjects")).unwrap_or(0),
        })
    }
}

/// Reads a number that Kubo sends as a number and js-ipfs sometimes as a string.
fn lenient_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A duration in the Go syntax both Kubo and js-ipfs accept for `timeout`.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

fn is_not_pinned(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("not pinned")
}

fn is_timeout_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("deadline exceeded") || m.contains("timed out") || m.contains("timeout")
}

/// Turns a non-2xx answer into a classified error.
fn classify(status: u16, body: &str) -> BackendError {
    let parsed: Option<RpcError> = serde_json::from_str(body).ok();
    let (message, code) = match parsed {
        Some(e) if !e.message.is_empty() => (e.message, e.code.as_i64()),
        _ => (truncate(body.trim(), 500).to_owned(), None),
    };
    let message = if message.is_empty() {
        format!("HTTP {status} with an empty body")
    } else {
        message
    };
    if is_timeout_message(&message) {
        return BackendError::Timeout(message);
    }
    let client_error = (400..500).contains(&status) && status != 408 && status != 429;
    if client_error || code == Some(CODE_CLIENT) {
        BackendError::Rejected { status, message }
    } else {
        BackendError::Transient { status, message }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One line of `pin/ls` output: either a streamed `{"Cid","Type"}` object or, from
/// servers that ignore `stream`, a whole `{"Keys": {cid: {"Type"}}}` map.
fn parse_pin_ls_line(line: &str) -> Vec<Result<String, BackendError>> {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return vec![Err(BackendError::Protocol(format!(
                "pin/ls: {e}: {}",
                truncate(line, 200)
            )))];
        }
    };
    if let Some(cid) = v.get("Cid").and_then(Value::as_str) {
        let recursive = v
            .get("Type")
            .and_then(Value::as_str)
            .is_none_or(|t| t == "recursive");
        return if recursive {
            vec![Ok(cid.to_owned())]
        } else {
            vec![]
        };
    }
    if let Some(keys) = v.get("Keys").and_then(Value::as_object) {
        return keys
            .iter()
            .filter(|(_, info)| {
                info.get("Type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "recursive")
            })
            .map(|(cid, _)| Ok(cid.clone()))
            .collect();
    }
    if let Some(msg) = v.get("Message").and_then(Value::as_str) {
        return vec![Err(BackendError::Transient {
            status: 200,
            message: msg.to_owned(),
        })];
    }
    vec![Err(BackendError::Protocol(format!(
        "pin/ls: unrecognised line: {}",
        truncate(line, 200)
    )))]
}

/// Splits a byte stream into non-empty lines, holding at most one chunk and a partial line.
///
/// Each byte is looked at once: lines are handed out from a read offset, and the bytes
/// before it are dropped only when the next chunk is needed, so a chunk of many lines is
/// not shifted once per line (which made memmove 80 % of the scheduler's CPU listing a
/// million pins), and a line longer than a chunk (a whole non-streamed listing) is not
/// searched again from its start after each chunk.
fn ndjson_lines<S>(bytes: S) -> impl Stream<Item = Result<String, BackendError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, BackendError>> + Send + 'static,
{
    struct Lines<S> {
        bytes: Pin<Box<S>>,
        buf: Vec<u8>,
        /// Where the next line starts.
        start: usize,
        /// How far `buf` has been searched for a newline.
        searched: usize,
        done: bool,
    }
    let state = Lines {
        bytes: Box::pin(bytes),
        buf: Vec::new(),
        start: 0,
        searched: 0,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(rel) = st.buf[st.searched..].iter().position(|b| *b == b'\n') {
                let end = st.searched + rel;
                let line = String::from_utf8_lossy(&st.buf[st.start..end])
                    .trim()
                    .to_owned();
                st.start = end + 1;
                st.searched = st.start;
                if line.is_empty() {
                    continue;
                }
                return Some((Ok(line), st));
            }
            st.searched = st.buf.len();
            if st.done {
                let line = String::from_utf8_lossy(&st.buf[st.start..])
                    .trim()
                    .to_owned();
                st.buf.clear();
                (st.start, st.searched) = (0, 0);
                if line.is_empty() {
                    return None;
                }
                return Some((Ok(line), st));
            }
            // Only a partial line is left: drop what was handed out before reading more.
            st.buf.drain(..st.start);
            st.searched -= st.start;
            st.start = 0;
            match st.bytes.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    (st.start, st.searched) = (0, 0);
                    return Some((Err(e), st));
                }
                None => st.done = true,
            }
        }
    })
}

/// Whether a `pin/add` answer's `Pins` names every one of `cids`: as sent, or else in
/// another spelling of the same CID (a node may answer a CIDv0 as base58, a CIDv1 in its
/// own base), compared in canonical form. Nodes answer in the spelling they were sent
/// almost always, so the canonical forms, which cost a parse and an encoding each, are
/// worked out only for a CID the answer does not name as sent.
fn pins_name_all(answer: &Value, cids: &[&str]) -> bool {
    let Some(Value::Array(pins)) = answer.get("Pins") else {
        return false;
    };
    let named: std::collections::HashSet<&str> = pins.iter().filter_map(Value::as_str).collect();
    let mut canonical: Option<std::collections::HashSet<String>> = None;
    cids.iter().all(|c| {
        named.contains(c) || {
            let pinned = canonical.get_or_insert_with(|| {
                named
                    .iter()
                    .filter_map(|p| crate::cid::canonical_of(p))
                    .collect()
            });
            crate::cid::canonical_of(c).is_some_and(|k| pinned.contains(&k))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `chunks` as `ndjson_lines` hands them out.
    fn lines_of(chunks: &[&str]) -> Vec<String> {
        let items: Vec<Result<bytes::Bytes, BackendError>> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c.as_bytes())))
            .collect();
        let stream = ndjson_lines(futures::stream::iter(items));
        futures::executor::block_on(stream.map(|l| l.expect("no error")).collect())
    }

    #[test]
    fn a_shared_pin_add_succeeds_only_if_its_answer_names_every_cid() {
        let v0 = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";
        let v1 = crate::cid::canonical_of(v0).expect("a valid CID");
        let other = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
        let answer = |pins: &[&str]| serde_json::json!({ "Pins": pins });
        assert!(pins_name_all(&answer(&[v0, other]), &[v0, other]));
        // Another spelling of the same CID, and another order.
        assert!(pins_name_all(&answer(&[other, &v1]), &[v0, other]));
        // As many entries, but one CID is missing (another named twice).
        assert!(!pins_name_all(&answer(&[other, other]), &[v0, other]));
        assert!(!pins_name_all(&answer(&[v0]), &[v0, other]));
        assert!(!pins_name_all(&answer(&["not a cid", v0]), &[v0, other]));
        // One CID as sent, the other only in another spelling.
        assert!(pins_name_all(&answer(&[other, &v1]), &[other, v0]));
        assert!(!pins_name_all(&answer(&[v0, &v1]), &[v0, other]));
        assert!(!pins_name_all(&serde_json::json!({}), &[v0]));
        assert!(!pins_name_all(&serde_json::json!({ "Pins": "x" }), &[v0]));
    }

    #[test]
    fn splits_lines_across_chunks() {
        assert_eq!(
            lines_of(&["{\"a\":1}\n{\"b\"", ":2}\n\n  \n{\"c\":3}\n{\"d", "\":4}"]),
            ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}", "{\"d\":4}"]
        );
        // A line longer than many chunks, then lines that end exactly at chunk ends.
        let long = "x".repeat(10_000);
        let pieces: Vec<String> = long
            .as_bytes()
            .chunks(7)
            .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
            .collect();
        let mut chunks: Vec<&str> = pieces.iter().map(String::as_str).collect();
        chunks.extend(["\n", "one\n", "two\n"]);
        assert_eq!(lines_of(&chunks), [long.as_str(), "one", "two"]);
        assert!(lines_of(&[]).is_empty());
        assert!(lines_of(&["\n\n", " \n"]).is_empty());
    }

    #[test]
    fn a_broken_stream_ends_with_its_error() {
        let items: Vec<Result<bytes::Bytes, BackendError>> = vec![
            Ok(bytes::Bytes::from_static(b"one\ntw")),
            Err(BackendError::Interrupted("reset".into())),
            Ok(bytes::Bytes::from_static(b"o\n")),
        ];
        let stream = ndjson_lines(futures::stream::iter(items));
        let got: Vec<Result<String, BackendError>> = futures::executor::block_on(stream.collect());
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_deref().ok(), Some("one"));
        assert!(matches!(&got[1], Err(BackendError::Interrupted(m)) if m == "reset"));
    }

    #[test]
    fn builds_call_urls_from_the_parsed_base() {
        let http = reqwest::Client::new();
        let q = [("arg", "bafy a&b=c/ü"), ("recursive", "true")];
        let plain = KuboClient::new(http.clone(), "http://127.0.0.1:5001/");
        assert_eq!(
            plain.url("pin/add", &q).map(String::from).as_deref(),
            Some("http://127.0.0.1:5001/api/v0/pin/add?arg=bafy+a%26b%3Dc%2F%C3%BC&recursive=true")
        );
        // A base behind a path prefix keeps it; userinfo stays too.
        let prefixed = KuboClient::new(http.clone(), "http://u:p@node.example:8080/ipfs-rpc");
        assert_eq!(
            prefixed.url("id", &[]).map(String::from).as_deref(),
            Some("http://u:p@node.example:8080/ipfs-rpc/api/v0/id")
        );
        // Not a URL: no URL, so the call reports the HTTP client's own error.
        assert!(KuboClient::new(http, "not a url").url("id", &[]).is_none());
    }

    #[test]
    fn classifies_errors() {
        let e = classify(
            500,
            r#"{"Message":"not pinned or pinned indirectly","Code":0,"Type":"error"}"#,
        );
        assert!(matches!(e, BackendError::Transient { status: 500, .. }));
        let e = classify(
            500,
            r#"{"Message":"context deadline exceeded","Code":0,"Type":"error"}"#,
        );
        assert!(matches!(e, BackendError::Timeout(_)));
        let e = classify(400, r#"{"Message":"invalid path","Code":1,"Type":"error"}"#);
        assert!(!e.is_transient());
        let e = classify(500, r#"{"Message":"bad arg","Code":1,"Type":"error"}"#);
        assert!(!e.is_transient(), "Kubo client-error code means permanent");
        assert!(classify(429, "slow down").is_transient());
        assert!(classify(408, "").is_transient());
        assert!(classify(503, "<html>").is_transient());
        assert!(!classify(404, "no such endpoint").is_transient());
    }

    /// A backend whose host takes no new connection (a full accept queue, as a host that
    /// drops them would behave) runs the client's connect timeout out: the backend never
    /// saw the request, so the job must not spend an attempt on it.
    #[tokio::test]
    async fn a_connection_that_times_out_is_unreachable() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("bind");
        // Never accepted: once the queue of a backlog of 0 is full, the kernel drops
        // further connection attempts unanswered.
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut queued = Vec::new();
        for _ in 0..4 {
            let connect = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), connect).await {
                queued.push(s);
            }
        }
        assert!(!queued.is_empty(), "the accept queue took a connection");
        assert!(queued.len() < 4, "the accept queue filled up");

        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(300))
            .build()
            .expect("client");
        let client = KuboClient::new(http, &format!("http://{addr}"));
        let err = client
            .pin_add("bafkreiabc", Duration::from_secs(20))
            .await
            .expect_err("no connection");
        assert!(
            matches!(err, BackendError::Unreachable(_)),
            "a connect timeout is unreachable: {err:?}"
        );
        drop(listener);
    }

    #[test]
    fn reads_both_pin_ls_shapes() {
        assert_eq!(
            parse_pin_ls_line(r#"{"Cid":"QmA","Type":"recursive"}"#)
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>(),
            vec!["QmA".to_string()]
        );
        assert!(parse_pin_ls_line(r#"{"Cid":"QmB","Type":"direct"}"#).is_empty());
        let mut keys: Vec<String> = parse_pin_ls_line(
            r#"{"Keys":{"QmA":{"Type":"recursive"},"QmB":{"Type":"indirect"},"QmC":{"Type":"recursive"}}}"#,
        )
        .into_iter()
        .map(Result::unwrap)
        .collect();
        keys.sort();
        assert_eq!(keys, vec!["QmA", "QmC"]);
        assert!(parse_pin_ls_line("not json")[0].is_err());
    }

    #[test]
    fn lenient_numbers() {
        assert_eq!(lenient_u64(Some(&Value::from(7))), Some(7));
        assert_eq!(lenient_u64(Some(&Value::from("7"))), Some(7));
        assert_eq!(lenient_u64(Some(&Value::from("x"))), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(2)), "2000ms");
        assert_eq!(go_duration(Duration::ZERO), "1ms");
    }
}
