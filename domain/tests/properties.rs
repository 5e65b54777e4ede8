//! Property tests: random command sequences against one group's state, with
//! every invariant checked after every step.

use std::collections::BTreeMap;

use domain::*;
use proptest::prelude::*;

const SKUS: [&str; 3] = ["hot", "warm", "cold"];
const SHOPPERS: [&str; 3] = ["ann", "bob", "cyd"];
const HOLD_MS: u64 = 5_000;

/// One step of a random run. Indices are reduced modulo what exists, so every
/// generated step means something.
#[derive(Clone, Debug)]
enum Step {
    Open { shopper: usize },
    SetCart { session: usize, sku: usize, qty: u32 },
    RemoveCart { session: usize, sku: usize },
    Checkout { session: usize, key: u8, items: Option<Vec<(usize, u32)>> },
    Pay { session: usize, order: usize },
    Cancel { session: usize, order: usize },
    Restock { sku: usize, key: u8, units: u64 },
    Wait { ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    let items = proptest::option::of(proptest::collection::vec((0..SKUS.len(), 0u32..4), 0..4));
    prop_oneof![
        1 => (0..SHOPPERS.len()).prop_map(|shopper| Step::Open { shopper }),
        2 => (0..8usize, 0..SKUS.len(), 0u32..4).prop_map(|(session, sku, qty)| Step::SetCart { session, sku, qty }),
        1 => (0..8usize, 0..SKUS.len()).prop_map(|(session, sku)| Step::RemoveCart { session, sku }),
        5 => (0..8usize, 0u8..4, items).prop_map(|(session, key, items)| Step::Checkout { session, key, items }),
        3 => (0..8usize, 0..16usize).prop_map(|(session, order)| Step::Pay { session, order }),
        1 => (0..8usize, 0..16usize).prop_map(|(session, order)| Step::Cancel { session, order }),
        1 => (0..SKUS.len(), 0u8..3, 0u64..3).prop_map(|(sku, key, units)| Step::Restock { sku, key, units }),
        2 => (0u64..4_000).prop_map(|ms| Step::Wait { ms }),
        // About as long as a session stays open without a write.
        1 => (SESSION_IDLE_MS - 8_000..SESSION_IDLE_MS + 8_000).prop_map(|ms| Step::Wait { ms }),
    ]
}

/// A state with three sales open from t=1000 to t=100_000, and that opening moment: a scarce hot SKU
/// with a per-shopper limit, and two roomier ones.
fn opened() -> (GroupState, u64) {
    let mut state = GroupState::default();
    let sales = SKUS.iter().zip([(5, 2), (20, 0), (50, 3)]).map(|(sku, (stock, limit))| {
        Command::CreateSale(Sale {
            sku: sku.to_string(),
            name: format!("{sku} item"),
            price_minor: 1_999,
            stock,
            starts_at_ms: 1_000,
            ends_at_ms: 100_000,
            limit_per_shopper: limit,
        })
    });
    // Created before the sales open, so a test may still try a checkout too early.
    let response = state.apply(&Request { stamped_at_ms: 0, commands: sales.collect() });
    assert!(response.outcomes.iter().all(|o| matches!(o, Outcome::Sku(_))));
    (state, 1_000)
}

fn token(n: usize) -> String {
    format!("{n:064x}")
}

/// The items of a key's first checkout and what it decided.
type Decided = (Option<Vec<Line>>, Result<OrderId, Rejection>);

/// What the test remembers of the run, to check the promises the API makes.
#[derive(Default)]
struct Memory {
    sessions: Vec<SessionId>,
    /// For each session holding no order pending payment or paid, since
    /// when: its last write (opened, cart changed, a checkout decided) or
    /// its last such order cancelled or expired. It closes
    /// [`SESSION_IDLE_MS`] later.
    idle_since: BTreeMap<SessionId, u64>,
    /// Every order ever acknowledged, with its session.
    orders: Vec<(OrderId, SessionId)>,
    /// Orders pending payment, with their session and deadline.
    pending: BTreeMap<OrderId, (SessionId, u64)>,
    /// Orders paid, with their session.
    paid: BTreeMap<OrderId, SessionId>,
    /// (session, key) → items and decision (order or refusal) of the first
    /// checkout that decided something.
    keys: BTreeMap<(SessionId, u8), Decided>,
    /// (SKU, key) → the units of the first restock with that key that added
    /// them.
    restocks: BTreeMap<(usize, u8), u64>,
}

fn run(steps: Vec<Step>) {
    let (mut state, mut now) = opened();
    let mut memory = Memory::default();
    for step in steps {
        let command = match &step {
            Step::Wait { ms } => {
                now += ms;
                memory.pass_time(now);
                state.apply(&Request { stamped_at_ms: now, commands: vec![] });
                state.check_invariants();
                continue;
            }
            Step::Open { shopper } => Command::OpenSession {
                shopper: SHOPPERS[*shopper].to_string(),
                token_hash: token(memory.sessions.len()),
            },
            _ if memory.sessions.is_empty() => continue,
            Step::SetCart { session, sku, qty } => Command::SetCartItem {
                session: memory.sessions[session % memory.sessions.len()],
                sku: SKUS[*sku].to_string(),
                qty: *qty,
            },
            Step::RemoveCart { session, sku } => Command::RemoveCartItem {
                session: memory.sessions[session % memory.sessions.len()],
                sku: SKUS[*sku].to_string(),
            },
            Step::Checkout { session, key, items } => Command::Checkout {
                session: memory.sessions[session % memory.sessions.len()],
                idempotency_key: format!("key-{key}"),
                items: items.as_ref().map(|items| {
                    items.iter().map(|(sku, qty)| Line { sku: SKUS[*sku].to_string(), qty: *qty }).collect()
                }),
                hold_ms: HOLD_MS,
            },
            Step::Pay { session, order } | Step::Cancel { session, order } if !memory.orders.is_empty() => {
                let session = memory.sessions[session % memory.sessions.len()];
                let (order, _) = memory.orders[order % memory.orders.len()];
                if matches!(step, Step::Pay { .. }) {
                    Command::Pay { session, order }
                } else {
                    Command::Cancel { session, order }
                }
            }
            Step::Pay { .. } | Step::Cancel { .. } => continue,
            Step::Restock { sku, key, units } => Command::Restock {
                sku: SKUS[*sku].to_string(),
                units: *units,
                idempotency_key: format!("restock-{key}"),
            },
        };

        // Let time's own effects (expiry) happen first, so that a rejected
        // command can be compared against the state right before it.
        memory.pass_time(now);
        state.apply(&Request { stamped_at_ms: now, commands: vec![] });
        let before = state.clone();
        let response = state.apply(&Request { stamped_at_ms: now, commands: vec![command.clone()] });
        state.check_invariants();
        let outcome = &response.outcomes[0];

        // A session holding no order pending or paid closes after
        // SESSION_IDLE_MS idle, and only then; one holding one stays open.
        if let Some(session) = session_of(&command) {
            let open = memory.is_open(session, now);
            if *outcome == Outcome::Rejected(Rejection::UnknownSession) {
                assert!(!open, "open session {session} unknown to {command:?}");
            } else {
                assert!(open || matches!(outcome, Outcome::Rejected(_)), "closed session {session} took {command:?}");
            }
            // An open session's own orders are all still there.
            if let Command::Pay { order, .. } | Command::Cancel { order, .. } = command {
                if open && memory.orders.contains(&(order, session)) {
                    assert_ne!(*outcome, Outcome::Rejected(Rejection::UnknownOrder { order }), "{command:?}");
                }
            }
        }

        match outcome {
            // A checkout's refusal is kept with its key, and nothing else changes.
            Outcome::Rejected(refusal) if refusal.is_decision() => {
                assert!(before.sku_views().eq(state.sku_views()), "refused {command:?} moved stock");
                assert_eq!(before.order_counts(), state.order_counts(), "refused {command:?} placed an order");
            }
            Outcome::Rejected(_) => assert_eq!(before, state, "rejected {command:?} changed the state"),
            Outcome::Order { replayed: true, .. } => {
                assert_eq!(before, state, "replayed {command:?} changed the state")
            }
            _ => {}
        }
        if let Step::Restock { sku, key, units } = step {
            match (memory.restocks.get(&(sku, key)), outcome) {
                // At most once: a retry adds nothing, other units conflict.
                (Some(first), Outcome::Sku(_)) => {
                    assert_eq!(*first, units);
                    assert_eq!(before, state, "retried {command:?} changed the state");
                }
                (Some(first), Outcome::Rejected(Rejection::IdempotencyConflict)) => assert_ne!(*first, units),
                (Some(_), Outcome::Rejected(Rejection::Invalid(_))) => assert_eq!(units, 0),
                (Some(first), other) => panic!("restock of {first} retried, now answered {other:?}"),
                (None, Outcome::Sku(_)) => drop(memory.restocks.insert((sku, key), units)),
                (None, _) => {}
            }
        }
        remember(&mut memory, &command, outcome, now);
    }

    // Every acknowledged order is still there unless its session closed,
    // and once every deadline has passed nothing is held any more: expired
    // holds return to stock.
    now += HOLD_MS;
    memory.pass_time(now);
    state.apply(&Request { stamped_at_ms: now, commands: vec![] });
    state.check_invariants();
    for (order, session) in &memory.orders {
        match state.order_by_id(*order) {
            Some(order) => assert_ne!(order.status, OrderStatus::PendingPayment),
            None => assert!(!memory.is_open(*session, now), "order {order} of open session {session} vanished"),
        }
    }
    for view in state.sku_views() {
        assert_eq!(view.stock.held, 0, "{} still holds units after every deadline", view.sale.sku);
    }
}

/// The session a command writes to, if any.
fn session_of(command: &Command) -> Option<SessionId> {
    match command {
        Command::SetCartItem { session, .. }
        | Command::RemoveCartItem { session, .. }
        | Command::Checkout { session, .. }
        | Command::Pay { session, .. }
        | Command::Cancel { session, .. } => Some(*session),
        _ => None,
    }
}

impl Memory {
    /// Whether `session` is open at `now`, as far as the model knows.
    fn is_open(&self, session: SessionId, now: u64) -> bool {
        self.idle_since.get(&session).is_none_or(|since| now < since + SESSION_IDLE_MS)
    }

    /// A write to an idle session starts its idle time again.
    fn touch(&mut self, session: SessionId, now: u64) {
        if let Some(since) = self.idle_since.get_mut(&session) {
            *since = now;
        }
    }

    /// The session's order went from holding units to owing nothing.
    fn order_final(&mut self, session: SessionId, now: u64) {
        let pending = self.pending.values().any(|(of, _)| *of == session);
        if !pending && !self.paid.values().any(|of| *of == session) {
            self.idle_since.insert(session, now);
        }
    }

    /// The state's clock reaches `now`: orders past their deadline expire.
    fn pass_time(&mut self, now: u64) {
        let due: Vec<(OrderId, SessionId)> =
            self.pending.iter().filter(|(_, (_, pay_by))| *pay_by <= now).map(|(o, (s, _))| (*o, *s)).collect();
        for (order, session) in due {
            self.pending.remove(&order);
            self.order_final(session, now);
        }
    }
}

fn remember(memory: &mut Memory, command: &Command, outcome: &Outcome, now: u64) {
    match (command, outcome) {
        (Command::OpenSession { .. }, Outcome::SessionOpened { session }) => {
            memory.sessions.push(*session);
            memory.idle_since.insert(*session, now);
        }
        (Command::SetCartItem { session, .. } | Command::RemoveCartItem { session, .. }, Outcome::Cart(_)) => {
            memory.touch(*session, now);
        }
        (Command::Checkout { session, idempotency_key, items, .. }, outcome) => {
            let key = idempotency_key.trim_start_matches("key-").parse::<u8>().unwrap();
            let first = memory.keys.get(&(*session, key));
            match (first, outcome) {
                // The session closed since: checked in `run`.
                (Some(_), Outcome::Rejected(Rejection::UnknownSession)) => {}
                // At most once: a retry with the same body gets the same answer.
                (Some((first_items, _)), Outcome::Rejected(Rejection::IdempotencyConflict)) => {
                    assert_ne!(first_items, items)
                }
                (Some((first_items, Ok(order))), Outcome::Order { order: got, replayed }) => {
                    assert!(replayed);
                    assert_eq!(first_items, items);
                    assert_eq!(got.id, *order);
                }
                (Some((first_items, Err(refusal))), Outcome::Rejected(got)) => {
                    assert_eq!(first_items, items);
                    assert_eq!(got, refusal);
                }
                (Some(first), other) => panic!("retried key decided {first:?}, now answered {other:?}"),
                (None, Outcome::Order { order, replayed }) => {
                    assert!(!replayed);
                    assert_eq!(order.status, OrderStatus::PendingPayment);
                    memory.orders.push((order.id, *session));
                    memory.keys.insert((*session, key), (items.clone(), Ok(order.id)));
                    memory.pending.insert(order.id, (*session, order.pay_by_ms));
                    memory.idle_since.remove(session);
                }
                (None, Outcome::Rejected(refusal)) if refusal.is_decision() => {
                    memory.keys.insert((*session, key), (items.clone(), Err(refusal.clone())));
                    memory.touch(*session, now);
                }
                (None, _) => {}
            }
        }
        (Command::Pay { order, .. }, Outcome::Order { order: got, .. }) => {
            assert_eq!((got.id, got.status), (*order, OrderStatus::Paid));
            if memory.pending.remove(order).is_some() {
                memory.paid.insert(*order, got.session);
            }
        }
        (Command::Cancel { order, .. }, Outcome::Order { order: got, replayed }) => {
            assert_eq!((got.id, got.status), (*order, OrderStatus::Cancelled));
            // A replayed cancel changes nothing, the idle time included.
            if !replayed {
                memory.pending.remove(order);
                memory.order_final(got.session, now);
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step(steps in proptest::collection::vec(step(), 1..120)) {
        run(steps);
    }
}

/// A table of single commands against a fresh state, each with the outcome a
/// user relies on.
#[test]
fn checkout_outcomes() {
    fn check(commands: Vec<Command>, now: u64, expect: impl Fn(&Outcome) -> bool) {
        let (mut state, _) = opened();
        let mut setup = vec![Command::OpenSession { shopper: "ann".into(), token_hash: token(0) }];
        setup.extend(commands);
        let response = state.apply(&Request { stamped_at_ms: now, commands: setup });
        let last = response.outcomes.last().unwrap();
        assert!(expect(last), "unexpected outcome {last:?}");
        state.check_invariants();
    }
    let checkout = |key: &str, lines: &[(&str, u32)]| Command::Checkout {
        session: 0,
        idempotency_key: key.into(),
        items: Some(lines.iter().map(|(sku, qty)| Line { sku: sku.to_string(), qty: *qty }).collect()),
        hold_ms: HOLD_MS,
    };

    check(vec![checkout("k", &[("hot", 2)])], 2_000, |o| matches!(o, Outcome::Order { replayed: false, .. }));
    check(vec![checkout("k", &[("hot", 1)])], 500, |o| matches!(o, Outcome::Rejected(Rejection::SaleNotOpen { .. })));
    check(vec![checkout("k", &[("hot", 1)])], 100_000, |o| matches!(o, Outcome::Rejected(Rejection::SaleEnded { .. })));
    check(vec![checkout("k", &[("hot", 3)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::LimitExceeded { .. }))
    });
    check(vec![checkout("k", &[("warm", 21)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::SoldOut { available: 20, .. }))
    });
    check(vec![checkout("k", &[("nope", 1)])], 2_000, |o| matches!(o, Outcome::Rejected(Rejection::UnknownSku { .. })));
    check(vec![checkout("k", &[("hot", 0)])], 2_000, |o| matches!(o, Outcome::Rejected(Rejection::Invalid(_))));
    check(vec![checkout("k", &[("hot", u32::MAX)])], 2_000, |o| matches!(o, Outcome::Rejected(Rejection::Invalid(_))));
    check(vec![checkout("k", &[("hot", 1), ("hot", 1)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::Invalid(_)))
    });
    check(vec![checkout("k", &[])], 2_000, |o| matches!(o, Outcome::Rejected(Rejection::EmptyOrder)));
    check(vec![checkout("", &[("hot", 1)])], 2_000, |o| matches!(o, Outcome::Rejected(Rejection::Invalid(_))));
    // One line sold out rejects the whole order: nothing of "warm" is held.
    check(vec![checkout("k", &[("warm", 1), ("hot", 9)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::SoldOut { .. }))
    });
    check(vec![checkout("k", &[("hot", 1)]), checkout("k", &[("hot", 2)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::IdempotencyConflict))
    });
    check(
        vec![checkout("k", &[("hot", 1)]), checkout("k", &[("hot", 1)])],
        2_000,
        |o| matches!(o, Outcome::Order { replayed: true, order } if order.id == 0),
    );
    // A sold-out answer is kept with its key: the retry is sold out too, even
    // though another key could now buy.
    check(vec![checkout("k", &[("hot", 9)]), checkout("k", &[("hot", 9)])], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::SoldOut { available: 5, .. }))
    });
    check(vec![checkout("k", &[("hot", 1)]), Command::Pay { session: 1, order: 0 }], 2_000, |o| {
        matches!(o, Outcome::Rejected(Rejection::UnknownSession | Rejection::UnknownOrder { .. }))
    });
}

/// The crowd presses "buy" before the sale opens, over and over: none of it
/// is kept, so the same key buys once the sale opens, and the presses use
/// up none of the session's keys.
#[test]
fn pressing_buy_before_the_sale_opens_costs_the_shopper_nothing() {
    let (mut state, opening) = opened();
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: token(0) };
    state.apply(&Request { stamped_at_ms: opening - 100, commands: vec![open] });
    let checkout = |key: String| Command::Checkout {
        session: 0,
        idempotency_key: key,
        items: Some(vec![Line { sku: "hot".into(), qty: 1 }]),
        hold_ms: HOLD_MS,
    };
    let early: Vec<Command> = (0..CHECKOUTS_PER_SESSION_MAX).map(|n| checkout(format!("early-{n}"))).collect();
    let before = state.clone();
    let response = state.apply(&Request { stamped_at_ms: opening - 1, commands: early });
    assert!(response.outcomes.iter().all(|o| matches!(o, Outcome::Rejected(Rejection::SaleNotOpen { .. }))));
    assert_eq!(state.checkout_keys(0), 0);
    assert!(before.sku_views().eq(state.sku_views()));

    let response = state.apply(&Request { stamped_at_ms: opening, commands: vec![checkout("early-0".into())] });
    assert!(matches!(&response.outcomes[0], Outcome::Order { replayed: false, .. }), "{:?}", response.outcomes);
    assert_eq!(state.checkout_decision(0, "early-0"), Some(Ok(0)));
}

/// An operator whose restock timed out sends it again: the units go on sale
/// once. Only the latest [`RESTOCKS_KEPT`] keys are remembered.
#[test]
fn a_retried_restock_adds_its_units_once() {
    let (mut state, now) = opened();
    let restock = |key: String, units: u64| Command::Restock { sku: "cold".into(), units, idempotency_key: key };
    let total = |state: &GroupState| state.sku_view("cold").unwrap().stock.total;
    let response = state.apply(&Request {
        stamped_at_ms: now,
        commands: vec![restock("first".into(), 10), restock("first".into(), 10), restock("first".into(), 11)],
    });
    assert!(matches!(&response.outcomes[1], Outcome::Sku(view) if view.stock.total == 60));
    assert_eq!(response.outcomes[2], Outcome::Rejected(Rejection::IdempotencyConflict));
    assert_eq!(total(&state), 60);

    let later = (0..RESTOCKS_KEPT).map(|n| restock(format!("later-{n}"), 1)).collect();
    state.apply(&Request { stamped_at_ms: now, commands: later });
    state.apply(&Request { stamped_at_ms: now, commands: vec![restock("first".into(), 10)] });
    assert_eq!(total(&state), 60 + RESTOCKS_KEPT as u64 + 10, "a forgotten key adds its units again");
}

/// A session that placed no order closes after [`SESSION_IDLE_MS`] without
/// a write: its token is unknown from then on. One with an order stays
/// open, so its shopper can still see and pay for it.
#[test]
fn a_session_without_an_order_closes_after_its_idle_time() {
    let (mut state, now) = opened();
    let open = |n: usize| Command::OpenSession { shopper: "ann".into(), token_hash: token(n) };
    let buy = Command::Checkout {
        session: 1,
        idempotency_key: "k".into(),
        items: Some(vec![Line { sku: "cold".into(), qty: 1 }]),
        hold_ms: SESSION_IDLE_MS * 2,
    };
    state.apply(&Request { stamped_at_ms: now, commands: vec![open(0), open(1), buy] });
    let cart = Command::SetCartItem { session: 0, sku: "warm".into(), qty: 1 };
    let written_at = now + 1_000;
    state.apply(&Request { stamped_at_ms: written_at, commands: vec![cart] });

    state.apply(&Request { stamped_at_ms: written_at + SESSION_IDLE_MS - 1, commands: vec![] });
    assert_eq!(state.cart(0).unwrap().lines.len(), 1, "the cart write kept the session open");

    state.apply(&Request { stamped_at_ms: written_at + SESSION_IDLE_MS, commands: vec![] });
    assert_eq!(state.cart(0), Err(Rejection::UnknownSession));
    assert_eq!(state.session_by_token(&token(0)), None);
    let response = state.apply(&Request {
        stamped_at_ms: written_at + SESSION_IDLE_MS,
        commands: vec![Command::Pay { session: 1, order: 0 }],
    });
    assert!(matches!(&response.outcomes[0], Outcome::Order { order, .. } if order.status == OrderStatus::Paid));
    assert_eq!(state.session_by_token(&token(1)), Some((1, "ann")));
}

/// Cancelled or expired, an order holds its session open no longer: the
/// session closes [`SESSION_IDLE_MS`] after its last order ended, and its
/// orders go with it. Placing and cancelling orders does not keep a
/// session, and the state, for good.
#[test]
fn a_session_whose_orders_ended_unpaid_closes_with_them() {
    let (mut state, now) = opened();
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: token(0) };
    let buy = |key: &str| Command::Checkout {
        session: 0,
        idempotency_key: key.into(),
        items: Some(vec![Line { sku: "cold".into(), qty: 1 }]),
        hold_ms: HOLD_MS,
    };
    state.apply(&Request { stamped_at_ms: now, commands: vec![open, buy("a"), buy("b")] });
    let cancelled_at = now + 10;
    state.apply(&Request { stamped_at_ms: cancelled_at, commands: vec![Command::Cancel { session: 0, order: 0 }] });
    // Order 1 is still pending: the session stays open past the idle time.
    let expired_at = now + HOLD_MS;
    state.apply(&Request { stamped_at_ms: expired_at, commands: vec![] });
    assert_eq!(state.order(0, 1).map(|order| order.status), Ok(OrderStatus::Expired));
    assert_eq!(state.session_counts(), (0, 1));

    state.apply(&Request { stamped_at_ms: expired_at + SESSION_IDLE_MS - 1, commands: vec![] });
    assert!(state.session_by_token(&token(0)).is_some());
    state.apply(&Request { stamped_at_ms: expired_at + SESSION_IDLE_MS, commands: vec![] });
    assert_eq!(state.session_by_token(&token(0)), None);
    assert_eq!((state.order_by_id(0), state.order_by_id(1)), (None, None));
    assert_eq!(state.order_counts(), [0; 4]);
    assert_eq!(state.sku_view("cold").unwrap().stock.available, 50, "the units went back on sale long ago");
}

/// A state keeping at most `max` idle sessions, with the "cold" sale open,
/// and the moment it opened.
fn bounded(max: usize) -> (GroupState, u64) {
    let (sales, now) = opened();
    let mut state = GroupState::with_idle_sessions_max(max);
    let sale = Command::CreateSale(sales.sku_view("cold").unwrap().sale);
    state.apply(&Request { stamped_at_ms: 0, commands: vec![sale] });
    (state, now)
}

/// Opens session `n` of the bound tests.
fn open_nth(n: usize) -> Command {
    Command::OpenSession { shopper: format!("shopper-{n}"), token_hash: token(n) }
}

/// A script opening sessions without end grows no replica past the bound:
/// each session past it closes the one idle longest. Sessions with an order
/// do not count and never close.
#[test]
fn opening_a_session_past_the_bound_closes_the_one_idle_longest() {
    let (mut state, now) = bounded(2);
    let cart = |session| Command::SetCartItem { session, sku: "cold".into(), qty: 1 };
    let buy = |session| Command::Checkout { session, idempotency_key: "k".into(), items: None, hold_ms: HOLD_MS };
    let known =
        |state: &GroupState| (0..5).filter(|n| state.session_by_token(&token(*n)).is_some()).collect::<Vec<_>>();

    state.apply(&Request { stamped_at_ms: now, commands: vec![open_nth(0)] });
    state.apply(&Request { stamped_at_ms: now + 10, commands: vec![open_nth(1)] });
    state.apply(&Request { stamped_at_ms: now + 20, commands: vec![cart(0)] });
    state.apply(&Request { stamped_at_ms: now + 30, commands: vec![open_nth(2)] });
    assert_eq!(known(&state), [0, 2], "session 1 was idle longest");

    state.apply(&Request { stamped_at_ms: now + 40, commands: vec![buy(0), open_nth(3)] });
    assert_eq!(known(&state), [0, 2, 3], "session 0 holds an order and no longer counts");
    state.apply(&Request { stamped_at_ms: now + 50, commands: vec![open_nth(4)] });
    assert_eq!(known(&state), [0, 3, 4]);
}

/// At the bound, a session whose order just ended is not the one that
/// closes, even when the idle times tie to the millisecond.
#[test]
fn the_session_just_used_is_not_the_one_the_bound_closes() {
    let (mut state, now) = bounded(1);
    let buy = Command::Checkout {
        session: 0,
        idempotency_key: "k".into(),
        items: Some(vec![Line { sku: "cold".into(), qty: 1 }]),
        hold_ms: HOLD_MS,
    };
    let cancel = Command::Cancel { session: 0, order: 0 };
    let response = state.apply(&Request { stamped_at_ms: now, commands: vec![open_nth(0), buy, open_nth(1), cancel] });
    assert!(matches!(&response.outcomes[3], Outcome::Order { order, .. } if order.status == OrderStatus::Cancelled));
    assert_eq!(state.session_by_token(&token(0)), Some((0, "shopper-0")));
    assert_eq!(state.session_by_token(&token(1)), None);
}

#[test]
fn unpaid_order_expires_at_its_deadline_and_cannot_be_paid() {
    let (mut state, now) = opened();
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: token(0) };
    let checkout = Command::Checkout {
        session: 0,
        idempotency_key: "k".into(),
        items: Some(vec![Line { sku: "hot".into(), qty: 2 }]),
        hold_ms: HOLD_MS,
    };
    state.apply(&Request { stamped_at_ms: now, commands: vec![open, checkout] });
    assert_eq!(state.sku_view("hot").unwrap().stock.held, 2);

    let response =
        state.apply(&Request { stamped_at_ms: now + HOLD_MS, commands: vec![Command::Pay { session: 0, order: 0 }] });
    assert_eq!(
        response.outcomes[0],
        Outcome::Rejected(Rejection::OrderFinal { order: 0, status: OrderStatus::Expired })
    );
    let stock = state.sku_view("hot").unwrap().stock;
    assert_eq!((stock.available, stock.held, stock.sold), (5, 0, 0));
}

#[test]
fn leader_time_never_goes_backwards() {
    let (mut state, now) = opened();
    state.apply(&Request { stamped_at_ms: now + 10_000, commands: vec![] });
    state.apply(&Request { stamped_at_ms: now, commands: vec![] });
    assert_eq!(state.clock_ms(), now + 10_000);
}

#[test]
fn drill_records_are_kept_bounded_and_replaced_by_their_later_version() {
    let (mut state, now) = opened();
    let record = |id: u64, record: String| Request {
        stamped_at_ms: now,
        commands: vec![Command::RecordDrill { id, coordinator: 3, record }],
    };
    state.apply(&Request { stamped_at_ms: now, commands: vec![] });
    let before = state.clone();
    let too_big = state.apply(&record(1, "x".repeat(DRILL_RECORD_BYTES_MAX + 1)));
    assert!(matches!(too_big.outcomes[..], [Outcome::Rejected(Rejection::Invalid(_))]), "{too_big:?}");
    assert_eq!(state, before, "a refused record changes nothing");

    assert_eq!(state.apply(&record(1, "running".into())).outcomes, vec![Outcome::DrillRecorded]);
    state.apply(&record(1, "completed".into()));
    assert_eq!(state.drill_records().collect::<Vec<_>>(), vec!["completed"]);
    for id in 2..=(DRILLS_KEPT as u64 + 1) {
        state.apply(&record(id, format!("drill {id}")));
    }
    let kept: Vec<&str> = state.drill_records().collect();
    assert_eq!(kept.len(), DRILLS_KEPT);
    assert_eq!((kept[0], kept[DRILLS_KEPT - 1]), ("drill 2", "drill 101"), "the oldest goes first");
}

#[test]
fn a_switchover_freezes_writes_then_promotes_a_region_in_a_new_epoch() {
    let (mut state, now) = opened();
    let apply = |state: &mut GroupState, command: Command| {
        state.apply(&Request { stamped_at_ms: now, commands: vec![command] }).outcomes.remove(0)
    };
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: token(1) };
    assert_eq!(apply(&mut state, Command::Freeze { epoch: 1 }), Outcome::Epoch { epoch: 0, frozen: true });
    assert!(state.is_frozen());
    let before = state.clone();
    assert_eq!(apply(&mut state, open.clone()), Outcome::Rejected(Rejection::Frozen { epoch: 1 }));
    let restock = Command::Restock { sku: "hot".into(), units: 1, idempotency_key: "r".into() };
    assert_eq!(apply(&mut state, restock), Outcome::Rejected(Rejection::Frozen { epoch: 1 }));
    assert_eq!(state, before, "a frozen group takes no write");
    // Out of turn: a second freeze, or a promotion to another epoch.
    assert!(matches!(apply(&mut state, Command::Freeze { epoch: 2 }), Outcome::Rejected(Rejection::StaleEpoch { .. })));
    let wrong = Command::Promote { region: "dr".into(), epoch: 2 };
    assert!(matches!(apply(&mut state, wrong), Outcome::Rejected(Rejection::StaleEpoch { .. })));

    let promote = Command::Promote { region: "dr".into(), epoch: 1 };
    assert_eq!(apply(&mut state, promote), Outcome::Epoch { epoch: 1, frozen: false });
    assert_eq!((state.epoch(), state.primary_region(), state.is_frozen()), (1, Some("dr"), false));
    assert!(matches!(apply(&mut state, open), Outcome::SessionOpened { .. }));
    // An epoch is never reused; an abandoned switchover thaws in the old one.
    assert!(matches!(apply(&mut state, Command::Freeze { epoch: 1 }), Outcome::Rejected(Rejection::StaleEpoch { .. })));
    apply(&mut state, Command::Freeze { epoch: 2 });
    assert_eq!(apply(&mut state, Command::Thaw { epoch: 2 }), Outcome::Epoch { epoch: 1, frozen: false });
    assert_eq!((state.epoch(), state.primary_region()), (1, Some("dr")));
}
