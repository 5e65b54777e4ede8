//! Escrow and failover: the DR copy, promoted at any point of the primary's
//! history, never sells a unit the lost primary may have sold, and names
//! every order the primary acknowledged that it does not have.

use std::collections::BTreeSet;

use domain::*;
use proptest::prelude::*;

const SKUS: [&str; 2] = ["hot", "cold"];
const HOLD_MS: u64 = 5_000;

fn opened() -> GroupState {
    let mut state = GroupState::default();
    let sales = SKUS.iter().zip([6, 30]).map(|(sku, stock)| {
        Command::CreateSale(Sale {
            sku: sku.to_string(),
            name: format!("{sku} item"),
            price_minor: 100,
            stock,
            starts_at_ms: 0,
            ends_at_ms: u64::MAX,
            limit_per_shopper: 0,
        })
    });
    state.apply(&Request { stamped_at_ms: 0, commands: sales.collect() });
    state
}

fn apply(state: &mut GroupState, now: u64, command: Command) -> Outcome {
    let outcome = state.apply(&Request { stamped_at_ms: now, commands: vec![command] }).outcomes.remove(0);
    state.check_invariants();
    outcome
}

fn checkout(session: SessionId, key: &str, sku: &str, qty: u32) -> Command {
    Command::Checkout {
        session,
        idempotency_key: key.into(),
        items: Some(vec![Line { sku: sku.into(), qty }]),
        hold_ms: HOLD_MS,
    }
}

fn grant(sku: &str, units: u64) -> Command {
    Command::GrantEscrow { sku: sku.into(), units }
}

#[test]
fn once_escrow_is_on_a_checkout_holds_only_confirmed_escrow() {
    let mut state = opened();
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: format!("{:064x}", 1) };
    let Outcome::SessionOpened { session } = apply(&mut state, 1, open) else { panic!() };
    // Without escrow, stock is held straight from what is available.
    assert!(matches!(apply(&mut state, 1, checkout(session, "a", "hot", 1)), Outcome::Order { .. }));

    assert_eq!(apply(&mut state, 1, grant("hot", 3)), Outcome::Escrow { granted: 1, confirmed: 0 });
    assert!(state.escrow_is_on());
    let before = state.clone();
    let pending = apply(&mut state, 1, checkout(session, "b", "hot", 1));
    assert_eq!(pending, Outcome::Rejected(Rejection::EscrowPending { sku: "hot".into(), wanted: 1 }));
    assert!(!pending_is_a_decision(&pending), "the same key may retry once escrow is confirmed");
    assert_eq!(state, before, "a checkout waiting for escrow changes nothing");
    // Still sold out as before when the units do not exist at all.
    assert!(matches!(
        apply(&mut state, 1, checkout(session, "c", "hot", 6)),
        Outcome::Rejected(Rejection::SoldOut { available: 5, .. })
    ));

    assert_eq!(
        apply(&mut state, 1, Command::ConfirmEscrow { through: 1 }),
        Outcome::Escrow { granted: 1, confirmed: 1 }
    );
    assert_eq!(state.holdable("hot"), 3);
    assert!(matches!(apply(&mut state, 1, checkout(session, "b", "hot", 3)), Outcome::Order { .. }));
    assert!(matches!(
        apply(&mut state, 1, checkout(session, "d", "hot", 1)),
        Outcome::Rejected(Rejection::EscrowPending { .. })
    ));

    // Units an order gives back are available again, outside escrow: selling
    // them again takes a new grant the DR copy hears of.
    apply(&mut state, 1 + HOLD_MS, Command::Restock { sku: "cold".into(), units: 1, idempotency_key: "r".into() });
    let stock = state.sku_view("hot").unwrap().stock;
    assert_eq!((stock.available, stock.escrowed, stock.held), (6, 0, 0));
    assert_eq!(state.holdable("hot"), 0);
}

fn pending_is_a_decision(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Rejected(rejection) if rejection.is_decision())
}

#[test]
fn grants_and_confirmations_out_of_bounds_change_nothing() {
    let mut state = opened();
    state.apply(&Request { stamped_at_ms: 1, commands: vec![] });
    let before = state.clone();
    for command in [grant("hot", 0), grant("hot", 7), grant("nope", 1), Command::ConfirmEscrow { through: 1 }] {
        assert!(matches!(apply(&mut state, 1, command.clone()), Outcome::Rejected(_)), "{command:?}");
        assert_eq!(state, before, "{command:?} changed the state");
    }
    apply(&mut state, 1, grant("hot", 2));
    apply(&mut state, 1, Command::ConfirmEscrow { through: 1 });
    let before = state.clone();
    // A confirmation that arrives twice (two replicas, or a retry) is harmless.
    assert_eq!(
        apply(&mut state, 1, Command::ConfirmEscrow { through: 1 }),
        Outcome::Escrow { granted: 1, confirmed: 1 }
    );
    assert_eq!(state, before);
}

/// One step of the primary's or the promoted copy's history.
#[derive(Clone, Debug)]
enum Step {
    Open,
    Checkout {
        session: usize,
        sku: usize,
        qty: u32,
    },
    Pay {
        order: usize,
    },
    Cancel {
        order: usize,
    },
    Wait {
        ms: u64,
    },
    Grant {
        sku: usize,
        units: u64,
    },
    /// The DR copy confirms every grant it has applied.
    Confirm,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::Open),
        5 => (0..8usize, 0..SKUS.len(), 1u32..4).prop_map(|(session, sku, qty)| Step::Checkout { session, sku, qty }),
        3 => (0..16usize).prop_map(|order| Step::Pay { order }),
        1 => (0..16usize).prop_map(|order| Step::Cancel { order }),
        1 => (0u64..4_000).prop_map(|ms| Step::Wait { ms }),
        3 => (0..SKUS.len(), 1u64..5).prop_map(|(sku, units)| Step::Grant { sku, units }),
        2 => Just(Step::Confirm),
    ]
}

/// One copy of the state and what its own answers told it.
#[derive(Clone)]
struct Copy {
    state: GroupState,
    sessions: Vec<SessionId>,
    orders: Vec<(SessionId, OrderId)>,
    /// Orders whose placement or payment this copy acknowledged.
    acknowledged: BTreeSet<OrderId>,
    keys: u64,
}

impl Copy {
    /// Runs `step`; a confirmation covers grants up to `confirmable`.
    fn run(&mut self, step: &Step, now: &mut u64, confirmable: u64, tokens: &mut u64) {
        let pick = |n: usize, len: usize| n % len.max(1);
        let command = match *step {
            Step::Open => {
                *tokens += 1;
                Command::OpenSession { shopper: format!("s{}", *tokens % 3), token_hash: format!("{:064x}", *tokens) }
            }
            Step::Checkout { .. } | Step::Pay { .. } | Step::Cancel { .. } if self.sessions.is_empty() => return,
            Step::Checkout { session, sku, qty } => {
                self.keys += 1;
                let session = self.sessions[pick(session, self.sessions.len())];
                checkout(session, &format!("k{}", self.keys), SKUS[sku], qty)
            }
            Step::Pay { .. } | Step::Cancel { .. } if self.orders.is_empty() => return,
            Step::Pay { order } => {
                let (session, order) = self.orders[pick(order, self.orders.len())];
                Command::Pay { session, order }
            }
            Step::Cancel { order } => {
                let (session, order) = self.orders[pick(order, self.orders.len())];
                Command::Cancel { session, order }
            }
            Step::Wait { ms } => {
                *now += ms;
                self.state.apply(&Request { stamped_at_ms: *now, commands: vec![] });
                return;
            }
            Step::Grant { sku, units } => grant(SKUS[sku], units),
            Step::Confirm => Command::ConfirmEscrow { through: confirmable.min(self.state.escrow_granted()) },
        };
        match apply(&mut self.state, *now, command) {
            Outcome::SessionOpened { session } => self.sessions.push(session),
            Outcome::Order { order, .. } => {
                if order.status == OrderStatus::PendingPayment && !self.acknowledged.contains(&order.id) {
                    self.orders.push((order.session, order.id));
                }
                self.acknowledged.insert(order.id);
            }
            _ => {}
        }
    }
}

fn fail_over_at(history: Vec<Step>, cut: usize, after: Vec<Step>) {
    let (mut now, mut tokens) = (1, 0);
    let mut primary =
        Copy { state: opened(), sessions: vec![], orders: vec![], acknowledged: BTreeSet::new(), keys: 0 };
    let cut = cut % (history.len() + 1);
    for step in &history[..cut] {
        primary.run(step, &mut now, u64::MAX, &mut tokens);
    }
    let at_cut = primary.state.clone();
    // The copy stops here: from now on it confirms no grant it has not applied.
    for step in &history[cut..] {
        primary.run(step, &mut now, at_cut.escrow_granted(), &mut tokens);
    }
    // Until the copy holds a grant, the primary sold straight from stock:
    // an order there could expire and its units sell again, any number of
    // times, so nothing bounds what a failover would lose, and a forced
    // failover refuses such a copy (`copy-unbounded`).
    if !at_cut.escrow_is_on() {
        return;
    }

    let mut copy =
        Copy { state: at_cut.clone(), sessions: vec![], orders: vec![], acknowledged: BTreeSet::new(), keys: 1_000 };
    let failover = copy.state.fail_over("dr");
    copy.state.check_invariants();
    assert_eq!(copy.state.primary_region(), Some("dr"));
    assert!(copy.state.epoch() > at_cut.epoch());
    assert_eq!(copy.state.generation(), at_cut.generation() + 1);
    // It has no DR copy of its own: it sells what is available, not escrow.
    assert!(!copy.state.escrow_is_on());

    // Every order the primary acknowledged and the copy lacks is named, and
    // so is every payment the copy may not have.
    for order in &primary.acknowledged {
        let got = primary.state.order_by_id(*order).unwrap();
        match at_cut.order_by_id(*order) {
            None => assert!(failover.orders_maybe_lost.contains(order), "order {order} lost unreported: {failover:?}"),
            Some(seen) if seen.status != got.status && got.status == OrderStatus::Paid => {
                assert!(failover.payments_in_doubt.contains(order), "payment of {order} lost unreported")
            }
            Some(_) => {}
        }
    }
    // So is every session the primary opened that the copy lacks: its token
    // gets 401 from now on, and the report says why.
    for session in &primary.sessions {
        if at_cut.cart(*session).is_err() {
            assert!(failover.sessions_maybe_lost.contains(session), "session {session} lost unreported: {failover:?}");
        }
    }
    // The bound is honest: the lost ids are no more than the units unsettled.
    assert_eq!(
        failover.orders_maybe_lost.end - failover.orders_maybe_lost.start,
        failover.unsettled.values().sum::<u64>()
    );

    // The copy sells on, in the new region, to the sessions and orders it
    // knew of (some in doubt) and to new ones.
    copy.sessions = primary.sessions.iter().copied().filter(|s| at_cut.cart(*s).is_ok()).collect();
    copy.orders = primary.orders.iter().copied().filter(|(_, id)| at_cut.order_by_id(*id).is_some()).collect();
    for step in &after {
        copy.run(step, &mut now, u64::MAX, &mut tokens);
    }
    let new_ids: BTreeSet<OrderId> =
        copy.acknowledged.iter().copied().filter(|id| at_cut.order_by_id(*id).is_none()).collect();
    assert!(
        new_ids.iter().all(|id| *id >= failover.orders_maybe_lost.end),
        "the copy reused an id the old primary may have given: {new_ids:?} vs {failover:?}"
    );
    // No oversell across both regions: what either promised fits in the stock.
    for sku in SKUS {
        let total = copy.state.sku_view(sku).unwrap().stock.total;
        let promised = GroupState::units_promised(&primary.state, &copy.state, sku);
        assert!(promised <= total, "{sku}: {promised} units promised, {total} exist");
    }

    // Failback without the lost primary's copy, its disks gone for good:
    // nothing goes back on sale, every payment in doubt stays in doubt, and
    // the copy sells on. Nothing is sold twice, counting what the lost
    // primary sold that this copy does not hold.
    let mut blind = copy.clone();
    let settle = blind.state.reconcile_without(None, vec![1]).settlement(failover.generation);
    assert_eq!(apply(&mut blind.state, now, settle), Outcome::Settled { generation: 1, replayed: false });
    let mut blind_now = now;
    for step in &after {
        blind.run(step, &mut blind_now, u64::MAX, &mut tokens);
    }
    assert_sold_once(&blind.state, &primary.state, "failback without the lost copy");

    // Failback: the lost primary comes back; what nobody bought there goes
    // back on sale, and the copy sells on. Still nothing is sold twice: the
    // lost primary's pending orders will never be paid (it is fenced), its
    // paid ones stay counted.
    let reconciliation = copy.state.reconcile(&primary.state);
    let settle = reconciliation.settlement(failover.generation);
    assert_eq!(apply(&mut copy.state, now, settle.clone()), Outcome::Settled { generation: 1, replayed: false });
    let settled = copy.state.clone();
    assert_eq!(apply(&mut copy.state, now, settle), Outcome::Settled { generation: 1, replayed: true });
    assert_eq!(copy.state, settled, "a repeated settlement changed the state");
    for order in &primary.acknowledged {
        let there = primary.state.order_by_id(*order).unwrap();
        let agrees = copy.state.order_by_id(*order).is_some_and(|here| here.status == there.status);
        let listed = reconciliation.orders_to_settle.iter().any(|settle| settle.id == *order);
        assert!(agrees || listed, "order {order} differs between the copies and is not listed: {reconciliation:?}");
    }
    for step in &after {
        copy.run(step, &mut now, u64::MAX, &mut tokens);
    }
    assert_sold_once(&copy.state, &primary.state, "failback");
}

/// No unit of `here`, the promoted copy, is sold or held, or on sale, that
/// `there`, the lost primary, sold: those must stay out of sale for good.
fn assert_sold_once(here: &GroupState, there: &GroupState, after: &str) {
    for sku in SKUS {
        let stock = here.sku_view(sku).unwrap().stock;
        let sold_there = sold_only_there(there, here, sku);
        assert!(
            stock.for_sale() + stock.held + stock.sold + sold_there <= stock.total,
            "after {after}, {sku}: {stock:?} here, {sold_there} sold there only"
        );
    }
}

/// Units of `sku` in orders `there` has paid that hold nothing `here`.
fn sold_only_there(there: &GroupState, here: &GroupState, sku: &str) -> u64 {
    let holds_here =
        |id| here.order_by_id(id).is_some_and(|o| matches!(o.status, OrderStatus::PendingPayment | OrderStatus::Paid));
    there
        .orders()
        .filter(|order| order.status == OrderStatus::Paid && !holds_here(order.id))
        .flat_map(|order| order.lines.iter().filter(|line| line.sku == sku).map(|line| u64::from(line.qty)))
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_copy_promoted_at_any_point_never_sells_what_the_primary_may_have_sold(
        history in proptest::collection::vec(step(), 1..80),
        cut in 0usize..80,
        after in proptest::collection::vec(step(), 0..60),
    ) {
        fail_over_at(history, cut, after);
    }
}

#[test]
fn a_switchover_hands_escrow_to_the_new_dr_copy_to_confirm_again() {
    let mut state = opened();
    apply(&mut state, 1, grant("hot", 4));
    apply(&mut state, 1, grant("cold", 2));
    apply(&mut state, 1, Command::ConfirmEscrow { through: 2 });
    assert_eq!((state.holdable("hot"), state.holdable("cold")), (4, 2));
    apply(&mut state, 1, Command::Freeze { epoch: 1 });
    apply(&mut state, 1, Command::Promote { region: "dr".into(), epoch: 1 });
    // The old DR copy confirmed those units; the new one has not.
    assert_eq!((state.holdable("hot"), state.holdable("cold")), (0, 0));
    assert_eq!((state.escrow_granted(), state.escrow_confirmed()), (3, 2));
    apply(&mut state, 1, Command::ConfirmEscrow { through: 3 });
    assert_eq!((state.holdable("hot"), state.holdable("cold")), (4, 2));
}

/// A primary with all 6 hot units in escrow its DR copy confirmed, and a
/// session that placed two orders from it, pending payment: `unpaid` of 2
/// units and `paid` (paid later, in some tests) of 1.
fn two_orders_pending() -> (GroupState, SessionId, Order, Order) {
    let mut state = opened();
    apply(&mut state, 1, grant("hot", 6));
    apply(&mut state, 1, Command::ConfirmEscrow { through: 1 });
    let open = Command::OpenSession { shopper: "ann".into(), token_hash: format!("{:064x}", 1) };
    let Outcome::SessionOpened { session } = apply(&mut state, 1, open) else { panic!("no session") };
    let unpaid = placed(apply(&mut state, 1, checkout(session, "a", "hot", 2)));
    let paid = placed(apply(&mut state, 1, checkout(session, "b", "hot", 1)));
    (state, session, unpaid, paid)
}

fn placed(outcome: Outcome) -> Order {
    let Outcome::Order { order, .. } = outcome else { panic!("no order: {outcome:?}") };
    order
}

#[test]
fn after_failback_an_order_in_doubt_that_expires_returns_its_units_unless_it_was_paid_there() {
    let (state, session, unpaid, paid) = two_orders_pending();
    // The primary takes one payment after the DR copy's last entry, and is lost.
    let mut primary = state.clone();
    assert!(matches!(apply(&mut primary, 2, Command::Pay { session, order: paid.id }), Outcome::Order { .. }));
    let mut copy = state;
    let failover = copy.fail_over("dr");
    assert_eq!(failover.payments_in_doubt, vec![unpaid.id, paid.id]);

    // Failback settles before either order expires here.
    let reconciliation = copy.reconcile(&primary);
    let settled = apply(&mut copy, 3, reconciliation.settlement(failover.generation));
    assert_eq!(settled, Outcome::Settled { generation: 1, replayed: false });
    assert_eq!(copy.sku_view("hot").unwrap().stock.unsettled, 0, "the unsold escrow went back on sale");

    // Both expire here. The one the lost primary never saw paid gives its
    // two units back to sale; the one it sold keeps its unit out of sale.
    apply(&mut copy, 3 + HOLD_MS, Command::ConfirmEscrow { through: 0 });
    let stock = copy.sku_view("hot").unwrap().stock;
    assert_eq!((stock.held, stock.unsettled, stock.for_sale()), (0, 1, 5), "{stock:?}");
    // The lost primary is fenced: of its orders only the paid one counts.
    let sold_there = u64::from(paid.lines[0].qty);
    assert_eq!(stock.for_sale() + stock.held + stock.sold + sold_there, stock.total);
}

/// A copy that sold on for hours after the failover closed an idle session
/// with its orders. Failback passes over the one both copies left unpaid,
/// and still lists the one the lost primary was paid for.
#[test]
fn failback_passes_over_orders_the_copy_closed_unpaid_and_lists_one_paid_there() {
    let (mut state, session, unpaid, paid) = two_orders_pending();
    apply(&mut state, 1, Command::Cancel { session, order: unpaid.id });
    let mut primary = state.clone();
    assert!(matches!(apply(&mut primary, 2, Command::Pay { session, order: paid.id }), Outcome::Order { .. }));
    let mut copy = state;
    copy.fail_over("dr");

    // Here the payment in doubt expires, and the session, holding nothing,
    // closes six hours later with both orders.
    let expired_at = 1 + HOLD_MS;
    copy.apply(&Request { stamped_at_ms: expired_at, commands: vec![] });
    copy.apply(&Request { stamped_at_ms: expired_at + SESSION_IDLE_MS, commands: vec![] });
    copy.check_invariants();
    assert_eq!((copy.order_by_id(unpaid.id), copy.order_by_id(paid.id)), (None, None));

    let reconciliation = copy.reconcile(&primary);
    let listed: Vec<_> = reconciliation.orders_to_settle.iter().map(|order| (order.id, order.here)).collect();
    assert_eq!(listed, vec![(paid.id, None)]);
    assert_eq!(reconciliation.units_sold_there["hot"], u64::from(paid.lines[0].qty));
}

#[test]
fn failback_without_a_lost_copy_returns_no_unit_and_keeps_every_payment_in_doubt() {
    let (state, session, unpaid, paid) = two_orders_pending();
    // After the DR copy's last entry the primary takes a payment, which
    // one of its nodes has, then sells two more units only its leader
    // logged; that leader's disk is lost for good.
    let mut survivor = state.clone();
    assert!(matches!(apply(&mut survivor, 2, Command::Pay { session, order: paid.id }), Outcome::Order { .. }));
    let mut leader = survivor.clone();
    let more = placed(apply(&mut leader, 2, checkout(session, "c", "hot", 2)));
    assert!(matches!(apply(&mut leader, 2, Command::Pay { session, order: more.id }), Outcome::Order { .. }));
    let mut copy = state;
    let failover = copy.fail_over("dr");
    assert_eq!(failover.unsettled["hot"], 3);

    // Reconciled with the survivor as if it were complete, the three
    // unsettled units would go back on sale, and two of them were sold.
    assert_eq!(copy.reconcile(&survivor).units_returned["hot"], 3);

    let partly = copy.reconcile_without(Some(&survivor), vec![1]);
    assert_eq!(partly.orders_to_settle.iter().map(|order| order.id).collect::<Vec<_>>(), vec![paid.id]);
    assert_eq!(partly.kept_in_doubt, BTreeSet::from([unpaid.id, paid.id]));
    assert!(partly.units_returned.is_empty());
    assert_eq!(partly.copies_lost, vec![1]);
    let blind = copy.reconcile_without(None, vec![1, 2, 3, 4]);
    assert!(blind.orders_to_settle.is_empty() && blind.units_returned.is_empty());
    assert_eq!(blind.kept_in_doubt, partly.kept_in_doubt);

    let settled = apply(&mut copy, 3, partly.settlement(failover.generation));
    assert_eq!(settled, Outcome::Settled { generation: 1, replayed: false });
    // Both in-doubt orders expire here: neither gives its units back.
    apply(&mut copy, 3 + HOLD_MS, Command::ConfirmEscrow { through: 0 });
    let stock = copy.sku_view("hot").unwrap().stock;
    assert_eq!((stock.for_sale(), stock.held, stock.sold, stock.unsettled), (0, 0, 0, 6), "{stock:?}");
    let sold_there = u64::from(paid.lines[0].qty + more.lines[0].qty);
    assert!(stock.for_sale() + stock.held + stock.sold + sold_there <= stock.total);
}
