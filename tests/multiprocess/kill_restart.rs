//! SIGKILL the node in the middle of a sale, restart it on the same data
//! directory, and check that every acknowledged order survived and nothing
//! was oversold.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const SKU: &str = "flash-1";
const STOCK: u64 = 150;
const SHOPPERS: usize = 48;

/// An order the API acknowledged, and the strongest status it acknowledged.
#[derive(Clone, Debug)]
struct Acked {
    token: String,
    key: String,
    order_id: u64,
    paid: bool,
}

/// One shopper: checks out one or two units with a fresh key, pays most of
/// the time, and goes again until the node stops answering.
async fn shopper(url: String, n: usize, acked: Rc<RefCell<Vec<Acked>>>, stop: Rc<RefCell<bool>>) {
    let client = client();
    let Ok((201, session)) =
        call(&client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({"shopper": format!("s{n}")}))).await
    else {
        return;
    };
    let token = session["token"].as_str().unwrap().to_string();
    for round in 0.. {
        if *stop.borrow() {
            return;
        }
        let key = format!("s{n}-r{round}");
        let headers = [bearer(&token), ("Idempotency-Key", key.clone())];
        let items = json!({"items": [{"sku": SKU, "qty": 1 + (n + round) % 2}]});
        match call(&client, "POST", &format!("{url}/v1/checkout"), &headers, Some(items)).await {
            Ok((201, order)) => {
                let order_id = order["order_id"].as_u64().unwrap();
                let index = acked.borrow().len();
                acked.borrow_mut().push(Acked { token: token.clone(), key, order_id, paid: false });
                if round % 3 != 2 {
                    let pay = call(
                        &client,
                        "POST",
                        &format!("{url}/v1/orders/{order_id}/pay"),
                        &[bearer(&token)],
                        Some(json!({"payment_token": "tok_approve"})),
                    )
                    .await;
                    if let Ok((200, paid)) = pay {
                        assert_eq!(paid["status"], "paid");
                        acked.borrow_mut()[index].paid = true;
                    }
                }
            }
            Ok((409, _)) => return, // sold out or limit: this shopper is done
            Ok((status, body)) if status >= 500 => panic!("server error {status}: {body}"),
            Ok(_) | Err(_) => return, // the node is gone
        }
    }
}

#[actix_rt::test]
async fn acknowledged_orders_survive_sigkill_and_nothing_is_oversold() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 120_000);
    let node = Surge::start(&config);
    let client = client();
    let sale = json!({"sku": SKU, "name": "Flash", "price_minor": 100, "stock": STOCK,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": 0});
    let (status, _) =
        call(&client, "POST", &format!("{}/v1/sales", node.url), &[bearer(OPERATOR)], Some(sale)).await.unwrap();
    assert_eq!(status, 201);

    // The crowd runs on this thread; the kill comes while it is mid-flight.
    let acked = Rc::new(RefCell::new(Vec::new()));
    let stop = Rc::new(RefCell::new(false));
    let crowd: Vec<_> =
        (0..SHOPPERS).map(|n| actix_rt::spawn(shopper(node.url.clone(), n, acked.clone(), stop.clone()))).collect();
    let started = Instant::now();
    while acked.borrow().len() < 60 && started.elapsed() < Duration::from_secs(30) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    let config = node.kill();
    *stop.borrow_mut() = true;
    for shopper in crowd {
        shopper.await.unwrap();
    }
    let acked = acked.borrow().clone();
    assert!(acked.len() >= 60, "the crowd got only {} orders before the kill", acked.len());

    let node = Surge::start(&config);
    let url = &node.url;
    for order in &acked {
        let reply =
            call(&client, "GET", &format!("{url}/v1/orders/{}", order.order_id), &[bearer(&order.token)], None).await;
        let (status, body) = reply.unwrap();
        assert_eq!(status, 200, "acknowledged order {} lost after SIGKILL", order.order_id);
        if order.paid {
            assert_eq!(body["status"], "paid", "order {} was acknowledged as paid", order.order_id);
        }
        // At most once, across the crash: the same key still names the same order.
        let headers = [bearer(&order.token), ("Idempotency-Key", order.key.clone())];
        let qty = body["items"][0]["qty"].as_u64().unwrap();
        let retry = call(
            &client,
            "POST",
            &format!("{url}/v1/checkout"),
            &headers,
            Some(json!({"items": [{"sku": SKU, "qty": qty}]})),
        )
        .await;
        let (status, again) = retry.unwrap();
        assert_eq!((status, again["order_id"].as_u64()), (200, Some(order.order_id)));
    }

    let (_, stock) = call(&client, "GET", &format!("{url}/v1/skus/{SKU}"), &[], None).await.unwrap();
    let [available, held, sold, total] = ["available", "held", "sold", "total"].map(|k| stock[k].as_u64().unwrap());
    assert_eq!(total, STOCK);
    assert_eq!(available + held + sold, total, "stock not conserved: {stock}");
    let acked_units: u64 = acked.len() as u64; // at least one unit each
    assert!(
        held + sold >= acked_units,
        "fewer units held or sold ({}) than orders acknowledged ({acked_units})",
        held + sold
    );
    let paid_acked = acked.iter().filter(|o| o.paid).count() as u64;
    assert!(sold >= paid_acked, "{sold} sold but {paid_acked} paid orders were acknowledged");

    // And the node still sells after the restart.
    let (status, session) =
        call(&client, "POST", &format!("{url}/v1/sessions"), &[], Some(json!({"shopper": "after"}))).await.unwrap();
    assert_eq!(status, 201);
    let token = session["token"].as_str().unwrap();
    let headers = [bearer(token), ("Idempotency-Key", "after-1".to_string())];
    let (status, body) = call(
        &client,
        "POST",
        &format!("{url}/v1/checkout"),
        &headers,
        Some(json!({"items": [{"sku": SKU, "qty": 1}]})),
    )
    .await
    .unwrap();
    assert!(status == 201 || (status == 409 && available == 0), "checkout after restart: {status} {body}");
}
