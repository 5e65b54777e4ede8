//! The vocabulary of the replicated log: commands in, outcomes out, and the
//! records a shopper or operator can read back.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::stock::Stock;

/// A session's id, assigned by the state machine in log order so that every
/// replica agrees on it without coordination.
pub type SessionId = u64;
/// An order's id, assigned by the state machine in log order.
pub type OrderId = u64;

/// One Raft log entry: the commands one proposer collected while its previous
/// proposal was in flight (group commit), stamped with the leader's clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds since the Unix epoch on the leader when it proposed the
    /// entry. The state machine's only notion of time: sale windows and
    /// payment deadlines are judged against it, never against a local clock.
    pub stamped_at_ms: u64,
    /// Applied in order; each gets one outcome.
    pub commands: Vec<Command>,
}

/// What applying one [`Request`] produced: one outcome per command, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// `outcomes[i]` answers `commands[i]`.
    pub outcomes: Vec<Outcome>,
}

/// A sale as the operator defines it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    /// The product's code; one sale per SKU.
    pub sku: String,
    /// Shown to shoppers.
    pub name: String,
    /// Unit price in minor currency units (cents), so money is never a float.
    pub price_minor: u64,
    /// Units for sale at creation; restocks add to the SKU's total.
    pub stock: u64,
    /// Checkouts are accepted from this moment (leader time, ms since epoch)...
    pub starts_at_ms: u64,
    /// ...until just before this one.
    pub ends_at_ms: u64,
    /// Most units one shopper may hold or have bought of this SKU; 0 means no limit.
    pub limit_per_shopper: u32,
}

/// One line of a cart or an order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Line {
    /// Which product.
    pub sku: String,
    /// How many units.
    pub qty: u32,
}

/// Where an order is in its life. `PendingPayment` holds stock; the other
/// three are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Stock is held until `pay_by_ms`.
    PendingPayment,
    /// Held units became sold.
    Paid,
    /// The shopper cancelled; held units returned to stock.
    Cancelled,
    /// The deadline passed unpaid; held units returned to stock.
    Expired,
}

impl OrderStatus {
    /// The name used in the API and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    /// Whether the order holds or sold units: pending payment or paid. One
    /// cancelled or expired owes nothing to anyone.
    pub fn holds_units(self) -> bool {
        matches!(self, OrderStatus::PendingPayment | OrderStatus::Paid)
    }
}

/// An order as it is replicated and as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Assigned in log order.
    pub id: OrderId,
    /// The session that placed it: only that session may read or change it.
    pub session: SessionId,
    /// The shopper the per-shopper limits count it against.
    pub shopper: String,
    /// What was reserved, sorted by SKU.
    pub lines: Vec<Line>,
    /// Sum of unit price times quantity, in minor units, fixed at checkout.
    pub amount_minor: u64,
    /// Where the order is in its life.
    pub status: OrderStatus,
    /// Leader time at which the order was placed.
    pub placed_at_ms: u64,
    /// Leader time at which an unpaid order expires and its stock returns.
    pub pay_by_ms: u64,
    /// Leader time of the last status change.
    pub updated_at_ms: u64,
}

/// A sale together with its live stock, as `GET /v1/skus/{sku}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuView {
    /// The sale as created (its `stock` is the initial stock).
    pub sale: Sale,
    /// The current counters.
    pub stock: Stock,
}

/// A session's cart as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    /// Sorted by SKU.
    pub lines: Vec<Line>,
}

/// A change to the replicated state. Every command is validated again by the
/// state machine: a command that fails validation is rejected and changes
/// nothing, whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Operator: put a SKU on sale.
    CreateSale(Sale),
    /// Operator: add units to a SKU's total. The same `idempotency_key`
    /// with the same units adds them once: a retry gets the SKU as it is
    /// now; with other units it is a conflict. A SKU remembers its last
    /// [`crate::RESTOCKS_KEPT`] keys.
    Restock { sku: String, units: u64, idempotency_key: String },
    /// Shopper: start a session. `token_hash` is the SHA-256 of the bearer
    /// token, so the log never holds a usable credential.
    OpenSession { shopper: String, token_hash: String },
    /// Shopper: set a cart line's quantity (adds the line if missing).
    SetCartItem { session: SessionId, sku: String, qty: u32 },
    /// Shopper: drop a cart line.
    RemoveCartItem { session: SessionId, sku: String },
    /// Shopper: reserve `items` (or, when `None`, the whole cart) as one order,
    /// all lines or none. The same `idempotency_key` with the same `items`
    /// gets the first checkout's answer again (its order, or the same
    /// sold-out or limit refusal); with different `items` it is a conflict.
    Checkout {
        session: SessionId,
        idempotency_key: String,
        items: Option<Vec<Line>>,
        /// How long the order may stay unpaid, from the entry's timestamp.
        hold_ms: u64,
    },
    /// Shopper: the payment provider approved; held units become sold.
    Pay { session: SessionId, order: OrderId },
    /// Shopper: give up an unpaid order; held units return to stock.
    Cancel { session: SessionId, order: OrderId },
    /// Operator tooling: keep a drill's record (its report, opaque here) in
    /// the replicated state, so every node can show it and the node that
    /// ran the drill can restart without losing it. A record with the same
    /// `(id, coordinator)` replaces the earlier one; past
    /// [`crate::DRILLS_KEPT`] records the oldest goes.
    RecordDrill { id: u64, coordinator: u64, record: String },
    /// Switchover, step 1: refuse every write from now on (503, retried)
    /// while the DR copy catches up. `epoch` is the next epoch, above the
    /// current one.
    Freeze { epoch: u64 },
    /// Switchover, last step: `region` takes writes from now on, in
    /// `epoch`, which the freeze announced; writes flow again.
    Promote { region: String, epoch: u64 },
    /// A switchover that could not finish: writes flow again, in the old
    /// epoch and region.
    Thaw { epoch: u64 },
    /// Leader, while the group has a DR copy: `units` of the SKU's
    /// available stock go into escrow, as grant number
    /// [`GroupState::escrow_granted`](crate::GroupState::escrow_granted).
    /// The first grant turns escrow on for good: from then on a checkout
    /// holds only escrowed units the DR copy has confirmed, so the copy
    /// always knows which units the writing region might have sold.
    GrantEscrow { sku: String, units: u64 },
    /// The DR copy, once it has applied every grant up to `through`: their
    /// units may be held now.
    ConfirmEscrow { through: u64 },
    /// Failback after the forced failover that made generation
    /// `generation`: each SKU's `returned` units go from `unsettled` back
    /// on sale (see [`GroupState::reconcile`](crate::GroupState::reconcile)).
    /// Of the orders whose payment was in doubt, only `kept_in_doubt` stay
    /// in doubt (those the lost primary had paid, or every one if a copy of
    /// it was lost): if they expire here their units may have been sold
    /// there and stay out of sale; the others' come back on sale. Once per
    /// generation; a repeat changes nothing.
    SettleFailover { generation: u64, returned: BTreeMap<String, u64>, kept_in_doubt: BTreeSet<OrderId> },
}

impl Command {
    /// The SKU whose stock this command touches first, if any: the proposer
    /// routes a command to that SKU's actor so that a hot SKU's requests share
    /// one batch.
    pub fn routing_sku(&self) -> Option<&str> {
        match self {
            Command::CreateSale(sale) => Some(&sale.sku),
            Command::Restock { sku, .. } | Command::GrantEscrow { sku, .. } => Some(sku),
            Command::Checkout { items: Some(items), .. } => items.first().map(|line| line.sku.as_str()),
            _ => None,
        }
    }

    /// Whether the command changes the sale (stock, sessions, carts,
    /// orders): what a switchover's freeze refuses. Records and switchover
    /// steps are not.
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Command::RecordDrill { .. } | Command::Freeze { .. } | Command::Promote { .. } | Command::Thaw { .. }
        )
    }

    /// A short name for metrics and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateSale(_) => "create_sale",
            Command::Restock { .. } => "restock",
            Command::OpenSession { .. } => "open_session",
            Command::SetCartItem { .. } => "set_cart_item",
            Command::RemoveCartItem { .. } => "remove_cart_item",
            Command::Checkout { .. } => "checkout",
            Command::Pay { .. } => "pay",
            Command::Cancel { .. } => "cancel",
            Command::RecordDrill { .. } => "record_drill",
            Command::Freeze { .. } => "freeze",
            Command::Promote { .. } => "promote",
            Command::Thaw { .. } => "thaw",
            Command::GrantEscrow { .. } => "grant_escrow",
            Command::ConfirmEscrow { .. } => "confirm_escrow",
            Command::SettleFailover { .. } => "settle_failover",
        }
    }
}

/// What one command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// `CreateSale` or `Restock` succeeded.
    Sku(SkuView),
    /// `OpenSession` succeeded.
    SessionOpened { session: SessionId },
    /// A cart command succeeded; the cart after it.
    Cart(Cart),
    /// `Checkout`, `Pay` or `Cancel` succeeded. `replayed` is true when the
    /// command had already been applied (a retry) and nothing changed now.
    Order { order: Order, replayed: bool },
    /// `RecordDrill` succeeded.
    DrillRecorded,
    /// `Freeze`, `Promote` or `Thaw` succeeded: the epoch and whether writes
    /// are refused now.
    Epoch { epoch: u64, frozen: bool },
    /// `GrantEscrow` or `ConfirmEscrow` succeeded: the latest grant's
    /// number, and the latest confirmed.
    Escrow { granted: u64, confirmed: u64 },
    /// `SettleFailover` succeeded; `replayed` when the generation was
    /// settled already and nothing changed now.
    Settled { generation: u64, replayed: bool },
    /// The command changed nothing, for this reason.
    Rejected(Rejection),
}

/// Why a command changed nothing. These are normal outcomes of a flash sale
/// (sold out, limit reached) or of bad input, not internal errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// Malformed input: the message says which bound it broke.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No sale exists for this SKU.
    #[error("no sale for sku {sku}")]
    UnknownSku { sku: String },
    /// A sale for this SKU exists already.
    #[error("a sale for sku {sku} exists already")]
    SaleExists { sku: String },
    /// The group holds as many sales as it may.
    #[error("too many sales")]
    TooManySales,
    /// Now is before the sale's start.
    #[error("the sale of {sku} has not started")]
    SaleNotOpen { sku: String },
    /// Now is at or after the sale's end.
    #[error("the sale of {sku} has ended")]
    SaleEnded { sku: String },
    /// Fewer units are available than the line asks for.
    #[error("sku {sku} is sold out ({available} available)")]
    SoldOut { sku: String, available: u64 },
    /// The line would take the shopper past the per-shopper limit.
    #[error("limit of {limit} per shopper for sku {sku} reached ({already} held or bought)")]
    LimitExceeded { sku: String, limit: u32, already: u64 },
    /// Checkout of an empty cart, or an order with no lines.
    #[error("nothing to order")]
    EmptyOrder,
    /// The cart already has as many lines as it may.
    #[error("the cart is full")]
    CartFull,
    /// The session has made as many checkouts as it may.
    #[error("this session has made its maximum number of checkouts")]
    TooManyCheckouts,
    /// The idempotency key was used before with a different request body.
    #[error("idempotency key reused with a different request")]
    IdempotencyConflict,
    /// No such session (or its token is unknown).
    #[error("unknown session")]
    UnknownSession,
    /// No such order for this session. Another session's order is reported
    /// the same way, so its existence leaks nothing.
    #[error("order {order} not found")]
    UnknownOrder { order: OrderId },
    /// The order is in a state the command cannot act on (paying an expired
    /// order, cancelling a paid one).
    #[error("order {order} is {status:?}")]
    OrderFinal { order: OrderId, status: OrderStatus },
    /// Restocking would take the total past [`crate::SALE_STOCK_MAX`].
    #[error("stock would exceed the maximum")]
    StockOverflow,
    /// A switchover is under way: no write is taken until it ends.
    #[error("a switchover to epoch {epoch} is under way; retry shortly")]
    Frozen { epoch: u64 },
    /// Units are on sale but not yet in confirmed escrow: the DR copy has
    /// not heard that the writing region may sell them. Retry shortly.
    #[error("units of {sku} are on their way into escrow; retry shortly")]
    EscrowPending { sku: String, wanted: u64 },
    /// A switchover step out of turn: its epoch is not the one expected.
    #[error("epoch {epoch} does not follow: the cluster is in epoch {current}{}", if *.frozen { " (frozen)" } else { "" })]
    StaleEpoch { epoch: u64, current: u64, frozen: bool },
}

impl Rejection {
    /// Whether this is a decision about the sale (sold out, over the limit,
    /// ended) rather than a complaint about the request. A checkout's
    /// decision is kept with its idempotency key and replayed to retries.
    ///
    /// A sale not open yet is no decision: the crowd presses "buy" before
    /// the moment, and a refusal kept with the key would refuse the same
    /// key for good once the sale opens, and use up one of the session's
    /// [`crate::CHECKOUTS_PER_SESSION_MAX`] keys at every press.
    pub fn is_decision(&self) -> bool {
        matches!(self, Rejection::SoldOut { .. } | Rejection::LimitExceeded { .. } | Rejection::SaleEnded { .. })
    }
}

/// What an unplanned failover cost, computed by the DR copy as it takes
/// over ([`GroupState::fail_over`](crate::GroupState::fail_over)). The copy
/// cannot know what the lost primary did after its last entry, only what it
/// could have done: sell escrowed units, place orders with the next ids,
/// and take payment for orders that were pending.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// The copy's generation from now on: one above the lost primary's.
    pub generation: u64,
    /// The epoch the copy takes writes in.
    pub epoch: u64,
    /// The region that takes writes now.
    pub region: String,
    /// The copy's clock at its last entry: acknowledgements after it may be
    /// lost.
    pub cut_at_ms: u64,
    /// Units each SKU took out of sale (its escrow): the undersell bound,
    /// settled at failback.
    pub unsettled: BTreeMap<String, u64>,
    /// Order ids the old primary may have acknowledged after the cut,
    /// `first..end`: every placed order takes at least one escrowed unit,
    /// so there are at most as many as units unsettled. The copy gives its
    /// own orders ids above them.
    pub orders_maybe_lost: std::ops::Range<OrderId>,
    /// Orders pending payment at the cut: the old primary may have taken
    /// their payment, or let them expire and freed their units. They may
    /// still be paid; unpaid, their units stay out of sale.
    pub payments_in_doubt: Vec<OrderId>,
    /// Session ids the old primary may have given sessions it opened after
    /// the cut, `first..end`: the copy gives its own sessions ids above
    /// them ([`crate::SESSIONS_SKIPPED_AT_FAILOVER`]). Their tokens are
    /// unknown here.
    pub sessions_maybe_lost: std::ops::Range<SessionId>,
}

impl Failover {
    /// Whether it names `order`: as an id the lost primary may have
    /// acknowledged, or as an order whose payment is in doubt.
    pub fn names(&self, order: OrderId) -> bool {
        self.orders_maybe_lost.contains(&order) || self.payments_in_doubt.contains(&order)
    }
}

/// What failback found comparing the lost primary's copy with the promoted
/// one (see [`GroupState::reconcile`](crate::GroupState::reconcile)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// Orders the lost primary acknowledged in a state the promoted copy
    /// does not have (or does not have at all), for an operator to settle.
    pub orders_to_settle: Vec<OrderToSettle>,
    /// Units per SKU in orders the lost primary has as paid that hold
    /// nothing in the promoted copy: sold there, so they stay out of sale.
    pub units_sold_there: BTreeMap<String, u64>,
    /// Units per SKU the failover took out of sale that nobody bought:
    /// they go back on sale.
    pub units_returned: BTreeMap<String, u64>,
    /// Orders pending in the promoted copy whose payment stays in doubt:
    /// paid there, or with a copy lost, every one in doubt. Unpaid, their
    /// units stay out of sale; every other order in doubt gives its units
    /// back to sale if it expires.
    #[serde(default)]
    pub kept_in_doubt: BTreeSet<OrderId>,
    /// Returning nodes whose copies an operator declared lost for good and
    /// that were not read. Orders only they knew are not listed, so no unit
    /// goes back on sale and every payment in doubt stays in doubt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies_lost: Vec<u64>,
}

impl Reconciliation {
    /// The command that settles it, for the failover of `generation`.
    pub fn settlement(&self, generation: u64) -> Command {
        Command::SettleFailover {
            generation,
            returned: self.units_returned.clone(),
            kept_in_doubt: self.kept_in_doubt.clone(),
        }
    }
}

/// One order the two copies disagree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderToSettle {
    /// The order's id, the same in both copies.
    pub id: OrderId,
    /// Who placed it.
    pub shopper: String,
    /// What it holds or sold.
    pub lines: Vec<Line>,
    /// What it costs, in minor units.
    pub amount_minor: u64,
    /// Its status in the lost primary's copy: what the shopper was told.
    pub there: OrderStatus,
    /// Its status in the promoted copy, if it has the order at all.
    pub here: Option<OrderStatus>,
}
