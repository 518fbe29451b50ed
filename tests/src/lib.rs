//! The end-to-end test harness. Each test builds a [`Stack`]: its own PostgreSQL database,
//! its own RabbitMQ queue name, its own js-ipfs node (a real IPFS node, started from
//! `deploy/ipfs/node.mjs`), and the real `pinq-api`, `pinq-worker` and `pinq-scheduler`
//! binaries as child processes. Nothing the tests check is mocked; their one test
//! double, [`FaultProxy`], stands between a process and RabbitMQ to make the broker
//! unreachable on demand. [`kubo_double`], a test double of the Kubo RPC with injected
//! latency and errors, serves only the benchmark (`tests/examples/bench`), never a test.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the test
//! command in the README does).

pub mod kubo_double;
pub mod private;

use std::collections::HashSet;
use std::fs::File;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pinq_core::cid::canonical_of;
use pinq_core::kubo::KuboClient;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// The admin token every test stack uses.
pub const TOKEN: &str = "e2e-admin-token-0123456789";

fn pg_admin_url() -> String {
    std::env::var("PINQ_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The broker every test uses (a private queue name keeps tests apart).
pub fn amqp_url() -> String {
    std::env::var("PINQ_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Deletes a stack's job queue and its urgent queue, if the broker can be reached.
pub async fn delete_queues(queue: &str) {
    let Ok(conn) = pinq_core::amqp::connect(&amqp_url(), "pinq-e2e-cleanup").await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in [queue.to_owned(), pinq_core::amqp::urgent_queue(queue)] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Where cargo put the binaries: next to the `deps` folder holding this test binary.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pinq-e2e-{tag}-{}", Uuid::new_v4().simple()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// A database of its own, migrated, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    server: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<TestDb> {
        Self::create_on(&pg_admin_url()).await
    }

    /// A database on another server, e.g. a private instance a fault test restarts.
    /// `server` is a URL without a database name: `postgres://postgres@127.0.0.1:PORT`.
    pub async fn create_on(server: &str) -> anyhow::Result<TestDb> {
        Self::create_with(server, None).await
    }

    /// A database migrated only up to `version` (inclusive), to test a later migration on
    /// data of the schema before it; `MIGRATOR.run` then applies the rest.
    pub async fn create_migrated_to(version: i64) -> anyhow::Result<TestDb> {
        Self::create_with(&pg_admin_url(), Some(version)).await
    }

    async fn create_with(server: &str, version: Option<i64>) -> anyhow::Result<TestDb> {
        let name = format!("pinq_e2e_{}", Uuid::new_v4().simple());
        let url = format!("{server}/{name}");
        pinq_core::db::ensure_database(&url)
            .await
            .context("PostgreSQL must be running (the test command starts it)")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        match version {
            None => pinq_core::db::MIGRATOR.run(&pool).await?,
            Some(v) => pinq_core::db::MIGRATOR.run_to(v, &pool).await?,
        }
        Ok(TestDb {
            name,
            url,
            pool,
            server: server.to_owned(),
        })
    }

    /// Registers a backend with columns every schema version has, for the migration tests
    /// that start from an older schema (`db::insert_backend` returns today's columns).
    pub async fn insert_backend_row(&self, name: &str) -> anyhow::Result<Uuid> {
        Ok(sqlx::query_scalar(
            "INSERT INTO backends (id, name, kind, url)
             VALUES (gen_random_uuid(), $1, 'kubo', 'http://127.0.0.1:9') RETURNING id",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Counts rows of a table (test-only helper; the table name is a literal of the test).
    pub async fn count(&self, table: &'static str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        let row: (i64,) = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap_or((-1,));
        row.0
    }

    /// Checks that the job tallies behind `GET /v1/stats` (`job_tallies`, kept by triggers)
    /// agree with a count of the jobs, per owner and state, and that there are some; and
    /// that the recent finishes (`job_finishes`, also kept by the triggers) hold every job
    /// that finished in the last 90 s, in its second, owner, state and latency bucket,
    /// with its latency within the bucket's maximum. The finishes are events, so a key
    /// may hold more than the jobs now show (a job that finished, was retried by hand
    /// and finished again counts twice); it may never hold fewer.
    pub async fn check_tallies(&self) -> anyhow::Result<()> {
        type Counts = Vec<(String, String, i64)>;
        // One snapshot for both reads: the triggers change the tallies in the transaction
        // that changes the jobs, so the two agree exactly at any snapshot.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let kept: Counts = sqlx::query_as(
            "SELECT owner, state, sum(n)::int8 FROM job_tallies
             GROUP BY owner, state HAVING sum(n) <> 0 ORDER BY owner, state",
        )
        .fetch_all(&mut *tx)
        .await?;
        let counted: Counts = sqlx::query_as(
            "SELECT owner, state, count(*) FROM jobs GROUP BY owner, state
             ORDER BY owner, state",
        )
        .fetch_all(&mut *tx)
        .await?;
        type Missed = Vec<(String, String, String, i16, i64, i64, f64, Option<f64>)>;
        let missed: Missed = sqlx::query_as(
            "SELECT j.second::text, j.owner, j.state, j.bucket, j.n, coalesce(f.n, 0)::int8,
                    j.max_ms, f.max_ms
             FROM (SELECT date_trunc('second', finished_at) AS second, owner, state,
                          pinq_latency_bucket(ms) AS bucket, count(*) AS n, max(ms) AS max_ms
                   FROM (SELECT owner, state, finished_at,
                                extract(epoch FROM finished_at - created_at)::float8 * 1000
                                    AS ms
                         FROM jobs
                         WHERE state IN ('succeeded', 'failed')
                           AND finished_at >= now() - interval '90 seconds') x
                   GROUP BY 1, 2, 3, 4) j
             LEFT JOIN (SELECT second, owner, state, bucket, sum(n) AS n, max(max_ms) AS max_ms
                        FROM job_finishes GROUP BY 1, 2, 3, 4) f
                    USING (second, owner, state, bucket)
             WHERE coalesce(f.n, 0) < j.n OR f.max_ms < j.max_ms - 0.001
             ORDER BY 1, 2, 3, 4",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        anyhow::ensure!(
            missed.is_empty(),
            "the recent finishes miss jobs that finished (second, owner, state, bucket, \
             jobs, finishes kept, the jobs' longest ms, the kept longest ms): {missed:?}"
        );
        anyhow::ensure!(
            kept == counted,
            "the job tallies {kept:?} differ from the jobs' own count {counted:?}"
        );
        anyhow::ensure!(!counted.is_empty(), "there were no jobs to count");
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let pool = self.pool.clone();
        let server = self.server.clone();
        run_blocking(async move {
            pool.close().await;
            if let Ok(pool) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&format!("{server}/postgres"))
                .await
            {
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
            }
        });
    }
}

/// Runs async clean-up from `Drop`, which may itself run inside a runtime.
fn run_blocking<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(15), f).await;
            });
        }
    })
    .join();
}

// ---------------------------------------------------------------------------------------
// Child processes

/// A child process whose output goes to a log file; stopped when dropped.
pub struct Proc {
    pub label: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{label}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {label}"))?;
        Ok(Proc {
            label: label.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait(timeout).await
    }

    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits until the process has written a line containing `marker`, and returns what
    /// follows the marker on that line. `None` if the process exits or time runs out.
    pub async fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if let Some(rest) = text
                .lines()
                .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim().to_owned()))
            {
                return Some(rest);
            }
            if !self.alive() || Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.alive() {
                self.signal(Signal::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The IPFS node

/// A real js-ipfs node with its own repository and port.
pub struct IpfsNode {
    pub url: String,
    pub repo: PathBuf,
    port: u16,
    proc: Option<Proc>,
    dir: PathBuf,
    http: reqwest::Client,
}

impl IpfsNode {
    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub async fn start(dir: &Path) -> anyhow::Result<IpfsNode> {
        let repo = dir.join("ipfs-repo");
        // Port 0 on the first start: the OS picks a free port and the node prints it, so
        // two stacks starting at once never race for one port. Restarts reuse it.
        let mut node = IpfsNode {
            url: String::new(),
            repo,
            port: 0,
            proc: None,
            dir: dir.to_owned(),
            http: reqwest::Client::new(),
        };
        node.restart().await?;
        Ok(node)
    }

    /// Starts the node (again) on the same repository and port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let script = repo_root().join("deploy/ipfs/node.mjs");
        let mut cmd = Command::new("node");
        cmd.arg(&script)
            .arg("--repo")
            .arg(&self.repo)
            .arg("--api-port")
            .arg(self.port.to_string());
        let mut proc = Proc::spawn("ipfs", cmd, &self.dir)?;
        let Some(url) = proc
            .wait_for_line("IPFS API ready on ", Duration::from_secs(60))
            .await
        else {
            bail!(
                "the IPFS node did not start (is deploy/ipfs installed? run deploy/ipfs/install.sh):\n{}",
                proc.log_tail(30)
            );
        };
        self.port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .context("the IPFS node printed no port")?;
        self.url = url.trim_end_matches('/').to_owned();
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .http
                .post(format!("{}/api/v0/version", self.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if let Some(p) = self.proc.as_mut()
                && !p.alive()
            {
                bail!("the IPFS node exited at start:\n{}", p.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!(
                    "the IPFS node did not answer within 60 s (is deploy/ipfs installed? run deploy/ipfs/install.sh)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the node (SIGTERM), keeping its repository.
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take()
            && p.terminate(Duration::from_secs(10)).await.is_none()
        {
            p.kill9();
        }
    }

    /// Adds each content to the node without pinning it; returns the CIDs in order.
    pub async fn add_unpinned(&self, contents: &[Vec<u8>]) -> anyhow::Result<Vec<String>> {
        let mut cids = Vec::with_capacity(contents.len());
        for chunk in contents.chunks(100) {
            let boundary = format!("pinq{}", Uuid::new_v4().simple());
            let mut body = Vec::new();
            for (i, content) in chunk.iter().enumerate() {
                body.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f{i}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(content);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            let text = self
                .http
                .post(format!("{}/api/v0/add", self.url))
                .query(&[("pin", "false"), ("wrap-with-directory", "false")])
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line)?;
                let hash = v["Hash"].as_str().context("add: no Hash")?;
                cids.push(hash.to_owned());
            }
        }
        anyhow::ensure!(
            cids.len() == contents.len(),
            "add returned {} CIDs for {} files",
            cids.len(),
            contents.len()
        );
        Ok(cids)
    }

    /// The node's recursive pins, in canonical form.
    pub async fn pins(&self) -> anyhow::Result<HashSet<String>> {
        let client = KuboClient::new(self.http.clone(), &self.url);
        let mut stream = client.pin_ls_recursive(Duration::from_secs(60)).await?;
        let mut out = HashSet::new();
        while let Some(cid) = stream.next().await {
            let cid = cid?;
            out.insert(
                canonical_of(&cid)
                    .with_context(|| format!("node listed an unparsable CID {cid}"))?,
            );
        }
        Ok(out)
    }

    /// Pins or unpins directly on the node, behind pinq's back.
    pub async fn pin_direct(&self, cid: &str, pin: bool) -> anyhow::Result<()> {
        let client = KuboClient::new(self.http.clone(), &self.url);
        if pin {
            client.pin_add(cid, Duration::from_secs(30)).await?;
        } else {
            client.pin_rm(cid, Duration::from_secs(30)).await?;
        }
        Ok(())
    }
}

/// A job of `op` on `cid` for `backend` at position `seq`, keyed by the canonical form of
/// `cid` (or by `cid` itself when it is not a CID), with no name, meta or replaced CID.
pub fn new_job(
    backend: Uuid,
    seq: i32,
    op: pinq_core::model::Op,
    cid: &str,
) -> pinq_core::db::NewJob {
    pinq_core::db::NewJob {
        id: Uuid::now_v7(),
        seq,
        backend_id: backend,
        op,
        cid: cid.to_owned(),
        replaces_cid: None,
        cid_key: canonical_of(cid).unwrap_or_else(|| cid.to_owned()),
        replaces_key: None,
        name: None,
        meta: Value::Object(Default::default()),
        unpin_all: false,
    }
}

/// Stores `jobs` as one fresh batch of `owner` (priority 5, default retry policy) the way
/// the API does, and marks its outbox row published; returns the batch id and the job ids.
pub async fn store_batch(
    pool: &PgPool,
    owner: &str,
    jobs: Vec<pinq_core::db::NewJob>,
) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    use pinq_core::db::{self, NewBatch, Stored};
    let batch = NewBatch {
        id: Uuid::now_v7(),
        owner: owner.to_owned(),
        priority: pinq_core::model::Priority::new(5)?,
        backends: vec!["b".into()],
        retry: pinq_core::retry::RetryPolicy::default(),
        idempotency_key: None,
        request_digest: None,
        jobs,
    };
    match db::insert_batch(pool, &batch).await? {
        Stored::Created { id, owed } => {
            db::settle_dispatch(pool, owed.entry).await?;
            Ok((id, owed.jobs.into_iter().map(|(id, _)| id).collect()))
        }
        Stored::Existing { .. } => bail!("a fresh batch was taken for an existing one"),
    }
}

/// One relay scan, committed, as the relay runs it; returns (rows taken, jobs requeued).
pub async fn relay_scan(
    pool: &PgPool,
    scan: pinq_core::db::RelayScan,
) -> anyhow::Result<(usize, Vec<Uuid>)> {
    let (take, ids) = relay_scan_limit(pool, scan, 1000).await?;
    Ok((take.taken, ids))
}

/// [`relay_scan`] with the scan's limit (the relay's `PINQ_RELAY_BATCH`) given: returns
/// what the scan locked and the ids it requeued.
pub async fn relay_scan_limit(
    pool: &PgPool,
    scan: pinq_core::db::RelayScan,
    limit: i64,
) -> anyhow::Result<(pinq_core::db::RelayTake, Vec<Uuid>)> {
    let mut tx = pool.begin().await?;
    let take = pinq_core::db::relay_lock_due(&mut tx, scan, limit).await?;
    let ids: Vec<Uuid> = take.jobs.iter().map(|j| j.id).collect();
    if !ids.is_empty() {
        pinq_core::db::relay_requeue(&mut tx, scan, &ids).await?;
    }
    tx.commit().await?;
    Ok((take, ids))
}

/// The SQLSTATE of a database error (`"23503"` for a foreign-key violation), if it is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// `n` distinct small contents, unique to this call.
pub fn unique_contents(n: usize) -> Vec<Vec<u8>> {
    let salt = Uuid::new_v4();
    (0..n)
        .map(|i| format!("pinq e2e content {salt} #{i}\n").into_bytes())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The broker fault injector (a test double: a TCP proxy that can be cut)

/// A TCP proxy in front of RabbitMQ. While cut, it closes every open connection and
/// refuses new ones, so the broker is unreachable for whoever connects through it; while
/// stalled, it closes them too but takes new ones and never answers, as a broker host that
/// drops packets would. RabbitMQ itself keeps running for other tests. (The suite's other
/// test double is the Kubo RPC's, `kubo_double`, for injected latency.)
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// [`FaultProxy`]'s modes.
const PROXY_UP: u8 = 0;
const PROXY_CUT: u8 = 1;
const PROXY_STALLED: u8 = 2;

impl FaultProxy {
    pub async fn start(target: &str) -> anyhow::Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mode = Arc::new(AtomicU8::new(PROXY_UP));
        let (generation, gen_rx) = tokio::sync::watch::channel(0u64);
        let target = target.to_owned();
        let mode2 = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = gen_rx.clone();
                let born = *rx.borrow();
                match mode2.load(Ordering::SeqCst) {
                    PROXY_CUT => {
                        drop(inbound);
                        continue;
                    }
                    PROXY_STALLED => {
                        // Held open, unanswered, until the mode changes.
                        tokio::spawn(async move {
                            let _ = rx.wait_for(|g| *g != born).await;
                            drop(inbound);
                        });
                        continue;
                    }
                    _ => {}
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|g| *g != born) => {}
                    }
                });
            }
        });
        Ok(FaultProxy {
            port,
            mode,
            generation,
            task,
        })
    }

    /// An AMQP URL that goes through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn cut(&self) {
        self.mode.store(PROXY_CUT, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Closes every open connection and holds new ones without an answer.
    pub fn stall(&self) {
        self.mode.store(PROXY_STALLED, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards again; connections held by a stall are closed.
    pub fn restore(&self) {
        if self.mode.swap(PROXY_UP, Ordering::SeqCst) == PROXY_STALLED {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP proxy in front of a real node that records the path and query of every
/// request it forwards (a test instrument: the node behind it does all the work). Tests
/// register a backend at its URL to see which RPC calls pinq makes.
pub struct CallLog {
    pub url: String,
    calls: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CallLog {
    pub async fn start(target: &str) -> anyhow::Result<CallLog> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let state = (
            target.trim_end_matches('/').to_owned(),
            reqwest::Client::new(),
            calls.clone(),
        );
        let app = axum::Router::new()
            .fallback(forward_recorded)
            .with_state(Arc::new(state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(CallLog { url, calls, task })
    }

    /// Every request forwarded so far, as `path?query`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The CIDs of each `pin/add` call so far, one list per call.
    pub fn pin_adds(&self) -> Vec<Vec<String>> {
        self.calls()
            .iter()
            .filter_map(|c| c.strip_prefix("/api/v0/pin/add?"))
            .map(|q| {
                url_form_pairs(q)
                    .into_iter()
                    .filter(|(k, _)| k == "arg")
                    .map(|(_, v)| v)
                    .collect()
            })
            .collect()
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type CallLogState = Arc<(String, reqwest::Client, Arc<std::sync::Mutex<Vec<String>>>)>;

async fn forward_recorded(
    axum::extract::State(state): axum::extract::State<CallLogState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (target, http, calls) = &*state;
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if let Ok(mut c) = calls.lock() {
        c.push(path.clone());
    }
    let method = request.method().clone();
    let body = match axum::body::to_bytes(request.into_body(), usize::MAX).await {
        Ok(b) => b,
        Err(e) => return (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let answer = http
        .request(method, format!("{target}{path}"))
        .body(body)
        .send()
        .await;
    match answer {
        Ok(resp) => {
            let status = resp.status();
            let kind = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut out = (status, bytes).into_response();
            if let Some(kind) = kind {
                out.headers_mut()
                    .insert(reqwest::header::CONTENT_TYPE, kind);
            }
            out
        }
        Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// The pairs of a URL query, decoded.
fn url_form_pairs(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The stack

/// One test's pinq deployment.
pub struct Stack {
    pub dir: PathBuf,
    pub db: TestDb,
    pub queue: String,
    pub amqp_url: String,
    pub api_url: String,
    pub ipfs: Option<IpfsNode>,
    pub api: Option<Proc>,
    pub workers: Vec<Proc>,
    pub scheduler: Option<Proc>,
    pub http: reqwest::Client,
    /// Extra environment for every process started after it is set.
    pub env: Vec<(String, String)>,
    worker_seq: usize,
}

impl Stack {
    /// A database and a queue name; no processes yet.
    pub async fn new() -> anyhow::Result<Stack> {
        Self::with_db(TestDb::create().await?)
    }

    /// Like [`Stack::new`], with the database on another PostgreSQL server.
    pub async fn on_postgres(server: &str) -> anyhow::Result<Stack> {
        Self::with_db(TestDb::create_on(server).await?)
    }

    fn with_db(db: TestDb) -> anyhow::Result<Stack> {
        let dir = scratch_dir("stack");

        Ok(Stack {
            dir,
            db,
            queue: format!("pinq.e2e.{}", Uuid::new_v4().simple()),
            amqp_url: amqp_url(),
            // Known once the API has started and said where it listens.
            api_url: String::new(),
            ipfs: None,
            api: None,
            workers: Vec::new(),
            scheduler: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            env: Vec::new(),
            worker_seq: 0,
        })
    }

    /// The usual stack: an IPFS node registered as backend `local`, the API, `workers`
    /// workers and a scheduler.
    pub async fn full(workers: usize) -> anyhow::Result<Stack> {
        Stack::full_with_env(workers, &[]).await
    }

    /// [`Stack::full`] with these environment variables set for every pinq process.
    pub async fn full_with_env(workers: usize, env: &[(&str, &str)]) -> anyhow::Result<Stack> {
        let mut s = Stack::new().await?;
        s.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        s.start_ipfs().await?;
        s.start_api().await?;
        s.register_ipfs_backend("local").await?;
        for _ in 0..workers {
            s.start_worker()?;
        }
        s.start_scheduler()?;
        Ok(s)
    }

    pub async fn start_ipfs(&mut self) -> anyhow::Result<()> {
        self.ipfs = Some(IpfsNode::start(&self.dir).await?);
        Ok(())
    }

    pub fn ipfs(&self) -> &IpfsNode {
        self.ipfs
            .as_ref()
            .expect("the test starts an IPFS node first")
    }

    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(bin_path(bin));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db.url)
            .env("AMQP_URL", &self.amqp_url)
            .env("PINQ_QUEUE", &self.queue)
            .env("PINQ_ADMIN_TOKEN", TOKEN)
            .env("PINQ_API_ADDR", "127.0.0.1:0")
            .env("PINQ_RELAY_INTERVAL_MS", "200")
            .env("PINQ_RELAY_GRACE_MS", "1000")
            .env("PINQ_PIN_TIMEOUT_SECS", "30")
            .env("PINQ_DB_MAX_CONNECTIONS", "8")
            .env("RUST_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub async fn start_api(&mut self) -> anyhow::Result<()> {
        // The API binds port 0 and prints its address: no two stacks can share a port.
        let mut proc = Proc::spawn("api", self.command("pinq-api"), &self.dir)?;
        let Some(url) = proc
            .wait_for_line("pinq-api listening on ", Duration::from_secs(30))
            .await
        else {
            bail!("pinq-api did not start:\n{}", proc.log_tail(30));
        };
        self.api_url = url;
        self.api = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .http
                .get(format!("{}/healthz", self.api_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if let Some(api) = self.api.as_mut()
                && !api.alive()
            {
                bail!("pinq-api exited at start:\n{}", api.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("pinq-api did not become healthy within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn start_worker(&mut self) -> anyhow::Result<usize> {
        self.worker_seq += 1;
        let label = format!("worker-{}", self.worker_seq);
        let proc = Proc::spawn(&label, self.command("pinq-worker"), &self.dir)?;
        self.workers.push(proc);
        Ok(self.workers.len() - 1)
    }

    pub fn start_scheduler(&mut self) -> anyhow::Result<()> {
        self.scheduler = Some(Proc::spawn(
            "scheduler",
            self.command("pinq-scheduler"),
            &self.dir,
        )?);
        Ok(())
    }

    /// An authenticated request builder.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(TOKEN)
    }

    pub async fn register_ipfs_backend(&self, name: &str) -> anyhow::Result<()> {
        let url = self.ipfs().url.clone();
        self.register_backend(name, &url).await
    }

    pub async fn register_backend(&self, name: &str, url: &str) -> anyhow::Result<()> {
        let resp = self
            .req(reqwest::Method::POST, "/v1/backends")
            .json(&json!({"name": name, "kind": "kubo", "url": url}))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 201,
            "register backend: {} {}",
            resp.status(),
            resp.text().await?
        );
        Ok(())
    }

    /// Submits a batch; returns (status, body).
    pub async fn submit(&self, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .req(reqwest::Method::POST, "/v1/batches")
            .json(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Submits a batch that must be accepted; returns its id.
    pub async fn submit_ok(&self, body: &Value) -> anyhow::Result<Uuid> {
        let (status, resp) = self.submit(body).await?;
        anyhow::ensure!(status == 202, "batch not accepted: {status} {resp}");
        Ok(resp["id"].as_str().context("no id")?.parse()?)
    }

    pub async fn batch(&self, id: Uuid) -> anyhow::Result<Value> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/batches/{id}"))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "GET batch: {}", resp.status());
        Ok(resp.json().await?)
    }

    /// Waits until no job is queued, running or waiting (parked jobs included).
    pub async fn wait_jobs_settled(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (active,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'retry_wait')",
            )
            .fetch_one(&self.db.pool)
            .await?;
            if active == 0 {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{active} jobs never ended");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls a Pinning Service API request (`GET /pins/{id}` with `token`) until its
    /// status is `want`; returns the request.
    pub async fn wait_pin_status(
        &self,
        token: &str,
        id: &str,
        want: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let resp = self
                .http
                .get(format!("{}/pins/{id}", self.api_url))
                .bearer_auth(token)
                .send()
                .await?;
            let code = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(code, 200, "{v}");
            if v["status"] == want {
                return Ok(v);
            }
            assert!(
                Instant::now() < deadline,
                "request {id} not {want} within {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls the batch until it is done; returns its last view.
    pub async fn wait_done(&self, id: Uuid, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let b = self.batch(id).await?;
            if b["state"] == "done" {
                return Ok(b);
            }
            // A panic (not an error) so that the stack's logs are printed.
            assert!(
                Instant::now() < deadline,
                "batch {id} not done within {timeout:?}: {}",
                b["counts"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The pin index for a backend, as canonical CIDs with status `pinned`.
    pub async fn pin_index(&self, backend: &str) -> anyhow::Result<HashSet<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT p.cid FROM pins p JOIN backends b ON b.id = p.backend_id
             WHERE b.name = $1 AND p.status = 'pinned'",
        )
        .bind(backend)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.into_iter().map(|(c,)| c).collect())
    }

    /// Opens a channel on the test's broker, for tests that publish or inspect directly.
    pub async fn amqp_channel(&self) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
        let conn = pinq_core::amqp::connect(&amqp_url(), "pinq-e2e").await?;
        let ch = conn.create_channel().await?;
        pinq_core::amqp::declare_queue(&ch, &self.queue).await?;
        Ok((conn, ch))
    }

    fn all_procs(&self) -> impl Iterator<Item = &Proc> {
        self.api
            .iter()
            .chain(self.workers.iter())
            .chain(self.scheduler.iter())
            .chain(self.ipfs.iter().filter_map(|n| n.proc.as_ref()))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Always written: the test harness captures a test's output and shows it only if
        // the test fails, whether by a panic or by returning an error (which a drop
        // cannot tell apart from a pass).
        for p in self.all_procs() {
            eprintln!(
                "----- {} (last lines of {}) -----\n{}",
                p.label,
                p.log.display(),
                p.log_tail(40)
            );
        }
        // Stop the processes before the database and the queue go.
        self.api.take();
        self.workers.clear();
        self.scheduler.take();
        self.ipfs.take();
        let queue = self.queue.clone();
        run_blocking(async move { delete_queues(&queue).await });
        // PINQ_E2E_KEEP_LOGS=1 keeps every test's folder (logs, IPFS repository).
        if !std::thread::panicking() && std::env::var_os("PINQ_E2E_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("stack logs kept in {}", self.dir.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fault-test helpers

impl IpfsNode {
    /// A valid CID of content nobody has (a random SHA-256 digest, raw codec): pinning it
    /// blocks until the pin's timeout.
    pub fn unprovided_cid(&self) -> String {
        random_cid()
    }
}

/// A valid CIDv1 of a random SHA-256 digest (raw codec): content nobody has.
pub fn random_cid() -> String {
    let digest: [u8; 32] = rand::random();
    match cid::multihash::Multihash::<64>::wrap(0x12, &digest) {
        Ok(mh) => cid::Cid::new_v1(0x55, mh).to_string(),
        // A 32-byte digest always fits a 64-byte multihash.
        Err(e) => panic!("multihash: {e}"),
    }
}

impl Stack {
    /// The worker id a worker process registered under.
    pub async fn worker_id(&self, index: usize) -> anyhow::Result<Uuid> {
        let pid = self.workers.get(index).context("no such worker")?.pid();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row: Option<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM workers WHERE pid = $1 ORDER BY started_at DESC LIMIT 1",
            )
            .bind(pid)
            .fetch_optional(&self.db.pool)
            .await?;
            if let Some((id,)) = row {
                return Ok(id);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "worker pid {pid} never registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Counts jobs of a batch per state, read from PostgreSQL directly.
    pub async fn state_counts(
        &self,
        batch: Uuid,
    ) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM jobs WHERE batch_id = $1 GROUP BY state")
                .bind(batch)
                .fetch_all(&self.db.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Waits until at least `n` jobs of the batch succeeded.
    pub async fn wait_succeeded(
        &self,
        batch: Uuid,
        n: i64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let counts = self.state_counts(batch).await?;
            if counts.get("succeeded").copied().unwrap_or(0) >= n {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no progress to {n} succeeded within {timeout:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The figures every fault test prints and checks: what was submitted, and how the
    /// jobs ended according to PostgreSQL.
    pub async fn figures(&self, batches: &[Uuid], submitted: i64) -> anyhow::Result<Figures> {
        let (succeeded, failed, unfinished, stored, unattributed): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'succeeded'),
                        count(*) FILTER (WHERE state = 'failed'),
                        count(*) FILTER (WHERE state NOT IN ('succeeded', 'failed', 'cancelled')),
                        count(*),
                        count(*) FILTER (WHERE state = 'succeeded' AND succeeded_by IS NULL)
                 FROM jobs WHERE batch_id = ANY($1)",
            )
            .bind(batches)
            .fetch_one(&self.db.pool)
            .await?;
        anyhow::ensure!(
            unattributed == 0,
            "{unattributed} succeeded job(s) do not name the worker that ran them"
        );
        // An attempt ends once: with a record in `job_attempts`, or as the success on the
        // job's row (`succeeded_by`). A job counts as run twice if it succeeded more than
        // once, if the attempt its row calls successful was also ended another way (the
        // relay took it back as lost, say, and the fence still let its success through),
        // or if an attempt before its successful one has no record: every other ending
        // writes one (a deferral gives its number back), so a gap is an earlier success
        // that a later one overwrote.
        let (double_run, attempts, max_attempt): (i64, i64, i32) = sqlx::query_as(
            "SELECT count(*) FILTER (
                        WHERE a.succeeded + (j.succeeded_by IS NOT NULL)::int > 1
                           OR (j.succeeded_by IS NOT NULL
                               AND (a.at_success > 0 OR a.before_success <> j.attempt - 1))),
                    coalesce(sum(a.records + (j.succeeded_by IS NOT NULL)::int), 0)::int8,
                    coalesce(max(j.attempt), 0)
             FROM jobs j
             CROSS JOIN LATERAL (
                 SELECT count(*) AS records,
                        count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
                        count(*) FILTER (WHERE attempt = j.attempt) AS at_success,
                        count(*) FILTER (WHERE attempt < j.attempt) AS before_success
                 FROM job_attempts WHERE job_id = j.id
             ) a
             WHERE j.batch_id = ANY($1)",
        )
        .bind(batches)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(Figures {
            submitted,
            succeeded,
            failed,
            // A job is lost if it was accepted but has no row, or never reached an end.
            lost: (submitted - stored) + unfinished,
            double_run,
            attempts,
            max_attempt,
        })
    }
}

/// How a fault test's jobs ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub lost: i64,
    /// Jobs recorded as succeeded by more than one attempt, whose successful attempt was
    /// also ended another way, or with an earlier attempt that left no record.
    pub double_run: i64,
    /// Attempts that ended: records, and successes on the jobs' rows.
    pub attempts: i64,
    pub max_attempt: i32,
}

impl Figures {
    /// Prints the line `docs/reliability.md` quotes.
    pub fn print(&self, test: &str, extra: &str) {
        println!(
            "fault-figures {test}: submitted={} succeeded={} failed={} lost={} double_run={} attempts={} max_attempt={}{}{extra}",
            self.submitted,
            self.succeeded,
            self.failed,
            self.lost,
            self.double_run,
            self.attempts,
            self.max_attempt,
            if extra.is_empty() { "" } else { " " },
        );
    }
}
