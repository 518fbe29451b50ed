//! A worker's backend calls, handed to the jobs that wait for one highest priority first.
//!
//! A worker claims jobs a little ahead of its free calls (the claim headroom), so a
//! saturated worker holds up to its concurrency in claimed jobs waiting for a call. A tokio
//! semaphore serves them in arrival order: a priority-9 job claimed behind them would wait
//! for a whole round of backend calls, seconds with slow pins. Here a call that ends goes to
//! the waiting job of the highest priority (the earliest among equals), so that job starts
//! as soon as one call ends.
//!
//! One lock guards the count of free calls and the waiters; a call is handed to its waiter
//! through a one-shot channel, outside the lock, and a waiter that has gone (its job was
//! cancelled, or its lease lost, while it waited) is skipped.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

pub(crate) struct Calls {
    state: Mutex<State>,
}

struct State {
    free: usize,
    waiting: BinaryHeap<Waiter>,
    arrivals: u64,
}

/// Served in the order of `key`, largest first: highest priority, then earliest arrival.
struct Waiter {
    key: (u8, Reverse<u64>),
    call: oneshot::Sender<Call>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// One backend call in flight; ending it (dropping this) hands the call to the next waiter.
pub(crate) struct Call {
    calls: Option<Arc<Calls>>,
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(calls) = self.calls.take() {
            Calls::release(calls);
        }
    }
}

impl Calls {
    pub(crate) fn new(calls: usize) -> Arc<Self> {
        Arc::new(Calls {
            state: Mutex::new(State {
                free: calls,
                waiting: BinaryHeap::new(),
                arrivals: 0,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls not taken now.
    pub(crate) fn available(&self) -> usize {
        self.state().free
    }

    /// Waits for a call, served before every waiter of a lower priority and after the
    /// earlier waiters of the same or a higher one. Cancel-safe: a waiter dropped before it
    /// is served takes nothing, and one dropped as it is served gives the call back.
    pub(crate) async fn acquire(self: &Arc<Self>, priority: u8) -> Call {
        loop {
            let served = {
                let mut state = self.state();
                if state.free > 0 {
                    state.free -= 1;
                    return Call {
                        calls: Some(self.clone()),
                    };
                }
                let (call, served) = oneshot::channel();
                let arrival = state.arrivals;
                state.arrivals += 1;
                state.waiting.push(Waiter {
                    key: (priority, Reverse(arrival)),
                    call,
                });
                served
            };
            // The sender is dropped unsent only if the gate itself goes; then look again.
            if let Ok(call) = served.await {
                return call;
            }
        }
    }

    /// Hands an ended call to the first waiter still waiting, or counts it free. The lock
    /// is not held while the call is sent: a waiter that goes as it is sent drops the call,
    /// which releases it again.
    fn release(calls: Arc<Calls>) {
        let mut call = Call { calls: Some(calls) };
        loop {
            let next = {
                let Some(gate) = call.calls.as_ref() else {
                    return;
                };
                let mut state = gate.state();
                match state.waiting.pop() {
                    Some(waiter) => waiter,
                    None => {
                        state.free += 1;
                        drop(state);
                        // Counted free: this call must not release itself again.
                        call.calls = None;
                        return;
                    }
                }
            };
            match next.call.send(call) {
                Ok(()) => return,
                // That waiter has gone: try the next.
                Err(back) => call = back,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Starts a task waiting for a call with `priority`; it reports `label` once served and
    /// holds the call until its sender is dropped.
    fn waiter(
        calls: &Arc<Calls>,
        priority: u8,
        label: &'static str,
        served: tokio::sync::mpsc::UnboundedSender<&'static str>,
    ) -> tokio::task::JoinHandle<()> {
        let calls = calls.clone();
        tokio::spawn(async move {
            let call = calls.acquire(priority).await;
            let _ = served.send(label);
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(call);
        })
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_ended_call_goes_to_the_highest_priority_then_the_earliest() {
        let calls = Calls::new(1);
        let held = calls.acquire(0).await;
        assert_eq!(calls.available(), 0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Arrival order: two of priority 1, then one of 9, then one of 5.
        let tasks = vec![
            waiter(&calls, 1, "first 1", tx.clone()),
            waiter(&calls, 1, "second 1", tx.clone()),
            waiter(&calls, 9, "9", tx.clone()),
            waiter(&calls, 5, "5", tx.clone()),
        ];
        settle().await;
        assert!(
            rx.try_recv().is_err(),
            "nobody is served while the call is held"
        );
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, vec!["9", "5", "first 1", "second 1"]);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(calls.available(), 1, "every call came back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_went_is_skipped_and_takes_nothing() {
        let calls = Calls::new(2);
        let a = calls.acquire(3).await;
        let b = calls.acquire(3).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let gone = waiter(&calls, 9, "gone", tx.clone());
        let stays = waiter(&calls, 1, "stays", tx.clone());
        settle().await;
        gone.abort();
        let _ = gone.await;
        drop(a);
        assert_eq!(rx.recv().await, Some("stays"));
        stays.await.unwrap();
        assert_eq!(
            calls.available(),
            1,
            "the call the waiter gave back is free"
        );
        drop(b);
        assert_eq!(calls.available(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn free_calls_are_taken_without_waiting() {
        let calls = Calls::new(3);
        let held: Vec<Call> = vec![
            calls.acquire(0).await,
            calls.acquire(9).await,
            calls.acquire(4).await,
        ];
        assert_eq!(calls.available(), 0);
        drop(held);
        assert_eq!(calls.available(), 3);
    }
}
