//! Resident memory of the stack's processes, read from `/proc/<pid>/status`: `VmRSS`
//! sampled while a scenario runs, and the kernel's own peak (`VmHWM`) at its end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// One field of `/proc/<pid>/status`, in KiB (0 if the process is gone).
pub fn status_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples the `VmRSS` of labelled processes every 100 ms until stopped.
pub struct RssWatch {
    procs: Vec<(String, i32)>,
    max_rss: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    pub fn start(procs: Vec<(String, i32)>) -> RssWatch {
        let max_rss = Arc::new(Mutex::new(BTreeMap::new()));
        let (p, m) = (procs.clone(), max_rss.clone());
        let task = tokio::spawn(async move {
            // Bounded by the scenario: the task is aborted when the watch ends.
            loop {
                for (label, pid) in &p {
                    let rss = status_kib(*pid, "VmRSS:");
                    if let Ok(mut m) = m.lock() {
                        let e = m.entry(label.clone()).or_insert(0);
                        *e = (*e).max(rss);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssWatch {
            procs,
            max_rss,
            task,
        }
    }

    /// Peak memory per process: `VmHWM` now, in MiB.
    pub fn peak_mib(&self, label: &str) -> f64 {
        self.procs
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, pid)| mib(status_kib(*pid, "VmHWM:")))
            .unwrap_or(0.0)
    }

    /// Stops sampling; returns `{label: {"vmhwm_mib", "sampled_max_rss_mib"}}`. Call it
    /// before the processes stop.
    pub fn finish(self) -> Value {
        self.task.abort();
        let sampled = self.max_rss.lock().map(|m| m.clone()).unwrap_or_default();
        let mut out = serde_json::Map::new();
        for (label, pid) in &self.procs {
            let hwm = status_kib(*pid, "VmHWM:");
            out.insert(
                label.clone(),
                json!({
                    "vmhwm_mib": (mib(hwm) * 10.0).round() / 10.0,
                    "sampled_max_rss_mib": (mib(sampled.get(label).copied().unwrap_or(0)) * 10.0).round() / 10.0,
                }),
            );
        }
        Value::Object(out)
    }
}

/// CPU time, in seconds, used so far by one process (all its threads), by the programs
/// that share the machine with it (every live process, grouped by program), and by the
/// whole machine (every core's busy time), read from `/proc`. The difference of two
/// readings tells who used the CPU during a phase. A process that exits between the two
/// readings (a PostgreSQL backend, say) takes its time with it, so the groups may add up
/// to a little less than the machine.
#[derive(Debug, Clone)]
pub struct CpuMark {
    pub process_s: f64,
    pub programs: BTreeMap<&'static str, f64>,
    pub machine_busy_s: f64,
}

// Linux reports CPU time in clock ticks of USER_HZ, which is 100 on every platform Rust's
// std targets.
const TICK: f64 = 0.01;

/// Seconds rounded to 10 ms.
fn round_cs(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The CPU (user and system) one process has used so far, in seconds; NaN once it is
/// gone.
pub fn process_cpu_s(pid: i32) -> f64 {
    proc_cpu(pid).map_or(f64::NAN, |(_, s)| s)
}

/// `(command name, utime + stime in seconds)` of one process.
fn proc_cpu(pid: i32) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name sits in parentheses and may hold spaces; the fields follow it.
    let (head, rest) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) * TICK))
}

/// The program group a process belongs to, by its command name.
fn program_of(comm: &str, pid: i32) -> &'static str {
    if pid == std::process::id() as i32 {
        "bench"
    } else if comm.starts_with("pinq-") {
        "pinq"
    } else if comm == "postgres" {
        "postgres"
    } else if comm == "beam.smp"
        || comm.starts_with("erl_")
        || comm == "epmd"
        || comm == "inet_gethost"
    {
        "rabbitmq"
    } else if comm.starts_with("kworker") {
        // The kernel's worker threads (writeback of files among their work).
        "kernel_workers"
    } else {
        "other"
    }
}

impl CpuMark {
    pub fn read(pid: i32) -> CpuMark {
        let process = process_cpu_s(pid);
        let mut programs = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(p) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                if p == pid {
                    continue;
                }
                if let Some((comm, secs)) = proc_cpu(p) {
                    *programs.entry(program_of(&comm, p)).or_insert(0.0) += secs;
                }
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?;
                let v: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
                Some(busy * TICK)
            })
            .unwrap_or(f64::NAN);
        CpuMark {
            process_s: process,
            programs,
            machine_busy_s: machine,
        }
    }

    /// What each program used between `self` and `later`, in seconds rounded to 10 ms:
    /// `pinq`'s processes, `postgres`, `rabbitmq`, `kernel_workers`, the `bench` itself
    /// and `other` (a process that started after `self` counts from zero).
    pub fn by_program(&self, later: &CpuMark) -> serde_json::Value {
        let by_program: serde_json::Map<String, serde_json::Value> = later
            .programs
            .iter()
            .map(|(k, v)| {
                let before = self.programs.get(k).copied().unwrap_or(0.0);
                (k.to_string(), json!(round_cs(v - before).max(0.0)))
            })
            .collect();
        serde_json::Value::Object(by_program)
    }

    /// What was used between `self` and `later`, rounded to 10 ms, as JSON: the node, the
    /// machine, everything but the node, and that split by program ([`CpuMark::by_program`]).
    pub fn until(&self, later: &CpuMark) -> serde_json::Value {
        let r = round_cs;
        serde_json::json!({
            "node_cpu_s": r(later.process_s - self.process_s),
            "machine_busy_cpu_s": r(later.machine_busy_s - self.machine_busy_s),
            "others_cpu_s": r((later.machine_busy_s - self.machine_busy_s)
                - (later.process_s - self.process_s)),
            "others_by_program_cpu_s": self.by_program(later),
        })
    }
}
