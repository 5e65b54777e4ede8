//! A voter's disk lost for good: `surge ctl replace-node` takes it out of
//! the group and back in as a new member, the node starts wiped, and it
//! ends a voter with the whole log. Refused while the node holds its copy.
//! A replacement whose leader is lost half way is finished by asking again.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const SKU: &str = "replace-1";

/// `GET /v1/cluster` through `endpoint`: each node's view of its group.
async fn groups(client: &awc::Client, endpoint: &str) -> Vec<(u64, Value)> {
    let (status, cluster) = get(client, &format!("{endpoint}/v1/cluster"), &[bearer(OPERATOR)]).await;
    assert_eq!(status, 200, "{cluster}");
    let nodes = cluster["nodes"].as_array().unwrap();
    nodes.iter().map(|node| (node["id"].as_u64().unwrap(), node["status"]["groups"][0].clone())).collect()
}

/// Waits (bounded) until `check` holds of the leader's view of its group.
async fn wait_for_leader_view(client: &awc::Client, endpoint: &str, what: &str, check: impl Fn(&Value) -> bool) -> u64 {
    let started = Instant::now();
    loop {
        let views = groups(client, endpoint).await;
        if let Some((id, _)) = views.iter().find(|(_, group)| group["role"] == "leader" && check(group)) {
            return *id;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: {views:?}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks out one unit as a new shopper through `endpoint`; the order id.
async fn buy_one(client: &awc::Client, endpoint: &str, shopper: &str) -> u64 {
    let (status, session) =
        call(client, "POST", &format!("{endpoint}/v1/sessions"), &[], Some(json!({"shopper": shopper}))).await.unwrap();
    assert_eq!(status, 201, "{session}");
    let headers = [bearer(session["token"].as_str().unwrap()), ("Idempotency-Key", format!("{shopper}-1"))];
    let items = json!({"items": [{"sku": SKU, "qty": 1}]});
    let started = Instant::now();
    loop {
        match call(client, "POST", &format!("{endpoint}/v1/checkout"), &headers, Some(items.clone())).await {
            Ok((201, order)) => return order["order_id"].as_u64().unwrap(),
            Ok((503, _)) | Err(_) if started.elapsed() < Duration::from_secs(10) => {
                actix_rt::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("checkout through {endpoint}: {other:?}"),
        }
    }
}

/// Starts `surge ctl replace-node --node <target>` through `endpoint`,
/// its output piped; it runs until the replacement ends.
fn replace_node(endpoint: &str, target: u64) -> std::process::Child {
    ctl_command(endpoint, &["replace-node", "--node", &target.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the leader has added `target` back as a learner.
async fn wait_added_back(client: &awc::Client, endpoint: &str, target: u64) {
    let learner = target.to_string();
    wait_for_leader_view(client, endpoint, "the node was not added back as a learner", |group| {
        group["replica_lag"].get(&learner).is_some()
    })
    .await;
}

/// Waits (bounded) until `target` is a voter with the whole log, as the
/// leader sees it.
async fn wait_voter_with_whole_log(client: &awc::Client, endpoint: &str, target: u64) {
    let voter = target.to_string();
    wait_for_leader_view(client, endpoint, "the node is not a voter with the whole log", |group| {
        group["follower_lag"].get(&voter).is_some_and(|lag| lag == 0) && group["replica_lag"].get(&voter).is_none()
    })
    .await;
}

#[actix_rt::test]
async fn a_voter_whose_disk_is_lost_rejoins_wiped_as_a_voter() {
    let mut cluster = Cluster::start(&FIVE_VOTERS);
    let client = client();
    cluster.ready(&client).await;
    let endpoint = cluster.api[0].clone();
    let sale = json!({"sku": SKU, "name": "Replace", "price_minor": 100, "stock": 100,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, body) =
        call(&client, "POST", &format!("{endpoint}/v1/sales"), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201, "{body}");
    buy_one(&client, &endpoint, "before").await;

    let leader = wait_for_leader_view(&client, &endpoint, "no leader", |_| true).await;
    // A voter of zone b that does not lead, and an endpoint that stays up.
    let target: u64 = if leader == 3 { 4 } else { 3 };
    let endpoint = cluster.api[if leader == 1 { 1 } else { 0 }].clone();

    // Refused while the node still holds its copy: its disk is not lost.
    let refused = ctl(&endpoint, &["replace-node", "--node", &target.to_string()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a node holding its copy was replaced");
    assert!(stderr.contains("answers with its log"), "{stderr}");

    // The disk dies: the node is gone, and the sale goes on without it.
    cluster.kill(target as usize);
    let replacing = replace_node(&endpoint, target);
    wait_added_back(&client, &endpoint, target).await;
    let during = buy_one(&client, &endpoint, "during").await;

    // A new, empty disk: the node starts wiped and catches up.
    cluster.rejoin_wiped(target as usize);
    let output = replacing.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("node {target} is a voter again")), "{stdout}");

    // A voter again, with every entry: it has applied what the leader has.
    wait_voter_with_whole_log(&client, &endpoint, target).await;
    let views = groups(&client, &cluster.api[target as usize - 1]).await;
    let own = &views.iter().find(|(id, _)| *id == target).unwrap().1;
    assert_eq!(own["role"], "follower", "{own}");
    let (status, sku) = get(&client, &format!("{}/v1/skus/{SKU}", cluster.api[target as usize - 1]), &[]).await;
    assert_eq!((status, sku["held"].as_u64()), (200, Some(2)), "{sku}");
    assert!(during > 0);
    println!("{stdout}");
}

/// The leader replacing a voter is lost half way, after it took the node
/// out and added it back as a learner. Asked again of the new leader, with
/// no word of the role, the replacement finishes what the first one
/// recorded: the node ends a voter, not a learner that would leave the
/// group a voter short.
#[actix_rt::test]
async fn a_replacement_cut_short_is_finished_by_asking_again() {
    let mut cluster = Cluster::start(&FIVE_VOTERS);
    let client = client();
    cluster.ready(&client).await;
    let leader = wait_for_leader_view(&client, &cluster.api[0], "no leader", |_| true).await;
    let target: u64 = if leader == 3 { 4 } else { 3 };
    // An endpoint that stays up: neither the leader nor the target.
    let endpoint = cluster.api[(1..=5).find(|id| ![leader, target].contains(id)).unwrap() as usize - 1].clone();

    cluster.kill(target as usize);
    let first = replace_node(&endpoint, target);
    wait_added_back(&client, &endpoint, target).await;
    // The coordinator dies; its command sees the drill no more.
    cluster.kill(leader as usize);
    let cut_short = first.wait_with_output().unwrap();
    assert!(!cut_short.status.success(), "{}", String::from_utf8_lossy(&cut_short.stdout));
    let new_leader = wait_for_leader_view(&client, &endpoint, "no new leader", |_| true).await;
    assert_ne!(new_leader, leader);

    let again = replace_node(&endpoint, target);
    cluster.rejoin_wiped(target as usize);
    let output = again.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("node {target} is a voter again")), "{stdout}");
    wait_voter_with_whole_log(&client, &endpoint, target).await;
}
