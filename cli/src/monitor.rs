//! `pinq monitor`: a live terminal view refreshed every second — throughput, latency
//! percentiles, queue depth, in-flight jobs per worker, backend health. It takes over
//! the terminal (raw mode, alternate screen) and gives it back on q, Esc, Ctrl-C, after
//! `--duration`, on error and on panic.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use serde_json::Value;

use crate::UsageError;
use crate::client::Client;
use crate::output::{self, Table};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Keys: q, Esc or Ctrl-C quit.\n\nExample:\n  pinq monitor --duration 60")]
pub struct MonitorArgs {
    /// Quit by itself after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
}

/// Restores the terminal when dropped (normal exit, `?` errors) and from the panic hook.
struct TerminalGuard;

static RESTORED: AtomicBool = AtomicBool::new(true);

fn restore() {
    if RESTORED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut out = std::io::stdout();
    let _ = execute!(out, cursor::Show, terminal::LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<TerminalGuard> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        RESTORED.store(false, Ordering::SeqCst);
        let guard = TerminalGuard;
        terminal::enable_raw_mode().map_err(|e| anyhow::anyhow!("cannot use the terminal: {e}"))?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .map_err(|e| anyhow::anyhow!("cannot use the terminal: {e}"))?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

pub async fn run(client: &Client, args: MonitorArgs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(UsageError(
            "pinq monitor needs a terminal; for scripts use `pinq status --output json`".into(),
        )
        .into());
    }
    // The first fetch happens before the screen is taken, so a wrong URL or token is a
    // plain one-line error.
    let mut stats = client.get("/v1/stats", &[]).await?;
    let quit = Arc::new(AtomicBool::new(false));
    let _guard = TerminalGuard::enter()?;

    // Keys are read on a blocking thread; it polls so it can notice the quit flag.
    let keys_quit = quit.clone();
    let keys = std::thread::spawn(move || {
        while !keys_quit.load(Ordering::SeqCst) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => {
                    if let Ok(Event::Key(k)) = event::read() {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if k.kind != KeyEventKind::Release
                            && (ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc))
                        {
                            keys_quit.store(true, Ordering::SeqCst);
                        }
                    }
                }
                Ok(false) => {}
                Err(_) => keys_quit.store(true, Ordering::SeqCst),
            }
        }
    });

    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs(d));
    let interval = Duration::from_millis(args.interval_ms);
    let mut refresh = 1u64;
    let mut prev: Option<(Instant, i64, i64)> = None;
    let mut error: Option<String> = None;
    let result = loop {
        let now = Instant::now();
        let totals = (
            stats["jobs"]["succeeded"].as_i64().unwrap_or(0),
            stats["jobs"]["failed"].as_i64().unwrap_or(0),
        );
        let rate = prev.map(|(at, s, f)| {
            let dt = now.duration_since(at).as_secs_f64().max(0.001);
            (
                (totals.0 - s).max(0) as f64 / dt,
                (totals.1 - f).max(0) as f64 / dt,
            )
        });
        if error.is_none() {
            prev = Some((now, totals.0, totals.1));
        }
        if let Err(e) = draw(client, &stats, rate, refresh, error.as_deref()) {
            break Err(anyhow::anyhow!("cannot draw on the terminal: {e}"));
        }
        // Sleep until the next refresh, waking early to quit.
        let next = Instant::now() + interval;
        while Instant::now() < next && !quit.load(Ordering::SeqCst) {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                quit.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if quit.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d) {
            break Ok(());
        }
        refresh += 1;
        match client.get("/v1/stats", &[]).await {
            Ok(s) => {
                stats = s;
                error = None;
            }
            // Keep the last picture and say why it is stale; the API may come back.
            Err(e) => error = Some(e.to_string()),
        }
    };
    quit.store(true, Ordering::SeqCst);
    let _ = keys.join();
    drop(_guard);
    result
}

fn draw(
    client: &Client,
    stats: &Value,
    rate: Option<(f64, f64)>,
    refresh: u64,
    error: Option<&str>,
) -> std::io::Result<()> {
    let (cols, rows) = terminal::size().unwrap_or((100, 40));
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "pinq monitor — {} — {} — refresh #{refresh} — q to quit",
        client.base_url(),
        chrono::Local::now().format("%H:%M:%S")
    ));
    if let Some(e) = error {
        lines.push(format!("! stale: {e}"));
    }
    lines.push(String::new());
    let r = &stats["recent"];
    let f = |v: &Value, div: f64| {
        v.as_f64()
            .map(|x| format!("{:.1}", x / div))
            .unwrap_or_else(|| "-".into())
    };
    let (now_ok, now_fail) = rate
        .map(|(a, b)| (format!("{a:.1}"), format!("{b:.1}")))
        .unwrap_or(("-".into(), "-".into()));
    lines.push(format!(
        "throughput   completed/s {now_ok:>8}   failed/s {now_fail:>8}   (10 s avg {} / {}, 60 s avg {} / {})",
        f(&r["succeeded_10s"], 10.0),
        f(&r["failed_10s"], 10.0),
        f(&r["succeeded_60s"], 60.0),
        f(&r["failed_60s"], 60.0),
    ));
    lines.push(format!(
        "latency      p50 {:>8}   p90 {:>8}   p99 {:>8}   max {:>8}   (submit→done, {} jobs in the last 60 s)",
        output::ms_field(&r["latency_p50_ms"]),
        output::ms_field(&r["latency_p90_ms"]),
        output::ms_field(&r["latency_p99_ms"]),
        output::ms_field(&r["latency_max_ms"]),
        output::n(&r["latency_samples"]),
    ));
    let q = &stats["queue"];
    lines.push(format!(
        "queue        {} ready in {} and {}",
        if q["depth"].is_null() {
            "? (broker unreachable)".into()
        } else {
            format!(
                "{} ({} urgent)",
                output::n(&q["depth"]),
                output::n(&q["urgent"]["depth"])
            )
        },
        output::s(&q["name"]),
        output::s(&q["urgent"]["name"])
    ));
    let j = &stats["jobs"];
    lines.push(format!(
        "jobs         queued {}   running {}   retry_wait {}   succeeded {}   failed {}   cancelled {}",
        output::n(&j["queued"]),
        output::n(&j["running"]),
        output::n(&j["retry_wait"]),
        output::n(&j["succeeded"]),
        output::n(&j["failed"]),
        output::n(&j["cancelled"]),
    ));
    lines.push(String::new());
    let w = &stats["workers"];
    if w.is_null() {
        lines.push("workers      (visible to admin tokens only)".into());
    } else {
        let mut t = Table::new(&[
            "WORKER",
            "HOST",
            "PID",
            "STATE",
            "IN FLIGHT",
            "",
            "HEARTBEAT",
        ]);
        for x in w["workers"].as_array().into_iter().flatten() {
            let inflight = x["in_flight"].as_i64().unwrap_or(0);
            let conc = x["concurrency"].as_i64().unwrap_or(0).max(1);
            let filled = ((inflight * 20) / conc).clamp(0, 20) as usize;
            t.row(vec![
                output::clip(&output::s(&x["id"]), 8),
                output::s(&x["host"]),
                output::n(&x["pid"]),
                output::s(&x["state"]),
                format!("{inflight}/{conc}"),
                format!("[{}{}]", "#".repeat(filled), ".".repeat(20 - filled)),
                output::ago(&x["last_heartbeat"]),
            ]);
        }
        lines.extend(t.render().lines().map(str::to_owned));
    }
    lines.push(String::new());
    if let Some(bs) = stats["backends"].as_array() {
        let mut t = Table::new(&[
            "BACKEND",
            "HEALTH",
            "SINCE",
            "LAST PROBE",
            "LATENCY",
            "ERROR",
        ]);
        for b in bs {
            t.row(vec![
                output::s(&b["name"]),
                output::s(&b["status"]),
                output::ago(&b["status_since"]),
                output::ago(&b["last_probe_at"]),
                output::ms_field(&b["last_probe_latency_ms"]),
                output::clip(&output::s(&b["last_probe_error"]), 40),
            ]);
        }
        lines.extend(t.render().lines().map(str::to_owned));
    }

    let mut out = std::io::stdout().lock();
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    for (i, line) in lines.iter().take(rows as usize).enumerate() {
        queue!(out, cursor::MoveTo(0, i as u16))?;
        write!(out, "{}", output::clip(line, cols as usize))?;
    }
    out.flush()
}
