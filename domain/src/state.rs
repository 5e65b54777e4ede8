//! The replicated state of one Raft group and the deterministic `apply`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::mutation::{self, Mutation};
use crate::stock::Stock;
use crate::types::*;

/// Everything one Raft group replicates: the sales and stock of its SKUs and
/// the sessions, carts and orders of its shoppers.
///
/// Only ordered collections (`BTreeMap`/`BTreeSet`): iteration order is part
/// of the state machine's behaviour (which holds expire first), so it must be
/// the same on every replica and in every simulator run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The latest leader timestamp applied. Never goes backwards, even if a
    /// new leader's clock is behind the old one's.
    clock_ms: u64,
    /// One entry per SKU on sale.
    skus: BTreeMap<String, SkuState>,
    /// Open sessions by id.
    sessions: BTreeMap<SessionId, Session>,
    /// `(closes_at_ms, session)` for each open session that holds no order
    /// pending payment or paid: the idle-session queue. A session holding
    /// one stays open, so the order keeps its owner.
    closing: BTreeSet<(u64, SessionId)>,
    /// How many sessions `closing` may hold.
    idle_sessions_max: IdleSessionsMax,
    /// SHA-256 of a session's bearer token → session, to authenticate requests.
    tokens: BTreeMap<String, SessionId>,
    /// Every order ever placed.
    orders: BTreeMap<OrderId, Order>,
    /// `(pay_by_ms, order)` for each order pending payment: the expiry queue.
    deadlines: BTreeSet<(u64, OrderId)>,
    /// The id the next session gets.
    next_session: SessionId,
    /// The id the next order gets.
    next_order: OrderId,
    /// Drill records by `(id, coordinator)`: ids are start times, so the
    /// first is the oldest.
    drills: BTreeMap<(u64, u64), String>,
    /// Raised by every switchover; see [`GroupState::epoch`].
    epoch: u64,
    /// The epoch a switchover under way announced: writes are refused.
    frozen: Option<u64>,
    /// The region that takes writes, once a switchover has moved them
    /// (until then, the configured primary region).
    primary_region: Option<String>,
    /// The number of the latest escrow grant; 0 while escrow is off.
    escrow_granted: u64,
    /// Every grant up to this number is confirmed by the DR copy.
    escrow_confirmed: u64,
    /// Orders pending payment when this copy failed over: unpaid, their
    /// units go to `unsettled`, not back on sale.
    in_doubt: BTreeSet<OrderId>,
    /// Raised by every forced failover; see [`GroupState::generation`].
    generation: u64,
    /// The latest generation whose failover failback has settled.
    settled_generation: u64,
    /// What the latest forced failover reported it may have cost: part of
    /// the copy the new group is founded from, so the report outlives the
    /// node that promoted it.
    last_failover: Option<Failover>,
}

/// A SKU's sale, stock, and how much of it each shopper holds or bought.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SkuState {
    sale: Sale,
    stock: Stock,
    /// Units held or sold per shopper, for the per-shopper limit. A shopper
    /// appears only while the count is above zero.
    per_shopper: BTreeMap<String, u64>,
    /// The SKU's escrowed units, by whether the DR copy confirmed them.
    escrow: Escrow,
    /// The latest restocks' idempotency keys and units, oldest first, at
    /// most [`RESTOCKS_KEPT`].
    restocks: VecDeque<(String, u64)>,
}

/// The bound on idle sessions; [`IDLE_SESSIONS_MAX`] unless a test asks for
/// a smaller one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct IdleSessionsMax(usize);

impl Default for IdleSessionsMax {
    fn default() -> Self {
        Self(IDLE_SESSIONS_MAX)
    }
}

/// `stock.escrowed = ready + Σ unconfirmed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Escrow {
    /// Grants the DR copy has not confirmed: grant number → units.
    unconfirmed: BTreeMap<u64, u64>,
    /// Confirmed units not yet held: what checkouts may hold.
    ready: u64,
}

/// A shopper's session: cart, orders, and idempotency keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    shopper: String,
    /// SHA-256 of the bearer token, to forget it when the session closes.
    token_hash: String,
    /// When the session closes if nothing is written to it; `None` while
    /// it holds an order pending payment or paid.
    closes_at_ms: Option<u64>,
    /// Its orders, oldest first: they close with it (then all are
    /// cancelled or expired).
    orders: Vec<OrderId>,
    /// SKU → quantity.
    cart: BTreeMap<String, u32>,
    /// Idempotency key → the `items` of the first checkout with that key and
    /// what it decided: the order placed, or why none was (sold out, limit,
    /// sale closed). A retry gets the same answer, never a second decision.
    checkouts: BTreeMap<String, Checkout>,
}

/// What a checkout with one idempotency key decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Checkout {
    items: Option<Vec<Line>>,
    decided: Result<OrderId, Rejection>,
}

impl GroupState {
    /// An empty state that keeps at most `max` idle sessions open, instead
    /// of [`IDLE_SESSIONS_MAX`]: lets a test reach the bound.
    pub fn with_idle_sessions_max(max: usize) -> Self {
        Self { idle_sessions_max: IdleSessionsMax(max.max(1)), ..Self::default() }
    }

    /// Applies one log entry. Deterministic: the same state and request give
    /// the same state and response on every replica.
    pub fn apply(&mut self, request: &Request) -> Response {
        self.clock_ms = self.clock_ms.max(request.stamped_at_ms);
        self.expire_due();
        self.close_idle_sessions();
        let outcomes = request.commands.iter().map(|command| self.apply_command(command)).collect();
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
        Response { outcomes }
    }

    fn apply_command(&mut self, command: &Command) -> Outcome {
        if let Some(epoch) = self.frozen {
            if command.is_write() {
                return Outcome::Rejected(Rejection::Frozen { epoch });
            }
        }
        let result = match command {
            Command::CreateSale(sale) => self.create_sale(sale),
            Command::Restock { sku, units, idempotency_key } => self.restock(sku, *units, idempotency_key),
            Command::OpenSession { shopper, token_hash } => self.open_session(shopper, token_hash),
            Command::SetCartItem { session, sku, qty } => self.set_cart_item(*session, sku, *qty),
            Command::RemoveCartItem { session, sku } => self.remove_cart_item(*session, sku),
            Command::Checkout { session, idempotency_key, items, hold_ms } => {
                self.checkout(*session, idempotency_key, items.as_deref(), *hold_ms)
            }
            Command::Pay { session, order } => self.pay(*session, *order),
            Command::Cancel { session, order } => self.cancel(*session, *order),
            Command::RecordDrill { id, coordinator, record } => self.record_drill(*id, *coordinator, record),
            Command::Freeze { epoch } => self.freeze(*epoch),
            Command::Promote { region, epoch } => self.promote(region, *epoch),
            Command::Thaw { epoch } => self.thaw(*epoch),
            Command::GrantEscrow { sku, units } => self.grant_escrow(sku, *units),
            Command::ConfirmEscrow { through } => self.confirm_escrow(*through),
            Command::SettleFailover { generation, returned, kept_in_doubt } => {
                self.settle_failover(*generation, returned, kept_in_doubt)
            }
        };
        result.unwrap_or_else(Outcome::Rejected)
    }

    fn create_sale(&mut self, sale: &Sale) -> Result<Outcome, Rejection> {
        validate_sku(&sale.sku)?;
        if sale.name.is_empty() || sale.name.len() > SALE_NAME_LEN_MAX {
            return Err(Rejection::Invalid(format!("name must be 1 to {SALE_NAME_LEN_MAX} bytes")));
        }
        if sale.price_minor > PRICE_MINOR_MAX {
            return Err(Rejection::Invalid(format!("price_minor must be at most {PRICE_MINOR_MAX}")));
        }
        if sale.stock > SALE_STOCK_MAX {
            return Err(Rejection::Invalid(format!("stock must be at most {SALE_STOCK_MAX}")));
        }
        if sale.ends_at_ms <= sale.starts_at_ms {
            return Err(Rejection::Invalid("ends_at_ms must be after starts_at_ms".into()));
        }
        if self.skus.contains_key(&sale.sku) {
            return Err(Rejection::SaleExists { sku: sale.sku.clone() });
        }
        if self.skus.len() >= SALES_MAX {
            return Err(Rejection::TooManySales);
        }
        let state = SkuState {
            sale: sale.clone(),
            stock: Stock::new(sale.stock),
            per_shopper: BTreeMap::new(),
            escrow: Escrow::default(),
            restocks: VecDeque::new(),
        };
        let view = state.view();
        self.skus.insert(sale.sku.clone(), state);
        Ok(Outcome::Sku(view))
    }

    fn freeze(&mut self, epoch: u64) -> Result<Outcome, Rejection> {
        if self.frozen.is_some() || epoch <= self.epoch {
            return Err(self.stale_epoch(epoch));
        }
        self.frozen = Some(epoch);
        Ok(Outcome::Epoch { epoch: self.epoch, frozen: true })
    }

    fn promote(&mut self, region: &str, epoch: u64) -> Result<Outcome, Rejection> {
        if self.frozen != Some(epoch) {
            return Err(self.stale_epoch(epoch));
        }
        if region.is_empty() || region.len() > REGION_LEN_MAX {
            return Err(Rejection::Invalid(format!("region must be 1 to {REGION_LEN_MAX} bytes")));
        }
        self.epoch = epoch;
        self.frozen = None;
        self.primary_region = Some(region.to_string());
        self.regrant_escrow();
        Ok(Outcome::Epoch { epoch, frozen: false })
    }

    /// After a switchover the DR copy is another region's, which has not
    /// confirmed anything yet: all escrow becomes one new grant, for it to
    /// confirm once it has applied everything up to here.
    fn regrant_escrow(&mut self) {
        if !self.escrow_is_on() {
            return;
        }
        let number = self.escrow_granted + 1;
        for sku in self.skus.values_mut() {
            sku.escrow = Escrow::default();
            if sku.stock.escrowed > 0 {
                sku.escrow.unconfirmed.insert(number, sku.stock.escrowed);
            }
        }
        self.escrow_granted = number;
        self.escrow_confirmed = number - 1;
    }

    fn thaw(&mut self, epoch: u64) -> Result<Outcome, Rejection> {
        if self.frozen != Some(epoch) {
            return Err(self.stale_epoch(epoch));
        }
        self.frozen = None;
        Ok(Outcome::Epoch { epoch: self.epoch, frozen: false })
    }

    fn stale_epoch(&self, epoch: u64) -> Rejection {
        Rejection::StaleEpoch { epoch, current: self.epoch, frozen: self.frozen.is_some() }
    }

    fn grant_escrow(&mut self, sku: &str, units: u64) -> Result<Outcome, Rejection> {
        let number = self.escrow_granted + 1;
        let state = self.sku_mut(sku)?;
        if units == 0 || units > state.stock.available {
            let available = state.stock.available;
            return Err(Rejection::Invalid(format!("an escrow grant must be 1 to {available} units")));
        }
        state.stock.grant(units);
        state.escrow.unconfirmed.insert(number, units);
        self.escrow_granted = number;
        Ok(Outcome::Escrow { granted: number, confirmed: self.escrow_confirmed })
    }

    fn confirm_escrow(&mut self, through: u64) -> Result<Outcome, Rejection> {
        if through > self.escrow_granted {
            return Err(Rejection::Invalid(format!("no escrow grant {through} yet")));
        }
        if through > self.escrow_confirmed {
            for sku in self.skus.values_mut() {
                let later = sku.escrow.unconfirmed.split_off(&(through + 1));
                sku.escrow.ready += std::mem::replace(&mut sku.escrow.unconfirmed, later).values().sum::<u64>();
            }
            self.escrow_confirmed = through;
        }
        Ok(Outcome::Escrow { granted: self.escrow_granted, confirmed: self.escrow_confirmed })
    }

    fn settle_failover(
        &mut self,
        generation: u64,
        returned: &BTreeMap<String, u64>,
        kept_in_doubt: &BTreeSet<OrderId>,
    ) -> Result<Outcome, Rejection> {
        if generation == 0 || generation != self.generation {
            return Err(Rejection::Invalid(format!(
                "no failover of generation {generation} to settle (this copy is of generation {})",
                self.generation
            )));
        }
        if self.settled_generation == generation {
            return Ok(Outcome::Settled { generation, replayed: true });
        }
        for (sku, units) in returned {
            let unsettled =
                self.skus.get(sku).ok_or_else(|| Rejection::UnknownSku { sku: sku.clone() })?.stock.unsettled;
            if *units > unsettled {
                return Err(Rejection::Invalid(format!(
                    "{sku}: cannot return {units} units, {unsettled} are unsettled"
                )));
            }
        }
        for (sku, units) in returned {
            self.skus.get_mut(sku).expect("checked above").stock.return_unsettled(*units);
        }
        // The lost primary is fenced: an order pending there now will never
        // be paid there, and its units were not sold again there.
        self.in_doubt.retain(|order| kept_in_doubt.contains(order));
        self.settled_generation = generation;
        Ok(Outcome::Settled { generation, replayed: false })
    }

    fn record_drill(&mut self, id: u64, coordinator: u64, record: &str) -> Result<Outcome, Rejection> {
        if record.len() > DRILL_RECORD_BYTES_MAX {
            return Err(Rejection::Invalid(format!("a drill record must be at most {DRILL_RECORD_BYTES_MAX} bytes")));
        }
        self.drills.insert((id, coordinator), record.to_string());
        if self.drills.len() > DRILLS_KEPT {
            self.drills.pop_first();
        }
        Ok(Outcome::DrillRecorded)
    }

    /// Adds `units` once per key: an operator whose restock timed out may
    /// send it again.
    fn restock(&mut self, sku: &str, units: u64, key: &str) -> Result<Outcome, Rejection> {
        validate_idempotency_key(key)?;
        let state = self.sku_mut(sku)?;
        if units == 0 {
            return Err(Rejection::Invalid("units must be at least 1".into()));
        }
        let earlier =
            state.restocks.iter().find(|(k, _)| k == key).filter(|_| !mutation::active(Mutation::ApplyRetryTwice));
        if let Some((_, earlier)) = earlier {
            return if *earlier == units {
                Ok(Outcome::Sku(state.view()))
            } else {
                Err(Rejection::IdempotencyConflict)
            };
        }
        if state.stock.total.saturating_add(units) > SALE_STOCK_MAX {
            return Err(Rejection::StockOverflow);
        }
        state.stock.restock(units);
        state.restocks.push_back((key.to_string(), units));
        if state.restocks.len() > RESTOCKS_KEPT {
            state.restocks.pop_front();
        }
        Ok(Outcome::Sku(state.view()))
    }

    fn open_session(&mut self, shopper: &str, token_hash: &str) -> Result<Outcome, Rejection> {
        validate_shopper(shopper)?;
        if token_hash.len() != 64 || !token_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Rejection::Invalid("token_hash must be 64 hex digits".into()));
        }
        if self.tokens.contains_key(token_hash) {
            return Err(Rejection::Invalid("token already in use".into()));
        }
        let id = self.next_session;
        self.next_session += 1;
        let session = Session {
            shopper: shopper.to_string(),
            token_hash: token_hash.to_string(),
            closes_at_ms: None,
            orders: Vec::new(),
            cart: BTreeMap::new(),
            checkouts: BTreeMap::new(),
        };
        self.sessions.insert(id, session);
        self.tokens.insert(token_hash.to_string(), id);
        self.start_idle(id);
        Ok(Outcome::SessionOpened { session: id })
    }

    /// Starts (or starts again) a session's idle time: it closes
    /// [`SESSION_IDLE_MS`] from now unless it is written to or places an
    /// order. Past [`IDLE_SESSIONS_MAX`] idle sessions, the one idle
    /// longest closes now.
    fn start_idle(&mut self, id: SessionId) {
        let closes_at_ms = self.clock_ms.saturating_add(SESSION_IDLE_MS);
        let session = self.sessions.get_mut(&id).expect("idle time of an unknown session");
        if let Some(before) = session.closes_at_ms.replace(closes_at_ms) {
            self.closing.remove(&(before, id));
        }
        self.closing.insert((closes_at_ms, id));
        // Never `id` itself, even when every idle session's time ties with
        // its own: it was just used.
        while self.closing.len() > self.idle_sessions_max.0 {
            let mut others = self.closing.iter().filter(|&&(_, other)| other != id);
            let &(_, idle_longest) = others.next().expect("over a bound of at least 1");
            self.close_session(idle_longest);
        }
    }

    /// Closes every idle session whose time has come.
    fn close_idle_sessions(&mut self) {
        while let Some(&(closes_at_ms, session)) = self.closing.first() {
            if closes_at_ms > self.clock_ms {
                break;
            }
            self.close_session(session);
        }
    }

    /// Forgets an idle session: its token, cart, checkouts, and its orders,
    /// every one of them cancelled or expired. Its token is unknown from
    /// now on.
    fn close_session(&mut self, id: SessionId) {
        let session = self.sessions.remove(&id).expect("close of an unknown session");
        let closes_at_ms = session.closes_at_ms.expect("close of a session holding an order");
        self.closing.remove(&(closes_at_ms, id));
        self.tokens.remove(&session.token_hash);
        for order in session.orders {
            let order = self.orders.remove(&order).expect("an order of the session");
            assert!(!order.status.holds_units(), "order {} of a closing session is {:?}", order.id, order.status);
        }
    }

    /// Keeps an idle session open [`SESSION_IDLE_MS`] from now.
    fn touch_session(&mut self, id: SessionId) {
        if self.sessions[&id].closes_at_ms.is_some() {
            self.start_idle(id);
        }
    }

    /// Whether the session holds an order pending payment or paid.
    fn holds_an_order(&self, id: SessionId) -> bool {
        self.sessions[&id].orders.iter().any(|order| self.orders[order].status.holds_units())
    }

    fn set_cart_item(&mut self, id: SessionId, sku: &str, qty: u32) -> Result<Outcome, Rejection> {
        validate_sku(sku)?;
        validate_qty(qty)?;
        if !self.skus.contains_key(sku) {
            return Err(Rejection::UnknownSku { sku: sku.to_string() });
        }
        let session = self.sessions.get_mut(&id).ok_or(Rejection::UnknownSession)?;
        if !session.cart.contains_key(sku) && session.cart.len() >= CART_LINES_MAX {
            return Err(Rejection::CartFull);
        }
        session.cart.insert(sku.to_string(), qty);
        let cart = session.cart_view();
        self.touch_session(id);
        Ok(Outcome::Cart(cart))
    }

    fn remove_cart_item(&mut self, id: SessionId, sku: &str) -> Result<Outcome, Rejection> {
        validate_sku(sku)?;
        let session = self.sessions.get_mut(&id).ok_or(Rejection::UnknownSession)?;
        session.cart.remove(sku);
        let cart = session.cart_view();
        self.touch_session(id);
        Ok(Outcome::Cart(cart))
    }

    /// Reserves every line or none: all checks run before the first unit moves.
    fn checkout(
        &mut self,
        session_id: SessionId,
        key: &str,
        items: Option<&[Line]>,
        hold_ms: u64,
    ) -> Result<Outcome, Rejection> {
        validate_idempotency_key(key)?;
        let session = self.sessions.get(&session_id).ok_or(Rejection::UnknownSession)?;
        let first = session.checkouts.get(key).filter(|_| !mutation::active(Mutation::ApplyRetryTwice));
        if let Some(first) = first {
            return match (&first.decided, first.items.as_deref() == items) {
                (_, false) => Err(Rejection::IdempotencyConflict),
                (Ok(order), true) => Ok(Outcome::Order { order: self.orders[order].clone(), replayed: true }),
                (Err(rejection), true) => Err(rejection.clone()),
            };
        }
        if session.checkouts.len() >= CHECKOUTS_PER_SESSION_MAX {
            return Err(Rejection::TooManyCheckouts);
        }
        let placed = self.place_order(session_id, items, hold_ms);
        let decided = match &placed {
            Ok(order) => Ok(order.id),
            // A decision about the sale is final for this key; bad input, or
            // a sale not open yet, is not a decision, so the shopper may fix
            // it or wait, and use the key again.
            Err(rejection) if rejection.is_decision() => Err(rejection.clone()),
            Err(rejection) => return Err(rejection.clone()),
        };
        let checkout = Checkout { items: items.map(<[Line]>::to_vec), decided };
        let session = self.sessions.get_mut(&session_id).expect("checked above");
        session.checkouts.insert(key.to_string(), checkout);
        self.touch_session(session_id);
        placed.map(|order| Outcome::Order { order, replayed: false })
    }

    /// Places an order for `items` (or the cart), all lines or none.
    fn place_order(&mut self, session_id: SessionId, items: Option<&[Line]>, hold_ms: u64) -> Result<Order, Rejection> {
        let session = &self.sessions[&session_id];
        let mut lines: Vec<Line> = match items {
            Some(items) => items.to_vec(),
            None => session.cart.iter().map(|(sku, qty)| Line { sku: sku.clone(), qty: *qty }).collect(),
        };
        validate_lines(&lines)?;
        lines.sort();

        let mut amount_minor = 0u64;
        for line in &lines {
            let sku = self.sku(&line.sku)?;
            let sale = &sku.sale;
            if self.clock_ms < sale.starts_at_ms {
                return Err(Rejection::SaleNotOpen { sku: line.sku.clone() });
            }
            if self.clock_ms >= sale.ends_at_ms {
                return Err(Rejection::SaleEnded { sku: line.sku.clone() });
            }
            let qty = u64::from(line.qty);
            if !mutation::active(Mutation::SkipStockCheck) {
                if qty > sku.stock.for_sale() {
                    return Err(Rejection::SoldOut { sku: line.sku.clone(), available: sku.stock.for_sale() });
                }
                if self.escrow_is_on() && qty > sku.escrow.ready {
                    return Err(Rejection::EscrowPending { sku: line.sku.clone(), wanted: qty });
                }
            }
            let already = sku.per_shopper.get(&session.shopper).copied().unwrap_or(0);
            if sale.limit_per_shopper > 0 && already + qty > u64::from(sale.limit_per_shopper) {
                return Err(Rejection::LimitExceeded { sku: line.sku.clone(), limit: sale.limit_per_shopper, already });
            }
            // Bounded by the limits: 32 lines × 10^4 units × 10^12 < 2^64.
            amount_minor += sale.price_minor * qty;
        }

        // Every check passed: now move units.
        let shopper = session.shopper.clone();
        let escrow = self.escrow_is_on();
        for line in &lines {
            let sku = self.skus.get_mut(&line.sku).expect("checked above");
            let units = u64::from(line.qty);
            if escrow {
                sku.escrow.ready = sku.escrow.ready.saturating_sub(units);
                sku.stock.hold_escrowed(units);
            } else {
                sku.stock.hold(units);
            }
            *sku.per_shopper.entry(shopper.clone()).or_insert(0) += u64::from(line.qty);
        }
        let id = self.next_order;
        self.next_order += 1;
        let pay_by_ms = self.clock_ms.saturating_add(hold_ms);
        let order = Order {
            id,
            session: session_id,
            shopper,
            lines,
            amount_minor,
            status: OrderStatus::PendingPayment,
            placed_at_ms: self.clock_ms,
            pay_by_ms,
            updated_at_ms: self.clock_ms,
        };
        self.orders.insert(id, order.clone());
        self.deadlines.insert((pay_by_ms, id));
        let session = self.sessions.get_mut(&session_id).expect("checked above");
        if items.is_none() {
            session.cart.clear();
        }
        session.orders.push(id);
        // The order keeps its owner: the session stays open while it holds it.
        if let Some(closes_at_ms) = session.closes_at_ms.take() {
            self.closing.remove(&(closes_at_ms, session_id));
        }
        Ok(order)
    }

    fn pay(&mut self, session: SessionId, order_id: OrderId) -> Result<Outcome, Rejection> {
        let order = self.session_order(session, order_id)?;
        match order.status {
            OrderStatus::Paid => return Ok(Outcome::Order { order: order.clone(), replayed: true }),
            OrderStatus::PendingPayment => {}
            status => return Err(Rejection::OrderFinal { order: order_id, status }),
        }
        // `apply` expired every due order before this command, so a pending
        // order here is still inside its deadline.
        debug_assert!(order.pay_by_ms > self.clock_ms);
        let order = self.settle(order_id, OrderStatus::Paid);
        Ok(Outcome::Order { order, replayed: false })
    }

    fn cancel(&mut self, session: SessionId, order_id: OrderId) -> Result<Outcome, Rejection> {
        let order = self.session_order(session, order_id)?;
        match order.status {
            OrderStatus::Cancelled => return Ok(Outcome::Order { order: order.clone(), replayed: true }),
            OrderStatus::PendingPayment => {}
            status => return Err(Rejection::OrderFinal { order: order_id, status }),
        }
        let order = self.settle(order_id, OrderStatus::Cancelled);
        Ok(Outcome::Order { order, replayed: false })
    }

    /// Releases the holds of every pending order whose deadline has passed.
    fn expire_due(&mut self) {
        while let Some(&(pay_by_ms, order)) = self.deadlines.first() {
            if pay_by_ms > self.clock_ms {
                break;
            }
            self.settle(order, OrderStatus::Expired);
        }
    }

    /// Moves a pending order to a final status and its held units to sold
    /// (paid) or back to available (cancelled, expired).
    fn settle(&mut self, order_id: OrderId, status: OrderStatus) -> Order {
        assert_ne!(status, OrderStatus::PendingPayment);
        let order = self.orders.get_mut(&order_id).expect("settle of an unknown order");
        assert_eq!(order.status, OrderStatus::PendingPayment, "settle of a final order {order_id}");
        assert!(self.deadlines.remove(&(order.pay_by_ms, order_id)), "pending order {order_id} had no deadline");
        order.status = status;
        order.updated_at_ms = self.clock_ms;
        let in_doubt = self.in_doubt.remove(&order_id);
        for line in &order.lines {
            let sku = self.skus.get_mut(&line.sku).expect("order line of an unknown sku");
            let units = u64::from(line.qty);
            if status == OrderStatus::Paid {
                sku.stock.confirm(units);
            } else {
                if in_doubt {
                    sku.stock.release_unsettled(units);
                } else {
                    sku.stock.release(units);
                }
                let count = sku.per_shopper.get_mut(&order.shopper).expect("held units without a shopper count");
                *count -= units;
                if *count == 0 {
                    sku.per_shopper.remove(&order.shopper);
                }
            }
        }
        let order = order.clone();
        if !self.holds_an_order(order.session) {
            self.start_idle(order.session);
        }
        order
    }

    fn sku(&self, sku: &str) -> Result<&SkuState, Rejection> {
        self.skus.get(sku).ok_or_else(|| Rejection::UnknownSku { sku: sku.to_string() })
    }

    fn sku_mut(&mut self, sku: &str) -> Result<&mut SkuState, Rejection> {
        self.skus.get_mut(sku).ok_or_else(|| Rejection::UnknownSku { sku: sku.to_string() })
    }

    fn session_order(&self, session: SessionId, order: OrderId) -> Result<&Order, Rejection> {
        match self.orders.get(&order) {
            Some(found) if found.session == session => Ok(found),
            _ => Err(Rejection::UnknownOrder { order }),
        }
    }

    // ---- Reads. They see this replica's applied state; callers that need a
    // ---- linearizable read confirm leadership first.

    /// The latest leader time applied.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// A SKU's sale and stock.
    pub fn sku_view(&self, sku: &str) -> Option<SkuView> {
        self.skus.get(sku).map(SkuState::view)
    }

    /// Every SKU's sale and stock, in SKU order (for metrics and the demo).
    pub fn sku_views(&self) -> impl Iterator<Item = SkuView> + '_ {
        self.skus.values().map(SkuState::view)
    }

    /// The session a bearer token's SHA-256 belongs to, with its shopper.
    pub fn session_by_token(&self, token_hash: &str) -> Option<(SessionId, &str)> {
        let id = *self.tokens.get(token_hash)?;
        Some((id, &self.sessions[&id].shopper))
    }

    /// What the checkout with idempotency key `key` of `session` decided,
    /// if it was decided: the order placed, or why none was. Lets an
    /// auditor learn the fate of a checkout whose answer was lost.
    pub fn checkout_decision(&self, session: SessionId, key: &str) -> Option<Result<OrderId, Rejection>> {
        self.sessions.get(&session)?.checkouts.get(key).map(|checkout| checkout.decided.clone())
    }

    /// How many idempotency keys a session has decided (placed an order or
    /// refused): it can hold no more orders than that.
    pub fn checkout_keys(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.checkouts.len())
    }

    /// A session's cart.
    pub fn cart(&self, session: SessionId) -> Result<Cart, Rejection> {
        self.sessions.get(&session).map(Session::cart_view).ok_or(Rejection::UnknownSession)
    }

    /// One of a session's orders; another session's order is "not found".
    pub fn order(&self, session: SessionId, order: OrderId) -> Result<Order, Rejection> {
        self.session_order(session, order).cloned()
    }

    /// Any order by id, for operators, recovery checks and the demo's audit.
    pub fn order_by_id(&self, order: OrderId) -> Option<&Order> {
        self.orders.get(&order)
    }

    /// The earliest payment deadline of a pending order: when the state
    /// machine next needs time to pass for holds to expire.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|&(pay_by_ms, _)| pay_by_ms)
    }

    /// How many switchovers the cluster has made: the epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a switchover has writes refused right now.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// How many forced failovers made this copy: a copy of generation `g`
    /// descends from a copy of `g - 1` that was promoted without its
    /// primary's consent. Nodes of a lower generation are the lost primary
    /// (or never heard of the failover) and are fenced: peers refuse their
    /// messages and they take no writes (see `cluster::fence`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The epoch a switchover under way announced, while it refuses writes.
    pub fn frozen_epoch(&self) -> Option<u64> {
        self.frozen
    }

    /// The region a switchover moved writes to; `None` before any.
    pub fn primary_region(&self) -> Option<&str> {
        self.primary_region.as_deref()
    }

    /// Whether checkouts hold only confirmed escrow: on since the first grant.
    pub fn escrow_is_on(&self) -> bool {
        self.escrow_granted > 0
    }

    /// The number of the latest escrow grant.
    pub fn escrow_granted(&self) -> u64 {
        self.escrow_granted
    }

    /// Every escrow grant up to this number is confirmed.
    pub fn escrow_confirmed(&self) -> u64 {
        self.escrow_confirmed
    }

    /// Units of `sku` a checkout may hold right now: its confirmed escrow
    /// while escrow is on, otherwise everything available.
    pub fn holdable(&self, sku: &str) -> u64 {
        self.skus.get(sku).map_or(
            0,
            |state| {
                if self.escrow_is_on() {
                    state.escrow.ready
                } else {
                    state.stock.available
                }
            },
        )
    }

    /// Makes this copy (the DR region's, its primary region lost) the one
    /// that takes writes, in `region` and a new epoch, and says what that
    /// may have cost. What the old primary did after this copy's last entry
    /// is unknown; what it *could* have done is bounded, because it held
    /// only escrowed units the copy had confirmed:
    ///
    /// - every escrowed unit may have been sold: all go to `unsettled`, out
    ///   of sale, so nothing is sold twice (the undersell bound);
    /// - each order it placed took at least one of them, so its order ids
    ///   lie in the next `Σ unsettled` ids, which the copy skips;
    /// - an order pending here may have been paid there, or expired and
    ///   its units gone to another order there (after a grant, so also in
    ///   escrow): it may still be paid here, and unpaid its units go to
    ///   `unsettled` too;
    /// - sessions it opened are unknown here; the copy's session ids start
    ///   past any it could have given out.
    ///
    /// Before escrow is on (the copy holds no grant of its generation), the
    /// old primary held units straight from what was available: all of it
    /// is unsettled here, but that is no bound. An order there could expire
    /// and its units be sold again, any number of times, to orders outside
    /// the skipped ids, and a pending order here may have lost its units
    /// there. A forced failover refuses such a copy; only a preview runs
    /// this on one.
    pub fn fail_over(&mut self, region: &str) -> Failover {
        self.epoch = self.epoch.max(self.frozen.take().unwrap_or(0)) + 1;
        self.primary_region = Some(region.to_string());
        let escrow_was_on = self.escrow_is_on();
        let mut unsettled = BTreeMap::new();
        for (code, sku) in &mut self.skus {
            if !escrow_was_on {
                sku.stock.grant(sku.stock.available);
            }
            let units = sku.stock.unsettle_escrow();
            sku.escrow = Escrow::default();
            if units > 0 {
                unsettled.insert(code.clone(), units);
            }
        }
        // This copy has no DR copy of its own until failback: it sells from
        // what is available, and the first grant to a new copy turns escrow
        // on again.
        (self.escrow_granted, self.escrow_confirmed) = (0, 0);
        self.generation += 1;
        let first = self.next_order;
        self.next_order += unsettled.values().sum::<u64>();
        let first_session = self.next_session;
        self.next_session += SESSIONS_SKIPPED_AT_FAILOVER;
        self.in_doubt.extend(self.deadlines.iter().map(|&(_, order)| order));
        let failover = Failover {
            generation: self.generation,
            epoch: self.epoch,
            region: region.to_string(),
            cut_at_ms: self.clock_ms,
            unsettled,
            orders_maybe_lost: first..self.next_order,
            payments_in_doubt: self.deadlines.iter().map(|&(_, order)| order).collect(),
            sessions_maybe_lost: first_session..self.next_session,
        };
        self.last_failover = Some(failover.clone());
        failover
    }

    /// What the latest forced failover of this copy's history reported it
    /// may have cost, if there was one.
    pub fn last_failover(&self) -> Option<&Failover> {
        self.last_failover.as_ref()
    }

    /// Failback: compares `lost`, the copy of the primary this copy was
    /// promoted without, with this one. Every order `lost` has in another
    /// state than this copy (or that this copy lacks) is listed for an
    /// operator to settle: the shopper was told what `lost` says (but not an
    /// order both left unpaid, which this copy forgot with its idle
    /// session since the failover: nothing is owed). Units of
    /// orders paid there that hold nothing here (this copy lacks them, or
    /// let them expire or be cancelled, their units `unsettled`) were sold
    /// there and stay out of sale; the rest of each SKU's unsettled units
    /// nobody bought, and go back on sale. (An order pending there will
    /// never be paid there: the lost primary is fenced. One paid there and
    /// still pending here is listed, and holds its units here until it is
    /// paid, or expires and leaves them out of sale: they were sold there.
    /// [`Reconciliation::settlement`] says which; every other order whose
    /// payment was in doubt gives its units back to sale if it expires.)
    pub fn reconcile(&self, lost: &GroupState) -> Reconciliation {
        let mut reconciliation = Reconciliation::default();
        // Orders this copy had before the failover, and lacks now, it
        // forgot with their idle session: they were cancelled or expired.
        let had_before = |id: OrderId| self.last_failover.as_ref().is_some_and(|f| id < f.orders_maybe_lost.start);
        for there in lost.orders.values() {
            let here = self.orders.get(&there.id).map(|order| order.status);
            let unpaid_in_both = here.is_none() && had_before(there.id) && !there.status.holds_units();
            if here == Some(there.status) || unpaid_in_both {
                continue;
            }
            let holds_here = matches!(here, Some(OrderStatus::PendingPayment | OrderStatus::Paid));
            if there.status == OrderStatus::Paid && !holds_here {
                for line in &there.lines {
                    *reconciliation.units_sold_there.entry(line.sku.clone()).or_default() += u64::from(line.qty);
                }
            }
            reconciliation.orders_to_settle.push(OrderToSettle {
                id: there.id,
                shopper: there.shopper.clone(),
                lines: there.lines.clone(),
                amount_minor: there.amount_minor,
                there: there.status,
                here,
            });
        }
        for (code, sku) in &self.skus {
            let sold_there = reconciliation.units_sold_there.get(code).copied().unwrap_or(0);
            let free = sku.stock.unsettled.saturating_sub(sold_there);
            if free > 0 {
                reconciliation.units_returned.insert(code.clone(), free);
            }
        }
        let paid_there = reconciliation.orders_to_settle.iter().filter(|order| order.there == OrderStatus::Paid);
        reconciliation.kept_in_doubt =
            paid_there.map(|order| order.id).filter(|id| self.in_doubt.contains(id)).collect();
        reconciliation
    }

    /// Failback when the copies of the returning nodes `copies_lost` are
    /// gone for good (an operator says so); `lost` is the most up-to-date
    /// of the other copies, if any survived. The orders it has are listed
    /// as by [`GroupState::reconcile`]. But an order only a lost copy knew
    /// may have sold any unsettled unit, or paid any order in doubt: no
    /// unit goes back on sale and every payment in doubt stays in doubt.
    /// The failover's undersell stays, reported; nothing is sold twice.
    pub fn reconcile_without(&self, lost: Option<&GroupState>, copies_lost: Vec<u64>) -> Reconciliation {
        let mut reconciliation = lost.map(|lost| self.reconcile(lost)).unwrap_or_default();
        reconciliation.units_returned.clear();
        reconciliation.kept_in_doubt = self.in_doubt.clone();
        reconciliation.copies_lost = copies_lost;
        reconciliation
    }

    /// Whether failback has settled this copy's failover.
    pub fn failover_settled(&self) -> bool {
        self.settled_generation == self.generation
    }

    /// Units of `sku` that orders pending or paid in either state hold or
    /// sold, each order (by id) counted once: what two copies that parted
    /// (a promoted DR copy and the lost primary) have promised together,
    /// which must fit in the stock.
    pub fn units_promised(a: &GroupState, b: &GroupState, sku: &str) -> u64 {
        let mut by_order: BTreeMap<OrderId, u64> = BTreeMap::new();
        for order in a.orders.values().chain(b.orders.values()) {
            if matches!(order.status, OrderStatus::PendingPayment | OrderStatus::Paid) {
                let units = order.lines.iter().filter(|line| line.sku == sku).map(|line| u64::from(line.qty)).sum();
                let counted = by_order.entry(order.id).or_default();
                *counted = (*counted).max(units);
            }
        }
        by_order.values().sum()
    }

    /// The drill records kept, oldest first.
    pub fn drill_records(&self) -> impl Iterator<Item = &str> + '_ {
        self.drills.values().map(String::as_str)
    }

    /// Every order ever placed, by id: what the simulator's checkers audit.
    pub fn orders(&self) -> impl Iterator<Item = &Order> + '_ {
        self.orders.values()
    }

    /// How many sessions are open: `(holding an order pending payment or
    /// paid, holding none)`. Only the latter close when idle, and they are
    /// bounded.
    pub fn session_counts(&self) -> (usize, usize) {
        (self.sessions.len() - self.closing.len(), self.closing.len())
    }

    /// How many orders are in each status, in `OrderStatus` declaration order
    /// (pending, paid, cancelled, expired).
    pub fn order_counts(&self) -> [u64; 4] {
        let mut counts = [0u64; 4];
        for order in self.orders.values() {
            counts[order.status as usize] += 1;
        }
        counts
    }

    /// Checks every invariant of DESIGN.md that one group's state can show,
    /// from scratch, and panics with the first one broken. Runs after every
    /// apply in debug builds and after every step of the property tests.
    pub fn check_invariants(&self) {
        let mut held: BTreeMap<&str, u64> = BTreeMap::new();
        let mut sold: BTreeMap<&str, u64> = BTreeMap::new();
        let mut per_shopper: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut pending = BTreeSet::new();
        let mut orders_of: BTreeMap<SessionId, Vec<OrderId>> = BTreeMap::new();
        let mut holding = BTreeSet::new();
        for order in self.orders.values() {
            assert!(self.sessions.contains_key(&order.session), "order {} of an unknown session", order.id);
            orders_of.entry(order.session).or_default().push(order.id);
            if order.status.holds_units() {
                holding.insert(order.session);
            }
            assert!(order.id < self.next_order, "order id {} not yet assigned", order.id);
            for line in &order.lines {
                let counter = match order.status {
                    OrderStatus::PendingPayment => &mut held,
                    OrderStatus::Paid => &mut sold,
                    OrderStatus::Cancelled | OrderStatus::Expired => continue,
                };
                *counter.entry(&line.sku).or_default() += u64::from(line.qty);
                *per_shopper.entry((&line.sku, &order.shopper)).or_default() += u64::from(line.qty);
            }
            if order.status == OrderStatus::PendingPayment {
                assert!(order.pay_by_ms > self.clock_ms, "order {} is past its deadline but pending", order.id);
                pending.insert((order.pay_by_ms, order.id));
            }
        }
        assert_eq!(pending, self.deadlines, "expiry queue differs from the pending orders");
        assert!(self.in_doubt.iter().all(|order| self.orders[order].status == OrderStatus::PendingPayment));
        assert!(self.escrow_confirmed <= self.escrow_granted, "escrow confirmed past the latest grant");
        assert!(self.drills.len() <= DRILLS_KEPT, "{} drill records kept", self.drills.len());
        for (code, sku) in &self.skus {
            let stock = &sku.stock;
            stock.assert_conserved();
            let escrow = &sku.escrow;
            assert_eq!(stock.escrowed, escrow.ready + escrow.unconfirmed.values().sum::<u64>(), "escrow of {code}");
            assert!(
                escrow.unconfirmed.keys().all(|n| (self.escrow_confirmed + 1..=self.escrow_granted).contains(n)),
                "escrow grants of {code} out of range: {escrow:?}"
            );
            assert_eq!(stock.held, held.get(code.as_str()).copied().unwrap_or(0), "held of {code}");
            assert_eq!(stock.sold, sold.get(code.as_str()).copied().unwrap_or(0), "sold of {code}");
            for (shopper, units) in &sku.per_shopper {
                assert!(*units > 0, "zero count kept for {shopper} on {code}");
                assert_eq!(Some(units), per_shopper.get(&(code.as_str(), shopper.as_str())), "{shopper} on {code}");
                let limit = u64::from(sku.sale.limit_per_shopper);
                assert!(limit == 0 || *units <= limit, "{shopper} holds {units} of {code}, limit {limit}");
            }
        }
        let counted = per_shopper.keys().filter(|(code, _)| self.skus.contains_key(*code)).count();
        let kept: usize = self.skus.values().map(|sku| sku.per_shopper.len()).sum();
        assert_eq!(counted, kept, "per-shopper counts out of step with orders");
        for (session_id, session) in &self.sessions {
            for checkout in session.checkouts.values() {
                if let Ok(order) = &checkout.decided {
                    assert_eq!(self.orders[order].session, *session_id, "idempotency key points at a foreign order");
                }
            }
        }
        assert_eq!(self.tokens.len(), self.sessions.len(), "one token per session");
        let mut closing = BTreeSet::new();
        for (session_id, session) in &self.sessions {
            assert_eq!(self.tokens.get(&session.token_hash), Some(session_id), "token of session {session_id}");
            let orders = orders_of.get(session_id).map_or(&[][..], Vec::as_slice);
            assert_eq!(session.orders, orders, "orders of session {session_id}");
            match session.closes_at_ms {
                Some(closes_at_ms) => {
                    assert!(!holding.contains(session_id), "session {session_id} holds an order but may close");
                    assert!(closes_at_ms > self.clock_ms, "session {session_id} is idle past its time but open");
                    closing.insert((closes_at_ms, *session_id));
                }
                None => assert!(holding.contains(session_id), "session {session_id} holds no order but never closes"),
            }
        }
        assert_eq!(closing, self.closing, "idle-session queue differs from the sessions holding no order");
        assert!(self.closing.len() <= self.idle_sessions_max.0, "{} idle sessions kept", self.closing.len());
    }
}

impl SkuState {
    fn view(&self) -> SkuView {
        SkuView { sale: self.sale.clone(), stock: self.stock }
    }
}

impl Session {
    fn cart_view(&self) -> Cart {
        Cart { lines: self.cart.iter().map(|(sku, qty)| Line { sku: sku.clone(), qty: *qty }).collect() }
    }
}
