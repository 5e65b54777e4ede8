//! Invariant 2: `available + escrowed + held + sold + unsettled == total` for every SKU, on every
//! replica, whenever the sampler looked and at the end.

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    let broken = |s: &domain::Stock| !s.is_conserved();
    if let Some(seen) = view.oracle.violations.iter().find(|v| broken(&v.stock)) {
        return Err(format!("during the run: {seen}"));
    }
    for (node, state) in view.replicas {
        for sku in state.sku_views() {
            let s = sku.stock;
            if !s.is_conserved() {
                return Err(format!("node {node}, {}: {s:?}", sku.sale.sku));
            }
        }
    }
    Ok(())
}
