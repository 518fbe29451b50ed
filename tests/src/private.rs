//! Private PostgreSQL and RabbitMQ instances for fault tests.
//!
//! Tests that stop or restart a service must never touch the machine's shared PostgreSQL
//! (5432) and RabbitMQ (5672): other tests run against them in parallel. This module owns
//! throwaway instances instead: [`PrivatePostgres`] (its own `initdb` cluster, data dir,
//! socket dir and port) and [`PrivateRabbit`] (its own node name, AMQP and distribution
//! ports, data, logs and an empty plugin list). Each can be stopped and started again on
//! the same port with its data kept, to simulate an outage. Dropping one kills it and
//! removes its folders.
//!
//! The tests run as root, but PostgreSQL refuses to run as root and RabbitMQ's files and
//! Erlang cookie belong to its own user, so every server command runs as `postgres` or
//! `rabbitmq` through `runuser`.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use uuid::Uuid;

/// Ports a private instance must never take: the shared services' ports, plus the range
/// RabbitMQ's CLI tools bind for their own distribution listener (35672..=35682 by
/// default), which any `rabbitmqctl` on the machine may hold for a moment.
fn reserved_port(port: u16) -> bool {
    matches!(port, 4369 | 5432 | 5672 | 15672 | 25672 | 35672..=35682)
}

/// `n` distinct ports nobody listens on right now. The listeners are held until all are
/// picked so the same port is not handed out twice; there is still a small window between
/// dropping them and the server binding, which is acceptable for tests.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut attempts = 0;
    while ports.len() < n {
        attempts += 1;
        if attempts > 100 {
            bail!("could not find {n} free TCP ports on 127.0.0.1");
        }
        let listener = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("reading a bound port")?
            .port();
        if !reserved_port(port) {
            ports.push(port);
        }
        held.push(listener);
    }
    Ok(ports)
}

/// A fresh, uniquely named folder under the temp dir.
fn scratch_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let short = Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("pinq-e2e-{tag}-{}", &short[..12]));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Hands a folder (recursively) to a service user: the servers drop privileges and must
/// own their data.
async fn chown_to(dir: &Path, user: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("chown");
    cmd.arg("-R").arg(format!("{user}:{user}")).arg(dir);
    run(cmd, Duration::from_secs(30), "chown").await?;
    Ok(())
}

/// The last `lines` lines of a file (reads at most the last 64 KiB), for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return format!("({} does not exist)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return format!("(could not read {})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    )
}

/// Runs a command to completion with a deadline; a non-zero exit is an error carrying the
/// command's output. The child is killed if the deadline passes.
async fn run(mut cmd: Command, timeout: Duration, what: &str) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: could not spawn"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{what}: no answer within {timeout:?}"))?
        .with_context(|| format!("{what}: waiting for it"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", describe(&output));
    }
    Ok(output)
}

/// Runs a command that launches a daemon. Its stdout/stderr go to `out_file`, not pipes:
/// a daemon that inherited a pipe would keep it open and the wait would never end.
async fn run_launcher(
    mut cmd: Command,
    out_file: &Path,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let out =
        fs::File::create(out_file).with_context(|| format!("creating {}", out_file.display()))?;
    let err = out.try_clone().context("duplicating a file handle")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{what}: could not spawn"))?;
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .map_err(|_| anyhow!("{what}: no answer within {timeout:?}"))?
        .with_context(|| format!("{what}: waiting for it"))?;
    if !status.success() {
        bail!("{what} failed: {status}\n{}", tail(out_file, 40));
    }
    Ok(())
}

/// The blocking twin of [`run`] for `Drop`, where nothing can be awaited. Output is
/// discarded; only whether it succeeded in time matters.
fn run_sync(mut cmd: StdCommand, timeout: Duration) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Whether a process is alive. A zombie counts as dead: daemons are reparented and, in a
/// container whose init does not reap, may linger as zombies after they exited.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGKILLs a process and waits (bounded) until it is gone, so its folders can be removed.
fn kill_and_wait(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Runs `program` as `user`. `runuser` without `--login` keeps the environment (the
/// RabbitMQ variables must reach the server) and sets HOME to the user's home.
fn as_user(user: &str, program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.arg("-u").arg(user).arg("--").arg(program);
    cmd
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// The newest installed PostgreSQL's binaries (`/usr/lib/postgresql/<major>/bin`).
fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let entries = fs::read_dir(root).with_context(|| {
        format!(
            "PostgreSQL server binaries not found: cannot read {}",
            root.display()
        )
    })?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or_else(|| anyhow!("no {}/<version>/bin/initdb found", root.display()))
}

/// A PostgreSQL cluster of its own: trust auth for user `postgres`, listening on
/// 127.0.0.1 at a free port, its socket in its own folder, `fsync` off (tests need speed,
/// not durability across machine crashes; a clean or fast stop still keeps all data).
pub struct PrivatePostgres {
    port: u16,
    bin: PathBuf,
    /// Owned by `postgres`; holds `data/`, the socket and `server.log`.
    base: PathBuf,
    running: bool,
}

impl PrivatePostgres {
    const USER: &'static str = "postgres";

    /// Creates and starts a fresh cluster.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = pg_bin_dir()?;
        let port = free_ports(1)?[0];
        let base = scratch_dir("pg")?;
        // Built before anything else can fail, so Drop removes the folder on every error.
        let mut pg = PrivatePostgres {
            port,
            bin,
            base,
            running: false,
        };
        chown_to(&pg.base, Self::USER).await?;
        let mut initdb = as_user(Self::USER, &pg.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(pg.data_dir())
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .current_dir(&pg.base);
        run(initdb, Duration::from_secs(120), "initdb").await?;
        pg.start_again().await?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.base.join("server.log")
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = as_user(Self::USER, &self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.data_dir()).current_dir(&self.base);
        cmd
    }

    /// A connection URL for database `db` (`postgres` always exists).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server is (believed to be) running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The end of the server's log, for diagnostics.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file(), lines)
    }

    /// Stops the server (fast shutdown: clients are disconnected, data is kept): an outage.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.args(["stop", "-m", "fast", "-w", "-t", "30"]);
        run(cmd, Duration::from_secs(45), "pg_ctl stop")
            .await
            .with_context(|| format!("server log:\n{}", self.log_tail(30)))?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same port with the same data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let base = self.base.to_string_lossy();
        // The socket goes into our own folder: /var/run/postgresql belongs to the shared
        // server, and the socket dir must be writable by `postgres`.
        let options = format!(
            "-p {} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let mut cmd = self.pg_ctl();
        cmd.arg("-o")
            .arg(options)
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "start"]);
        // pg_ctl points the server's output at the log file, but it is still a launcher.
        let out = self.base.join("pg_ctl.out");
        if let Err(e) = run_launcher(cmd, &out, Duration::from_secs(75), "pg_ctl start").await {
            return Err(e.context(format!("server log:\n{}", self.log_tail(30))));
        }
        self.running = true;
        Ok(())
    }

    /// Stops and starts again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// The postmaster's pid, from `postmaster.pid`'s first line.
    fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running || self.data_dir().join("postmaster.pid").exists() {
            // Immediate: the data is about to be deleted, so a clean shutdown buys nothing.
            let mut cmd = StdCommand::new("runuser");
            cmd.arg("-u")
                .arg(Self::USER)
                .arg("--")
                .arg(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["stop", "-m", "immediate", "-w", "-t", "10"])
                .current_dir(&self.base);
            if !run_sync(cmd, Duration::from_secs(15))
                && let Some(pid) = self.postmaster_pid()
            {
                kill_and_wait(pid);
            }
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}

// ---------------------------------------------------------------------------------------
// RabbitMQ

/// A RabbitMQ program: the real script under /usr/lib/rabbitmq/bin when present (the
/// /usr/sbin wrapper would `su` again and re-quote its arguments), else the one on PATH.
fn rabbit_program(name: &str) -> PathBuf {
    let real = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if real.is_file() {
        real
    } else {
        PathBuf::from(name)
    }
}

/// A RabbitMQ node of its own: a unique node name, AMQP on 127.0.0.1 at a free port, its
/// distribution listener on another free port (epmd on 4369 is shared, which is fine),
/// its own data, logs, feature-flag file, an empty config (so the system config's
/// listeners are not used) and an empty plugin list (so no management listener).
///
/// Every `rabbitmq*` command runs as the `rabbitmq` user, whose HOME holds the Erlang
/// cookie: the server and `rabbitmqctl` thus share one cookie, and root's HOME is never
/// given a new cookie file.
pub struct PrivateRabbit {
    node: String,
    port: u16,
    dist_port: u16,
    /// Owned by `rabbitmq`; holds everything the node writes.
    base: PathBuf,
    running: bool,
}

impl PrivateRabbit {
    const USER: &'static str = "rabbitmq";

    /// Creates and starts a fresh node; returns once a real AMQP connection succeeded.
    pub async fn start() -> anyhow::Result<Self> {
        let ports = free_ports(2)?;
        let short = Uuid::new_v4().simple().to_string();
        let base = scratch_dir("rabbit")?;
        // Built before anything else can fail, so Drop removes the folder on every error.
        let mut rabbit = PrivateRabbit {
            node: format!("pinq-e2e-{}@localhost", &short[..8]),
            port: ports[0],
            dist_port: ports[1],
            base,
            running: false,
        };
        for dir in ["mnesia", "log"] {
            let path = rabbit.base.join(dir);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let write = |name: &str, text: &str| -> anyhow::Result<()> {
            let path = rabbit.base.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("enabled_plugins", "[].\n")?;
        write("rabbitmq.conf", "")?;
        write("rabbitmq-env.conf", "")?;
        chown_to(&rabbit.base, Self::USER).await?;
        rabbit.start_again().await?;
        Ok(rabbit)
    }

    /// The connection URL (`guest` may log in from loopback only, which this is).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name (for `rabbitmqctl -n`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the node is (believed to be) running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    fn log_file(&self) -> PathBuf {
        self.base.join("log").join(format!("{}.log", self.node))
    }

    /// The end of the node's log, for diagnostics.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file(), lines)
    }

    /// The environment that makes the node private. Given to the server and to every
    /// `rabbitmqctl` call alike.
    fn env(&self) -> Vec<(String, String)> {
        let path = |name: &str| self.base.join(name).to_string_lossy().into_owned();
        vec![
            ("RABBITMQ_NODENAME".into(), self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), self.port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_FEATURE_FLAGS_FILE".into(), path("feature_flags")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_PID_FILE".into(), path("rabbit.pid")),
            // Empty files of our own instead of /etc/rabbitmq's: the system config sets
            // the 5672 listener and its env file sets NODENAME=rabbit@localhost.
            ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE".into(), path("rabbitmq-env.conf")),
            // Does not exist, which RabbitMQ accepts: no advanced config.
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE".into(),
                path("advanced.config"),
            ),
            // What the system env file does for the shared node: keep epmd (should this
            // node be the one to start it) and the distribution listener on loopback.
            ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            // A crash dump lands in our folder, not in /var/lib/rabbitmq or the cwd.
            ("ERL_CRASH_DUMP".into(), path("erl_crash.dump")),
        ]
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = as_user(Self::USER, &rabbit_program(program));
        // Never let the test process's own RabbitMQ settings (say RABBITMQ_USE_LONGNAME)
        // leak into the private node.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RABBITMQ_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env()).current_dir(&self.base);
        cmd
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("rabbitmqctl");
        cmd.arg("-n").arg(&self.node).args(args);
        cmd
    }

    /// Stops the node gracefully (`rabbitmqctl shutdown` waits until its OS process is
    /// gone). Durable queues and persistent messages are kept: an outage.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let cmd = self.ctl(&["shutdown"]);
        run(cmd, Duration::from_secs(60), "rabbitmqctl shutdown")
            .await
            .with_context(|| format!("node log:\n{}", self.log_tail(30)))?;
        self.running = false;
        Ok(())
    }

    /// Starts the node again with the same name, ports and data; returns once a real AMQP
    /// connection succeeded.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let dump = self.base.join("erl_crash.dump");
        let _ = fs::remove_file(&dump);
        let mut server = self.command("rabbitmq-server");
        server.arg("-detached");
        let out = self.base.join("server.out");
        run_launcher(
            server,
            &out,
            Duration::from_secs(30),
            "rabbitmq-server -detached",
        )
        .await?;
        // From here on a node may be running, even if it never gets ready.
        self.running = true;
        if let Err(e) = self.wait_ready(&dump).await {
            return Err(e.context(format!(
                "node {} did not come up; launcher output:\n{}\nnode log:\n{}",
                self.node,
                tail(&out, 20),
                self.log_tail(40)
            )));
        }
        Ok(())
    }

    /// Waits for the AMQP port, then for the boot to finish, then for a real AMQP login.
    async fn wait_ready(&self, dump: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        // `-detached` returns at once; a node that fails to boot only leaves a crash dump.
        while !port_open(self.port).await {
            if dump.exists() {
                bail!("the node crashed while booting (see {})", dump.display());
            }
            if Instant::now() > deadline {
                bail!("AMQP port {} not open within 90 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cmd = self.ctl(&["await_startup", "--timeout", "60"]);
        run(cmd, Duration::from_secs(75), "rabbitmqctl await_startup").await?;
        let url = self.amqp_url();
        loop {
            match pinq_core::amqp::connect(&url, "pinq-e2e-probe").await {
                Ok(conn) => {
                    let _ = conn.close(200, "probe done".into()).await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow!(e).context("AMQP login to the private node"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The node's Erlang VMs: `beam.smp` processes with our node name in their
    /// environment (RabbitMQ writes no pid file when started with `-detached`). Found
    /// afresh each time, so a stale, reused pid is never killed. Our own `rabbitmqctl`
    /// VMs match too, which is harmless: none outlives the call that started it.
    fn node_pids(&self) -> Vec<i32> {
        let needle = format!("RABBITMQ_NODENAME={}\0", self.node);
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() != "beam.smp" {
                    return false;
                }
                let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                String::from_utf8_lossy(&environ).contains(&needle)
            })
            .collect()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // A hard kill: the data is about to be deleted, and a graceful shutdown takes
        // seconds that Drop would spend blocking a runtime thread.
        if self.running {
            for pid in self.node_pids() {
                kill_and_wait(pid);
            }
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}
