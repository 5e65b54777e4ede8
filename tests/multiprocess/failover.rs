//! The primary region is lost mid-sale (all four of its nodes SIGKILLed
//! while shoppers check out), and the DR region is promoted with
//! `surge ctl failover --to dr --force`. Every acknowledged order the
//! promoted copy lacks is in the reported list; across both regions no
//! unit is sold twice; and when the old primary's nodes come back they
//! are fenced and take no write. Then the failback: the two copies are
//! reconciled, the old primary's nodes rejoin with wiped data as the DR
//! copy, and a switchover moves the sale back to them.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::dr_replication::WITH_REPLICA;
use crate::support::*;

const SKU: &str = "failover-hot";
const STOCK: u64 = 300;
/// Shoppers checking out at once through the primary's endpoints.
const SHOPPERS: usize = 4;

/// An acknowledged order and the token of the session that placed it.
type Acknowledged = Vec<(String, u64)>;

/// Opens a session through `url`; `None` if it did not answer 201.
async fn open_session(client: &awc::Client, url: &str, shopper: &str) -> Option<String> {
    match call(client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({ "shopper": shopper }))).await {
        Ok((201, session)) => session["token"].as_str().map(String::from),
        _ => None,
    }
}

/// Checks out one unit at a time through `url` until `stop`, the SKU sells
/// out, or a minute has passed, noting every acknowledgement. Failures (the
/// endpoint died, or has no leader yet) are retried with the same key: an
/// order is counted only once acknowledged.
async fn shop(
    client: awc::Client,
    url: String,
    shopper: String,
    stop: Rc<RefCell<bool>>,
    acked: Rc<RefCell<Acknowledged>>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        if let Some(token) = open_session(&client, &url, &shopper).await {
            break token;
        }
        if *stop.borrow() || Instant::now() > deadline {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    let mut round = 0;
    while !*stop.borrow() && round < 100 && Instant::now() < deadline {
        let headers = [bearer(&token), ("Idempotency-Key", format!("{shopper}-{round}"))];
        let body = json!({"items": [{"sku": SKU, "qty": 1}]});
        match call(&client, "POST", &format!("{url}/v1/checkout"), &headers, Some(body)).await {
            Ok((201, order)) => {
                acked.borrow_mut().push((token.clone(), order["order_id"].as_u64().unwrap()));
                round += 1;
            }
            Ok((409, _)) => return,
            _ => actix_rt::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[actix_rt::test]
async fn a_forced_failover_reports_every_lost_order_oversells_nothing_and_fences_the_old_primary() {
    let mut cluster = Cluster::start(&WITH_REPLICA);
    let client = client();
    cluster.ready(&client).await;
    let replica = cluster.api[5].clone();
    let sale = json!({"sku": SKU, "name": "Failover", "price_minor": 100, "stock": STOCK,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, body) =
        call(&client, "POST", &format!("{}/v1/sales", cluster.api[0]), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201, "{body}");

    // Shoppers check out through every primary endpoint; the whole primary
    // region dies under them.
    let (stop, acked) = (Rc::new(RefCell::new(false)), Rc::new(RefCell::new(Acknowledged::new())));
    let shoppers: Vec<_> = (0..SHOPPERS)
        .map(|i| {
            let shop = shop(client.clone(), cluster.api[i].clone(), format!("s{i}"), stop.clone(), acked.clone());
            actix_rt::spawn(shop)
        })
        .collect();
    let started = Instant::now();
    while acked.borrow().len() < 30 {
        assert!(started.elapsed() < Duration::from_secs(20), "only {} checkouts in 20 s", acked.borrow().len());
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    for id in 1..=4 {
        cluster.kill(id);
    }
    *stop.borrow_mut() = true;
    for shopper in shoppers {
        shopper.await.unwrap();
    }
    let before: Acknowledged = acked.borrow().clone();

    // With no leader to ask, the replica answers from its copy: an order it
    // lacks is a 404 marked as stale, not a 503 or a wait.
    let (token, order) = before.first().expect("an acknowledged checkout");
    let asked = Instant::now();
    let missing = order + 1_000_000;
    let (status, problem, stale_ms) =
        get_marked(&client, &format!("{replica}/v1/orders/{missing}"), &[bearer(token)]).await;
    assert_eq!((status, stale_ms.is_some()), (404, true), "{problem}");
    assert!(asked.elapsed() < Duration::from_secs(5), "the stale 404 took {:?}", asked.elapsed());

    // Promote the DR region.
    let forced = ctl(&replica, &["failover", "--to", "dr", "--force"]);
    let stdout = String::from_utf8_lossy(&forced.stdout);
    eprintln!("{stdout}");
    assert!(forced.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&forced.stderr));
    let (status, drills) = get(&client, &format!("{replica}/v1/admin/drills"), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 200, "{drills}");
    let report =
        drills.as_array().unwrap().iter().rev().find(|d| d["kind"] == "failover").expect("no failover on record");
    assert_eq!(report["state"], "completed", "{report}");
    let cost = &report["failover"];
    assert_eq!(cost["generation"], 1, "{cost}");
    let lost_ids = cost["orders_maybe_lost_from"].as_u64().unwrap()..cost["orders_maybe_lost_to"].as_u64().unwrap();

    // Every acknowledgement the promoted copy lacks is reported.
    let mut lost = 0;
    for (token, order) in &before {
        let (status, _) = get(&client, &format!("{replica}/v1/orders/{order}"), &[bearer(token)]).await;
        if status != 200 {
            assert!(lost_ids.contains(order), "order {order} lost ({status}) but not reported: {cost}");
            lost += 1;
        }
    }
    let unsettled = cost["unsettled"][SKU].as_u64().unwrap_or(0);
    assert!(lost <= unsettled, "{lost} orders lost, only {unsettled} units out of sale: {cost}");

    // The DR region sells on until the SKU is gone: across both regions,
    // never more units than exist.
    let after = Rc::new(RefCell::new(Acknowledged::new()));
    let dr_stop = Rc::new(RefCell::new(false));
    for i in 0..4 {
        shop(client.clone(), cluster.api[4 + i % 2].clone(), format!("dr{i}"), dr_stop.clone(), after.clone()).await;
    }
    let (_, sku) = get(&client, &format!("{replica}/v1/skus/{SKU}"), &[]).await;
    eprintln!(
        "failover: {} acknowledged before, {lost} of them lost and reported, {unsettled} units out of sale, {} sold after",
        before.len(),
        after.borrow().len()
    );
    assert_eq!(sku["available"], 0, "the SKU did not sell out in the DR region: {sku}");
    let sold_in_both = before.len() as u64 + after.borrow().len() as u64;
    assert!(sold_in_both <= STOCK, "{sold_in_both} units acknowledged, {STOCK} exist: {sku}");
    assert_eq!(sku["unsettled"].as_u64(), Some(unsettled), "{sku}");

    // The old primary comes back: its nodes learn of generation 1 and take
    // no write.
    for id in 1..=4 {
        cluster.restart(id);
    }
    let started = Instant::now();
    'fenced: loop {
        let (_, view) = get(&client, &format!("{}/v1/cluster", cluster.api[0]), &[bearer(OPERATOR)]).await;
        let fenced = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|node| node["region"] == "primary")
            .all(|node| node["status"]["groups"][0]["fenced_by"] == 1);
        if fenced {
            break 'fenced;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the old primary was not fenced: {view}");
        // Meanwhile it takes no write.
        for url in &cluster.api[..4] {
            let answer =
                call(&client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({"shopper": "late"}))).await;
            assert!(!matches!(answer, Ok((201, _))), "node at {url} took a write: {answer:?}");
        }
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    for url in &cluster.api[..4] {
        let (status, body) =
            call(&client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({"shopper": "late"}))).await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body["detail"].as_str().unwrap_or_default().contains("fenced"), "{body}");
    }
    // The DR region still takes writes.
    let answer = call(&client, "POST", &format!("{replica}/v1/sessions"), &[], Some(json!({"shopper": "after"}))).await;
    let (_, view) = get(&client, &format!("{replica}/v1/cluster"), &[bearer(OPERATOR)]).await;
    assert!(matches!(answer, Ok((201, _))), "the new primary stopped taking writes: {answer:?} {view}");

    // Failback, step 1: the returned copies are reconciled with the new
    // primary's. Every order acknowledged there and lost here is listed,
    // and the units nobody bought go back on sale.
    let back = ctl(&replica, &["failback", "--from", "primary"]);
    eprintln!("{}", String::from_utf8_lossy(&back.stdout));
    assert!(
        back.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&back.stdout),
        String::from_utf8_lossy(&back.stderr)
    );
    let (_, drills) = get(&client, &format!("{replica}/v1/admin/drills"), &[bearer(OPERATOR)]).await;
    let report =
        drills.as_array().unwrap().iter().rev().find(|d| d["kind"] == "failback").expect("no failback on record");
    let reconciliation = &report["reconciliation"];
    let listed: Vec<u64> =
        reconciliation["orders_to_settle"].as_array().unwrap().iter().map(|o| o["id"].as_u64().unwrap()).collect();
    for (token, order) in &before {
        let (status, _) = get(&client, &format!("{replica}/v1/orders/{order}"), &[bearer(token)]).await;
        assert!(status == 200 || listed.contains(order), "lost order {order} is not listed: {reconciliation}");
    }
    let returned = reconciliation["units_returned"][SKU].as_u64().unwrap_or(0);
    let (_, settled) = get(&client, &format!("{replica}/v1/skus/{SKU}"), &[]).await;
    assert_eq!(settled["unsettled"].as_u64(), Some(unsettled - returned), "{settled} after {reconciliation}");
    assert_eq!(settled["available"].as_u64(), Some(returned), "{settled}");

    // Step 2: the old primary's nodes come back wiped and rejoin as the DR
    // copy; then a planned switchover moves the sale back to them.
    for id in 1..=4 {
        cluster.kill(id);
        cluster.rejoin_wiped(id);
    }
    let rejoined = ctl(&replica, &["failback", "--from", "primary"]);
    let stdout = String::from_utf8_lossy(&rejoined.stdout);
    eprintln!("{stdout}");
    assert!(rejoined.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&rejoined.stderr));
    let home = ctl(&replica, &["switchover", "--to", "primary"]);
    let stdout = String::from_utf8_lossy(&home.stdout);
    assert!(home.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&home.stderr));
    // (Leadership may still be settling in the region: a 503 is retried.)
    let started = Instant::now();
    while open_session(&client, &cluster.api[0], "home-again").await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "the primary region takes no writes after the failback");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, home_sku) = get(&client, &format!("{}/v1/skus/{SKU}", cluster.api[0]), &[]).await;
    assert_eq!(home_sku["total"].as_u64(), Some(STOCK), "{home_sku}");
}
