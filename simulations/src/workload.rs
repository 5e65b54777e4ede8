//! The seeded crowd: shoppers who open sessions, check out the hot SKU and
//! cold ones (directly or through their cart), retry with the same
//! idempotency key when an answer is lost, pay, cancel or walk away, through
//! endpoints in both zones; and an operator who restocks. Every answer the
//! cluster gave is written down in the [`Oracle`] for the checkers.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use cluster::{Node, ProposeError};
use domain::{Command, Line, OrderId, OrderStatus, Outcome, Rejection, Sale, SessionId};
use rand::Rng;
use todc_utils::linearizability::history::Action;
use tokio::time::Instant;

use crate::checkers::promotable::{sample, Sampled, Seen};
use crate::clock::EPOCH_MS;
use crate::trace::Trace;
use crate::world::World;

/// The flash-sale SKU and two ordinary ones.
pub const HOT: &str = "hot";
/// Ordinary SKUs some shoppers add.
pub const COLD: [&str; 2] = ["cold-a", "cold-b"];
/// Most units of the hot SKU one shopper may hold or buy.
pub const HOT_LIMIT: u32 = 2;
/// A checkout's payment window.
pub const HOLD_MS: u64 = 3_000;
/// How long a client keeps retrying one operation before it gives up and
/// counts the outcome as unknown.
const GIVE_UP: Duration = Duration::from_secs(30);
/// Bound on one attempt, on top of the node's own timeouts.
const ATTEMPT_MAX: Duration = Duration::from_secs(10);

/// What a shopper was told about one of its orders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Told {
    /// Reserved, pending payment.
    Reserved,
    /// Paid.
    Paid,
    /// Cancelled.
    Cancelled,
}

/// An acknowledged order, as its shopper remembers it.
#[derive(Clone, Debug)]
pub struct Acked {
    pub session: SessionId,
    pub key: String,
    pub lines: Vec<Line>,
    pub told: Told,
    /// When the shopper was last told something about it (simulated ms).
    pub at_ms: u64,
}

/// Everything the cluster answered, for the checkers.
#[derive(Debug, Default)]
pub struct Oracle {
    /// Acknowledged orders by id.
    pub acked: BTreeMap<OrderId, Acked>,
    /// The orders each (session, key) was answered with: at most one each.
    pub answers: BTreeMap<(SessionId, String), BTreeSet<OrderId>>,
    /// Keys each session used.
    pub keys: BTreeMap<SessionId, BTreeSet<String>>,
    /// Checkouts answered definitely (an order or a refusal), and not.
    pub decided: u64,
    pub unknown: u64,
    /// Stock invariant breaks the sampler saw on any replica.
    pub violations: Vec<Sighting>,
    /// What a failover at the moment the sampler looked would have broken.
    pub promotion_breaks: Vec<String>,
    /// After the region's loss, how often the sampler promoted the
    /// rejoined region's copy back, and how often a failover would have
    /// refused it (no escrow grant yet).
    pub second_failovers: SecondFailovers,
    /// Simulated ms from the end of the faults until a checkout succeeded.
    pub recovered_after_ms: Option<u64>,
    /// The history of the linearizability SKU.
    pub lin: LinHistory,
    /// The primary region's loss, in a run that loses it.
    pub region_lost: Option<crate::region::Lost>,
    /// The hot SKU's stock when its sale was created.
    pub hot_created: u64,
    /// The operator's restock of the hot SKU, once it was sent.
    pub restock: Option<Restock>,
}

/// The operator's one restock, sent with one key until it was answered.
#[derive(Clone, Copy, Debug)]
pub struct Restock {
    pub units: u64,
    /// Whether an answer said the units were added.
    pub acked: bool,
}

impl Oracle {
    /// Records what the failover sampler found.
    fn sampled(&mut self, sampled: Sampled, trace: &Trace) {
        let second = u64::from(self.region_lost.is_some());
        match sampled {
            Sampled::Nothing => {}
            Sampled::Refused => self.second_failovers.refused += second,
            Sampled::Safe => self.second_failovers.promoted += second,
            Sampled::Breaks(broken) => {
                trace.event(format!("a failover now would break: {broken}"));
                self.promotion_breaks.push(format!("at {} ms: {broken}", trace.now_ms()));
            }
        }
    }
}

/// Second failovers the sampler tried, in a run that lost its region.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecondFailovers {
    pub promoted: u64,
    pub refused: u64,
}

/// One replica's stock of one SKU, as the sampler saw it break an invariant.
#[derive(Clone, Debug)]
pub struct Sighting {
    pub at_ms: u64,
    pub node: u64,
    pub sku: String,
    pub stock: domain::Stock,
}

impl std::fmt::Display for Sighting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} at {} ms, {}: {:?}", self.node, self.at_ms, self.sku, self.stock)
    }
}

/// Creates the sales, retrying until a leader takes them; returns the hot
/// SKU's stock.
pub async fn create_sales(world: &World) -> Result<u64, String> {
    let hot_stock = world.draw(|rng| rng.gen_range(20..120));
    let sales = std::iter::once((HOT, hot_stock, HOT_LIMIT))
        .chain(COLD.iter().map(|sku| (*sku, 1_000, 0)))
        .chain(std::iter::once((LIN, LIN_STOCK, 0)))
        .map(|(sku, stock, limit)| Sale {
            sku: sku.into(),
            name: sku.into(),
            price_minor: 100,
            stock,
            starts_at_ms: EPOCH_MS,
            ends_at_ms: EPOCH_MS + 24 * 3_600_000,
            limit_per_shopper: limit,
        });
    for sale in sales {
        let command = Command::CreateSale(sale.clone());
        let outcome = definite(world, 0, |node: Node| {
            let command = command.clone();
            async move { node.operator(command).await }
        })
        .await;
        match outcome {
            Some(Outcome::Sku(_)) | Some(Outcome::Rejected(Rejection::SaleExists { .. })) => {}
            other => return Err(format!("creating sale {}: {other:?}", sale.sku)),
        }
    }
    world.trace.event(format!("sales created, hot stock {hot_stock}"));
    Ok(hot_stock)
}

/// Sends one operation through the endpoints, starting at `first`, until
/// it gets a definite answer: `None` if it never did (its effect unknown).
/// A lost answer is retried as it is, which is safe: every command that
/// could apply twice carries its identity (the idempotency key, the order).
async fn definite<F, Fut>(world: &World, first: usize, op: F) -> Option<Outcome>
where
    F: Fn(Node) -> Fut,
    Fut: Future<Output = Result<Outcome, ProposeError>>,
{
    let endpoints = world.endpoints();
    let mut at = first % endpoints.len();
    let started = Instant::now();
    while started.elapsed() < GIVE_UP {
        match world.ask(endpoints[at], |node| tokio::time::timeout(ATTEMPT_MAX, op(node))).await {
            // A switchover refuses writes for a moment, and a checkout may
            // find its SKU's escrow not yet confirmed: the API's 503s,
            // retried with the same key.
            Some(Ok(Ok(Outcome::Rejected(Rejection::Frozen { .. } | Rejection::EscrowPending { .. })))) => {}
            Some(Ok(Ok(outcome))) => return Some(outcome),
            _ => {}
        }
        at = (at + 1) % endpoints.len();
        let pause = world.draw(|rng| rng.gen_range(20..200));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    None
}

/// One shopper's choices, drawn up front from the world's generator.
struct Plan {
    arrive_ms: u64,
    first: usize,
    checkouts: u32,
    /// Per checkout: hot units, a cold SKU and its units.
    carts: Vec<(u32, Option<(&'static str, u32)>)>,
    via_cart: bool,
    /// Per checkout: 0 pay, 1 cancel, 2 walk away.
    fates: Vec<u8>,
    replays: bool,
}

impl Plan {
    fn draw(world: &World, until_ms: u64) -> Plan {
        world.draw(|rng| {
            let checkouts = rng.gen_range(1..=3);
            Plan {
                arrive_ms: rng.gen_range(0..until_ms.saturating_sub(5_000).max(1)),
                first: rng.gen(),
                checkouts,
                carts: (0..checkouts)
                    .map(|_| {
                        let hot = rng.gen_range(0..=2);
                        let cold =
                            (hot == 0 || rng.gen_bool(0.3)).then(|| (COLD[rng.gen_range(0..2)], rng.gen_range(1..=3)));
                        (hot, cold)
                    })
                    .collect(),
                via_cart: rng.gen_bool(0.3),
                fates: (0..checkouts).map(|_| [0, 0, 0, 1, 2][rng.gen_range(0..5)]).collect(),
                replays: rng.gen_bool(0.3),
            }
        })
    }
}

/// Opens a session for `name` (shopper number `n`). An open whose answer
/// was lost but which applied makes its retry find the token taken; the
/// shopper then starts another session with a new token, as a client
/// would, and the first stays unused.
async fn open_session(world: &World, name: &str, n: u64, first: usize) -> Option<SessionId> {
    for attempt in 0..10u64 {
        // A hash no token has.
        let token_hash = format!("{n:032x}{attempt:032x}");
        let open = |node: Node| {
            let (name, token_hash) = (name.to_string(), token_hash.clone());
            async move { node.open_session(name, token_hash).await }
        };
        match definite(world, first, open).await {
            Some(Outcome::SessionOpened { session }) => return Some(session),
            other => world.trace.event(format!("{name} could not open a session: {other:?}")),
        }
    }
    None
}

/// One shopper, from arrival to its last order.
pub async fn shopper(world: Rc<World>, oracle: Rc<RefCell<Oracle>>, n: u64, until_ms: u64) {
    let plan = Plan::draw(&world, until_ms);
    tokio::time::sleep(Duration::from_millis(plan.arrive_ms)).await;
    let name = format!("shopper-{n}");
    let Some(session) = open_session(&world, &name, n, plan.first).await else { return };
    world.trace.event(format!("{name} session {session}"));
    for c in 0..plan.checkouts as usize {
        if world.trace.now_ms() > until_ms {
            return;
        }
        let (hot, cold) = plan.carts[c];
        let mut lines: Vec<Line> = Vec::new();
        if hot > 0 {
            lines.push(Line { sku: HOT.into(), qty: hot });
        }
        if let Some((sku, qty)) = cold {
            lines.push(Line { sku: sku.into(), qty });
        }
        let items = if plan.via_cart {
            for line in &lines {
                let set = Command::SetCartItem { session, sku: line.sku.clone(), qty: line.qty };
                if definite(&world, plan.first, |node: Node| {
                    let set = set.clone();
                    async move { node.shopper(session, set).await }
                })
                .await
                .is_none()
                {
                    return;
                }
            }
            None
        } else {
            Some(lines.clone())
        };
        let key = format!("k{n}-{c}");
        oracle.borrow_mut().keys.entry(session).or_default().insert(key.clone());
        let checkout = Command::Checkout { session, idempotency_key: key.clone(), items, hold_ms: HOLD_MS };
        let order = match decide_checkout(&world, &oracle, &plan, session, &key, &checkout).await {
            Some(order) => order,
            None => continue,
        };
        let at_ms = world.trace.now_ms();
        let acked = Acked { session, key: key.clone(), lines: order.lines.clone(), told: Told::Reserved, at_ms };
        oracle.borrow_mut().acked.insert(order.id, acked);
        if plan.replays {
            // The same key again: the same order, never a second one.
            decide_checkout(&world, &oracle, &plan, session, &key, &checkout).await;
        }
        let think = world.draw(|rng| rng.gen_range(0..HOLD_MS + 500));
        tokio::time::sleep(Duration::from_millis(think)).await;
        let (command, told) = match plan.fates[c] {
            0 => (Command::Pay { session, order: order.id }, Told::Paid),
            1 => (Command::Cancel { session, order: order.id }, Told::Cancelled),
            _ => {
                world.trace.event(format!("{name} walks away from order {}", order.id));
                continue;
            }
        };
        let answer = definite(&world, plan.first, |node: Node| {
            let command = command.clone();
            async move { node.shopper(session, command).await }
        })
        .await;
        match answer {
            Some(Outcome::Order { order: settled, .. }) => {
                let expected = if told == Told::Paid { OrderStatus::Paid } else { OrderStatus::Cancelled };
                world.trace.event(format!("{name} order {} now {:?}", settled.id, settled.status));
                if settled.status == expected {
                    if let Some(acked) = oracle.borrow_mut().acked.get_mut(&settled.id) {
                        acked.told = told;
                        acked.at_ms = world.trace.now_ms();
                    }
                }
            }
            other => world.trace.event(format!("{name} settling order {}: {other:?}", order.id)),
        }
    }
}

/// Sends a checkout until it is decided; records the answer. `Some(order)`
/// when it placed (or replayed) one.
async fn decide_checkout(
    world: &World,
    oracle: &RefCell<Oracle>,
    plan: &Plan,
    session: SessionId,
    key: &str,
    checkout: &Command,
) -> Option<domain::Order> {
    let answer = definite(world, plan.first, |node: Node| {
        let checkout = checkout.clone();
        async move { node.shopper(session, checkout).await }
    })
    .await;
    let mut oracle = oracle.borrow_mut();
    match answer {
        Some(Outcome::Order { order, replayed }) => {
            oracle.decided += 1;
            oracle.answers.entry((session, key.to_string())).or_default().insert(order.id);
            world.trace.event(format!("checkout {key} -> order {} (replayed {replayed})", order.id));
            Some(order)
        }
        Some(Outcome::Rejected(rejection)) => {
            oracle.decided += 1;
            world.trace.event(format!("checkout {key} -> {rejection:?}"));
            None
        }
        other => {
            oracle.unknown += 1;
            world.trace.event(format!("checkout {key} -> unknown ({other:?})"));
            None
        }
    }
}

/// The operator restocks the hot SKU once, at a random moment, and sends
/// the restock again with the same key until it is answered: the units
/// must be added once.
pub async fn operator(world: Rc<World>, oracle: Rc<RefCell<Oracle>>, until_ms: u64) {
    let (at, units, via) = world.draw(|rng| (rng.gen_range(0..until_ms), rng.gen_range(1..20), rng.gen::<usize>()));
    tokio::time::sleep(Duration::from_millis(at)).await;
    let restock = Command::Restock { sku: HOT.into(), units, idempotency_key: "operator-restock".into() };
    oracle.borrow_mut().restock = Some(Restock { units, acked: false });
    let answer = definite(&world, via, |node: Node| {
        let restock = restock.clone();
        async move { node.operator(restock).await }
    })
    .await;
    world.trace.event(format!("restock {units}: {answer:?}"));
    if let Some(Outcome::Sku(_)) = answer {
        oracle.borrow_mut().restock = Some(Restock { units, acked: true });
    }
}

/// The linearizability shoppers, spawned beside the crowd.
pub fn lin_shoppers(world: &Rc<World>, oracle: &Rc<RefCell<Oracle>>) -> Vec<actix_rt::task::JoinHandle<()>> {
    (0..LIN_SHOPPERS).map(|n| actix_rt::spawn(lin_shopper(world.clone(), oracle.clone(), n))).collect()
}

/// Reads every live replica's stock now and then; an oversell or a broken
/// sum must not exist even for a moment, on any of them.
pub async fn sampler(world: Rc<World>, oracle: Rc<RefCell<Oracle>>, until_ms: u64) {
    while world.trace.now_ms() < until_ms {
        let (mut seen, mut down) = (Vec::new(), BTreeSet::new());
        for id in world.ids() {
            let region = world.topology.node(id).map(|spec| spec.region.clone()).unwrap_or_default();
            if world.copy_lost(id) {
                // Up or not, its copy is gone until it holds the whole log
                // again (see `promotable::sample`).
                down.insert(region.clone());
            }
            let Some(node) = world.node(id) else {
                down.insert(region);
                continue;
            };
            let (state, applied) = node.group().read_local_at(Clone::clone);
            seen.push(Seen { node: id, region, applied, state });
            for view in node.read_local(|s| s.sku_views().collect::<Vec<_>>()) {
                let stock = view.stock;
                if stock.held + stock.sold > stock.total || !stock.is_conserved() {
                    let sighting = Sighting { at_ms: world.trace.now_ms(), node: id, sku: view.sale.sku, stock };
                    oracle.borrow_mut().violations.push(sighting);
                }
            }
        }
        let sampled = sample(&seen, &down);
        oracle.borrow_mut().sampled(sampled, &world.trace);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// After the faults: how long until a fresh shopper's checkout succeeds.
pub async fn probe_liveness(world: &World, oracle: &RefCell<Oracle>) {
    let started = world.trace.now_ms();
    let Some(session) = open_session(world, "probe", u64::MAX, 0).await else { return };
    let checkout = Command::Checkout {
        session,
        idempotency_key: "probe".into(),
        items: Some(vec![Line { sku: COLD[0].into(), qty: 1 }]),
        hold_ms: HOLD_MS,
    };
    let answer = definite(world, 1, |node: Node| {
        let checkout = checkout.clone();
        async move { node.shopper(session, checkout).await }
    })
    .await;
    world.trace.event(format!("probe checkout: {answer:?}"));
    if let Some(Outcome::Order { .. }) = answer {
        oracle.borrow_mut().recovered_after_ms = Some(world.trace.now_ms() - started);
    }
}

/// The SKU whose history is checked for linearizability: only checked out
/// (with holds longer than the run) and read, never paid, cancelled,
/// restocked or expired, so its sequential specification is a counter.
pub const LIN: &str = "lin";
/// Its stock: small, so the history includes "sold out" answers.
pub const LIN_STOCK: u64 = 30;
/// Shoppers on it, and operations each.
const LIN_SHOPPERS: u64 = 6;
const LIN_OPS: u32 = 30;

/// One operation on [`LIN`], as the checker sees it: the call carries no
/// result, the response what the cluster answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LinOp {
    /// A checkout of `qty` units: reserved (`Some(true)`) or sold out.
    Checkout { qty: u64, reserved: Option<bool> },
    /// A linearizable read of the units available.
    Read(Option<u64>),
}

/// What the linearizability checker gets: every call and response on
/// [`LIN`] in real-time order, and the checkouts whose answer never came
/// (their fate is read from the final state: an idempotency key remembers
/// its decision).
#[derive(Debug, Default)]
pub struct LinHistory {
    pub events: Vec<(usize, todc_utils::linearizability::history::Action<LinOp>)>,
    /// (process, qty, session, key) of each checkout left without an answer.
    pub unanswered: Vec<(usize, u64, SessionId, String)>,
    /// Each process's last checkout, while it waits for the answer: (qty,
    /// session, key).
    pub in_flight: BTreeMap<usize, (u64, SessionId, String)>,
}

/// A shopper on [`LIN`]: checkouts and reads, each recorded as a call and
/// a response.
pub async fn lin_shopper(world: Rc<World>, oracle: Rc<RefCell<Oracle>>, n: u64) {
    let process = n as usize;
    let first = world.draw(|rng| rng.gen::<usize>());
    let Some(session) = open_session(&world, &format!("lin-{n}"), 1_000 + n, first).await else { return };
    for round in 0..LIN_OPS {
        let think = world.draw(|rng| rng.gen_range(50..1_500));
        tokio::time::sleep(Duration::from_millis(think)).await;
        if oracle.borrow().region_lost.is_some() {
            // The history checked ends with the region (see the checker).
            return;
        }
        let read = world.draw(|rng| rng.gen_bool(0.3));
        if read {
            let call = LinOp::Read(None);
            world.trace.event(format!("lin-{n} read"));
            oracle.borrow_mut().lin.events.push((process, Action::Call(call)));
            let answer = definite_read(&world, first).await;
            // A read that never answered had no effect: it leaves the history.
            let mut oracle = oracle.borrow_mut();
            if oracle.region_lost.is_some() {
                // The history checked ended with the region; it stays as it was.
                return;
            }
            world.trace.event(format!("lin-{n} read -> {answer:?}"));
            match answer {
                Some(available) => oracle.lin.events.push((process, Action::Response(LinOp::Read(Some(available))))),
                None => {
                    let last = oracle.lin.events.iter().rposition(|(p, _)| *p == process).expect("just pushed");
                    oracle.lin.events.remove(last);
                }
            }
            continue;
        }
        let qty = world.draw(|rng| rng.gen_range(1..=2));
        let key = format!("lin{n}-{round}");
        oracle.borrow_mut().keys.entry(session).or_default().insert(key.clone());
        let command = Command::Checkout {
            session,
            idempotency_key: key.clone(),
            items: Some(vec![Line { sku: LIN.into(), qty: qty as u32 }]),
            hold_ms: 600_000,
        };
        world.trace.event(format!("lin-{n} checkout {key} of {qty}"));
        {
            let mut oracle = oracle.borrow_mut();
            oracle.lin.events.push((process, Action::Call(LinOp::Checkout { qty, reserved: None })));
            oracle.lin.in_flight.insert(process, (qty, session, key.clone()));
        }
        let answer = definite(&world, first, |node: Node| {
            let command = command.clone();
            async move { node.shopper(session, command).await }
        })
        .await;
        let mut oracle = oracle.borrow_mut();
        oracle.lin.in_flight.remove(&process);
        if oracle.region_lost.is_some() {
            // Answered after the loss, outside the history checked; still
            // an acknowledgement the crowd keeps.
            if let Some(Outcome::Order { order, .. }) = answer {
                oracle.answers.entry((session, key.clone())).or_default().insert(order.id);
                let at_ms = world.trace.now_ms();
                let acked = Acked { session, key, lines: order.lines, told: Told::Reserved, at_ms };
                oracle.acked.insert(order.id, acked);
            }
            return;
        }
        let reserved = match answer {
            Some(Outcome::Order { order, .. }) => {
                oracle.answers.entry((session, key.clone())).or_default().insert(order.id);
                let at_ms = world.trace.now_ms();
                let acked = Acked { session, key: key.clone(), lines: order.lines, told: Told::Reserved, at_ms };
                oracle.acked.insert(order.id, acked);
                true
            }
            Some(Outcome::Rejected(Rejection::SoldOut { .. })) => false,
            Some(other) => {
                // Only an order or "sold out" is a right answer here.
                world.fail(format!("lin checkout {key} answered {other:?}"));
                return;
            }
            None => {
                world.trace.event(format!("lin checkout {key} unanswered; its fate is read from the final state"));
                oracle.lin.unanswered.push((process, qty, session, key));
                // No more operations from this process: its open call stays
                // open until the end of the history.
                return;
            }
        };
        world.trace.event(format!("lin checkout {key} -> reserved {reserved}"));
        oracle.lin.events.push((process, Action::Response(LinOp::Checkout { qty, reserved: Some(reserved) })));
    }
}

/// A linearizable read of [`LIN`]'s available units, retried through the
/// endpoints; `None` if none answered in time.
async fn definite_read(world: &World, first: usize) -> Option<u64> {
    let endpoints = world.endpoints();
    let started = Instant::now();
    let mut at = first % endpoints.len();
    while started.elapsed() < GIVE_UP {
        let read = |node: Node| async move {
            let read = node.read(|state| state.sku_view(LIN).map(|view| view.stock.for_sale()));
            tokio::time::timeout(ATTEMPT_MAX, read).await
        };
        if let Some(Ok(Ok(Some(available)))) = world.ask(endpoints[at], read).await {
            return Some(available);
        }
        at = (at + 1) % endpoints.len();
        let pause = world.draw(|rng| rng.gen_range(20..200));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    None
}
