//! When to restart a child that exited on its own, and when to stop trying.
//!
//! Pure bookkeeping over timestamps, so the policy is tested without processes or clocks:
//! the supervisor feeds it each child's start and exit instants and acts on the answer.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The knobs of the restart policy. [`Default`] is what `pinq up` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart.
    pub initial_delay: Duration,
    /// Cap on the delay, which doubles with each restart in a row.
    pub max_delay: Duration,
    /// A child that stayed up this long was healthy: its next restart waits
    /// `initial_delay` again.
    pub healthy_after: Duration,
    /// Window in which crashes are counted.
    pub crash_window: Duration,
    /// This many crashes within `crash_window` means a restart will not help.
    pub max_crashes: usize,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            crash_window: Duration::from_secs(60),
            max_crashes: 5,
        }
    }
}

/// What to do about a child that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this delay.
    RestartAfter(Duration),
    /// It keeps crashing: stop everything.
    GiveUp,
}

/// The restart history of one child.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    next_delay: Duration,
    /// Exit instants within the crash window, oldest first.
    recent: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker {
            next_delay: policy.initial_delay,
            policy,
            recent: VecDeque::with_capacity(policy.max_crashes),
        }
    }

    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Records that the child started at `started` exited at `exited` and decides what
    /// to do about it.
    pub fn on_exit(&mut self, started: Instant, exited: Instant) -> Decision {
        if exited.saturating_duration_since(started) >= self.policy.healthy_after {
            self.next_delay = self.policy.initial_delay;
        }
        self.recent.push_back(exited);
        while let Some(&oldest) = self.recent.front() {
            if exited.saturating_duration_since(oldest) > self.policy.crash_window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= self.policy.max_crashes {
            return Decision::GiveUp;
        }
        let delay = self.next_delay;
        self.next_delay = delay.saturating_mul(2).min(self.policy.max_delay);
        Decision::RestartAfter(delay)
    }

    /// Crashes counted in the window ending at the last exit.
    pub fn recent_crashes(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Feeds the tracker a child that crashes `uptime` after each (re)start, restarted
    /// when the tracker says, and returns the decisions.
    fn run(tracker: &mut RestartTracker, t0: Instant, uptime: Duration, n: usize) -> Vec<Decision> {
        let mut started = t0;
        let mut out = Vec::new();
        for _ in 0..n {
            let exited = started + uptime;
            let d = tracker.on_exit(started, exited);
            out.push(d);
            match d {
                Decision::RestartAfter(delay) => started = exited + delay,
                Decision::GiveUp => break,
            }
        }
        out
    }

    #[test]
    fn immediate_crashes_back_off_then_give_up_at_the_fifth() {
        let mut t = RestartTracker::new(RestartPolicy::default());
        let got = run(&mut t, Instant::now(), Duration::ZERO, 10);
        assert_eq!(
            got,
            [
                Decision::RestartAfter(secs(1)),
                Decision::RestartAfter(secs(2)),
                Decision::RestartAfter(secs(4)),
                Decision::RestartAfter(secs(8)),
                Decision::GiveUp,
            ]
        );
        assert_eq!(t.recent_crashes(), 5);
    }

    #[test]
    fn delay_doubles_up_to_the_cap_when_crashes_are_spread_out() {
        let mut t = RestartTracker::new(RestartPolicy::default());
        // 25 s of uptime: never healthy long enough to reset, never 5 crashes in 60 s.
        let got = run(&mut t, Instant::now(), secs(25), 8);
        let delays: Vec<_> = got
            .iter()
            .map(|d| match d {
                Decision::RestartAfter(d) => d.as_secs(),
                Decision::GiveUp => 0,
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_child_up_for_a_minute_starts_over_at_one_second() {
        let mut t = RestartTracker::new(RestartPolicy::default());
        let t0 = Instant::now();
        assert_eq!(t.on_exit(t0, t0 + secs(1)), Decision::RestartAfter(secs(1)));
        assert_eq!(
            t.on_exit(t0 + secs(2), t0 + secs(3)),
            Decision::RestartAfter(secs(2))
        );
        // Restarted at 5 s, up for 60 s.
        assert_eq!(
            t.on_exit(t0 + secs(5), t0 + secs(65)),
            Decision::RestartAfter(secs(1))
        );
        assert_eq!(
            t.on_exit(t0 + secs(66), t0 + secs(67)),
            Decision::RestartAfter(secs(2))
        );
    }

    #[test]
    fn crashes_older_than_the_window_do_not_count() {
        let mut t = RestartTracker::new(RestartPolicy::default());
        let t0 = Instant::now();
        for at in [0, 10, 20, 30] {
            let d = t.on_exit(t0 + secs(at), t0 + secs(at));
            assert!(
                matches!(d, Decision::RestartAfter(_)),
                "crash at {at}s: {d:?}"
            );
        }
        // The crash at 0 s is more than 60 s before this one: four in the window.
        let d = t.on_exit(t0 + secs(61), t0 + secs(61));
        assert!(matches!(d, Decision::RestartAfter(_)), "{d:?}");
        assert_eq!(t.recent_crashes(), 4);
        // A fifth within 60 s of the crash at 10 s.
        assert_eq!(t.on_exit(t0 + secs(62), t0 + secs(62)), Decision::GiveUp);
    }
}
