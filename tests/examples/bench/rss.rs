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
