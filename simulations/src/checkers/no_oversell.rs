//! Invariant 1: `sold + held <= total` for every SKU, on every replica, at
//! every moment the sampler looked and at the end.

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    if let Some(seen) = view.oracle.violations.iter().find(|v| v.stock.held + v.stock.sold > v.stock.total) {
        return Err(format!("during the run: {seen}"));
    }
    for (node, state) in view.replicas {
        for sku in state.sku_views() {
            let stock = sku.stock;
            if stock.held + stock.sold > stock.total {
                return Err(format!("node {node}, {}: {stock:?}", sku.sale.sku));
            }
        }
    }
    Ok(())
}
