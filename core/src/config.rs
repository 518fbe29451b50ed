//! Typed settings. Each binary flattens the groups it needs into its clap parser, so
//! every setting is a flag and an environment variable (listed in `.env.example`) with a
//! default that works against the local services of a development machine.

use std::net::SocketAddr;
use std::time::Duration;

use crate::retry::RetryPolicy;

/// Where PostgreSQL and RabbitMQ are.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/pinq"
    )]
    pub database_url: String,
    /// Largest number of PostgreSQL connections this process holds.
    #[arg(long, env = "PINQ_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,
    /// RabbitMQ (AMQP 0-9-1) URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Name of the durable priority queue that carries job messages. Messages of the
    /// urgent priorities go to a second queue beside it, named this plus `.urgent`.
    #[arg(long, env = "PINQ_QUEUE", default_value = "pinq.jobs")]
    pub queue: String,
    /// Jobs of this priority and above travel on the urgent queue, which every worker
    /// consumes with a prefetch window of its own, so they never wait behind the
    /// lower-priority messages a busy worker holds. 10 sends every message to the job queue.
    #[arg(long, env = "PINQ_URGENT_PRIORITY", default_value_t = 8, value_parser = clap::value_parser!(u8).range(0..=10))]
    pub urgent_priority: u8,
    /// Most job ids one message carries (jobs of one priority published together share
    /// messages; a worker claims a message's jobs in as few statements as its free slots
    /// allow, and acknowledges it once all are claimed).
    #[arg(long, env = "PINQ_MESSAGE_JOBS", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub message_jobs: u16,
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// `text` for people, `json` for log collectors.
    #[arg(long, env = "PINQ_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The default retry policy for jobs whose batch does not set one.
#[derive(Debug, Clone, clap::Args)]
pub struct RetryArgs {
    /// Attempts in all, the first included.
    #[arg(long, env = "PINQ_RETRY_MAX_ATTEMPTS", default_value_t = 8)]
    pub retry_max_attempts: u32,
    /// Upper bound of the first retry's delay, in milliseconds.
    #[arg(long, env = "PINQ_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Growth of the delay bound per attempt.
    #[arg(long, env = "PINQ_RETRY_FACTOR", default_value_t = 2.0)]
    pub retry_factor: f64,
    /// Cap on the delay, in milliseconds.
    #[arg(long, env = "PINQ_RETRY_MAX_DELAY_MS", default_value_t = 300_000)]
    pub retry_max_delay_ms: u64,
}

impl RetryArgs {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts,
            base: Duration::from_millis(self.retry_base_ms),
            factor: self.retry_factor,
            max_delay: Duration::from_millis(self.retry_max_delay_ms),
        }
    }
}

/// The HTTP API's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Address the HTTP server binds (port 0 picks a free port).
    #[arg(long, env = "PINQ_API_ADDR", default_value = "127.0.0.1:8080")]
    pub api_addr: SocketAddr,
    /// Bootstrap admin token; clients send it as `Authorization: Bearer <token>`.
    #[arg(long, env = "PINQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "PINQ_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most operations in one batch.
    #[arg(long, env = "PINQ_MAX_BATCH_OPS", default_value_t = 10_000)]
    pub max_batch_ops: usize,
    /// Longest a request may take before the server answers 503.
    #[arg(long, env = "PINQ_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// The Pinning Service API's settings.
    #[command(flatten)]
    pub psa: PsaArgs,
}

/// The Pinning Service API (`/pins`): where its pins go and how they run.
#[derive(Debug, Clone, clap::Args)]
pub struct PsaArgs {
    /// Backends every `/pins` request is placed on, by name, comma-separated. Empty: every
    /// backend enabled when the request arrives.
    #[arg(
        long,
        env = "PINQ_PSA_BACKENDS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub psa_backends: Vec<String>,
    /// Priority (0-9) of the jobs behind `/pins` requests.
    #[arg(long, env = "PINQ_PSA_PRIORITY", default_value_t = 5)]
    pub psa_priority: u8,
    /// TCP port of the backends' libp2p swarm, used to build `delegates` multiaddrs
    /// (`/ip4/<backend host>/tcp/<port>/p2p/<peer id>`) when a node reports no address.
    #[arg(long, env = "PINQ_PSA_SWARM_PORT", default_value_t = 4001)]
    pub psa_swarm_port: u16,
    /// Multiaddrs every pin request names as its `delegates`, in place of the addresses
    /// learnt from the backends (say the nodes' public addresses, which a node behind NAT
    /// does not report), comma-separated, each ending in `/p2p/<peer id>`, at most 20.
    /// Empty: the backends' own addresses.
    #[arg(
        long,
        env = "PINQ_PSA_DELEGATES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub psa_delegates: Vec<String>,
}

/// The worker's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Backend calls one worker process runs at once. It may hold a few more jobs claimed
    /// (two of its smallest claims, half of this each), ready to start as calls end.
    #[arg(long, env = "PINQ_WORKER_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Unacknowledged messages the broker may hand this worker (0: twice the messages
    /// needed to fill the concurrency, at least 4). Kept small so that message priority
    /// can still reorder what waits in the broker; a message is acknowledged as soon as
    /// its jobs are claimed, so a small prefetch does not limit concurrency.
    #[arg(long, env = "PINQ_WORKER_PREFETCH", default_value_t = 0)]
    pub prefetch: u16,
    /// Lease a worker holds on a running job; extended while the job runs.
    #[arg(long, env = "PINQ_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,
    /// Timeout for one pin or unpin call to a backend.
    #[arg(long, env = "PINQ_PIN_TIMEOUT_SECS", default_value_t = 300)]
    pub pin_timeout_secs: u64,
    /// Most pins that start together on one backend and share one `pin/add` call of
    /// content the node holds (1: every pin has a call of its own). A shared call that
    /// fails is followed by a call of its own for each pin, whose result is the job's.
    #[arg(long, env = "PINQ_PIN_GROUP", default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub pin_group: usize,
    /// On SIGTERM, how long in-flight jobs may finish before they are handed back.
    #[arg(long, env = "PINQ_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// How often the worker records its heartbeat.
    #[arg(long, env = "PINQ_HEARTBEAT_SECS", default_value_t = 5)]
    pub heartbeat_secs: u64,
}

impl WorkerArgs {
    pub fn effective_prefetch(&self, message_jobs: u16) -> u16 {
        if self.prefetch == 0 {
            let per_message = usize::from(message_jobs.max(1));
            let fill = self.concurrency.max(1).div_ceil(per_message);
            u16::try_from((fill * 2).max(4)).unwrap_or(u16::MAX)
        } else {
            self.prefetch
        }
    }
}

/// The scheduler's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerArgs {
    /// A worker whose last heartbeat is older than this is marked lost, and the leases of
    /// its running jobs are expired so they run again at once.
    #[arg(long, env = "PINQ_WORKER_STALE_SECS", default_value_t = 30)]
    pub worker_stale_secs: u64,
    /// Pause between relay passes that found nothing to do.
    #[arg(long, env = "PINQ_RELAY_INTERVAL_MS", default_value_t = 500)]
    pub relay_interval_ms: u64,
    /// Most jobs the relay publishes in one transaction; also the page of parked jobs its
    /// unblocked scan reads in one pass (plus any others behind the page's last blocker).
    #[arg(long, env = "PINQ_RELAY_BATCH", default_value_t = 1000)]
    pub relay_batch: i64,
    /// How long jobs the API committed are left to its own publish before the relay
    /// publishes them instead (their dispatch-outbox entry is still there).
    #[arg(long, env = "PINQ_RELAY_GRACE_MS", default_value_t = 3000)]
    pub relay_grace_ms: u64,
    /// A job still queued this long after its message was published is published again
    /// (safety net for a message lost in the broker; duplicates are harmless because
    /// claims are fenced). Published dispatch-outbox rows are kept this long.
    #[arg(long, env = "PINQ_REDISPATCH_AFTER_SECS", default_value_t = 1800)]
    pub redispatch_after_secs: u64,
    /// How often the cron loop looks for due firings (and manual runs).
    #[arg(long, env = "PINQ_CRON_TICK_MS", default_value_t = 250)]
    pub cron_tick_ms: u64,
    /// On shutdown, how long running schedule tasks may finish before they are abandoned.
    #[arg(long, env = "PINQ_CRON_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub cron_shutdown_grace_secs: u64,
    /// Timeout of one health probe of a backend (`id`, `version` and `repo/stat` together).
    #[arg(long, env = "PINQ_HEALTH_PROBE_TIMEOUT_MS", default_value_t = 5000)]
    pub health_probe_timeout_ms: u64,
    /// A good probe slower than this marks the backend `degraded`.
    #[arg(long, env = "PINQ_HEALTH_SLOW_MS", default_value_t = 2000)]
    pub health_slow_ms: u64,
    /// Consecutive failed probes after which a backend is `down`.
    #[arg(long, env = "PINQ_HEALTH_DOWN_AFTER", default_value_t = 2)]
    pub health_down_after: u32,
    /// Consecutive good probes after which a `down` or `degraded` backend is `healthy`.
    #[arg(long, env = "PINQ_HEALTH_HEALTHY_AFTER", default_value_t = 2)]
    pub health_healthy_after: u32,
    /// Timeout for streaming one backend's whole `pin/ls` during an index update.
    #[arg(long, env = "PINQ_INDEX_LS_TIMEOUT_SECS", default_value_t = 1800)]
    pub index_ls_timeout_secs: u64,
    /// Finished jobs (succeeded, failed, cancelled) older than this are deleted by `prune`,
    /// with their attempts; batches left without jobs go with them.
    #[arg(long, env = "PINQ_RETAIN_JOBS_DAYS", default_value_t = 30)]
    pub retain_jobs_days: u32,
    /// Schedule runs older than this are deleted by `prune`.
    #[arg(long, env = "PINQ_RETAIN_RUNS_DAYS", default_value_t = 14)]
    pub retain_runs_days: u32,
    /// Backend probe history older than this is deleted by `prune`.
    #[arg(long, env = "PINQ_RETAIN_PROBES_DAYS", default_value_t = 7)]
    pub retain_probes_days: u32,
}
