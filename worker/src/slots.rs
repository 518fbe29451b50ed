//! A worker's slots, handed to the deliveries that wait for them highest priority first.
//!
//! RabbitMQ orders only the messages it has not delivered yet: the ones a worker holds
//! (up to its prefetch) wait here for free slots before their jobs are claimed. A tokio
//! semaphore serves its waiters in arrival order, so a priority-9 message delivered behind
//! a few messages of priority 1 would wait until all of their jobs had been claimed. Here
//! only the first of the waiters in (priority, arrival) order waits on the semaphore; a
//! waiter that arrives with a higher priority takes its place at once. A delivery keeps
//! its place in line until its last part is claimed ([`Slots::line_up`]), so the slots
//! that come free while one of its parts is being claimed wait for its next part.
//! (Messages of the urgent priorities also skip the job queue's prefetch window: they
//! travel on a queue of their own, `pinq_core::amqp`.)

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};

/// Waiters in the order they are served: highest priority first, then arrival.
type Key = (Reverse<u8>, u64);

/// Where a delivery stands in line (see [`Slots::ticket`]).
pub(crate) struct Ticket(Key);

pub(crate) struct Slots {
    semaphore: Arc<Semaphore>,
    waiting: Mutex<BTreeSet<Key>>,
    arrivals: AtomicU64,
    /// Woken whenever the first waiter may have changed.
    changed: Notify,
}

impl Slots {
    pub(crate) fn new(slots: usize) -> Self {
        Slots {
            semaphore: Arc::new(Semaphore::new(slots)),
            waiting: Mutex::new(BTreeSet::new()),
            arrivals: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// A place in line for a delivery of `priority`, arriving now. A delivery whose jobs
    /// are claimed in several parts waits for each part with the same ticket, so it keeps
    /// its place before the deliveries that arrived after it.
    pub(crate) fn ticket(&self, priority: u8) -> Ticket {
        Ticket((
            Reverse(priority),
            self.arrivals.fetch_add(1, Ordering::Relaxed),
        ))
    }

    /// Waits for `want` slots, served before every waiter of a lower priority and after
    /// the earlier waiters of the same or a higher one. Cancel-safe: a waiter dropped
    /// before it is served takes nothing and leaves its place to the next.
    #[cfg(test)]
    pub(crate) async fn acquire(
        &self,
        ticket: &Ticket,
        want: u32,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let place = self.line_up(ticket);
        self.acquire_in_line(&place, want).await
    }

    /// Puts a delivery in line and keeps its place until the guard is dropped, also while
    /// it does not wait: between the parts of a delivery claimed in parts, while a part's
    /// claim statement runs, the slots that come free wait for its next part instead of
    /// going to a delivery it outranks or that arrived after it.
    pub(crate) fn line_up(&self, ticket: &Ticket) -> Place<'_> {
        Place::take(self, ticket.0)
    }

    /// Waits for `want` slots for the delivery in line at `place`, served before every
    /// waiter of a lower priority and after the earlier ones of the same or a higher one.
    /// Cancel-safe: dropped before it is served, it takes nothing.
    pub(crate) async fn acquire_in_line(
        &self,
        place: &Place<'_>,
        want: u32,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let key = place.key;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the two is not missed.
            changed.as_mut().enable();
            if self.first() == Some(key) {
                tokio::select! {
                    permit = self.semaphore.clone().acquire_many_owned(want) => return permit,
                    // Someone of a higher priority arrived: let go of the semaphore and
                    // look again.
                    () = &mut changed => {}
                }
            } else {
                changed.await;
            }
        }
    }

    /// Whether a delivery of a lower priority than `ticket`'s is waiting for slots now: the
    /// worker is saturated and this delivery would be served before it.
    pub(crate) fn outranks_a_waiter(&self, ticket: &Ticket) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .is_some_and(|lowest| lowest.0 > ticket.0.0)
    }

    /// Takes whatever slot is free now, without waiting.
    pub(crate) fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().try_acquire_owned().ok()
    }

    fn first(&self) -> Option<Key> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .copied()
    }
}

/// A delivery's place in line, given up when dropped.
pub(crate) struct Place<'a> {
    slots: &'a Slots,
    key: Key,
}

impl<'a> Place<'a> {
    fn take(slots: &'a Slots, key: Key) -> Self {
        let first = {
            let mut waiting = slots.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.insert(key);
            waiting.first() == Some(&key)
        };
        if first {
            slots.changed.notify_waiters();
        }
        Place { slots, key }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let was_first = {
            let mut waiting = self.slots.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let was_first = waiting.first() == Some(&self.key);
            waiting.remove(&self.key);
            was_first
        };
        if was_first {
            self.slots.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A waiter of `priority`, arriving now, for `want` slots: its task ends served.
    fn waiter(
        slots: &Arc<Slots>,
        priority: u8,
        want: u32,
    ) -> tokio::task::JoinHandle<OwnedSemaphorePermit> {
        let slots = slots.clone();
        let ticket = slots.ticket(priority);
        tokio::spawn(async move { slots.acquire(&ticket, want).await.expect("open") })
    }

    /// Lets the spawned waiters run until each is waiting.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn serves_the_highest_priority_first_then_arrival_order() {
        let slots = Arc::new(Slots::new(4));
        let all = slots.acquire(&slots.ticket(0), 4).await.expect("open");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (name, priority, want) in [("a", 1, 2), ("b", 1, 1), ("c", 9, 3), ("d", 5, 1)] {
            let slots = slots.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let permit = slots
                    .acquire(&slots.ticket(priority), want)
                    .await
                    .expect("open");
                tx.send((name, permit.num_permits())).expect("receiver");
                // Hold the slots briefly so that each release serves the next waiter.
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(permit);
            });
            settle().await;
        }
        drop(all);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.expect("served"));
        }
        assert_eq!(order, [("c", 3), ("d", 1), ("a", 2), ("b", 1)]);
    }

    #[tokio::test]
    async fn a_higher_priority_overtakes_the_first_waiter_already_waiting() {
        let slots = Arc::new(Slots::new(2));
        let held = slots.acquire(&slots.ticket(0), 2).await.expect("open");
        let low = waiter(&slots, 1, 2);
        settle().await;
        let high = waiter(&slots, 9, 1);
        settle().await;
        // One slot back: the later, higher waiter takes it; the first still waits for two.
        drop(held);
        let high = high.await.expect("served");
        settle().await;
        assert!(!low.is_finished(), "the lower waiter must still wait");
        drop(high);
        assert_eq!(low.await.expect("served").num_permits(), 2);
    }

    #[tokio::test]
    async fn a_delivery_claimed_in_parts_keeps_its_place() {
        let slots = Arc::new(Slots::new(2));
        let early = slots.ticket(1);
        let part = slots.acquire(&early, 2).await.expect("open");
        // A later delivery of the same priority waits for the slots the first part holds.
        let later = waiter(&slots, 1, 1);
        settle().await;
        let (served, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let rest = tokio::spawn({
            let slots = slots.clone();
            async move {
                let permit = slots.acquire(&early, 2).await.expect("open");
                served.send("early").expect("receiver");
                permit
            }
        });
        settle().await;
        drop(part);
        assert_eq!(rx.recv().await, Some("early"));
        assert!(!later.is_finished(), "the later delivery must wait");
        drop(rest.await.expect("task"));
        drop(later.await.expect("task"));
    }

    #[tokio::test]
    async fn slots_freed_between_the_parts_of_a_delivery_wait_for_its_next_part() {
        let slots = Arc::new(Slots::new(2));
        let urgent = slots.ticket(9);
        let place = slots.line_up(&urgent);
        let part = slots.acquire_in_line(&place, 2).await.expect("open");
        let low = waiter(&slots, 1, 1);
        settle().await;
        // The part's jobs end while the delivery runs its next claim: the lower waiter
        // must not take their slots meanwhile.
        drop(part);
        settle().await;
        assert!(
            !low.is_finished(),
            "the lower waiter took a slot between the parts"
        );
        let next = slots.acquire_in_line(&place, 2).await.expect("open");
        assert_eq!(next.num_permits(), 2);
        drop(next);
        settle().await;
        assert!(!low.is_finished(), "the place is still held");
        drop(place);
        assert_eq!(low.await.expect("served").num_permits(), 1);
    }

    #[tokio::test]
    async fn a_delivery_outranks_only_waiters_of_a_lower_priority() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire(&slots.ticket(0), 1).await.expect("open");
        assert!(!slots.outranks_a_waiter(&slots.ticket(9)), "nobody waits");
        let low = waiter(&slots, 3, 1);
        settle().await;
        assert!(slots.outranks_a_waiter(&slots.ticket(4)));
        assert!(
            !slots.outranks_a_waiter(&slots.ticket(3)),
            "the same priority"
        );
        assert!(!slots.outranks_a_waiter(&slots.ticket(2)));
        drop(held);
        drop(low.await.expect("served"));
        assert!(
            !slots.outranks_a_waiter(&slots.ticket(9)),
            "the waiter was served"
        );
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_its_place_to_the_next() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire(&slots.ticket(0), 1).await.expect("open");
        let first = waiter(&slots, 5, 1);
        settle().await;
        let second = waiter(&slots, 1, 1);
        settle().await;
        first.abort();
        let _ = first.await;
        drop(held);
        let served = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second waiter is served")
            .expect("task");
        assert_eq!(served.num_permits(), 1);
        drop(served);
        assert!(slots.try_acquire().is_some(), "its slot came back");
    }
}
