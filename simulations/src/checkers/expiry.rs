//! Expired holds return to stock: after the crowd left and the payment
//! window passed, nothing is held and no order is still pending.

use domain::OrderStatus;

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    for (node, state) in view.replicas {
        if let Some(sku) = state.sku_views().find(|sku| sku.stock.held > 0) {
            return Err(format!("node {node}: {} still holds {}", sku.sale.sku, sku.stock.held));
        }
        if let Some(order) = state.orders().find(|o| o.status == OrderStatus::PendingPayment) {
            return Err(format!("node {node}: order {} still pending, pay by {}", order.id, order.pay_by_ms));
        }
    }
    Ok(())
}
