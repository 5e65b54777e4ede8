//! Escrow tending: what lets the DR copy be promoted without a quorum and
//! never sell a unit the lost primary may have sold (`GroupState::fail_over`).
//!
//! Once a group has a DR copy, a checkout holds only *escrowed* units the
//! copy has confirmed it heard of. Two loops keep escrow ahead of need:
//!
//! - the **leader** grants each SKU's available units into escrow in blocks
//!   (`Command::GrantEscrow`), one batch in flight at a time. A SKU's block
//!   starts at `escrow_block_min` and doubles, up to `escrow_block_max`,
//!   when checkouts find its escrow short, once per grant (a crowd that
//!   finds it short at once doubles it once), so a hot SKU soon has a
//!   block that outlasts a confirmation round trip and a cold one keeps a
//!   small one;
//! - the **DR copy** (every learner in another region than the leader),
//!   once it has *applied* a grant, confirms it (`Command::ConfirmEscrow`),
//!   forwarded to the leader like any write from a follower. Only then may
//!   its units be held: the copy confirms nothing it would not have if it
//!   were promoted. A learner of the leader's own region (the promoted
//!   region's other nodes after a failover, a node rejoining its zone)
//!   confirms nothing: the loss of the region takes it too. A learner
//!   fsyncs the commit index it learns, so a crash cannot take it back
//!   below what it confirmed: on restart it applies as far again. Failover
//!   promotes the most advanced copy of the region, which has applied every
//!   grant any copy there confirmed.
//!
//! The leader grants only while the group has a member in another region:
//! a group a forced failover founded has none until failback, and sells
//! what is available (`fail_over` turned escrow off).
//!
//! The price: while the DR copy is unreachable, a SKU sells only what its
//! confirmed escrow holds, then answers 503 until the copy is back; and a
//! failover takes every escrowed unit out of sale until failback settles it.
//! The block bounds are the operator's knob between the two.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use domain::{Command, GroupState, Outcome, Rejection, Response};
use tokio::sync::Notify;

use crate::group::Group;
use crate::ProposeError;

/// A grant or confirmation that has not committed by then is given up (it
/// may still apply; the next one covers it), so one lost proposal cannot
/// stop escrow for good.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The leader's and the copy's escrow bookkeeping, shared by a group's
/// clones. None of it is replicated: a new leader starts from the minimum.
#[derive(Clone)]
pub(crate) struct Tender {
    /// Whether this group grants at all: its topology has a DR replica.
    enabled: bool,
    block_min: u64,
    block_max: u64,
    /// The log store's switch: on while this node is a learner, so that
    /// what it confirmed it has applied, it applies again after a crash.
    durable_commits: Arc<AtomicBool>,
    inner: Arc<Mutex<Inner>>,
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each SKU's block, once a checkout found its escrow short.
    blocks: BTreeMap<String, u64>,
    /// SKUs whose block doubled since their last grant: a crowd finding
    /// the escrow short at once doubles it once, not once per shopper.
    grown: BTreeSet<String>,
    /// A grant batch is being proposed.
    granting: bool,
    /// A confirmation is on its way to the leader.
    confirming: bool,
}

impl Tender {
    pub(crate) fn new(enabled: bool, block_min: u64, block_max: u64, durable_commits: Arc<AtomicBool>) -> Tender {
        let block_min = block_min.max(1);
        Tender {
            enabled,
            block_min,
            block_max: block_max.max(block_min),
            durable_commits,
            inner: Arc::default(),
            wake: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On the leader, for every batch it applied: a checkout that found
    /// its SKU's escrow short doubles the SKU's block (once until the SKU's
    /// next grant) and wakes the tender.
    pub(crate) fn note(&self, response: &Response) {
        let mut short = false;
        for outcome in &response.outcomes {
            if let Outcome::Rejected(Rejection::EscrowPending { sku, wanted }) = outcome {
                let mut inner = self.lock();
                let doubles = inner.grown.insert(sku.clone());
                let block = inner.blocks.entry(sku.clone()).or_insert(self.block_min);
                if doubles {
                    *block = (*block * 2).min(self.block_max);
                }
                *block = (*block).max(*wanted);
                short = true;
            }
        }
        if short {
            self.wake.notify_one();
        }
    }

    /// The grants due now: each SKU on sale whose escrow is below its
    /// block gets up to two blocks' worth, as far as stock allows.
    fn grants_due(&self, state: &GroupState) -> Vec<Command> {
        if !self.enabled || state.is_frozen() {
            return Vec::new();
        }
        let inner = self.lock();
        state
            .sku_views()
            .filter(|view| state.clock_ms() < view.sale.ends_at_ms && view.stock.available > 0)
            .filter_map(|view| {
                let block = inner.blocks.get(&view.sale.sku).copied().unwrap_or(self.block_min);
                let escrowed = view.stock.escrowed;
                (escrowed < block).then(|| Command::GrantEscrow {
                    units: (2 * block - escrowed).min(view.stock.available),
                    sku: view.sale.sku,
                })
            })
            .collect()
    }

    /// Runs until Raft stops. The leader looks every `tick`, and at once
    /// when a checkout finds escrow short; a learner also on every change
    /// Raft reports (an entry applied), so it confirms a grant as soon as it
    /// holds it. Other voters only tick.
    pub(crate) async fn run(self, group: Group, tick: Duration) {
        let mut metrics = group.raft().metrics();
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut learner = false;
        loop {
            tokio::select! {
                changed = metrics.changed(), if learner => if changed.is_err() { return },
                _ = self.wake.notified() => {}
                _ = ticks.tick() => {}
            }
            let (running, state) = {
                let now = metrics.borrow_and_update();
                (now.running_state.is_ok(), now.state)
            };
            // Raft stopped: its metrics say so, or it dropped their sender.
            if !running || metrics.has_changed().is_err() {
                return;
            }
            learner = state == openraft::ServerState::Learner;
            self.durable_commits.store(learner, Ordering::Relaxed);
            if state.is_leader() && group.has_copy_elsewhere() {
                self.grant(&group);
            } else if learner && group.leader_is_elsewhere() {
                self.confirm(&group);
            }
        }
    }

    fn grant(&self, group: &Group) {
        if self.lock().granting {
            return;
        }
        let grants = group.read_local(|state| self.grants_due(state));
        if grants.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.granting = true;
        for grant in &grants {
            if let Command::GrantEscrow { sku, .. } = grant {
                inner.grown.remove(sku);
            }
        }
        drop(inner);
        let (tender, group) = (self.clone(), group.clone());
        tokio::spawn(async move {
            // Not woken again from here: a grant that failed at once (this
            // leader is cut off) would be retried in a busy loop. The next
            // tick looks again.
            match tokio::time::timeout(PROPOSAL_TIMEOUT, group.propose_here(grants))
                .await
                .unwrap_or(Err(ProposeError::Timeout))
            {
                Ok(response) if domain::mutation::active(domain::mutation::Mutation::ConfirmUnheardEscrow) => {
                    // The bug: confirm without waiting for the DR copy.
                    let granted = response.outcomes.iter().filter_map(|outcome| match outcome {
                        Outcome::Escrow { granted, .. } => Some(*granted),
                        _ => None,
                    });
                    if let Some(through) = granted.max() {
                        let _ = group.propose_here(vec![Command::ConfirmEscrow { through }]).await;
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "escrow grants not made; the next tick tries again"),
            }
            tender.lock().granting = false;
        });
    }

    fn confirm(&self, group: &Group) {
        let (granted, confirmed) = group.read_local(|state| (state.escrow_granted(), state.escrow_confirmed()));
        if granted <= confirmed || self.lock().confirming {
            return;
        }
        self.lock().confirming = true;
        let (tender, group) = (self.clone(), group.clone());
        tokio::spawn(async move {
            let confirm = group.propose(vec![Command::ConfirmEscrow { through: granted }]);
            if let Err(error) =
                tokio::time::timeout(PROPOSAL_TIMEOUT, confirm).await.unwrap_or(Err(ProposeError::Timeout))
            {
                tracing::debug!(%error, "escrow confirmation not delivered; the next tick tries again");
            }
            tender.lock().confirming = false;
        });
    }
}
