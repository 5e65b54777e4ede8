//! Invariant 3: every order the cluster acknowledged is still there, on
//! every replica, with the lines it was acknowledged with; one told paid is
//! paid and one told cancelled is cancelled. In a run that lost its primary
//! region: unless the forced failover's report named it (every lost
//! acknowledgement is reported), and none was told after the old primary
//! returned: it is fenced, and takes no write. Failback must list it for
//! an operator to settle, unless it went without a copy whose disk was
//! lost for good.

use domain::{Order, OrderStatus};

use super::Final;
use crate::workload::{Acked, Told};

pub fn check(view: &Final<'_>) -> Result<(), String> {
    for (node, state) in view.replicas {
        for (&id, acked) in &view.oracle.acked {
            let kept = state.order_by_id(id).is_some_and(|order| order.lines == acked.lines && !undone(acked, order));
            if let Some(lost) = view.oracle.region_lost.as_ref().filter(|lost| !kept && lost.names(id)) {
                if lost.returned_at_ms.is_some_and(|returned| acked.at_ms >= returned) {
                    return Err(format!(
                        "order {id} was lost, told {:?} at {} ms, after the fenced old primary returned",
                        acked.told, acked.at_ms
                    ));
                }
                let listed = |r: &domain::Reconciliation| r.orders_to_settle.iter().any(|order| order.id == id);
                if lost.reconciliation.as_ref().is_some_and(|r| r.copies_lost.is_empty() && !listed(r)) {
                    return Err(format!("order {id} was lost, told {:?}, and failback did not list it", acked.told));
                }
                continue;
            }
            let Some(order) = state.order_by_id(id) else {
                return Err(format!("order {id} (key {}) is gone from node {node}", acked.key));
            };
            if order.lines != acked.lines || order.session != acked.session {
                return Err(format!("order {id} on node {node} is {order:?}, acknowledged as {acked:?}"));
            }
            if undone(acked, order) {
                return Err(format!("order {id} told {:?} is {:?} on node {node}", acked.told, order.status));
            }
        }
    }
    Ok(())
}

/// Whether `order` no longer is what its shopper was told last.
fn undone(acked: &Acked, order: &Order) -> bool {
    match acked.told {
        Told::Paid => order.status != OrderStatus::Paid,
        Told::Cancelled => order.status != OrderStatus::Cancelled,
        Told::Reserved => false,
    }
}
