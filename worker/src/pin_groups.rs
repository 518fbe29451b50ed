//! Pins that start together on one backend share one `pin/add` call.
//!
//! The Kubo RPC pins several CIDs in one call, and the node's cost of a call (parsing the
//! request, routing it, answering) is paid once for all of them: against the local js-ipfs
//! node, calls of 4–16 CIDs pinned about twice as many CIDs a second as calls of one, with
//! the same pins in flight (docs/performance.md). So each backend client has a gatherer:
//! a job about to pin hands its CID over, and the gatherer sends whatever has arrived
//! together (up to `PINQ_PIN_GROUP`) in one call. At most `concurrency / PINQ_PIN_GROUP`
//! shared calls younger than [`PERMIT_HOLD`] run at once: while they do, the pins that
//! arrive wait and go together as soon as one ends, so a saturated worker sends full
//! groups. A worker with calls to
//! spare sends a pin that arrives alone at once, alone, as before, with nothing added to
//! its time (and its call is not counted against that bound).
//!
//! A shared call never decides a job's outcome except for success, so a job's timeout,
//! retries and errors stay its own:
//! - it pins only what the node holds already (`offline`, which Kubo honours per call), so
//!   content that must be fetched fails the call at once instead of holding the others;
//! - it has a shorter timeout than a job's own call (a quarter of it, at most
//!   [`GROUP_TIMEOUT`]), since js-ipfs ignores `offline` and waits for missing content,
//!   and it stops counting against the bound on shared calls after [`PERMIT_HOLD`], so a
//!   slow one does not hold back the groups after it;
//! - if it fails in any way, each of its CIDs is pinned by a call of its own, with the
//!   job's full timeout (pinning is idempotent, so what the shared call pinned already is
//!   simply confirmed), and that call's result is the job's;
//! - if the backend could not be reached at all, every job gets that answer (no call of
//!   the group reached the node), and waits without spending an attempt, as a lone job
//!   would.
//!
//! A job cancelled or whose lease was lost while its group's call is under way stops
//! waiting for it; the call goes on for the others. The node may then have pinned its
//! CID, exactly as when a lone call is abandoned.

use std::sync::Arc;
use std::time::Duration;

use pinq_core::kubo::{BackendError, KuboClient};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// Longest a shared call may take before its CIDs are pinned one by one. Content the node
/// holds pins in milliseconds; a backend that ignores `offline` (js-ipfs) waits here for
/// content it lacks, and the CIDs of the group wait that long before their own calls.
const GROUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a shared call counts against the bound on shared calls. One that takes longer
/// is slow for a reason of its own (content the node lacks, a large DAG) and no longer
/// holds back the next groups.
const PERMIT_HOLD: Duration = Duration::from_millis(250);

/// How many times the gatherer yields to the runtime, while more pins keep arriving,
/// before it sends what it has: the jobs of one claim hand their CIDs over within a few
/// task switches of each other.
const GATHER_YIELDS: usize = 4;

/// A backend client whose pins are sent in groups.
pub(crate) struct PinGroups {
    client: KuboClient,
    timeout: Duration,
    /// `None` when groups are turned off (`PINQ_PIN_GROUP=1`).
    gatherer: Option<mpsc::UnboundedSender<Request>>,
}

struct Request {
    cid: String,
    reply: oneshot::Sender<Result<(), BackendError>>,
}

impl PinGroups {
    /// Starts the gatherer of `client` (unless `max_group` is 1). It stops when this is
    /// dropped; calls under way finish on their own.
    ///
    /// `concurrency` is the worker's: at most `concurrency / max_group` shared calls of
    /// this gatherer count against its bound at once (each for at most [`PERMIT_HOLD`]),
    /// so that under load each call carries close to `max_group`.
    pub(crate) fn start(
        client: KuboClient,
        max_group: usize,
        concurrency: usize,
        timeout: Duration,
    ) -> Self {
        let gatherer = (max_group > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let calls = Arc::new(Semaphore::new((concurrency / max_group).max(1)));
            tokio::spawn(gather(client.clone(), rx, max_group, calls, timeout));
            tx
        });
        PinGroups {
            client,
            timeout,
            gatherer,
        }
    }

    /// Unpins `cid`, in a call of its own with the job's timeout (unpins are not grouped:
    /// see ARCHITECTURE.md). The calls of their own are boxed here and in [`Self::pin_add`]
    /// so that an HTTP call's state does not enlarge every running job's future (see
    /// `run_job`).
    pub(crate) async fn pin_rm(&self, cid: &str) -> Result<(), BackendError> {
        Box::pin(self.client.pin_rm(cid, self.timeout)).await
    }

    /// Pins `cid`, in a call shared with the pins that start with it.
    pub(crate) async fn pin_add(&self, cid: &str) -> Result<(), BackendError> {
        let Some(gatherer) = &self.gatherer else {
            return Box::pin(self.client.pin_add(cid, self.timeout)).await;
        };
        let (reply, answer) = oneshot::channel();
        let request = Request {
            cid: cid.to_owned(),
            reply,
        };
        if gatherer.send(request).is_err() {
            return Box::pin(self.client.pin_add(cid, self.timeout)).await;
        }
        match answer.await {
            Ok(result) => result,
            // The group's task ended without an answer (the runtime is shutting down).
            Err(_) => Err(BackendError::Interrupted(
                "the shared pin/add call was dropped".into(),
            )),
        }
    }
}

/// Takes the pins as they arrive, and sends each gathering as one call of its own task.
/// While `calls` has no permit left (as many calls under way as the worker's concurrency
/// fills with full groups), the pins that arrive meanwhile wait and go together in the
/// next call, as soon as one ends: a saturated worker sends full groups, and a worker
/// with calls to spare sends each pin at once.
async fn gather(
    client: KuboClient,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_group: usize,
    calls: Arc<Semaphore>,
    timeout: Duration,
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        let mut yields = 0;
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(r) => {
                    group.push(r);
                    yields = 0;
                }
                Err(mpsc::error::TryRecvError::Empty) if yields < GATHER_YIELDS => {
                    yields += 1;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        tokio::spawn(pin_group(client.clone(), group, permit, timeout));
    }
}

/// Pins a group: one shared call, or each alone if that fails (see the module's doc).
async fn pin_group(
    client: KuboClient,
    mut group: Vec<Request>,
    permit: OwnedSemaphorePermit,
    timeout: Duration,
) {
    // Jobs that stopped waiting (cancelled, lease lost) are left out.
    group.retain(|r| !r.reply.is_closed());
    if group.len() <= 1 {
        drop(permit);
    } else {
        let result = {
            let cids: Vec<&str> = group.iter().map(|r| r.cid.as_str()).collect();
            let shared_timeout = (timeout / 4).clamp(Duration::from_millis(1), GROUP_TIMEOUT);
            let call = client.pin_add_local_many(&cids, shared_timeout);
            tokio::pin!(call);
            let mut permit = Some(permit);
            loop {
                tokio::select! {
                    r = &mut call => break r,
                    _ = tokio::time::sleep(PERMIT_HOLD), if permit.is_some() => permit = None,
                }
            }
        };
        match result {
            Ok(()) => {
                for r in group {
                    let _ = r.reply.send(Ok(()));
                }
                return;
            }
            Err(e) if e.is_unreachable() => {
                for r in group {
                    let _ = r.reply.send(Err(e.clone()));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, pins = group.len(), "a shared pin/add failed; pinning each alone");
            }
        }
    }
    // Calls of their own (a lone pin's, as without groups, or after a shared call failed)
    // are bounded by the jobs' call slots, not by the gatherer's: content that must be
    // fetched does not hold back the groups of content on the node.
    let alone = group.into_iter().map(|r| {
        let client = &client;
        async move {
            if r.reply.is_closed() {
                return;
            }
            let result = client.pin_add(&r.cid, timeout).await;
            let _ = r.reply.send(result);
        }
    });
    futures::future::join_all(alone).await;
}
