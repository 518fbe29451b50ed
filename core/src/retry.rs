//! The retry policy: capped exponential backoff with full jitter.
//!
//! The delay before attempt `n + 1` (after `n` failed attempts) is drawn uniformly from
//! `[0, min(max_delay, base * factor^(n-1))]` ("full jitter"), which spreads a herd of
//! jobs that failed together instead of retrying them in lock step. The delay is stored
//! in the job's `run_at`, so a retry survives any process restart.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a job is retried. One per job, resolved from the global default and the batch's
/// overrides at submit time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means "never retry".
    pub max_attempts: u32,
    /// Upper bound of the first retry's delay.
    pub base: Duration,
    /// Growth of the bound per further attempt (>= 1).
    pub factor: f64,
    /// Cap on the bound.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
        }
    }
}

/// Limits on a policy a client may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
pub const MAX_DELAY_LIMIT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    #[error("max_attempts must be from 1 to {MAX_ATTEMPTS_LIMIT}")]
    MaxAttempts,
    #[error("factor must be a number from 1 to 10")]
    Factor,
    #[error(
        "base_ms and max_delay_ms must be at most 86400000 (24 h), with base_ms <= max_delay_ms"
    )]
    Delay,
}

impl RetryPolicy {
    pub fn validate(self) -> Result<Self, RetryPolicyError> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(RetryPolicyError::MaxAttempts);
        }
        if !(self.factor.is_finite() && (1.0..=10.0).contains(&self.factor)) {
            return Err(RetryPolicyError::Factor);
        }
        if self.max_delay > MAX_DELAY_LIMIT || self.base > self.max_delay {
            return Err(RetryPolicyError::Delay);
        }
        Ok(self)
    }

    /// Upper bound of the delay after `failed_attempts` failures (>= 1).
    pub fn ceiling(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(1024) as i32;
        let bound = self.base.as_secs_f64() * self.factor.powi(exp);
        let cap = self.max_delay.as_secs_f64();
        Duration::from_secs_f64(if bound.is_finite() {
            bound.min(cap)
        } else {
            cap
        })
    }

    /// A full-jitter delay after `failed_attempts` failures.
    pub fn delay<R: Rng + ?Sized>(&self, failed_attempts: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(failed_attempts);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(rng.random_range(0.0..=ceiling.as_secs_f64()))
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_millis(1000),
        }
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let p = policy();
        let ms: Vec<u128> = (1..=6).map(|n| p.ceiling(n).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        // Absurd attempt counts neither overflow nor exceed the cap.
        assert_eq!(p.ceiling(u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn jitter_stays_within_zero_and_ceiling_and_spreads() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for n in 1..=8 {
            let ceiling = p.ceiling(n);
            let draws: Vec<Duration> = (0..2000).map(|_| p.delay(n, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling));
            let min = draws.iter().min().unwrap();
            let max = draws.iter().max().unwrap();
            // Full jitter covers the whole range, not a narrow band near the ceiling.
            assert!(
                min.as_secs_f64() < ceiling.as_secs_f64() * 0.05,
                "n={n} min={min:?}"
            );
            assert!(
                max.as_secs_f64() > ceiling.as_secs_f64() * 0.95,
                "n={n} max={max:?}"
            );
        }
    }

    #[test]
    fn attempts_budget() {
        let p = policy();
        assert!(p.allows_another(4));
        assert!(!p.allows_another(5));
    }

    #[test]
    fn validation() {
        assert!(policy().validate().is_ok());
        let mut p = policy();
        p.max_attempts = 0;
        assert_eq!(p.validate(), Err(RetryPolicyError::MaxAttempts));
        let mut p = policy();
        p.factor = 0.5;
        assert_eq!(p.validate(), Err(RetryPolicyError::Factor));
        let mut p = policy();
        p.base = Duration::from_secs(5);
        assert_eq!(p.validate(), Err(RetryPolicyError::Delay));
        let mut p = policy();
        p.factor = f64::NAN;
        assert_eq!(p.validate(), Err(RetryPolicyError::Factor));
    }
}
