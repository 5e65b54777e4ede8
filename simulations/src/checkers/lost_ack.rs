//! Invariant 3: every order the cluster acknowledged is still there, on
//! every replica, with the lines it was acknowledged with; one told paid is
//! paid and one told cancelled is cancelled.

use domain::OrderStatus;

use super::Final;
use crate::workload::Told;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    for (node, state) in view.replicas {
        for (&id, acked) in &view.oracle.acked {
            let Some(order) = state.order_by_id(id) else {
                return Err(format!("order {id} (key {}) is gone from node {node}", acked.key));
            };
            if order.lines != acked.lines || order.session != acked.session {
                return Err(format!("order {id} on node {node} is {order:?}, acknowledged as {acked:?}"));
            }
            let undone = match acked.told {
                Told::Paid => order.status != OrderStatus::Paid,
                Told::Cancelled => order.status != OrderStatus::Cancelled,
                Told::Reserved => false,
            };
            if undone {
                return Err(format!("order {id} told {:?} is {:?} on node {node}", acked.told, order.status));
            }
        }
    }
    Ok(())
}
