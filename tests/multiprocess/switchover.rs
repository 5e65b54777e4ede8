//! Planned switchover under load, and failback, on six real processes: the
//! five voters and the DR replica. Shoppers keep checking out through the
//! primary region's endpoints the whole time; `surge ctl switchover` moves
//! writes to the DR region and back, after refusing to while the DR
//! replica is down. Nothing acknowledged is lost, nothing
//! is oversold, and the voters and leaders end up where each switchover
//! said.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::dr_replication::WITH_REPLICA;
use crate::support::*;

const SKU: &str = "switch-hot";
const STOCK: u64 = 100_000;

/// Checkouts of one unit each, one after another through the primary
/// region's endpoints, each retried with its key until it is answered; the
/// order ids acknowledged go into `acked`.
async fn shopper(cluster_api: Vec<String>, n: usize, acked: Rc<RefCell<Vec<(String, u64)>>>, stop: Rc<RefCell<bool>>) {
    let client = client();
    let url = |round: usize| cluster_api[(n + round) % 4].clone();
    let token = loop {
        let body = Some(json!({"shopper": format!("s{n}")}));
        if let Ok((201, session)) = call(&client, "POST", &format!("{}/v1/sessions", url(0)), &[], body).await {
            break session["token"].as_str().unwrap().to_string();
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    for round in 0.. {
        if *stop.borrow() {
            return;
        }
        let key = format!("s{n}-{round}");
        let started = Instant::now();
        loop {
            let headers = [bearer(&token), ("Idempotency-Key", key.clone())];
            let body = json!({"items": [{"sku": SKU, "qty": 1}]});
            match call(&client, "POST", &format!("{}/v1/checkout", url(round)), &headers, Some(body)).await {
                Ok((201, order)) => {
                    acked.borrow_mut().push((token.clone(), order["order_id"].as_u64().unwrap()));
                    break;
                }
                Ok((status, body)) if status != 503 => panic!("checkout {key}: {status} {body}"),
                _ => {}
            }
            assert!(started.elapsed() < Duration::from_secs(30), "checkout {key} not answered within 30 s");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `GET /v1/cluster` through `endpoint`: the region that takes writes, the
/// epoch, and each node's role.
async fn view(client: &awc::Client, endpoint: &str) -> (String, u64, Vec<(u64, String)>) {
    let (status, cluster) = get(client, &format!("{endpoint}/v1/cluster"), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 200, "{cluster}");
    let roles = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| (node["id"].as_u64().unwrap(), node["status"]["groups"][0]["role"].as_str().unwrap_or("?").into()))
        .collect();
    (cluster["primary_region"].as_str().unwrap().to_string(), cluster["epoch"].as_u64().unwrap(), roles)
}

/// Waits (bounded) until the node leading the group is in `region`.
async fn wait_for_leader_in(client: &awc::Client, endpoint: &str, leaders: &[u64]) -> u64 {
    let started = Instant::now();
    loop {
        let (_, _, roles) = view(client, endpoint).await;
        if let Some((id, _)) = roles.iter().find(|(id, role)| role == "leader" && leaders.contains(id)) {
            return *id;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no leader among {leaders:?}: {roles:?}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn switchover_under_load_and_failback_lose_nothing() {
    let mut cluster = Cluster::start(&WITH_REPLICA);
    let client = client();
    cluster.ready(&client).await;
    let sale = json!({"sku": SKU, "name": "Switch", "price_minor": 100, "stock": STOCK,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, body) =
        call(&client, "POST", &format!("{}/v1/sales", cluster.api[0]), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201, "{body}");

    let acked = Rc::new(RefCell::new(Vec::new()));
    let stop = Rc::new(RefCell::new(false));
    let crowd: Vec<_> =
        (0..4).map(|n| actix_rt::spawn(shopper(cluster.api[..4].to_vec(), n, acked.clone(), stop.clone()))).collect();
    let wait_for_more = |more: usize| {
        let acked = acked.clone();
        async move {
            let target = acked.borrow().len() + more;
            let started = Instant::now();
            while acked.borrow().len() < target {
                assert!(started.elapsed() < Duration::from_secs(30), "checkout stalled at {}", acked.borrow().len());
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for_more(40).await;

    // With the DR replica gone, a switchover to its region is refused
    // before any write is: it could never hand writes to the replica.
    cluster.kill(6);
    let refused = ctl(&cluster.api[2], &["switchover", "--to", "dr", "--json"]);
    let printed = String::from_utf8_lossy(&refused.stdout);
    println!("{printed}");
    assert!(!refused.status.success(), "a switchover to a region with a node gone went ahead: {printed}");
    let report: Value = serde_json::from_str(&printed[printed.find("\n{").expect("a JSON report")..]).unwrap();
    let failure = report["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("nothing was changed") && failure.contains("[6]"), "{printed}");
    let froze =
        report["timeline"].as_array().unwrap().iter().any(|e| e["what"].as_str().unwrap().contains("writes refused"));
    assert!(!froze, "writes were frozen for a switchover that could not happen: {printed}");
    let (region, epoch, _) = view(&client, &cluster.api[0]).await;
    assert_eq!((region.as_str(), epoch), ("primary", 0));
    cluster.restart(6);
    wait_for_more(40).await;

    // Switchover to the DR region, asked through a node that need not lead.
    let moved = ctl(&cluster.api[2], &["switchover", "--to", "dr", "--json"]);
    let printed = String::from_utf8_lossy(&moved.stdout);
    println!("{printed}");
    assert!(moved.status.success(), "switchover failed: {}{printed}", String::from_utf8_lossy(&moved.stderr));
    let dr_leader = wait_for_leader_in(&client, &cluster.api[5], &[5, 6]).await;
    let (region, epoch, roles) = view(&client, &cluster.api[5]).await;
    assert_eq!((region.as_str(), epoch), ("dr", 1), "{roles:?}");
    let learners = roles.iter().filter(|(_, role)| role == "learner").count();
    assert_eq!(learners, 3, "the old primary's nodes but the coordinator follow as learners: {roles:?}");
    wait_for_more(40).await;

    // Failback, asked through the DR region.
    let back = ctl(&cluster.api[5], &["switchover", "--to", "primary"]);
    let printed = String::from_utf8_lossy(&back.stdout);
    println!("{printed}");
    assert!(back.status.success(), "failback failed: {}{printed}", String::from_utf8_lossy(&back.stderr));
    wait_for_leader_in(&client, &cluster.api[0], &[1, 2, 3, 4]).await;
    let (region, epoch, roles) = view(&client, &cluster.api[0]).await;
    assert_eq!((region.as_str(), epoch), ("primary", 2), "{roles:?}");
    let replica = if dr_leader == 5 { 6 } else { 5 };
    let replica_role = roles.iter().find(|(id, _)| *id == replica).map(|(_, role)| role.as_str());
    assert_eq!(replica_role, Some("learner"), "{roles:?}");
    wait_for_more(40).await;

    *stop.borrow_mut() = true;
    for shopper in crowd {
        shopper.await.unwrap();
    }
    // Nothing acknowledged is lost: every order is there, read linearizably
    // through a node of each region.
    let acked = acked.borrow().clone();
    println!("auditing {} acknowledged orders", acked.len());
    for (token, order) in &acked {
        for url in [&cluster.api[0], &cluster.api[dr_leader as usize - 1]] {
            let (status, body) = get(&client, &format!("{url}/v1/orders/{order}"), &[bearer(token)]).await;
            assert_eq!(status, 200, "acknowledged order {order} missing on {url}: {body}");
        }
    }
    // Conservation; the crowd's orders are all held (no payment window
    // passes), the probe orders of both switchovers may have expired.
    let (_, sku): (u16, Value) = get(&client, &format!("{}/v1/skus/{SKU}", cluster.api[0]), &[]).await;
    let [available, held, sold, total] = ["available", "held", "sold", "total"].map(|k| sku[k].as_u64().unwrap());
    assert_eq!((available + held + sold, total), (STOCK, STOCK), "{sku}");
    assert_eq!(held, acked.len() as u64, "{sku}");
    // The three switchovers are on record, on any node: the refused one
    // and the two that moved writes.
    let (_, drills) = get(&client, &format!("{}/v1/admin/drills", cluster.api[3]), &[bearer(OPERATOR)]).await;
    let states: Vec<&str> = drills
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"] == "switchover")
        .map(|d| d["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "completed", "completed"], "{drills}");
}
