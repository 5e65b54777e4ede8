//! Five voters and a DR replica, real processes on loopback. The replica
//! follows the log asynchronously: checkout never waits for it, and while
//! it is dead sells on from the escrow it confirmed (at least two blocks of
//! 32, more than the 20 checkouts made meanwhile); after a SIGKILL and a
//! restart it resumes where it stopped and ends with exactly the primary's
//! stock and orders; the reads it serves from its copy say how stale they
//! may be.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const SKU: &str = "dr-hot";
const STOCK: u64 = 100;

/// The five voters of [`FIVE_VOTERS`] and node 6, the DR replica.
pub const WITH_REPLICA: [(&str, &str, &str); 6] =
    [FIVE_VOTERS[0], FIVE_VOTERS[1], FIVE_VOTERS[2], FIVE_VOTERS[3], FIVE_VOTERS[4], ("dr", "d", "replica")];

/// One checkout of one unit through a primary endpoint, retried with the
/// same key past 503s and silence (bounded): the order id it placed.
async fn checkout(client: &awc::Client, cluster: &Cluster, token: &str, round: usize) -> u64 {
    let started = Instant::now();
    let key = format!("dr-{round}");
    loop {
        let url = &cluster.api[round % 4];
        let headers = [bearer(token), ("Idempotency-Key", key.clone())];
        let body = json!({"items": [{"sku": SKU, "qty": 1}]});
        match call(client, "POST", &format!("{url}/v1/checkout"), &headers, Some(body)).await {
            Ok((201, order)) => return order["order_id"].as_u64().unwrap(),
            Ok((status, body)) if status != 503 => panic!("checkout {key}: {status} {body}"),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(10), "checkout {key} not answered within 10 s");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn the_dr_replica_follows_off_the_commit_path_and_resumes_after_a_kill() {
    let mut cluster = Cluster::start(&WITH_REPLICA);
    let client = client();
    cluster.ready(&client).await;
    let replica = cluster.api[5].clone();

    // Writes sent to the replica go to the primary's leader.
    let sale = json!({"sku": SKU, "name": "DR", "price_minor": 100, "stock": STOCK,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, body) =
        call(&client, "POST", &format!("{replica}/v1/sales"), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, session) =
        call(&client, "POST", &format!("{}/v1/sessions", cluster.api[2]), &[], Some(json!({"shopper": "dr"})))
            .await
            .unwrap();
    assert_eq!(status, 201, "{session}");
    let token = session["token"].as_str().unwrap().to_string();

    let mut orders = Vec::new();
    for round in 0..10 {
        orders.push(checkout(&client, &cluster, &token, round).await);
    }
    // The DR region dies: checkout goes on as before.
    cluster.kill(6);
    for round in 10..30 {
        orders.push(checkout(&client, &cluster, &token, round).await);
    }
    cluster.restart(6);
    ready(&client, &replica, Duration::from_secs(30)).await;
    for round in 30..40 {
        orders.push(checkout(&client, &cluster, &token, round).await);
    }

    // The replica catches up to exactly the primary's stock, and says how
    // stale its copy may be. (The primary's escrow tops up in the
    // background, so the primary is read afresh each time.)
    let started = Instant::now();
    loop {
        let (_, primary_sku) = get(&client, &format!("{}/v1/skus/{SKU}", cluster.api[0]), &[]).await;
        assert_eq!(primary_sku["held"].as_u64(), Some(40), "{primary_sku}");
        // Until the restarted replica has caught up with what a leader told
        // it was committed, it reads through the leader, unmarked.
        let (status, copy, stale_ms) = get_marked(&client, &format!("{replica}/v1/skus/{SKU}"), &[]).await;
        assert_eq!(status, 200, "{copy}");
        if copy == primary_sku && stale_ms.is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the DR copy stayed at {copy} (stale by at most {stale_ms:?} ms), not {primary_sku}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    // Every acknowledged order is in the copy, as the primary has it.
    for order in &orders {
        let (_, want) = get(&client, &format!("{}/v1/orders/{order}", cluster.api[3]), &[bearer(&token)]).await;
        let (status, copy, _) = get_marked(&client, &format!("{replica}/v1/orders/{order}"), &[bearer(&token)]).await;
        assert_eq!((status, &copy), (200, &want), "order {order} in the DR copy");
    }
    // The leader reports the replica caught up.
    let (status, cluster_view) = get(&client, &format!("{}/v1/cluster", cluster.api[0]), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 200, "{cluster_view}");
    let lags: Vec<&Value> = cluster_view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|node| node["status"]["groups"][0]["replica_lag"].get("6"))
        .collect();
    assert_eq!(lags.len(), 1, "exactly the leader reports the replica's lag: {cluster_view}");
    assert_eq!(lags[0]["entries"], 0, "{cluster_view}");

    // Were the primary region lost now, a failover to the caught-up copy
    // would take exactly the SKU's escrow out of sale, name no order as
    // lost (the next id onwards only), and hold every pending order's
    // payment in doubt. A node of the primary region has nothing to fail
    // over from; carrying a failover out is refused while it answers.
    let preview = ctl(&cluster.api[0], &["failover", "--to", "dr", "--json"]);
    assert!(preview.status.success(), "{}", String::from_utf8_lossy(&preview.stderr));
    let preview: Value = serde_json::from_slice(&preview.stdout).unwrap();
    let (_, sku) = get(&client, &format!("{}/v1/skus/{SKU}", cluster.api[0]), &[]).await;
    assert_eq!(preview["unsettled"][SKU], sku["escrowed"], "{preview} vs {sku}");
    assert!(sku["escrowed"].as_u64().unwrap() > 0, "{sku}");
    let next_order = orders.iter().max().unwrap() + 1;
    assert!(preview["orders_maybe_lost_from"].as_u64().unwrap() >= next_order, "{preview}");
    let in_doubt = preview["payments_in_doubt"].as_array().unwrap();
    assert!(orders.iter().all(|order| in_doubt.contains(&json!(order))), "{preview}");
    let (status, refused) =
        get(&client, &format!("{}/v1/admin/failover/preview", cluster.api[1]), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 409, "{refused}");
    let forced = ctl(&cluster.api[5], &["failover", "--to", "dr", "--force"]);
    assert!(!forced.status.success());
    assert!(String::from_utf8_lossy(&forced.stderr).contains("is not lost"), "{forced:?}");
    // The replica is the only copy outside the primary region: made a
    // voter, it would leave none to confirm escrow, and sales would stop.
    let refused = ctl(&cluster.api[1], &["replace-node", "--node", "6", "--voter"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the last DR copy was made a voter");
    assert!(stderr.contains("confirm escrow"), "{stderr}");

    // A shopper reads the order they just placed through the primary at the
    // replica: a copy that lacks it yet asks the leader, it does not say 404.
    for round in 40..45 {
        let order = checkout(&client, &cluster, &token, round).await;
        let (status, copy, _) = get_marked(&client, &format!("{replica}/v1/orders/{order}"), &[bearer(&token)]).await;
        assert_eq!(status, 200, "new order {order} at the DR replica: {copy}");
    }
}
