//! Expired holds return to stock: every order still pending is inside its
//! payment window (give or take how far clocks jumped), and each SKU holds
//! exactly the units of its pending orders.

use std::collections::BTreeMap;

use domain::OrderStatus;

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    for (node, state) in view.replicas {
        let mut pending: BTreeMap<&str, u64> = BTreeMap::new();
        for order in state.orders().filter(|o| o.status == OrderStatus::PendingPayment) {
            if order.pay_by_ms + view.expiry_slack_ms < view.now_ms {
                return Err(format!(
                    "node {node}: order {} still pending {} ms after its deadline",
                    order.id,
                    view.now_ms - order.pay_by_ms
                ));
            }
            for line in &order.lines {
                *pending.entry(line.sku.as_str()).or_default() += u64::from(line.qty);
            }
        }
        for sku in state.sku_views() {
            let expected = pending.get(sku.sale.sku.as_str()).copied().unwrap_or(0);
            if sku.stock.held != expected {
                return Err(format!(
                    "node {node}: {} holds {} for pending orders of {expected}",
                    sku.sale.sku, sku.stock.held
                ));
            }
        }
    }
    Ok(())
}
