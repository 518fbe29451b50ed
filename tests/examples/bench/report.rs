//! The benchmark's figures: metrics with their targets, the table people read, the JSON
//! machines read, and what the machine looked like while it ran.

use serde_json::{Value, json};

/// Which way a target points.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(&self, v: f64) -> bool {
        match *self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }

    fn text(&self, unit: &str) -> String {
        match *self {
            Target::AtLeast(t) => format!(">= {} {unit}", num(t)),
            Target::AtMost(t) => format!("<= {} {unit}", num(t)),
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Metric {
    pub scenario: String,
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<Target>,
    /// Set when the figure could not be measured as intended (e.g. a run timed out).
    pub note: Option<String>,
}

impl Metric {
    pub fn new(scenario: &str, name: &str, value: f64, unit: &'static str) -> Metric {
        Metric {
            scenario: scenario.to_owned(),
            name: name.to_owned(),
            value,
            unit,
            target: None,
            note: None,
        }
    }

    pub fn at_least(mut self, t: f64) -> Metric {
        self.target = Some(Target::AtLeast(t));
        self
    }

    pub fn at_most(mut self, t: f64) -> Metric {
        self.target = Some(Target::AtMost(t));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Metric {
        self.note = Some(note.into());
        self
    }

    fn verdict(&self) -> &'static str {
        match self.target {
            None => "",
            Some(_) if self.note.is_some() => "MISS",
            Some(t) if t.met(self.value) => "pass",
            Some(_) => "MISS",
        }
    }

    pub fn to_json(&self) -> Value {
        let (op, target) = match self.target {
            Some(Target::AtLeast(t)) => (Some(">="), Some(t)),
            Some(Target::AtMost(t)) => (Some("<="), Some(t)),
            None => (None, None),
        };
        json!({
            "scenario": self.scenario,
            "metric": self.name,
            "value": round3(self.value),
            "unit": self.unit,
            "target_op": op,
            "target": target,
            "pass": self.target.map(|_| self.verdict() == "pass"),
            "note": self.note,
        })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A number for people: thousands separated, at most one decimal.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let decimals = if v.abs() >= 100.0 || v.fract() == 0.0 {
        0
    } else {
        1
    };
    let s = format!("{:.*}", decimals, v.abs());
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// Prints the metrics as an aligned table.
pub fn print_table(metrics: &[Metric]) {
    let rows: Vec<[String; 5]> = metrics
        .iter()
        .map(|m| {
            [
                m.scenario.clone(),
                m.name.clone(),
                format!("{} {}", num(m.value), m.unit),
                m.target.map(|t| t.text(m.unit)).unwrap_or_default(),
                match &m.note {
                    Some(n) => format!("{} ({n})", m.verdict()).trim().to_owned(),
                    None => m.verdict().to_owned(),
                },
            ]
        })
        .collect();
    let head = ["scenario", "metric", "measured", "target", "pass/miss"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i == 2 {
                s.push_str(&format!("{c:>w$}  "));
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head);
    line(width.map(|w| "-".repeat(w)).each_ref().map(String::as_str));
    for r in &rows {
        line(r.each_ref().map(String::as_str));
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The 1-, 5- and 15-minute load averages: other work on the machine skews the figures.
pub fn loadavg() -> Value {
    let text = read("/proc/loadavg");
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(v)
}

/// What the figures were measured on.
pub fn machine(pg_version: &str) -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_mib": mem_kib / 1024,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "postgres": pg_version,
        "git_commit": git(&["rev-parse", "--short", "HEAD"]),
        "git_uncommitted_files": git(&["status", "--porcelain"]).lines().count(),
        "loadavg_at_start": loadavg(),
    })
}
