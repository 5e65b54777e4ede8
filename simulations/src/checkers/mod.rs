//! The properties every run must keep, one file each. Each checker reads
//! the final state of every replica (after the faults healed and the
//! replicas caught up) and what the crowd was told (the [`Oracle`]), and
//! says what broke.

mod at_most_once;
mod conservation;
mod convergence;
mod expiry;
mod limits;
mod linearizability;
mod liveness;
mod lost_ack;
mod no_oversell;
pub mod promotable;

use domain::GroupState;

use crate::workload::Oracle;

/// What the checkers look at.
pub struct Final<'a> {
    /// `(node id, its state)` for every replica.
    pub replicas: &'a [(u64, GroupState)],
    pub oracle: &'a Oracle,
    /// Simulated wall time at the end, ms since the epoch.
    pub now_ms: u64,
    /// How late a hold may expire: clock jumps delay the leader's ticker.
    pub expiry_slack_ms: u64,
}

/// A checker: the property's name and its verdict.
type Checker = (&'static str, fn(&Final<'_>) -> Result<(), String>);

const CHECKERS: [Checker; 10] = [
    ("no oversell", no_oversell::check),
    ("conservation", conservation::check),
    ("no lost acknowledgement", lost_ack::check),
    ("at most one order per key", at_most_once::check),
    ("per-shopper limits", limits::check),
    ("expired holds return", expiry::check),
    ("replicas converge", convergence::check),
    ("liveness", liveness::check),
    ("per-SKU linearizability", linearizability::check),
    ("failover never oversells", promotable::check),
];

/// Runs every checker; one line per broken property.
pub fn run(view: &Final<'_>) -> Vec<String> {
    CHECKERS.iter().filter_map(|(name, check)| check(view).err().map(|why| format!("{name}: {why}"))).collect()
}
