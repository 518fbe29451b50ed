//! Domain types shared by every process: operations, job states, priorities, backends.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a job does on its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Pin,
    Unpin,
    /// Pin `cid`, then unpin `replaces_cid`: the new DAG is held before the old one is
    /// released, so nothing shared between them can be garbage-collected in between.
    Replace,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Pin, Op::Unpin, Op::Replace];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Pin => "pin",
            Op::Unpin => "unpin",
            Op::Replace => "replace",
        }
    }
}

impl FromStr for Op {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| UnknownVariant(s.to_owned()))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no variant of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value '{0}'")]
pub struct UnknownVariant(pub String);

/// The job state machine (see ARCHITECTURE.md):
/// `queued → running → succeeded | retry_wait (→ queued) | failed`, and
/// `queued | retry_wait → cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::RetryWait,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::RetryWait => "retry_wait",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A terminal state changes only by an explicit re-drive (retry of a failed job).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl FromStr for JobState {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownVariant(s.to_owned()))
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Job priority, 0 (lowest) to 9 (highest). Maps one to one onto AMQP message priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Priority(u8);

impl Priority {
    pub const MAX: u8 = 9;
    pub const DEFAULT: Priority = Priority(5);

    pub fn new(p: i64) -> Result<Self, PriorityError> {
        u8::try_from(p)
            .ok()
            .filter(|p| *p <= Self::MAX)
            .map(Priority)
            .ok_or(PriorityError(p))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority must be an integer from 0 to 9, got {0}")]
pub struct PriorityError(pub i64);

/// The protocol a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Kubo's RPC API (`/api/v0`), also served by js-ipfs.
    Kubo,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Kubo => "kubo",
        }
    }
}

impl FromStr for BackendKind {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kubo" => Ok(BackendKind::Kubo),
            other => Err(UnknownVariant(other.to_owned())),
        }
    }
}

/// A backend name: 1–63 characters of letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit (the same rule the `backends` table enforces).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct BackendName(String);

impl BackendName {
    pub fn parse(s: &str) -> Result<Self, BackendNameError> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = s.len() <= 63
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if first_ok && rest_ok {
            Ok(BackendName(s.to_owned()))
        } else {
            Err(BackendNameError(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "backend name '{0}' is invalid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
)]
pub struct BackendNameError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_bounds() {
        assert_eq!(Priority::new(0).unwrap().get(), 0);
        assert_eq!(Priority::new(9).unwrap().get(), 9);
        assert_eq!(Priority::new(10), Err(PriorityError(10)));
        assert_eq!(Priority::new(-1), Err(PriorityError(-1)));
        assert_eq!(Priority::default().get(), 5);
    }

    #[test]
    fn states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
        }
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Failed.is_terminal());
        assert!(!JobState::RetryWait.is_terminal());
    }

    #[test]
    fn ops_round_trip() {
        for op in Op::ALL {
            assert_eq!(op.as_str().parse::<Op>().unwrap(), op);
        }
        assert_eq!("pinn".parse::<Op>(), Err(UnknownVariant("pinn".into())));
    }

    #[test]
    fn backend_names() {
        assert!(BackendName::parse("local").is_ok());
        assert!(BackendName::parse("eu-1.kubo_a").is_ok());
        assert!(BackendName::parse("").is_err());
        assert!(BackendName::parse("-x").is_err());
        assert!(BackendName::parse("a b").is_err());
        assert!(BackendName::parse(&"a".repeat(64)).is_err());
    }
}
