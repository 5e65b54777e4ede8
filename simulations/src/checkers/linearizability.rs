//! The history of the linearizability SKU is linearizable: some order of
//! its checkouts and reads, each placed between its call and its response,
//! explains every answer by a sequential counter of available units.
//! Checked by todc-utils' Wing-Gong-Lowe checker, which knows nothing of
//! Surge.
//!
//! A checkout whose answer never came may have applied at any time after
//! its call: its key's decision is read from the final state, and its
//! response is placed at the end of the history. In a run that lost its
//! primary region, the history ends with the region (see [`cut_at_loss`]).

use todc_utils::linearizability::history::{Action, History};
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::Specification;

use std::collections::BTreeSet;

use domain::{GroupState, SessionId};

use super::Final;
use crate::region::Lost;
use crate::workload::{LinHistory, LinOp, LIN_STOCK};

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
    let (events, open, decided_by) = match &view.oracle.region_lost {
        None => (lin.events.clone(), lin.unanswered.clone(), state),
        Some(lost) => cut_at_loss(lin, lost)?,
    };
    let events = settle(events, &open, decided_by)?;
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

type Events = Vec<(usize, Action<LinOp>)>;
type Open = Vec<(usize, u64, SessionId, String)>;

/// The history of a run that lost its primary region ends with it: a
/// forced failover takes units out of sale and may lose acknowledged
/// checkouts (reported), which no sequential counter explains. Reads open
/// at the loss leave it; checkouts open then are decided by the lost
/// primary's own copy, read when it returned.
fn cut_at_loss<'a>(lin: &LinHistory, lost: &'a Lost) -> Result<(Events, Open, &'a GroupState), String> {
    let copy = lost.old_copy.as_ref().ok_or("the lost primary's copy was never read")?;
    let mut events = lin.events[..lost.lin_cut].to_vec();
    let mut open = Vec::new();
    let processes: BTreeSet<usize> = events.iter().map(|(process, _)| *process).collect();
    for process in processes {
        let last = events.iter().rposition(|(p, _)| *p == process).expect("a process with events");
        match &events[last].1 {
            Action::Call(LinOp::Read(_)) => {
                events.remove(last);
            }
            Action::Call(LinOp::Checkout { .. }) => {
                // In flight at the loss, or left unanswered before it.
                let unanswered = lin.unanswered.iter().find(|(p, ..)| *p == process);
                let (qty, session, key) = match lost.lin_in_flight.get(&process) {
                    Some((qty, session, key)) => (*qty, *session, key.clone()),
                    None => unanswered
                        .map(|(_, qty, session, key)| (*qty, *session, key.clone()))
                        .ok_or("an open checkout")?,
                };
                open.push((process, qty, session, key));
            }
            Action::Response(_) => {}
        }
    }
    Ok((events, open, copy))
}

/// Closes the checkouts in `open`, whose answer never came: each may have
/// applied at any time after its call, so its key's decision in `state`
/// places its response at the end of the history; one never decided had no
/// effect and its call leaves.
fn settle(mut events: Events, open: &Open, state: &GroupState) -> Result<Events, String> {
    for (process, qty, session, key) in open {
        let reserved = match state.checkout_decision(*session, key) {
            Some(Ok(_)) => true,
            Some(Err(domain::Rejection::SoldOut { .. })) => false,
            None => {
                let call = events.iter().rposition(|(p, a)| p == process && matches!(a, Action::Call(_)));
                events.remove(call.ok_or("an unanswered checkout without its call")?);
                continue;
            }
            Some(Err(other)) => return Err(format!("checkout {key} decided {other:?}")),
        };
        events.push((*process, Action::Response(LinOp::Checkout { qty: *qty, reserved: Some(reserved) })));
    }
    Ok(events)
}
