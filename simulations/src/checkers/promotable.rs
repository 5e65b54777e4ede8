//! Unplanned failover is safe at every moment: were the writing region
//! lost now, the most advanced copy outside it, promoted with
//! `GroupState::fail_over`, would sell no unit the primary may have sold,
//! and would name every order (and payment) the primary acknowledged that
//! it lacks. The sampler promotes a clone of that copy every 250 simulated
//! ms, against every node of the writing region ahead of it, and records
//! what broke. A copy a forced failover refuses (it holds no escrow grant)
//! is counted, not promoted. After a region loss this is a second failover:
//! from the promoted region back to the rejoined one.

use std::collections::BTreeSet;

use domain::{GroupState, OrderStatus};

use super::Final;

/// One node's applied state, as the sampler read it.
pub struct Seen {
    pub node: u64,
    pub region: String,
    /// Its last applied log index.
    pub applied: u64,
    pub state: GroupState,
}

/// What one sample found.
pub enum Sampled {
    /// No copy to promote: none outside the writing region, or a node down.
    Nothing,
    /// The copy holds no escrow grant: a forced failover refuses it.
    Refused,
    /// Promoted, and nothing broke.
    Safe,
    /// Promoted, and this broke.
    Breaks(String),
}

/// Promotes the copy a failover would promote now, if any. `down` names
/// the regions with a node down: a failover promotes the most advanced
/// node of the region, and a node that is down may be it (its disk
/// survives), so the check waits until they are all up. It also names the
/// regions with a node whose disk was lost and that does not hold the
/// whole log again yet: that region has one copy fewer than escrow counts
/// on, and a failover is safe only if its other copy is current, which
/// Surge does not promise (docs/operations.md, "Replacing a node whose disk
/// is lost").
pub fn sample(seen: &[Seen], down: &BTreeSet<String>) -> Sampled {
    // Only copies of the newest generation: an older one is a lost
    // primary's, fenced, and no failover promotes it.
    let Some(generation) = seen.iter().map(|s| s.state.generation()).max() else {
        return Sampled::Nothing;
    };
    let seen: Vec<&Seen> = seen.iter().filter(|s| s.state.generation() == generation).collect();
    let Some(newest) = seen.iter().max_by_key(|s| s.applied) else {
        return Sampled::Nothing;
    };
    let writing = newest.state.primary_region().unwrap_or("primary");
    if down.iter().any(|region| region != writing) {
        return Sampled::Nothing;
    }
    let Some(copy) = seen.iter().filter(|s| s.region != writing).max_by_key(|s| s.applied) else {
        return Sampled::Nothing;
    };
    if !copy.state.escrow_is_on() {
        return Sampled::Refused;
    }
    // Against every node of the writing region that is ahead of the copy
    // (one behind it holds a prefix of what the copy has).
    let ahead = seen.iter().copied().filter(|s| s.region == writing && s.applied > copy.applied);
    match breaks(copy, ahead) {
        Some(broken) => Sampled::Breaks(broken),
        None => Sampled::Safe,
    }
}

/// What promoting `copy` would break against the nodes `ahead` of it.
fn breaks<'a>(copy: &Seen, ahead: impl Iterator<Item = &'a Seen>) -> Option<String> {
    let mut promoted = copy.state.clone();
    let failover = promoted.fail_over("sampled");
    for primary in ahead {
        for view in promoted.sku_views() {
            let sku = &view.sale.sku;
            let total = view.stock.total.max(primary.state.sku_view(sku).map_or(0, |v| v.stock.total));
            let promised = GroupState::units_promised(&primary.state, &promoted, sku) + view.stock.for_sale();
            if promised > total {
                let stocks = [&primary.state, &copy.state].map(|s| s.sku_view(sku).map(|v| v.stock));
                return Some(format!(
                    "node {} (applied {}, escrow {:?}) promoted against node {} (applied {}, escrow {:?}): {sku} \
                     would have {promised} units promised of {total} (stock there {:?}, in the copy {:?})",
                    copy.node,
                    copy.applied,
                    (copy.state.escrow_granted(), copy.state.escrow_confirmed()),
                    primary.node,
                    primary.applied,
                    (primary.state.escrow_granted(), primary.state.escrow_confirmed()),
                    stocks[0],
                    stocks[1],
                ));
            }
        }
        for order in primary.state.orders() {
            let unreported = match copy.state.order_by_id(order.id) {
                None => !failover.orders_maybe_lost.contains(&order.id),
                Some(known) => {
                    known.status == OrderStatus::PendingPayment
                        && order.status == OrderStatus::Paid
                        && !failover.payments_in_doubt.contains(&order.id)
                }
            };
            if unreported {
                return Some(format!(
                    "node {} promoted against node {}: order {} ({:?}) would be lost unreported ({failover:?})",
                    copy.node, primary.node, order.id, order.status
                ));
            }
        }
    }
    None
}

pub fn check(view: &Final<'_>) -> Result<(), String> {
    match view.oracle.promotion_breaks.first() {
        Some(first) => Err(format!("{} times during the run; first: {first}", view.oracle.promotion_breaks.len())),
        None => Ok(()),
    }
}
