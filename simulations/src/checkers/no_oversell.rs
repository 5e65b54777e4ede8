//! Invariant 1: `sold + held <= total` for every SKU, on every replica, at
//! every moment the sampler looked and at the end. After a forced
//! failover, across both regions: what the promoted region sold, holds or
//! has on sale, and what shoppers were told they bought from the lost
//! primary and the promoted region does not hold for them, fit in the
//! stock. (A unit sold there only must stay out of sale here, whether or
//! not a shopper has bought it again yet.)

use std::collections::BTreeMap;

use domain::OrderStatus;

use super::Final;
use crate::workload::Told;

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
    across_regions(view)
}

/// The cross-region bound of a run that lost its primary region.
fn across_regions(view: &Final<'_>) -> Result<(), String> {
    let (Some(lost), Some((node, state))) = (&view.oracle.region_lost, view.replicas.first()) else {
        return Ok(());
    };
    // Paid there, holding nothing here: sold only in the lost region.
    let mut sold_there: BTreeMap<&str, u64> = BTreeMap::new();
    for (&id, acked) in view.oracle.acked.iter().filter(|(_, acked)| acked.told == Told::Paid) {
        let holds_here = state
            .order_by_id(id)
            .is_some_and(|order| matches!(order.status, OrderStatus::PendingPayment | OrderStatus::Paid));
        if !holds_here {
            for line in &acked.lines {
                *sold_there.entry(line.sku.as_str()).or_default() += u64::from(line.qty);
            }
        }
    }
    for sku in state.sku_views() {
        let code = sku.sale.sku.as_str();
        let there = sold_there.get(code).copied().unwrap_or(0);
        // A restock the lost region applied and the copy never heard of
        // counts too.
        let restocked = lost.old_copy.as_ref().and_then(|copy| copy.sku_view(code)).map_or(0, |v| v.stock.total);
        let total = sku.stock.total.max(restocked);
        if sku.stock.sold + sku.stock.held + sku.stock.for_sale() + there > total {
            return Err(format!(
                "node {node}, {code}: {} sold, {} held and {} on sale here and {there} sold only in the lost region, \
                 of {total}",
                sku.stock.sold,
                sku.stock.held,
                sku.stock.for_sale()
            ));
        }
    }
    Ok(())
}
