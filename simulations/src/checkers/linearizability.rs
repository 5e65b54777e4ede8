//! The history of the linearizability SKU is linearizable: some order of
//! its checkouts and reads, each placed between its call and its response,
//! explains every answer by a sequential counter of available units.
//! Checked by todc-utils' Wing-Gong-Lowe checker, which knows nothing of
//! Surge.
//!
//! A checkout whose answer never came may have applied at any time after
//! its call: its key's decision is read from the final state, and its
//! response is placed at the end of the history.

use todc_utils::linearizability::history::{Action, History};
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::Specification;

use super::Final;
use crate::workload::{LinOp, LIN_STOCK};

/// The sequential specification: a counter that checkouts take from.
struct Counter;

impl Specification for Counter {
    type State = u64;
    type Operation = LinOp;

    fn init() -> u64 {
        LIN_STOCK
    }

    fn apply(op: &LinOp, available: &u64) -> (bool, u64) {
        match *op {
            LinOp::Checkout { qty, reserved: Some(true) } if qty <= *available => (true, available - qty),
            LinOp::Checkout { qty, reserved: Some(false) } => (qty > *available, *available),
            LinOp::Read(Some(seen)) => (seen == *available, *available),
            _ => (false, *available),
        }
    }
}

pub fn check(view: &Final<'_>) -> Result<(), String> {
    let (_, state) = view.replicas.first().ok_or("no replica")?;
    let lin = &view.oracle.lin;
    let mut events = lin.events.clone();
    for (process, qty, session, key) in &lin.unanswered {
        let reserved = match state.checkout_decision(*session, key) {
            Some(Ok(_)) => true,
            Some(Err(domain::Rejection::SoldOut { .. })) => false,
            // Never decided: it had no effect; take its call back out.
            None => {
                let call = events.iter().rposition(|(p, a)| p == process && matches!(a, Action::Call(_)));
                events.remove(call.ok_or("an unanswered checkout without its call")?);
                continue;
            }
            Some(Err(other)) => return Err(format!("checkout {key} decided {other:?}")),
        };
        events.push((*process, Action::Response(LinOp::Checkout { qty: *qty, reserved: Some(reserved) })));
    }
    if events.is_empty() {
        return Ok(());
    }
    let operations = events.len() / 2;
    if WGLChecker::<Counter>::is_linearizable(History::from_actions(events)) {
        Ok(())
    } else {
        Err(format!("the history of {operations} operations on the linearizability SKU is not linearizable"))
    }
}
