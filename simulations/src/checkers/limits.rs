//! Invariant 5: no shopper holds or bought more of the hot SKU than its
//! per-shopper limit.

use std::collections::BTreeMap;

use domain::OrderStatus;

use super::Final;
use crate::workload::{HOT, HOT_LIMIT};

pub fn check(view: &Final<'_>) -> Result<(), String> {
    for (node, state) in view.replicas {
        let mut units: BTreeMap<&str, u64> = BTreeMap::new();
        for order in state.orders() {
            if matches!(order.status, OrderStatus::PendingPayment | OrderStatus::Paid) {
                let hot: u64 = order.lines.iter().filter(|l| l.sku == HOT).map(|l| u64::from(l.qty)).sum();
                *units.entry(order.shopper.as_str()).or_default() += hot;
            }
        }
        if let Some((shopper, n)) = units.iter().find(|(_, &n)| n > u64::from(HOT_LIMIT)) {
            return Err(format!("node {node}: {shopper} has {n} units of {HOT}, limit {HOT_LIMIT}"));
        }
    }
    Ok(())
}
