//! Printing: aligned plain-text tables for people, pretty JSON for scripts, and the small
//! formatters (ages, durations, rates) the tables use.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// A table printed with columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(width[i] - c.chars().count() + 2));
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = line(&self.header);
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A string field, or "-" when absent.
pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) if x.is_empty() => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// A number field as an integer string, or "-".
pub fn n(v: &Value) -> String {
    match v {
        Value::Number(x) => x.to_string(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// "3s ago", "5m ago", … for a timestamp field; "-" if absent.
pub fn ago(v: &Value) -> String {
    match parse_time(v) {
        None => "-".into(),
        Some(t) => {
            let secs = (Utc::now() - t).num_seconds();
            if secs < 0 {
                format!("in {}", human_secs(-secs))
            } else {
                format!("{} ago", human_secs(secs))
            }
        }
    }
}

pub fn human_secs(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Milliseconds as "850ms", "1.2s", "3m04s".
pub fn ms(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else if ms < 60_000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0).round() as i64;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A latency field in milliseconds, or "-".
pub fn ms_field(v: &Value) -> String {
    v.as_f64().map(ms).unwrap_or_else(|| "-".into())
}

/// The time between two timestamp fields, or "-".
pub fn between(from: &Value, to: &Value) -> String {
    match (parse_time(from), parse_time(to)) {
        (Some(a), Some(b)) => ms((b - a).num_milliseconds() as f64),
        _ => "-".into(),
    }
}

/// Cuts a string to `max` characters with an ellipsis.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!(
            "{}…",
            s.chars().take(max.saturating_sub(1)).collect::<String>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_trim_line_ends() {
        let mut t = Table::new(&["ID", "STATE"]);
        t.row(vec!["a".into(), "queued".into()]);
        t.row(vec!["long-id".into(), "".into()]);
        assert_eq!(t.render(), "ID       STATE\na        queued\nlong-id");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(ms(12.4), "12ms");
        assert_eq!(ms(1520.0), "1.5s");
        assert_eq!(ms(184_000.0), "3m04s");
        assert_eq!(human_secs(90), "90s");
        assert_eq!(human_secs(3600), "60m");
    }
}
