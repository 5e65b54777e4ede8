//! The JSON shapes of the public API. They are the contract, so they live
//! apart from the domain types: the domain can change its insides without
//! changing what shoppers and operators see.

use domain::{Line, Order, OrderStatus, SkuView};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/sales`: put a SKU on sale.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    pub sku: String,
    /// Shown to shoppers.
    pub name: String,
    /// Unit price in minor currency units (cents).
    pub price_minor: u64,
    /// Units on sale.
    pub stock: u64,
    /// Opening time, milliseconds since the Unix epoch.
    pub starts_at_ms: u64,
    /// Closing time, milliseconds since the Unix epoch.
    pub ends_at_ms: u64,
    /// Most units one shopper may hold or buy; 0 for no limit.
    #[serde(default)]
    pub limit_per_shopper: u32,
}

/// `POST /v1/skus/{sku}/restock`: add units.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    /// Units to add to the total.
    pub units: u64,
}

/// A SKU's sale and live stock.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Sku {
    pub sku: String,
    pub name: String,
    pub price_minor: u64,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    pub limit_per_shopper: u32,
    /// Units still on sale.
    pub available: u64,
    /// Of `available`, units in escrow: with a DR region, a checkout holds
    /// only these, once the DR copy has confirmed them.
    pub escrowed: u64,
    /// Units reserved by orders pending payment.
    pub held: u64,
    /// Units of paid orders.
    pub sold: u64,
    /// Units a failover took out of sale until failback settles them: the
    /// lost primary region may have sold them.
    pub unsettled: u64,
    /// `available + held + sold + unsettled`.
    pub total: u64,
}

impl From<SkuView> for Sku {
    fn from(view: SkuView) -> Self {
        let SkuView { sale, stock } = view;
        Sku {
            sku: sale.sku,
            name: sale.name,
            price_minor: sale.price_minor,
            starts_at_ms: sale.starts_at_ms,
            ends_at_ms: sale.ends_at_ms,
            limit_per_shopper: sale.limit_per_shopper,
            available: stock.for_sale(),
            escrowed: stock.escrowed,
            held: stock.held,
            sold: stock.sold,
            unsettled: stock.unsettled,
            total: stock.total,
        }
    }
}

/// `POST /v1/sessions`: start a shopper session.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The shopper's account id: per-shopper limits count against it.
    pub shopper: String,
}

/// A new session and the bearer token that acts for it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionCreated {
    pub session_id: u64,
    /// Send as `Authorization: Bearer <token>`. Shown once; the server keeps
    /// only its SHA-256.
    pub token: String,
}

/// `PUT /v1/cart/items/{sku}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCartItem {
    /// 1 to 10,000.
    pub qty: u32,
}

/// One line of a cart or an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub sku: String,
    pub qty: u32,
}

impl From<Line> for Item {
    fn from(line: Line) -> Self {
        Item { sku: line.sku, qty: line.qty }
    }
}

impl From<Item> for Line {
    fn from(item: Item) -> Self {
        Line { sku: item.sku, qty: item.qty }
    }
}

/// A session's cart.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cart {
    pub items: Vec<Item>,
}

/// `POST /v1/checkout` body. Absent or without `items`: check out the cart.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkout {
    /// Reserve these instead of the cart (the cart is left as it is).
    pub items: Option<Vec<Item>>,
}

/// `POST /v1/orders/{id}/pay` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pay {
    /// A token of the built-in test payment provider: `tok_approve` is
    /// approved; `tok_decline` and `tok_insufficient_funds` are declined.
    pub payment_token: String,
}

/// An order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderBody {
    pub order_id: u64,
    /// `pending_payment`, `paid`, `cancelled` or `expired`.
    pub status: String,
    pub items: Vec<Item>,
    /// Sum of unit price × quantity, in minor units.
    pub amount_minor: u64,
    /// When the order was placed (leader time, ms since epoch).
    pub placed_at_ms: u64,
    /// An unpaid order expires at this time and its units return to stock.
    pub pay_by_ms: u64,
}

impl From<Order> for OrderBody {
    fn from(order: Order) -> Self {
        OrderBody {
            order_id: order.id,
            status: order.status.as_str().to_string(),
            items: order.lines.into_iter().map(Item::from).collect(),
            amount_minor: order.amount_minor,
            placed_at_ms: order.placed_at_ms,
            pay_by_ms: order.pay_by_ms,
        }
    }
}

/// `GET /v1/cluster`: the cluster as the answering node sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// The region that takes writes (a switchover moves it).
    pub primary_region: String,
    /// How many switchovers the cluster has made.
    pub epoch: u64,
    /// Whether a switchover refuses writes right now.
    pub frozen: bool,
    /// Every node of the topology, each asked over the peer transport.
    pub nodes: Vec<NodeView>,
    /// Live SKU actors on the answering node.
    pub sku_actors: usize,
    /// Live session actors on the answering node.
    pub session_actors: usize,
    /// Orders by status in the answering node's replica.
    pub orders: OrderCounts,
}

/// One node of the topology and what it said about itself.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: u64,
    pub region: String,
    pub zone: String,
    /// Its public API address.
    pub api: String,
    /// Its peer transport address.
    pub peer: String,
    /// Its own report: role, leader, term, log positions, follower lag.
    pub status: Option<cluster::NodeStatus>,
    /// Why it did not answer (down, partitioned, isolated by a drill).
    pub error: Option<String>,
}

/// `POST /v1/admin/leader`: move the group's leadership to a node.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveLeader {
    /// The node that should lead (in the primary region).
    pub node: u64,
}

/// `POST /v1/admin/switchover`: move writes to another region.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Switchover {
    /// The region to take writes, e.g. `dr`.
    pub to: String,
}

/// `POST /v1/admin/failover`: promote this node's region, the region that
/// takes writes being lost.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    /// The region to take writes: this node's, e.g. `dr`.
    pub to: String,
    /// Must be `true`: a forced failover may lose acknowledged orders (it
    /// reports which), and `GET /v1/admin/failover/preview` says how many.
    pub force: bool,
}

/// `POST /v1/admin/failback`: settle a forced failover with the region it
/// lost, and take that region back as the DR copy.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failback {
    /// The region the failover lost, e.g. `primary`.
    pub from: String,
    /// Nodes of that region whose disks are gone for good. The
    /// reconciliation goes without their copies: it lists what the other
    /// copies have, returns no unit to sale and keeps every payment in
    /// doubt in doubt. Name none unless the disks are truly lost: a node
    /// that is only down may hold orders no other copy has.
    #[serde(default)]
    pub copies_lost: Vec<u64>,
}

/// `POST /v1/admin/replace-node`: take a node whose disk is gone for good
/// back into the group as a new, wiped member.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceNode {
    /// The node whose data is gone. It must not answer with a log: stopped,
    /// or already started wiped with `join = true`.
    pub node: u64,
    /// Whether it ends as a voter. By default: what the latest replacement
    /// of the node on record that did not complete meant it to be (a run
    /// cut short is finished by asking again), or else what it is now.
    #[serde(default)]
    pub voter: Option<bool>,
}

/// `POST /v1/admin/drills/zone-loss`: cut every node of a zone off from the
/// cluster for a while and measure what checkout sees.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ZoneLossDrill {
    /// The zone to cut off; the node asked must be outside it.
    pub zone: String,
    /// How long, 1 000 to 600 000 ms.
    pub isolate_for_ms: u64,
}

/// Orders by status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderCounts {
    pub pending_payment: u64,
    pub paid: u64,
    pub cancelled: u64,
    pub expired: u64,
}

impl From<[u64; 4]> for OrderCounts {
    fn from(counts: [u64; 4]) -> Self {
        let [pending_payment, paid, cancelled, expired] = counts;
        OrderCounts { pending_payment, paid, cancelled, expired }
    }
}

/// An RFC 9457 problem document: the body of every error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// Stable per kind of error, e.g. `/problems/sold-out`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, stable per type.
    pub title: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// What happened this time.
    pub detail: String,
}

/// Status names the API shows, in `OrderStatus` order.
pub const ORDER_STATUSES: [OrderStatus; 4] =
    [OrderStatus::PendingPayment, OrderStatus::Paid, OrderStatus::Cancelled, OrderStatus::Expired];
