//! Five real nodes on loopback (zones a and b of the primary region, and a
//! tiebreaker in the DR region) over mutual TLS. A crowd checks out through
//! endpoints in both zones; both nodes of zone a get SIGKILL mid-sale;
//! checkout goes on through zone b; zone a restarts and catches up. Every
//! client operation is recorded and the history is checked for
//! linearizability by an independent checker, with conservation and every
//! acknowledged order checked at the end.

use std::cell::RefCell;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;
use todc_utils::linearizability::history::{Action, History as Checked};
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::Specification;

use crate::support::*;

const SKU: &str = "zone-hot";
const STOCK: u64 = 400;
const SHOPPERS: usize = 8;

/// One client operation on the hot SKU, as the checker sees it: the call
/// carries no result (`None`), the response carries what the API answered.
#[derive(Clone, Debug)]
enum Op {
    /// A checkout of `qty` units: reserved (`Some(true)`) or sold out.
    Checkout { qty: u64, reserved: Option<bool> },
    /// `GET /v1/skus/{sku}`: the units available.
    Read(Option<u64>),
}

/// The sequential specification one SKU's stock must behave like, seen
/// through the API: a checkout takes `qty` units if that many are available,
/// and a read returns what is available. No payment window passes during the
/// test and nobody cancels, so nothing returns units.
struct StockSpec;

impl Specification for StockSpec {
    /// Units available.
    type State = u64;
    type Operation = Op;

    fn init() -> u64 {
        STOCK
    }

    fn apply(op: &Op, available: &u64) -> (bool, u64) {
        match *op {
            Op::Checkout { qty, reserved: Some(true) } if qty <= *available => (true, available - qty),
            Op::Checkout { qty, reserved: Some(false) } => (qty > *available, *available),
            Op::Read(Some(seen)) => (seen == *available, *available),
            _ => (false, *available),
        }
    }
}

/// Everything the crowd saw, in the order it saw it (one thread: the order
/// of events here is real-time order).
#[derive(Default)]
struct History {
    /// `(shopper, call or response)`.
    events: Vec<(usize, Action<Op>)>,
    /// Acknowledged orders: (token, order id).
    acked: Vec<(String, u64)>,
    /// Checkouts acknowledged after zone a was killed.
    acked_after_kill: usize,
    /// When zone a was killed.
    killed_at: Option<Instant>,
    /// Time from the kill to the first checkout acknowledged after it.
    unavailable: Option<Duration>,
}

/// A shopper: a session, then checkouts and reads through its endpoint,
/// moving to the next endpoint when one stops answering. An answer that
/// says nothing definite (a 5xx, no answer) is retried, a checkout with the
/// same idempotency key, until one does: so each operation in the history
/// runs from its first attempt to its definite answer, and the checker may
/// place it anywhere in between.
async fn shopper(endpoints: Vec<String>, n: usize, history: Rc<RefCell<History>>, stop: Rc<RefCell<bool>>) {
    let client = client();
    let mut endpoint = n % endpoints.len();
    let thread = n;
    let token = loop {
        let url = &endpoints[endpoint];
        match call(&client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({"shopper": format!("z{n}")}))).await
        {
            Ok((201, body)) => break body["token"].as_str().unwrap().to_string(),
            _ => endpoint = (endpoint + 1) % endpoints.len(),
        }
        if *stop.borrow() {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    for round in 0usize.. {
        if *stop.borrow() {
            return;
        }
        let op = if round % 4 == 3 {
            Op::Read(None)
        } else {
            Op::Checkout { qty: 1 + (n + round) as u64 % 2, reserved: None }
        };
        history.borrow_mut().events.push((thread, Action::Call(op.clone())));
        let started = Instant::now();
        let ret = loop {
            let url = endpoints[endpoint].clone();
            let reply = match &op {
                Op::Read(_) => call(&client, "GET", &format!("{url}/v1/skus/{SKU}"), &[], None).await,
                Op::Checkout { qty, .. } => {
                    let headers = [bearer(&token), ("Idempotency-Key", format!("z{n}-{round}"))];
                    let body = json!({"items": [{"sku": SKU, "qty": qty}]});
                    call(&client, "POST", &format!("{url}/v1/checkout"), &headers, Some(body)).await
                }
            };
            match (&op, reply) {
                (&Op::Checkout { qty, .. }, Ok((200 | 201, order))) => {
                    let mut h = history.borrow_mut();
                    h.acked.push((token.clone(), order["order_id"].as_u64().unwrap()));
                    let now = Instant::now();
                    if let Some(killed_at) = h.killed_at {
                        h.acked_after_kill += 1;
                        h.unavailable.get_or_insert(now - killed_at);
                    }
                    break Op::Checkout { qty, reserved: Some(true) };
                }
                (&Op::Checkout { qty, .. }, Ok((409, problem))) if problem["type"] == "/problems/sold-out" => {
                    break Op::Checkout { qty, reserved: Some(false) }
                }
                (Op::Read(_), Ok((200, sku))) => break Op::Read(Some(sku["available"].as_u64().unwrap())),
                (_, Ok((status, body))) if status < 500 => panic!("unexpected answer {status}: {body}"),
                (_, reply) => {
                    assert!(started.elapsed() < Duration::from_secs(60), "no definite answer for {op:?} in 60 s");
                    if reply.is_err() {
                        endpoint = (endpoint + 1) % endpoints.len();
                    }
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        history.borrow_mut().events.push((thread, Action::Response(ret)));
    }
}

#[actix_rt::test]
async fn checkout_survives_losing_a_zone_and_the_history_is_linearizable() {
    let mut cluster = Cluster::start(&FIVE_VOTERS);
    let client = client();
    cluster.ready(&client).await;
    let _ = cluster.config();

    // The sale is created through a zone b node: whichever node leads, the
    // write is forwarded there.
    let sale = json!({"sku": SKU, "name": "Zone", "price_minor": 100, "stock": STOCK,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, body) =
        call(&client, "POST", &format!("{}/v1/sales", cluster.api[2]), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201, "{body}");

    // Shoppers use the four primary-region endpoints, zones a and b.
    let endpoints: Vec<String> = cluster.api[..4].to_vec();
    let history = Rc::new(RefCell::new(History::default()));
    let stop = Rc::new(RefCell::new(false));
    let crowd: Vec<_> =
        (0..SHOPPERS).map(|n| actix_rt::spawn(shopper(endpoints.clone(), n, history.clone(), stop.clone()))).collect();

    let wait_for = |acked: usize, within: Duration| {
        let history = history.clone();
        async move {
            let started = Instant::now();
            while history.borrow().acked.len() < acked {
                assert!(started.elapsed() < within, "only {} checkouts acknowledged", history.borrow().acked.len());
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(30, Duration::from_secs(30)).await;

    // Zone a burns down: both of its nodes, whoever leads.
    history.borrow_mut().killed_at = Some(Instant::now());
    cluster.kill(1);
    cluster.kill(2);
    let before_kill = history.borrow().acked.len();
    wait_for(before_kill + 30, Duration::from_secs(30)).await;
    assert!(history.borrow().acked_after_kill > 0);
    let unavailable = history.borrow().unavailable.unwrap();
    println!("checkout unavailable for {} ms after losing zone a", unavailable.as_millis());
    assert!(unavailable < Duration::from_secs(10), "checkout unavailable for {unavailable:?}");

    println!("zone a restarting");
    // Zone a comes back and catches up.
    cluster.restart(1);
    cluster.restart(2);
    for url in &cluster.api[..2] {
        ready(&client, url, Duration::from_secs(30)).await;
    }
    let after_restart = history.borrow().acked.len();
    wait_for(after_restart + 15, Duration::from_secs(30)).await;
    *stop.borrow_mut() = true;
    for shopper in crowd {
        shopper.await.unwrap();
    }

    println!("crowd stopped; auditing {} acknowledged orders", history.borrow().acked.len());
    // Every acknowledged order is there, read through a node that was killed.
    let history = Rc::try_unwrap(history).ok().unwrap().into_inner();
    let url = &cluster.api[0];
    for (token, order) in &history.acked {
        let (status, _) = get(&client, &format!("{url}/v1/orders/{order}"), &[bearer(token)]).await;
        assert_eq!(status, 200, "acknowledged order {order} lost");
    }

    // Conservation, and every node agrees once it has caught up.
    let mut views = Vec::new();
    for url in &cluster.api {
        let (status, sku) = get(&client, &format!("{url}/v1/skus/{SKU}"), &[]).await;
        assert_eq!(status, 200);
        let [available, held, sold, total] = ["available", "held", "sold", "total"].map(|k| sku[k].as_u64().unwrap());
        assert_eq!((available + held + sold, total), (STOCK, STOCK), "{sku}");
        views.push(sku);
    }
    assert!(views.windows(2).all(|w| w[0] == w[1]), "replicas disagree: {views:?}");
    assert!(views[0]["held"].as_u64().unwrap() >= history.acked.len() as u64);

    println!("checking a history of {} events", history.events.len());
    // The history is linearizable against the sequential stock.
    assert!(
        WGLChecker::<StockSpec>::is_linearizable(Checked::from_actions(history.events)),
        "the recorded history is not linearizable"
    );

    // The operator's zone-loss drill, through `surge ctl` against a zone b
    // node: zone a is cut off (not killed) and comes back on its own.
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_surge"))
            .arg("ctl")
            .args(["--endpoint", &cluster.api[2], "--token", OPERATOR])
            .args(args)
            .output()
            .unwrap()
    };
    let drill = ctl(&["drill", "zone-loss", "--zone", "a", "--for", "2"]);
    let printed = String::from_utf8_lossy(&drill.stdout);
    println!("{printed}");
    assert!(drill.status.success(), "surge ctl drill failed: {}", String::from_utf8_lossy(&drill.stderr));
    let (status, drills) = get(&client, &format!("{}/v1/admin/drills", cluster.api[2]), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 200);
    let report = &drills[0];
    assert_eq!((report["state"].as_str(), report["nodes"].clone()), (Some("completed"), json!([1, 2])), "{report}");
    assert_eq!((report["orders_lost"].clone(), report["oversold_units"].as_u64()), (json!([]), Some(0)), "{report}");
    assert!(report["orders_acknowledged"].as_u64().unwrap() > 0, "{report}");
    assert!(report["caught_up_ms"].is_u64(), "zone a did not catch up after the drill: {report}");
    // The record is in the replicated state: a node that did not run the
    // drill, one of those it cut off, lists the same final report.
    let started = Instant::now();
    loop {
        let (status, elsewhere) =
            get(&client, &format!("{}/v1/admin/drills", cluster.api[0]), &[bearer(OPERATOR)]).await;
        assert_eq!(status, 200, "{elsewhere}");
        if elsewhere.get(0) == Some(report) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "node 1 lists {elsewhere}, not {report}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    // A node inside the zone refuses to coordinate its own loss.
    let refused = Command::new(env!("CARGO_BIN_EXE_surge"))
        .args(["ctl", "--endpoint", &cluster.api[0], "--token", OPERATOR, "drill", "zone-loss", "--zone", "a"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ask a node outside it"));

    // `surge ctl status` shows all five nodes, one leader among them, in
    // the primary region. The tiebreaker may have had to lead for a moment
    // (when it alone held entries the survivors lacked); then it hands
    // leadership back within a few leases.
    let started = Instant::now();
    let table = loop {
        let status = ctl(&["status"]);
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        let table = String::from_utf8_lossy(&status.stdout).into_owned();
        let leaders: Vec<&str> = table.lines().filter(|line| line.contains(" leader ")).collect();
        if leaders.len() == 1 && leaders[0].starts_with("primary") {
            break table;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no single leader in the primary region: {table}");
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    };
    let leaders: Vec<&str> = table.lines().filter(|line| line.contains(" leader ")).collect();
    assert_eq!(table.lines().filter(|line| line.contains("127.0.0.1:")).count(), 5, "{table}");

    // Leadership moves on the operator's word: to another primary node, and
    // never to the tiebreaker.
    let leader: u64 = leaders[0].split_whitespace().nth(2).unwrap().parse().unwrap();
    let target = if leader == 3 { 1 } else { 3 };
    let moved = ctl(&["transfer-leader", "--to", &target.to_string()]);
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    let table = String::from_utf8_lossy(&ctl(&["status"]).stdout).into_owned();
    let leader_rows: Vec<&str> = table.lines().filter(|line| line.contains(" leader ")).collect();
    assert_eq!(leader_rows.len(), 1, "{table}");
    assert_eq!(leader_rows[0].split_whitespace().nth(2), Some(target.to_string().as_str()), "{table}");
    let refused = ctl(&["transfer-leader", "--to", "5"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("never leads"));
}
