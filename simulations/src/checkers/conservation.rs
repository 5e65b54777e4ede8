//! Invariant 2: `available + escrowed + held + sold + unsettled == total` for every SKU, on every
//! replica, whenever the sampler looked and at the end. Restocks change the total explicitly,
//! and once: the hot SKU's total is what its sale was created with, plus the operator's restock
//! if it applied, which it must have if it was answered (unless the region that answered it was
//! lost).

use super::Final;
use crate::workload::HOT;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    restocked_once(view)?;
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

fn restocked_once(view: &Final<'_>) -> Result<(), String> {
    let created = view.oracle.hot_created;
    let restock = view.oracle.restock;
    let with_restock = created + restock.map_or(0, |restock| restock.units);
    let acked = restock.is_some_and(|restock| restock.acked) && view.oracle.region_lost.is_none();
    for (node, state) in view.replicas {
        let total = state.sku_view(HOT).map_or(0, |sku| sku.stock.total);
        let fits = if acked { total == with_restock } else { total == created || total == with_restock };
        if !fits {
            return Err(format!("node {node}, {HOT}: total {total}, created with {created}, restock {restock:?}"));
        }
    }
    Ok(())
}
