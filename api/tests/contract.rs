//! The public API contract, against a real node (Raft on redb in a temporary
//! directory) served in-process.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::test::{self, TestRequest};
use actix_web::{web, App};
use api::AppState;
use cluster::{Node, NodeConfig, SystemClock};
use serde_json::{json, Value};
use utoipa::OpenApi;

const OPERATOR: &str = "test-operator-token";

/// A node and the HTTP app in front of it.
struct Harness<S> {
    app: S,
    _data: tempfile::TempDir,
}

async fn harness(
    hold_ms: u64,
) -> Harness<impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>> {
    let data = tempfile::tempdir().unwrap();
    let config = NodeConfig { expiry_tick_ms: 20, ..NodeConfig::default() };
    let node = Node::start(&config, data.path(), Arc::new(SystemClock)).await.unwrap();
    let state =
        web::Data::new(AppState { node, operator_token: OPERATOR.into(), hold_ms, metrics: api::metrics::install() });
    let app = test::init_service(App::new().app_data(state).configure(api::configure)).await;
    Harness { app, _data: data }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}
use std::time::{SystemTime, UNIX_EPOCH};

/// Sends a request and returns status, headers of interest, and the JSON body.
/// Checks that an error is a problem document, and that openapi.json
/// documents the status for the operation, so every status a contract test
/// sees is one the document promises.
async fn send<S>(app: &S, req: TestRequest) -> (StatusCode, Value, actix_web::http::header::HeaderMap)
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let request = req.to_request();
    let (method, path) = (request.method().clone(), request.path().to_string());
    let response = test::call_service(app, request).await;
    let status = response.status();
    if let Some(operation) = documented_operation(&method, &path) {
        assert!(
            operation["responses"][status.as_str()].is_object(),
            "{method} {path} answered {status}, which openapi.json does not document for it"
        );
    }
    let headers = response.headers().clone();
    let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = test::read_body(response).await;
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        assert_eq!(content_type, "application/problem+json", "error without a problem document: {status} {json}");
        assert_eq!(json["status"], status.as_u16(), "problem status differs from HTTP status");
    }
    (status, json, headers)
}

/// The OpenAPI document as JSON, built once.
fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(api::openapi::ApiDoc::openapi()).unwrap())
}

/// The documented operation that serves `method` on `path`, if any. The
/// path picks the template as the router does (a literal segment before a
/// `{name}`: `/v1/admin/drills/zone-loss` is not a drill id); a method the
/// template lacks has no operation.
fn documented_operation(method: &Method, path: &str) -> Option<&'static Value> {
    let segments: Vec<&str> = path.split('/').collect();
    let fits = |template: &str| {
        let parts: Vec<&str> = template.split('/').collect();
        parts.len() == segments.len() && parts.iter().zip(&segments).all(|(part, s)| part.starts_with('{') || part == s)
    };
    let paths = openapi()["paths"].as_object().unwrap();
    let (_, item) = paths.iter().filter(|(template, _)| fits(template)).min_by_key(|(t, _)| t.matches('{').count())?;
    item.get(method.as_str().to_lowercase())
}

/// The operations of an OpenAPI path item, by lower-case method.
fn operations(item: &Value) -> impl Iterator<Item = (&String, &Value)> {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    item.as_object().unwrap().iter().filter(|(key, _)| METHODS.contains(&key.as_str()))
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

async fn create_sale<S>(app: &S, sku: &str, stock: u64, limit: u32) -> Value
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let body = json!({"sku": sku, "name": "Hot item", "price_minor": 1999, "stock": stock,
        "starts_at_ms": now_ms() - 1_000, "ends_at_ms": now_ms() + 3_600_000, "limit_per_shopper": limit});
    let (status, sku, _) =
        send(app, TestRequest::post().uri("/v1/sales").insert_header(bearer(OPERATOR)).set_json(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{sku}");
    sku
}

async fn session<S>(app: &S, shopper: &str) -> String
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let (status, body, _) =
        send(app, TestRequest::post().uri("/v1/sessions").set_json(json!({"shopper": shopper}))).await;
    assert_eq!(status, StatusCode::CREATED);
    body["token"].as_str().unwrap().to_string()
}

fn checkout(token: &str, key: &str, items: Value) -> TestRequest {
    TestRequest::post()
        .uri("/v1/checkout")
        .insert_header(bearer(token))
        .insert_header(("Idempotency-Key", key.to_string()))
        .set_json(json!({ "items": items }))
}

fn restock(sku: &str, key: &str, units: u64) -> TestRequest {
    TestRequest::post()
        .uri(&format!("/v1/skus/{sku}/restock"))
        .insert_header(bearer(OPERATOR))
        .insert_header(("Idempotency-Key", key.to_string()))
        .set_json(json!({ "units": units }))
}

async fn stock<S>(app: &S, sku: &str) -> Value
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let (status, body, _) = send(app, TestRequest::get().uri(&format!("/v1/skus/{sku}"))).await;
    assert_eq!(status, StatusCode::OK);
    body
}

#[actix_rt::test]
async fn a_shopper_buys_through_cart_checkout_and_payment() {
    let h = harness(60_000).await;
    create_sale(&h.app, "tv-55", 10, 2).await;
    let token = session(&h.app, "ann").await;

    let put = TestRequest::put().uri("/v1/cart/items/tv-55").insert_header(bearer(&token)).set_json(json!({"qty": 2}));
    let (status, cart, _) = send(&h.app, put).await;
    assert_eq!((status, cart), (StatusCode::OK, json!({"items": [{"sku": "tv-55", "qty": 2}]})));

    let from_cart =
        TestRequest::post().uri("/v1/checkout").insert_header(bearer(&token)).insert_header(("Idempotency-Key", "k1"));
    let (status, order, _) = send(&h.app, from_cart).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "pending_payment");
    assert_eq!(order["amount_minor"], 2 * 1999);
    let id = order["order_id"].as_u64().unwrap();
    let (_, cart, _) = send(&h.app, TestRequest::get().uri("/v1/cart").insert_header(bearer(&token))).await;
    assert_eq!(cart, json!({"items": []}), "checkout of the cart empties it");
    let s = stock(&h.app, "tv-55").await;
    assert_eq!((s["available"].as_u64(), s["held"].as_u64(), s["sold"].as_u64()), (Some(8), Some(2), Some(0)));

    // A declined card leaves the order pending; an approved one pays it.
    let pay = |tok: &str| {
        TestRequest::post()
            .uri(&format!("/v1/orders/{id}/pay"))
            .insert_header(bearer(&token))
            .set_json(json!({"payment_token": tok}))
    };
    let (status, problem, _) = send(&h.app, pay("tok_decline")).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("/problems/payment-declined")));
    let (status, paid, _) = send(&h.app, pay("tok_approve")).await;
    assert_eq!((status, paid["status"].as_str()), (StatusCode::OK, Some("paid")));
    let (status, again, _) =
        send(&h.app, TestRequest::get().uri(&format!("/v1/orders/{id}")).insert_header(bearer(&token))).await;
    assert_eq!((status, again["status"].as_str()), (StatusCode::OK, Some("paid")));
    let s = stock(&h.app, "tv-55").await;
    assert_eq!((s["available"].as_u64(), s["held"].as_u64(), s["sold"].as_u64()), (Some(8), Some(0), Some(2)));

    // Cancelling a paid order is refused and changes nothing.
    let cancel = TestRequest::post().uri(&format!("/v1/orders/{id}/cancel")).insert_header(bearer(&token));
    let (status, problem, _) = send(&h.app, cancel).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/order-final")));
}

#[actix_rt::test]
async fn an_idempotency_key_places_at_most_one_order() {
    let h = harness(60_000).await;
    create_sale(&h.app, "phone", 10, 0).await;
    let token = session(&h.app, "bob").await;
    let items = json!([{"sku": "phone", "qty": 1}]);

    let (status, first, _) = send(&h.app, checkout(&token, "key-1", items.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, retry, headers) = send(&h.app, checkout(&token, "key-1", items.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retry["order_id"], first["order_id"]);
    assert_eq!(headers.get("Idempotent-Replayed").unwrap(), "true");

    let (status, problem, _) = send(&h.app, checkout(&token, "key-1", json!([{"sku": "phone", "qty": 2}]))).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/idempotency-conflict"))
    );
    assert_eq!(stock(&h.app, "phone").await["held"], 1, "only the first checkout holds stock");
}

/// An operator whose restock timed out sends it again with the same key:
/// the units go on sale once.
#[actix_rt::test]
async fn an_idempotency_key_restocks_at_most_once() {
    let h = harness(60_000).await;
    create_sale(&h.app, "phone", 10, 0).await;

    for _ in 0..2 {
        let (status, sku, _) = send(&h.app, restock("phone", "restock-1", 5)).await;
        assert_eq!((status, &sku["total"]), (StatusCode::OK, &json!(15)), "{sku}");
    }
    let (status, problem, _) = send(&h.app, restock("phone", "restock-1", 6)).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("/problems/idempotency-conflict"))
    );
    let (status, sku, _) = send(&h.app, restock("phone", "restock-2", 5)).await;
    assert_eq!((status, &sku["total"]), (StatusCode::OK, &json!(20)), "{sku}");
}

#[actix_rt::test]
async fn sold_out_and_limits_are_answered_without_overselling() {
    let h = harness(60_000).await;
    create_sale(&h.app, "gpu", 3, 2).await;
    let ann = session(&h.app, "ann").await;
    let bob = session(&h.app, "bob").await;

    let (status, _, _) = send(&h.app, checkout(&ann, "a1", json!([{"sku": "gpu", "qty": 2}]))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, problem, _) = send(&h.app, checkout(&ann, "a2", json!([{"sku": "gpu", "qty": 1}]))).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/limit-exceeded")));
    let (status, problem, _) = send(&h.app, checkout(&bob, "b1", json!([{"sku": "gpu", "qty": 2}]))).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/sold-out")));
    let (status, _, _) = send(&h.app, checkout(&bob, "b2", json!([{"sku": "gpu", "qty": 1}]))).await;
    assert_eq!(status, StatusCode::CREATED);
    let s = stock(&h.app, "gpu").await;
    assert_eq!((s["available"].as_u64(), s["held"].as_u64(), s["total"].as_u64()), (Some(0), Some(3), Some(3)));
}

#[actix_rt::test]
async fn a_shopper_never_sees_another_shoppers_order() {
    let h = harness(60_000).await;
    create_sale(&h.app, "bag", 5, 0).await;
    let ann = session(&h.app, "ann").await;
    let eve = session(&h.app, "eve").await;
    let (_, order, _) = send(&h.app, checkout(&ann, "a", json!([{"sku": "bag", "qty": 1}]))).await;
    let id = order["order_id"].as_u64().unwrap();
    for req in [
        TestRequest::get().uri(&format!("/v1/orders/{id}")),
        TestRequest::post().uri(&format!("/v1/orders/{id}/cancel")),
        TestRequest::post().uri(&format!("/v1/orders/{id}/pay")).set_json(json!({"payment_token": "tok_approve"})),
    ] {
        let (status, problem, _) = send(&h.app, req.insert_header(bearer(&eve))).await;
        assert_eq!((status, problem["type"].as_str()), (StatusCode::NOT_FOUND, Some("/problems/unknown-order")));
    }
    assert_eq!(stock(&h.app, "bag").await["held"], 1);
}

#[actix_rt::test]
async fn bad_input_gets_a_problem_document_and_changes_nothing() {
    let h = harness(60_000).await;
    create_sale(&h.app, "hot", 5, 2).await;
    let token = session(&h.app, "ann").await;
    let before = stock(&h.app, "hot").await;
    let huge_body = format!("{{\"items\": [{{\"sku\": \"{}\", \"qty\": 1}}]}}", "x".repeat(20_000));
    let sale = |extra: Value| {
        let mut body =
            json!({"sku": "new", "name": "n", "price_minor": 1, "stock": 1, "starts_at_ms": 0, "ends_at_ms": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        TestRequest::post().uri("/v1/sales").insert_header(bearer(OPERATOR)).set_json(body)
    };

    let cases: Vec<(&str, TestRequest, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            TestRequest::post()
                .uri("/v1/checkout")
                .insert_header(bearer(&token))
                .insert_header(("Idempotency-Key", "m"))
                .insert_header(("content-type", "application/json"))
                .set_payload("{\"items\": ["),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "unknown SKU",
            checkout(&token, "u", json!([{"sku": "nope", "qty": 1}])),
            StatusCode::NOT_FOUND,
            "unknown-sku",
        ),
        (
            "negative quantity",
            checkout(&token, "n", json!([{"sku": "hot", "qty": -1}])),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "zero quantity",
            checkout(&token, "z", json!([{"sku": "hot", "qty": 0}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "huge quantity",
            checkout(&token, "h", json!([{"sku": "hot", "qty": 4_294_967_296u64}])),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "quantity over the line limit",
            checkout(&token, "o", json!([{"sku": "hot", "qty": 10_001}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "a SKU twice",
            checkout(&token, "t", json!([{"sku": "hot", "qty": 1}, {"sku": "hot", "qty": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "unknown field",
            checkout(&token, "f", json!([{"sku": "hot", "qty": 1, "price": 0}])),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "empty cart",
            TestRequest::post()
                .uri("/v1/checkout")
                .insert_header(bearer(&token))
                .insert_header(("Idempotency-Key", "e")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty-order",
        ),
        (
            "missing idempotency key",
            TestRequest::post()
                .uri("/v1/checkout")
                .insert_header(bearer(&token))
                .set_json(json!({"items": [{"sku": "hot", "qty": 1}]})),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "empty idempotency key",
            checkout(&token, "", json!([{"sku": "hot", "qty": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "idempotency key too long",
            checkout(&token, &"k".repeat(129), json!([{"sku": "hot", "qty": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "no token",
            TestRequest::post()
                .uri("/v1/checkout")
                .insert_header(("Idempotency-Key", "x"))
                .set_json(json!({"items": [{"sku": "hot", "qty": 1}]})),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "wrong token",
            checkout("not-a-session", "w", json!([{"sku": "hot", "qty": 1}])),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "oversized body",
            TestRequest::post()
                .uri("/v1/checkout")
                .insert_header(bearer(&token))
                .insert_header(("Idempotency-Key", "big"))
                .insert_header(("content-type", "application/json"))
                .set_payload(huge_body),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
        ),
        (
            "bad SKU in path",
            TestRequest::put()
                .uri("/v1/cart/items/bad%20sku")
                .insert_header(bearer(&token))
                .set_json(json!({"qty": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "bad order id",
            TestRequest::get().uri("/v1/orders/abc").insert_header(bearer(&token)),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        (
            "unknown payment token",
            TestRequest::post()
                .uri("/v1/orders/0/pay")
                .insert_header(bearer(&token))
                .set_json(json!({"payment_token": "tok_free"})),
            StatusCode::NOT_FOUND,
            "unknown-order",
        ),
        (
            "sale by a shopper",
            TestRequest::post().uri("/v1/sales").insert_header(bearer(&token)).set_json(json!({})),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        ("sale without a name", sale(json!({"name": ""})), StatusCode::UNPROCESSABLE_ENTITY, "invalid-request"),
        (
            "sale that ends before it starts",
            sale(json!({"starts_at_ms": 5, "ends_at_ms": 5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        (
            "sale with too much stock",
            sale(json!({"stock": 2_000_000_000u64})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
        ("sale of an existing SKU", sale(json!({"sku": "hot"})), StatusCode::CONFLICT, "sale-exists"),
        ("restock of nothing", restock("hot", "r-0", 0), StatusCode::UNPROCESSABLE_ENTITY, "invalid-request"),
        (
            "restock without an Idempotency-Key",
            TestRequest::post()
                .uri("/v1/skus/hot/restock")
                .insert_header(bearer(OPERATOR))
                .set_json(json!({"units": 1})),
            StatusCode::BAD_REQUEST,
            "bad-request",
        ),
        ("unknown route", TestRequest::get().uri("/v1/nothing-here"), StatusCode::NOT_FOUND, "not-found"),
        (
            "shopper id too long",
            TestRequest::post().uri("/v1/sessions").set_json(json!({"shopper": "s".repeat(200)})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
        ),
    ];
    for (name, req, expected_status, expected_type) in cases {
        let (status, problem, _) = send(&h.app, req).await;
        assert_eq!(status, expected_status, "{name}: {problem}");
        assert_eq!(problem["type"], format!("/problems/{expected_type}"), "{name}: {problem}");
        assert_eq!(stock(&h.app, "hot").await, before, "{name} changed the stock");
    }
    let (_, cart, _) = send(&h.app, TestRequest::get().uri("/v1/cart").insert_header(bearer(&token))).await;
    assert_eq!(cart, json!({"items": []}));
}

#[actix_rt::test]
async fn unpaid_holds_expire_and_return_to_stock() {
    let h = harness(300).await;
    create_sale(&h.app, "shoe", 4, 0).await;
    let token = session(&h.app, "ann").await;
    let (_, order, _) = send(&h.app, checkout(&token, "k", json!([{"sku": "shoe", "qty": 3}]))).await;
    let id = order["order_id"].as_u64().unwrap();
    assert_eq!(stock(&h.app, "shoe").await["held"], 3);

    // The expiry ticker proposes an entry once the deadline passes; nobody
    // else writes, so this checks that expiry needs no shopper traffic.
    let mut waited = Duration::ZERO;
    while stock(&h.app, "shoe").await["held"] != 0 {
        assert!(waited < Duration::from_secs(5), "holds did not expire");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let s = stock(&h.app, "shoe").await;
    assert_eq!((s["available"].as_u64(), s["sold"].as_u64()), (Some(4), Some(0)));
    let pay = TestRequest::post()
        .uri(&format!("/v1/orders/{id}/pay"))
        .insert_header(bearer(&token))
        .set_json(json!({"payment_token": "tok_approve"}));
    let (status, problem, _) = send(&h.app, pay).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/order-final")));
}

#[actix_rt::test]
async fn operations_endpoints_answer() {
    let h = harness(60_000).await;
    create_sale(&h.app, "cam", 5, 0).await;
    let token = session(&h.app, "ann").await;
    send(&h.app, checkout(&token, "k", json!([{"sku": "cam", "qty": 1}]))).await;

    let (status, _, _) = send(&h.app, TestRequest::get().uri("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&h.app, TestRequest::get().uri("/readyz")).await;
    assert_eq!(status, StatusCode::OK);

    let response = test::call_service(&h.app, TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(test::read_body(response).await.to_vec()).unwrap();
    for metric in [
        "surge_http_requests_total",
        "surge_http_request_seconds_bucket",
        "surge_checkouts_total{outcome=\"reserved\"}",
        "surge_batch_size_bucket",
        "surge_raft_commit_seconds_bucket",
        "surge_stock_units{sku=\"cam\",kind=\"held\"} 1",
        "surge_orders{status=\"pending_payment\"} 1",
        "surge_sessions{kind=\"holding_order\"} 1",
    ] {
        assert!(text.contains(metric), "/metrics lacks {metric}:\n{text}");
    }

    let (status, doc, _) = send(&h.app, TestRequest::get().uri("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/sales",
        "/v1/skus/{sku}",
        "/v1/sessions",
        "/v1/cart",
        "/v1/cart/items/{sku}",
        "/v1/checkout",
        "/v1/orders/{id}",
        "/v1/orders/{id}/pay",
        "/v1/orders/{id}/cancel",
        "/v1/cluster",
        "/v1/admin/drills",
        "/v1/admin/drills/zone-loss",
        "/v1/admin/drills/{id}",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi.json lacks {path}");
    }

    let (status, cluster, _) =
        send(&h.app, TestRequest::get().uri("/v1/cluster").insert_header(bearer(OPERATOR))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cluster["nodes"][0]["zone"], "a");
    assert_eq!(cluster["nodes"][0]["status"]["groups"][0]["role"], "leader");
    assert_eq!(
        cluster["nodes"][0]["status"]["groups"][0]["commit_index"],
        cluster["nodes"][0]["status"]["groups"][0]["last_log_index"]
    );
    assert_eq!(cluster["orders"]["pending_payment"], 1);

    // Drills: a single node has no zone it could lose, and bad requests
    // start nothing.
    let drill = |body: serde_json::Value| {
        TestRequest::post().uri("/v1/admin/drills/zone-loss").insert_header(bearer(OPERATOR)).set_json(body)
    };
    let (status, problem, _) = send(&h.app, drill(json!({"zone": "a", "isolate_for_ms": 5000}))).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/drill-loses-quorum")));
    let (status, _, _) = send(&h.app, drill(json!({"zone": "nowhere", "isolate_for_ms": 5000}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = send(&h.app, drill(json!({"zone": "a"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A failback: nothing to fail back from, and a lost copy must be one
    // of the returning region's nodes.
    let failback = |body: serde_json::Value| {
        TestRequest::post().uri("/v1/admin/failback").insert_header(bearer(OPERATOR)).set_json(body)
    };
    let (status, problem, _) = send(&h.app, failback(json!({"from": "primary"}))).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/already-primary")));
    let (status, problem, _) = send(&h.app, failback(json!({"from": "primary", "copies_lost": [9]}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem["detail"].as_str().unwrap().contains("node 9 is not of region \"primary\""), "{problem}");
    let (status, _, _) = send(&h.app, failback(json!({"from": "primary", "copies_lost": "all"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Replacing a node: not this one, which leads; not one the topology
    // lacks; and a clear 400 for a body that names no node.
    let replace = |body: serde_json::Value| {
        TestRequest::post().uri("/v1/admin/replace-node").insert_header(bearer(OPERATOR)).set_json(body)
    };
    let (status, problem, _) = send(&h.app, replace(json!({"node": 1}))).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/replaces-leader")));
    let (status, problem, _) = send(&h.app, replace(json!({"node": 9, "voter": true}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem["detail"].as_str().unwrap().contains("no node 9"), "{problem}");
    let (status, _, _) = send(&h.app, replace(json!({"voter": true}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = send(&h.app, replace(json!({"node": 1})).insert_header(bearer(&token))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, drills, _) =
        send(&h.app, TestRequest::get().uri("/v1/admin/drills").insert_header(bearer(OPERATOR))).await;
    assert_eq!((status, drills), (StatusCode::OK, json!([])));
    let (status, _, _) =
        send(&h.app, TestRequest::get().uri("/v1/admin/drills/17").insert_header(bearer(OPERATOR))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(&h.app, TestRequest::get().uri("/v1/admin/drills").insert_header(bearer(&token))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(&h.app, TestRequest::get().uri("/v1/cluster").insert_header(bearer(&token))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[actix_rt::test]
async fn openapi_declares_every_path_parameter() {
    let h = harness(60_000).await;
    let (_, doc, _) = send(&h.app, TestRequest::get().uri("/openapi.json")).await;
    for (template, item) in doc["paths"].as_object().unwrap() {
        let names = template.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'));
        for (method, operation) in operations(item) {
            for name in names.clone() {
                let declared = operation["parameters"].as_array().into_iter().flatten().any(|parameter| {
                    parameter["name"] == name && parameter["in"] == "path" && parameter["required"] == true
                });
                assert!(declared, "{method} {template} does not declare the path parameter {name}");
            }
        }
    }
}

#[actix_rt::test]
async fn openapi_lets_checkout_go_without_a_body() {
    let h = harness(60_000).await;
    let (_, doc, _) = send(&h.app, TestRequest::get().uri("/openapi.json")).await;
    let body = &doc["paths"]["/v1/checkout"]["post"]["requestBody"];
    assert_ne!(body["required"], true, "the handler checks out the cart when the body is absent: {body}");
    // Absent, not `null`: the handler refuses a JSON null.
    assert_eq!(body["content"]["application/json"]["schema"], json!({"$ref": "#/components/schemas/Checkout"}));
}

#[actix_rt::test]
async fn openapi_documents_the_errors_each_operation_returns() {
    let h = harness(60_000).await;
    let (_, doc, _) = send(&h.app, TestRequest::get().uri("/openapi.json")).await;
    let problem = json!({"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}});
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations(item) {
            let responses = operation["responses"].as_object().unwrap();
            let documents = |status: &str| responses.contains_key(status);
            for (status, response) in responses.iter().filter(|(status, _)| status.as_str() >= "400") {
                assert_eq!(response["content"], problem, "{method} {template} {status} is not a problem document");
                if status == "503" {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{method} {template} 503 lacks Retry-After"
                    );
                }
            }
            // What the extractors answer before the handler runs.
            if operation["security"].is_array() {
                assert!(documents("401"), "{method} {template} takes a bearer token but documents no 401");
            }
            if operation["requestBody"].is_object() {
                assert!(documents("400") && documents("413"), "{method} {template} takes a body but lacks 400 or 413");
            }
        }
    }
    // Writes go through Raft, which answers 503 when overloaded or
    // leaderless; so does the session lookup of a shopper's token.
    for (method, template) in [
        ("post", "/v1/sales"),
        ("post", "/v1/skus/{sku}/restock"),
        ("post", "/v1/sessions"),
        ("get", "/v1/cart"),
        ("put", "/v1/cart/items/{sku}"),
        ("delete", "/v1/cart/items/{sku}"),
        ("post", "/v1/checkout"),
        ("post", "/v1/orders/{id}/pay"),
        ("post", "/v1/orders/{id}/cancel"),
        ("get", "/v1/orders/{id}"),
        ("post", "/v1/admin/leader"),
    ] {
        let responses = &doc["paths"][template][method]["responses"];
        assert!(responses["503"].is_object(), "{method} {template} documents no 503");
    }
}

#[actix_rt::test]
async fn a_wrong_method_on_a_known_path_is_405_with_allow() {
    let h = harness(60_000).await;
    let cases = [
        (TestRequest::get().uri("/v1/checkout"), "POST"),
        (TestRequest::delete().uri("/v1/sales"), "POST"),
        (TestRequest::post().uri("/v1/skus/tv-55"), "GET, HEAD"),
        (TestRequest::post().uri("/v1/cart/items/tv-55"), "PUT, DELETE"),
        (TestRequest::delete().uri("/v1/orders/1"), "GET, HEAD"),
        (TestRequest::get().uri("/v1/admin/drills/zone-loss"), "POST"),
        (TestRequest::post().uri("/healthz"), "GET, HEAD"),
    ];
    for (req, allow) in cases {
        let (status, problem, headers) = send(&h.app, req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{problem}");
        assert_eq!(problem["type"], "/problems/method-not-allowed", "{problem}");
        let allowed: Vec<&str> = headers.get("Allow").unwrap().to_str().unwrap().split(',').map(str::trim).collect();
        assert_eq!(allowed, allow.split(", ").collect::<Vec<_>>(), "{problem}");
    }
    for req in [TestRequest::get().uri("/v1/nothing-here"), TestRequest::post().uri("/v1/skus")] {
        let (status, problem, _) = send(&h.app, req).await;
        assert_eq!((status, problem["type"].as_str()), (StatusCode::NOT_FOUND, Some("/problems/not-found")));
    }
}

/// A load balancer's HEAD probe, or a client checking a SKU exists, gets
/// GET's status and headers.
#[actix_rt::test]
async fn head_answers_as_get_does() {
    let h = harness(60_000).await;
    create_sale(&h.app, "tv-55", 10, 2).await;
    for (uri, want) in
        [("/healthz", StatusCode::OK), ("/v1/skus/tv-55", StatusCode::OK), ("/v1/skus/nope", StatusCode::NOT_FOUND)]
    {
        let response =
            test::call_service(&h.app, TestRequest::default().method(Method::HEAD).uri(uri).to_request()).await;
        assert_eq!(response.status(), want, "HEAD {uri}");
        let get = test::call_service(&h.app, TestRequest::get().uri(uri).to_request()).await;
        assert_eq!(response.headers().get("content-type"), get.headers().get("content-type"), "HEAD {uri}");
    }
    let token = session(&h.app, "ann").await;
    for (authorization, want) in
        [(format!("Bearer {token}"), StatusCode::OK), ("Bearer nope".into(), StatusCode::UNAUTHORIZED)]
    {
        let head =
            TestRequest::default().method(Method::HEAD).uri("/v1/cart").insert_header(("Authorization", authorization));
        assert_eq!(test::call_service(&h.app, head.to_request()).await.status(), want);
    }
}

#[actix_rt::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let h = harness(60_000).await;
    let token = session(&h.app, "ann").await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let authorization = ("Authorization", format!("{scheme} {token}"));
        let (status, _, _) = send(&h.app, TestRequest::get().uri("/v1/cart").insert_header(authorization)).await;
        assert_eq!(status, StatusCode::OK, "{scheme}");
        let authorization = ("Authorization", format!("{scheme} {OPERATOR}"));
        let (status, _, _) =
            send(&h.app, TestRequest::get().uri("/v1/admin/drills").insert_header(authorization)).await;
        assert_eq!(status, StatusCode::OK, "{scheme}");
    }
    for authorization in [format!("Basic {token}"), format!("Bearer{token}"), "bearer ".to_string()] {
        let req = TestRequest::get().uri("/v1/cart").insert_header(("Authorization", authorization.clone()));
        let (status, _, _) = send(&h.app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{authorization}");
    }
}
