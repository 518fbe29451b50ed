//! The child processes of `pinq up`: starting them, forwarding their output line by line
//! under a `[label] ` prefix, restarting those that exit, and stopping them in order.
//!
//! Each running child is owned by one task that waits for it and delivers signals to it,
//! so a pid is only ever signalled by the task that will reap it and a recycled pid is
//! never hit. The supervisor itself is a single loop over the exits those tasks report.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::restart::{Decision, RestartPolicy, RestartTracker};

/// Children stop in this order: first the API (no new batches), then the workers (they
/// finish or hand back their jobs), last the scheduler (it republishes what was handed
/// back while the workers stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Api,
    Workers,
    Scheduler,
}

impl Stage {
    pub const STOP_ORDER: [Stage; 3] = [Stage::Api, Stage::Workers, Stage::Scheduler];
}

/// How to run one child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Prefix of its output lines and name in logs: `api`, `worker-1`, `scheduler`.
    pub label: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Set on top of the inherited environment.
    pub env: Vec<(String, String)>,
    pub stage: Stage,
    /// How long it may take to exit after SIGTERM before it is killed.
    pub stop_timeout: Duration,
}

/// How long a SIGKILLed child may take to be reaped before the supervisor stops
/// waiting. SIGKILL cannot be ignored; this only guards against a hung wait.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Longest output line forwarded as one line; longer ones are split so that a child
/// writing without newlines cannot grow the buffer without bound.
const MAX_LINE: usize = 64 * 1024;

/// The supervisor's view of one child.
#[derive(Debug)]
enum State {
    Running {
        started: Instant,
        signals: mpsc::UnboundedSender<Signal>,
    },
    /// Exited; starts again at `until`.
    Backoff {
        until: Instant,
    },
    Stopped,
}

#[derive(Debug)]
struct Slot {
    spec: ChildSpec,
    state: State,
    restarts: RestartTracker,
}

impl Slot {
    fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    fn signal(&self, sig: Signal) {
        if let State::Running { signals, .. } = &self.state {
            // A closed channel means the watcher is reporting the exit right now.
            let _ = signals.send(sig);
        }
    }
}

/// A child's exit, reported by its watcher task.
#[derive(Debug)]
struct Exit {
    slot: usize,
    /// What happened, for people: `exit code 1`, `killed by SIGKILL`, `failed to start: …`.
    how: String,
}

/// Runs the children of `pinq up`.
pub struct Supervisor {
    slots: Vec<Slot>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
}

impl Supervisor {
    pub fn new(specs: Vec<ChildSpec>, policy: RestartPolicy) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Supervisor {
            slots: specs
                .into_iter()
                .map(|spec| Slot {
                    spec,
                    state: State::Stopped,
                    restarts: RestartTracker::new(policy),
                })
                .collect(),
            exits_tx,
            exits_rx,
        }
    }

    /// Starts every child. A child that cannot be started counts as one that crashed at
    /// once, so [`run`](Self::run) retries it and gives up like for any crash loop.
    pub fn start_all(&mut self) {
        for i in 0..self.slots.len() {
            self.start(i);
        }
    }

    /// Supervises until `shutdown` is cancelled or a child keeps crashing, then stops all
    /// children in [`Stage::STOP_ORDER`]. Returns an error naming the child it gave up on.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let gave_up = loop {
            let next_restart = self.next_restart();
            // Never reached: the branch is disabled when no restart is pending.
            let wake = next_restart.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                Some(exit) = self.exits_rx.recv() => {
                    if let Some(e) = self.on_exit(exit) {
                        break Some(e);
                    }
                }
                () = tokio::time::sleep_until(wake.into()), if next_restart.is_some() => {
                    self.restart_due();
                }
            }
        };
        self.stop_all().await;
        match gave_up {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn start(&mut self, i: usize) {
        let exits = self.exits_tx.clone();
        let slot = &mut self.slots[i];
        let spec = &slot.spec;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in the terminal reaches only `pinq up`, which
            // then stops the children in order instead of all of them at once.
            .process_group(0)
            // Should `pinq up` unwind without stopping a child, the child goes with it.
            .kill_on_drop(true);
        let (signals, signals_rx) = mpsc::unbounded_channel();
        slot.state = State::Running {
            started: Instant::now(),
            signals,
        };
        match cmd.spawn() {
            Ok(child) => {
                tracing::info!(child = %spec.label, pid = child.id(), "started {}", spec.program.display());
                tokio::spawn(watch(i, spec.label.clone(), child, signals_rx, exits));
            }
            Err(e) => {
                let _ = exits.send(Exit {
                    slot: i,
                    how: format!("failed to start {}: {e}", spec.program.display()),
                });
            }
        }
    }

    /// The earliest pending restart.
    fn next_restart(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                State::Backoff { until } => Some(until),
                _ => None,
            })
            .min()
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if matches!(self.slots[i].state, State::Backoff { until } if until <= now) {
                self.start(i);
            }
        }
    }

    /// Handles an exit while supervising; returns the error to stop with if the child
    /// keeps crashing.
    fn on_exit(&mut self, exit: Exit) -> Option<anyhow::Error> {
        let slot = &mut self.slots[exit.slot];
        let State::Running { started, .. } = slot.state else {
            return None;
        };
        let now = Instant::now();
        let uptime = now.saturating_duration_since(started);
        match slot.restarts.on_exit(started, now) {
            Decision::RestartAfter(delay) => {
                tracing::warn!(
                    child = %slot.spec.label,
                    status = %exit.how,
                    uptime_secs = uptime.as_secs(),
                    restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "child exited; restarting it"
                );
                slot.state = State::Backoff { until: now + delay };
                None
            }
            Decision::GiveUp => {
                let window = slot.restarts.policy().crash_window;
                let message = format!(
                    "{} exited {} times within {} s, last with {}; giving up",
                    slot.spec.label,
                    slot.restarts.recent_crashes(),
                    window.as_secs(),
                    exit.how
                );
                tracing::error!(child = %slot.spec.label, status = %exit.how, "{message}; stopping everything");
                slot.state = State::Stopped;
                Some(anyhow::anyhow!(message))
            }
        }
    }

    /// Stops every child, stage by stage: SIGTERM, wait up to the child's stop timeout,
    /// then SIGKILL. A second SIGINT or SIGTERM cuts the waiting short.
    async fn stop_all(&mut self) {
        let hurry = on_next_signal();
        for slot in &mut self.slots {
            if matches!(slot.state, State::Backoff { .. }) {
                slot.state = State::Stopped;
            }
        }
        for stage in Stage::STOP_ORDER {
            let targets: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].spec.stage == stage && self.slots[i].is_running())
                .collect();
            let Some(timeout) = targets
                .iter()
                .map(|&i| self.slots[i].spec.stop_timeout)
                .max()
            else {
                continue;
            };
            let labels: Vec<&str> = targets
                .iter()
                .map(|&i| self.slots[i].spec.label.as_str())
                .collect();
            tracing::info!(children = ?labels, timeout_secs = timeout.as_secs(), "stopping");
            for &i in &targets {
                self.slots[i].signal(Signal::SIGTERM);
            }
            if self
                .wait_stopped(&targets, Instant::now() + timeout, Some(&hurry))
                .await
            {
                continue;
            }
            for &i in &targets {
                let slot = &self.slots[i];
                if slot.is_running() {
                    tracing::warn!(child = %slot.spec.label, "still running after SIGTERM; sending SIGKILL");
                    slot.signal(Signal::SIGKILL);
                }
            }
            if !self
                .wait_stopped(&targets, Instant::now() + KILL_WAIT, None)
                .await
            {
                tracing::error!("a child did not exit after SIGKILL; leaving it behind");
            }
        }
    }

    /// Waits until none of `targets` is running (true), or the deadline passes or
    /// `hurry` is cancelled (false). Records every exit that arrives meanwhile.
    async fn wait_stopped(
        &mut self,
        targets: &[usize],
        deadline: Instant,
        hurry: Option<&CancellationToken>,
    ) -> bool {
        loop {
            if targets.iter().all(|&i| !self.slots[i].is_running()) {
                return true;
            }
            tokio::select! {
                Some(exit) = self.exits_rx.recv() => {
                    let slot = &mut self.slots[exit.slot];
                    tracing::info!(child = %slot.spec.label, status = %exit.how, "child stopped");
                    slot.state = State::Stopped;
                }
                () = tokio::time::sleep_until(deadline.into()) => return false,
                () = cancelled(hurry) => {
                    tracing::warn!("second signal: not waiting any longer");
                    return false;
                }
            }
        }
    }
}

/// Resolves when `token` is cancelled; never, without a token.
async fn cancelled(token: Option<&CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

/// A token cancelled by the next SIGINT or SIGTERM, for impatient users: the first one
/// started the graceful stop, the next one skips the waiting.
fn on_next_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        let t = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            t.cancel();
        });
    }
    token
}

/// Owns a running child: forwards its output, delivers signals, reaps it, reports how it
/// ended.
async fn watch(
    slot: usize,
    label: String,
    mut child: Child,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let prefix = format!("[{label}] ");
    let out = child.stdout.take().map(|s| {
        let prefix = prefix.clone();
        tokio::spawn(forward_lines(s, MAX_LINE, move |line| {
            write_line(&mut std::io::stdout().lock(), &prefix, line)
        }))
    });
    let err = child.stderr.take().map(|s| {
        let prefix = prefix.clone();
        tokio::spawn(forward_lines(s, MAX_LINE, move |line| {
            write_line(&mut std::io::stderr().lock(), &prefix, line)
        }))
    });
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(sig) = signals.recv() => send_signal(&child, &label, sig),
        }
    };
    // Let the child's last lines through before its exit is reported, but do not wait
    // for a grandchild that may have inherited the pipes.
    for forwarder in [out, err].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(1), forwarder).await;
    }
    let how = match status {
        Ok(status) => describe(status),
        Err(e) => format!("lost track of it: {e}"),
    };
    let _ = exits.send(Exit { slot, how });
}

fn send_signal(child: &Child, label: &str, sig: Signal) {
    // `id()` is `None` once the child was reaped, and only this task reaps it.
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        tracing::warn!(child = %label, pid, signal = %sig, error = %e, "failed to signal child");
    }
}

/// `exit code 1`, `killed by SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        status.to_string()
    }
}

/// Reads `reader` to its end and hands each line (without its line break) to `emit`.
/// Lines longer than `max_line` bytes are handed over in pieces.
pub async fn forward_lines<R, F>(reader: R, max_line: usize, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(&[u8]),
{
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::debug!(error = %e, "child output closed with an error");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let room = max_line.saturating_sub(line.len()).max(1);
        let window = &chunk[..chunk.len().min(room)];
        let (taken, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(pos) => (pos + 1, true),
            None => (window.len(), false),
        };
        line.extend_from_slice(&chunk[..taken]);
        reader.consume(taken);
        if complete || line.len() >= max_line {
            emit(trim_line_break(&line));
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(trim_line_break(&line));
    }
}

fn trim_line_break(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Writes one prefixed line in a single call on a locked stream, so that lines of
/// different children never interleave. The write blocks, like `println!`; terminal and
/// pipe writes of one line are short.
fn write_line(out: &mut impl std::io::Write, prefix: &str, line: &[u8]) {
    let mut buf = Vec::with_capacity(prefix.len() + line.len() + 1);
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(line);
    buf.push(b'\n');
    // Nowhere to report a closed stdout or stderr; the children keep running regardless.
    let _ = out.write_all(&buf).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max_line: usize) -> Vec<String> {
        let mut out = Vec::new();
        forward_lines(input, max_line, |l| {
            out.push(String::from_utf8_lossy(l).into_owned())
        })
        .await;
        out
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_the_unterminated_last_one() {
        assert_eq!(lines(b"a\r\nbb\n\nccc", 100).await, ["a", "bb", "", "ccc"]);
        assert!(lines(b"", 100).await.is_empty());
    }

    #[tokio::test]
    async fn long_lines_are_split() {
        assert_eq!(lines(b"abcdefg\nhi\n", 3).await, ["abc", "def", "g", "hi"]);
    }

    #[test]
    fn prefixed_line_is_written_whole() {
        let mut out = Vec::new();
        write_line(&mut out, "[worker-1] ", b"started");
        assert_eq!(out, b"[worker-1] started\n");
    }

    fn sh(label: &str, stage: Stage, script: &str, stop_timeout: Duration) -> ChildSpec {
        ChildSpec {
            label: label.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            stage,
            stop_timeout,
        }
    }

    fn fast_policy() -> RestartPolicy {
        RestartPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            healthy_after: Duration::from_secs(60),
            crash_window: Duration::from_secs(60),
            max_crashes: 3,
        }
    }

    #[tokio::test]
    async fn gives_up_on_a_child_that_keeps_crashing() {
        let mut sup = Supervisor::new(
            vec![
                sh("crasher", Stage::Workers, "exit 3", Duration::from_secs(5)),
                sh(
                    "steady",
                    Stage::Scheduler,
                    "exec sleep 30",
                    Duration::from_secs(5),
                ),
            ],
            fast_policy(),
        );
        sup.start_all();
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), sup.run(CancellationToken::new()))
            .await
            .expect("supervisor should give up quickly")
            .expect_err("a crash loop is an error");
        let msg = err.to_string();
        assert!(msg.contains("crasher exited 3 times"), "{msg}");
        assert!(msg.contains("exit code 3"), "{msg}");
        // `steady` ignores nothing, so SIGTERM stopped it well before its timeout.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_child_that_is_not_found_counts_as_crashing() {
        let mut spec = sh("ghost", Stage::Api, "", Duration::from_secs(1));
        spec.program = "/nonexistent/pinq-api".into();
        let mut sup = Supervisor::new(vec![spec], fast_policy());
        sup.start_all();
        let err = tokio::time::timeout(Duration::from_secs(10), sup.run(CancellationToken::new()))
            .await
            .expect("supervisor should give up quickly")
            .expect_err("a crash loop is an error");
        assert!(
            err.to_string()
                .contains("failed to start /nonexistent/pinq-api"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_in_order_and_kills_what_ignores_sigterm() {
        let dir = std::env::temp_dir().join(format!("pinq-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("order");
        let log_s = log.display().to_string();
        // Each child appends its label when it gets SIGTERM; `stubborn` ignores SIGTERM.
        let polite = |label: &str, stage| {
            sh(
                label,
                stage,
                &format!(
                    "trap 'echo {label} >> {log_s}; exit 0' TERM; while :; do sleep 0.05; done"
                ),
                Duration::from_secs(5),
            )
        };
        let stubborn = sh(
            "stubborn",
            Stage::Workers,
            &format!("trap 'echo stubborn >> {log_s}' TERM; while :; do sleep 0.05; done"),
            Duration::from_millis(300),
        );
        let mut sup = Supervisor::new(
            vec![
                polite("scheduler", Stage::Scheduler),
                stubborn,
                polite("api", Stage::Api),
            ],
            fast_policy(),
        );
        sup.start_all();
        // Give the shells time to install their traps.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), sup.run(shutdown))
            .await
            .expect("shutdown should finish")
            .expect("a requested shutdown is not an error");
        let order = std::fs::read_to_string(&log).expect("children wrote the log");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            order.split_whitespace().collect::<Vec<_>>(),
            ["api", "stubborn", "scheduler"]
        );
    }

    #[test]
    fn exit_statuses_read_well() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit code 1");
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
