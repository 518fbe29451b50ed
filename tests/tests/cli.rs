//! The `pinq` binary end to end: every test runs the built CLI as a user would, with
//! PINQ_API_URL and PINQ_TOKEN in its environment, against a running stack (real
//! PostgreSQL, RabbitMQ and IPFS node), and checks its output and exit code.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pinq_e2e::{Proc, Stack, TOKEN, TestDb, bin_path, free_port, unique_contents};
use serde_json::Value;

/// What one run of `pinq` did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// The error contract: exactly one line, `pinq: error: …`, and the given exit code.
    fn assert_error(&self, code: i32, contains: &str) {
        assert_eq!(self.code, code, "exit code; stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line, got: {:?}", self.stderr);
        assert!(lines[0].starts_with("pinq: error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(contains),
            "error line should mention '{contains}': {}",
            lines[0]
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("Error {"),
            "no panic or Debug dump: {}",
            self.stderr
        );
    }
}

fn pinq_cmd(api_url: &str, token: &str) -> Command {
    let mut cmd = Command::new(bin_path("pinq"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PINQ_API_URL", api_url)
        .env("PINQ_TOKEN", token);
    cmd
}

fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `pinq ARGS` against `api_url`, with `stdin` as its standard input.
async fn pinq_at(api_url: &str, token: &str, args: &[&str], stdin: &str) -> Run {
    let mut cmd = pinq_cmd(api_url, token);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("pinq starts");
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(input.as_bytes());
        }
        finish(child.wait_with_output().expect("pinq runs"))
    })
    .await
    .expect("runner thread")
}

async fn pinq(stack: &Stack, args: &[&str]) -> Run {
    pinq_at(&stack.api_url, TOKEN, args, "").await
}

async fn pinq_ok(stack: &Stack, args: &[&str]) -> Run {
    let r = pinq(stack, args).await;
    assert_eq!(
        r.code, 0,
        "pinq {args:?} failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_inspect_and_bench_through_the_cli() -> anyhow::Result<()> {
    let stack = Stack::full(1).await?;
    let cids = stack.ipfs().add_unpinned(&unique_contents(3)).await?;
    let file = stack.dir.join("cids.txt");
    std::fs::write(&file, format!("# three CIDs\n{}\n", cids.join("\n")))?;
    let file = file.to_string_lossy().into_owned();

    // From a file, followed to completion, as a person would.
    let r = pinq_ok(
        &stack,
        &[
            "batch",
            "submit",
            &file,
            "--backend",
            "local",
            "--name-prefix",
            "cli-",
            "--follow",
        ],
    )
    .await;
    assert!(r.stdout.contains("3 succeeded, 0 failed"), "{}", r.stdout);
    let pins = pinq_ok(&stack, &["pins", "ls", "--backend", "local", "-o", "json"])
        .await
        .json();
    assert_eq!(pins["pins"].as_array().map(Vec::len), Some(3), "{pins}");
    let one = pinq_ok(&stack, &["pins", "ls", "--cid", &cids[0], "-o", "json"])
        .await
        .json();
    assert_eq!(
        one["pins"][0]["name"]
            .as_str()
            .map(|n| n.starts_with("cli-")),
        Some(true)
    );

    // From standard input, as a script would: JSON out, parsed.
    let r = pinq_at(
        &stack.api_url,
        TOKEN,
        &[
            "batch", "submit", "-", "--op", "unpin", "--follow", "--output", "json",
        ],
        &cids.join("\n"),
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let batch = r.json();
    assert_eq!(batch["state"], "done");
    assert_eq!(batch["counts"]["succeeded"], 3, "{batch}");
    let id = batch["id"].as_str().expect("batch id").to_owned();
    assert!(
        stack.ipfs().pins().await?.is_empty(),
        "the node holds no pins"
    );

    let jobs = pinq_ok(&stack, &["jobs", "ls", "--batch", &id, "-o", "json"])
        .await
        .json();
    let jobs = jobs["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs.iter()
            .all(|j| j["op"] == "unpin" && j["state"] == "succeeded")
    );
    let status = pinq_ok(&stack, &["batch", "status", &id, "-o", "json"])
        .await
        .json();
    assert_eq!(status["counts"]["succeeded"], 3);
    let listed = pinq_ok(&stack, &["batch", "ls", "-o", "json"]).await.json();
    assert_eq!(listed["batches"].as_array().map(Vec::len), Some(2));
    let table = pinq_ok(&stack, &["batch", "ls"]).await;
    assert!(table.stdout.starts_with("ID "), "{}", table.stdout);
    let job = pinq_ok(
        &stack,
        &["jobs", "show", jobs[0]["id"].as_str().unwrap_or("")],
    )
    .await;
    assert!(job.stdout.contains("succeeded"), "{}", job.stdout);

    // The operator's views.
    let st = pinq_ok(&stack, &["status", "-o", "json"]).await.json();
    assert_eq!(st["api"]["ready"], true, "{st}");
    assert!(st["stats"]["queue"]["depth"].is_u64(), "{st}");
    assert!(st["stats"]["queue"]["urgent"]["depth"].is_u64(), "{st}");
    assert_eq!(st["stats"]["jobs"]["succeeded"], 6, "{st}");
    assert!(st["stats"]["workers"]["live"].as_u64() >= Some(1), "{st}");
    let human = pinq_ok(&stack, &["status"]).await;
    assert!(human.stdout.contains("local"), "{}", human.stdout);
    assert!(
        human
            .stdout
            .contains(&format!("of them on {}.urgent", stack.queue)),
        "{}",
        human.stdout
    );
    let backends = pinq_ok(&stack, &["backends", "ls", "-o", "json"])
        .await
        .json();
    assert_eq!(backends["backends"][0]["name"], "local");
    let check = pinq_ok(&stack, &["backends", "check", "local", "-o", "json"])
        .await
        .json();
    assert_eq!(check["ok"], true, "{check}");
    let workers = pinq_ok(&stack, &["workers", "ls", "-o", "json"])
        .await
        .json();
    assert!(!workers["workers"].as_array().is_none_or(Vec::is_empty));
    let scheds = pinq_ok(&stack, &["schedules", "ls", "-o", "json"])
        .await
        .json();
    assert!(
        scheds["schedules"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["name"] == "prune"))
    );
    pinq_ok(&stack, &["schedules", "disable", "prune"]).await;
    let scheds = pinq_ok(&stack, &["schedules", "ls", "-o", "json"])
        .await
        .json();
    let prune = scheds["schedules"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["name"] == "prune").cloned())
        .unwrap_or_default();
    assert_eq!(prune["enabled"], false);
    pinq_ok(&stack, &["schedules", "enable", "prune"]).await;

    // A small bench: unpins of random CIDs succeed on a real node.
    let b = pinq_ok(
        &stack,
        &[
            "bench",
            "--jobs",
            "40",
            "--batch-size",
            "10",
            "--concurrency",
            "2",
            "--backend",
            "local",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(b["succeeded"], 40, "{b}");
    assert_eq!(b["failed"], 0, "{b}");
    assert!(b["accepted_per_sec"].as_f64() > Some(0.0), "{b}");
    assert!(
        b["latency_ms"]["p99"].as_f64() >= b["latency_ms"]["p50"].as_f64(),
        "{b}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_bad_input_give_one_line_and_the_documented_exit_code() -> anyhow::Result<()> {
    // Pins time out after 1 s, so a CID nobody provides fails at its only attempt.
    let mut stack = Stack::new().await?;
    stack.env.push(("PINQ_PIN_TIMEOUT_SECS".into(), "1".into()));
    stack.start_ipfs().await?;
    stack.start_api().await?;
    stack.register_ipfs_backend("local").await?;
    stack.register_ipfs_backend("spare").await?;
    stack.start_worker()?;
    stack.start_scheduler()?;
    let cid = stack.ipfs().unprovided_cid();

    let r = pinq_at(
        &stack.api_url,
        TOKEN,
        &[
            "batch",
            "submit",
            "-",
            "--backend",
            "spare",
            "--max-attempts",
            "1",
            "--follow",
        ],
        &cid,
    )
    .await;
    r.assert_error(1, "failed job");
    assert!(r.stdout.contains("1 failed"), "{}", r.stdout);
    let failed = pinq_ok(&stack, &["jobs", "ls", "--state", "failed", "-o", "json"])
        .await
        .json();
    let job_id = failed["jobs"][0]["id"]
        .as_str()
        .expect("a failed job")
        .to_owned();
    let show = pinq_ok(&stack, &["jobs", "show", &job_id, "-o", "json"])
        .await
        .json();
    let attempt = &show["attempts"][0];
    assert_eq!(attempt["outcome"], "failed", "{show}");
    assert!(
        attempt["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{show}"
    );
    assert!(attempt["worker"].is_string(), "the worker is named: {show}");
    let human = pinq_ok(&stack, &["jobs", "show", &job_id]).await;
    assert!(human.stdout.contains("OUTCOME"), "{}", human.stdout);

    // With only finished jobs left, the backend goes only if its history may go too.
    pinq(&stack, &["backends", "rm", "spare"])
        .await
        .assert_error(1, "finished job(s) in its history");
    // A pin-index row of the backend (as an index update records a pin found on the
    // node) goes with it.
    let (spare_id,): (uuid::Uuid,) = sqlx::query_as(
        "INSERT INTO pins (backend_id, cid, status)
         SELECT id, $1, 'unmanaged' FROM backends WHERE name = 'spare' RETURNING backend_id",
    )
    .bind(pinq_e2e::random_cid())
    .fetch_one(&stack.db.pool)
    .await?;
    let rm = pinq_ok(
        &stack,
        &["backends", "rm", "spare", "--purge", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(rm["jobs_removed"], 1, "{rm}");
    let (orphans,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_attempts a WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = a.job_id)",
    )
    .fetch_one(&stack.db.pool)
    .await?;
    assert_eq!(orphans, 0, "the purged job's attempt records went with it");
    let (pins_left,): (i64,) = sqlx::query_as("SELECT count(*) FROM pins WHERE backend_id = $1")
        .bind(spare_id)
        .fetch_one(&stack.db.pool)
        .await?;
    assert_eq!(pins_left, 0, "the backend's pin-index rows went with it");
    pinq(&stack, &["backends", "check", "spare"])
        .await
        .assert_error(1, "no backend named 'spare'");

    // Bad input: each one line, documented exit codes.
    pinq(&stack, &["batch", "submit", "-", "--op", "frobnicate"])
        .await
        .assert_code(2);
    let unknown_op = format!(r#"[{{"op":"frobnicate","cid":"{cid}"}}]"#);
    pinq_at(
        &stack.api_url,
        TOKEN,
        &["batch", "submit", "-"],
        &unknown_op,
    )
    .await
    .assert_error(2, "/ops/0/op");
    pinq_at(
        &stack.api_url,
        TOKEN,
        &["batch", "submit", "-"],
        "not-a-cid\n",
    )
    .await
    .assert_error(2, "line 1: 'not-a-cid' is not a CID");
    let bad_json = format!(r#"{{"ops":[{{"op":"pin","cid":"{cid}x"}}]}}"#);
    pinq_at(&stack.api_url, TOKEN, &["batch", "submit", "-"], &bad_json)
        .await
        .assert_error(2, "the API rejected the request");
    pinq(&stack, &["batch", "submit", "/nonexistent/ops.json"])
        .await
        .assert_error(2, "cannot read /nonexistent/ops.json");
    pinq_at(
        &stack.api_url,
        "wrong-token-0123456789",
        &["batch", "ls"],
        "",
    )
    .await
    .assert_error(4, "refused the token");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    pinq_at(&nowhere, TOKEN, &["status"], "")
        .await
        .assert_error(3, "cannot reach the pinq API");
    Ok(())
}

impl Run {
    fn assert_code(&self, code: i32) {
        assert_eq!(self.code, code, "stderr: {}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_generated_for_each_shell() -> anyhow::Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let r = pinq_at("http://127.0.0.1:1", "", &["completions", shell], "").await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.contains("batch"), "{shell}: {}", r.stdout);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// pinq up

fn children(pid: i32, pattern: &str) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string(), "-f", pattern])
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    // A zombie still answers signal 0; /proc tells them apart.
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinq_up_restarts_a_killed_worker_and_stops_cleanly_on_sigterm() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let dir = std::env::temp_dir().join(format!("pinq-e2e-up-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let queue = format!("pinq.e2e.{}", uuid::Uuid::new_v4().simple());
    let bin_dir = bin_path("pinq")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut cmd = Command::new(bin_path("pinq"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", pinq_e2e::amqp_url())
        .env("PINQ_QUEUE", &queue)
        // Port 0: the API's own "listening on" line, which `pinq up` forwards, says where.
        .env("PINQ_API_ADDR", "127.0.0.1:0")
        .env("PINQ_ADMIN_TOKEN", TOKEN)
        .env("PINQ_SHUTDOWN_GRACE_SECS", "5")
        .env("PINQ_DB_MAX_CONNECTIONS", "4")
        .env("RUST_LOG", "info")
        .args(["up", "--workers", "2", "--bin-dir"])
        .arg(&bin_dir);
    let mut up = Proc::spawn("pinq-up", cmd, &dir)?;
    let up_pid = up.pid();
    let api_url = up
        .wait_for_line("pinq-api listening on ", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("the API never said where it listens:\n{}", up.log_text()));

    // Up when `pinq status` says so, through the CLI itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = pinq_at(&api_url, TOKEN, &["status", "-o", "json"], "").await;
        if r.code == 0 && r.json()["stats"]["workers"]["live"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline && up.alive(),
            "pinq up did not come up: {}\n{}",
            r.stderr,
            up.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let workers = children(up_pid, "pinq-worker");
    assert_eq!(workers.len(), 2, "two worker children: {workers:?}");
    let victim = workers[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL)?;
    let restarted = wait_for(
        "the killed worker to be restarted",
        Duration::from_secs(30),
        || {
            let now = children(up_pid, "pinq-worker");
            (now.len() == 2 && !now.contains(&victim)).then_some(now)
        },
    )
    .await;
    assert!(
        restarted.contains(&workers[1]),
        "the other worker kept running"
    );

    let all = children(up_pid, "pinq-");
    assert!(all.len() >= 4, "api, 2 workers, scheduler: {all:?}");
    up.signal(Signal::SIGTERM);
    let status = up.wait(Duration::from_secs(60)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "pinq up exits 0 after SIGTERM:\n{}",
        up.log_text()
    );
    for pid in all {
        assert!(
            !alive(pid),
            "child {pid} still running after pinq up exited"
        );
    }
    let log = up.log_text();
    assert!(log.contains("worker"), "{log}");
    pinq_e2e::delete_queues(&queue).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// pinq monitor, in a real pseudo-terminal

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_draws_updates_and_quits_on_q_leaving_the_terminal_usable() -> anyhow::Result<()> {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};

    let mut stack = Stack::new().await?;
    stack.start_api().await?;
    let pty = native_pty_system();
    let pair = pty.openpty(PtySize {
        rows: 40,
        cols: 120,
        pixel_width: 0,
        pixel_height: 0,
    })?;
    // A shell runs the monitor, then shows the terminal's settings after it quit.
    let mut cmd = CommandBuilder::new("sh");
    cmd.args([
        "-c",
        "\"$PINQ_BIN\" monitor --interval-ms 300; echo \"EXIT=$?\"; stty -a; echo END-OF-TEST",
    ]);
    cmd.env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.env("TERM", "xterm-256color");
    cmd.env("PINQ_BIN", bin_path("pinq"));
    cmd.env("PINQ_API_URL", &stack.api_url);
    cmd.env("PINQ_TOKEN", TOKEN);
    let mut child = pair.slave.spawn_command(cmd)?;
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader()?;
    let mut writer = pair.master.take_writer()?;
    let parser = Arc::new(Mutex::new(vt100::Parser::new(40, 120, 0)));
    let raw = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (p, r) = (parser.clone(), raw.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut p) = p.lock() {
                p.process(&buf[..n]);
            }
            if let Ok(mut r) = r.lock() {
                r.extend_from_slice(&buf[..n]);
            }
        }
    });
    let screen = |parser: &Arc<Mutex<vt100::Parser>>| {
        parser
            .lock()
            .map(|p| (p.screen().contents(), p.screen().alternate_screen()))
            .unwrap_or_default()
    };

    let (first, alt) = wait_for("the monitor's first frame", Duration::from_secs(20), || {
        let (text, alt) = screen(&parser);
        text.contains("refresh #1").then_some((text, alt))
    })
    .await;
    assert!(alt, "the monitor draws on the alternate screen");
    assert!(first.contains("pinq monitor"), "{first}");
    assert!(
        first.contains("throughput") && first.contains("queue"),
        "{first}"
    );
    wait_for("the monitor to refresh", Duration::from_secs(20), || {
        screen(&parser).0.contains("refresh #3").then_some(())
    })
    .await;

    writer.write_all(b"q")?;
    writer.flush()?;
    let (after, alt) = wait_for(
        "the shell after the monitor",
        Duration::from_secs(20),
        || {
            let (text, alt) = screen(&parser);
            text.contains("END-OF-TEST").then_some((text, alt))
        },
    )
    .await;
    assert!(!alt, "the alternate screen was left");
    assert!(after.contains("EXIT=0"), "{after}");
    assert!(
        !after.contains("refresh #"),
        "the monitor's frame is gone: {after}"
    );
    let words: Vec<String> = after.split_whitespace().map(str::to_owned).collect();
    for setting in ["icanon", "echo", "isig"] {
        assert!(
            words.iter().any(|w| w == setting),
            "raw mode was undone ({setting} is on again): {after}"
        );
    }
    let bytes = raw.lock().map(|r| r.clone()).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&bytes).contains("\u{1b}[?25h"),
        "the cursor is shown again"
    );
    let _ = child.wait();
    Ok(())
}
