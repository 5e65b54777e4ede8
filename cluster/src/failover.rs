//! What an unplanned failover to this node's region would cost if the
//! writing region were lost now: `GroupState::fail_over` run on a clone of
//! this node's applied state, which changes nothing. Operators read it
//! (`surge ctl failover --to dr`) to know their exposure before a disaster,
//! and it is the report a forced failover will give.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{DrillError, Node};

/// A failover's cost, as computed from one node's copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverPreview {
    /// The node whose copy would be promoted.
    pub node: u64,
    /// Its region, which would take writes.
    pub region: String,
    /// The last log index its copy has applied: promote the node of the
    /// region with the highest.
    pub applied_index: u64,
    /// On a DR replica, how stale its copy may be: acknowledgements of the
    /// last this many milliseconds may be lost.
    pub stale_ms_max: Option<u64>,
    /// The epoch it would take writes in.
    pub epoch: u64,
    /// Its copy's clock at its last entry.
    pub cut_at_ms: u64,
    /// Units each SKU would take out of sale until failback settles them.
    pub unsettled: BTreeMap<String, u64>,
    /// Their sum: the undersell bound.
    pub undersell_units: u64,
    /// Order ids the lost primary may have acknowledged that the copy
    /// lacks: from this one...
    pub orders_maybe_lost_from: u64,
    /// ...up to (not including) this one.
    pub orders_maybe_lost_to: u64,
    /// Orders pending payment in the copy, whose payment the lost primary
    /// may have taken.
    pub payments_in_doubt: Vec<u64>,
}

/// The preview from `node`'s copy. Refused on a node of the region that
/// takes writes: it has nothing to fail over from.
pub fn preview(node: &Node) -> Result<FailoverPreview, DrillError> {
    let region = node.topology().node(node.id()).map(|spec| spec.region.clone()).unwrap_or_default();
    if region == node.primary_region() {
        return Err(DrillError::AlreadyPrimary(region));
    }
    let applied_index = node.group().raft().metrics().borrow().last_applied.map_or(0, |id| id.index);
    let mut copy = node.read_local(Clone::clone);
    let cost = copy.fail_over(&region);
    Ok(FailoverPreview {
        node: node.id(),
        region,
        applied_index,
        stale_ms_max: node.group().stale_ms_max(),
        epoch: cost.epoch,
        cut_at_ms: cost.cut_at_ms,
        undersell_units: cost.unsettled.values().sum(),
        unsettled: cost.unsettled,
        orders_maybe_lost_from: cost.orders_maybe_lost.start,
        orders_maybe_lost_to: cost.orders_maybe_lost.end,
        payments_in_doubt: cost.payments_in_doubt,
    })
}
