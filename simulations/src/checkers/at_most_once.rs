//! Invariant 4: one idempotency key, at most one order. Every answer to a
//! key named the same order (or, after a forced failover, an order its
//! report names as maybe lost and a new one: the key was lost with it), and no session holds more orders than the keys
//! it used: the keys the workload sent, or for a session the workload does
//! not know (a drill's probe) the keys the state machine decided.

use std::collections::BTreeMap;

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    let named = |order: &u64| view.oracle.region_lost.as_ref().is_some_and(|lost| lost.names(*order));
    for ((session, key), orders) in &view.oracle.answers {
        if orders.iter().filter(|order| !named(order)).count() > 1 {
            return Err(format!("session {session} key {key} was answered with orders {orders:?}"));
        }
    }
    for (node, state) in view.replicas {
        let mut per_session: BTreeMap<u64, u64> = BTreeMap::new();
        for order in state.orders() {
            *per_session.entry(order.session).or_default() += 1;
        }
        for (session, count) in per_session {
            let keys = match view.oracle.keys.get(&session) {
                Some(keys) => keys.len() as u64,
                None => state.checkout_keys(session) as u64,
            };
            if count > keys {
                return Err(format!("node {node}: session {session} has {count} orders from {keys} keys"));
            }
        }
    }
    Ok(())
}
