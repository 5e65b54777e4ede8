//! The route handlers. Each validates its input, turns it into one domain
//! command (or a read), and maps the outcome to a response. None of them
//! decides anything the state machine decides.

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use cluster::{DrillReport, FailoverPreview, LeaderMoved, ProposeError};
use domain::{Command, Line, OrderId, Outcome, Rejection};

use crate::auth::{token_hash, Operator, Shopper};
use crate::dto::*;
use crate::payments;
use crate::problem::ApiError;
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// Parses an optional JSON body: empty means `T::default()`.
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Malformed(format!("invalid JSON body: {e}")))
}

fn sku_path(sku: &str) -> Result<&str> {
    domain::validate_sku(sku)?;
    Ok(sku)
}

fn order_path(id: &str) -> Result<OrderId> {
    id.parse().map_err(|_| ApiError::Malformed(format!("order id must be a non-negative integer, got {id:?}")))
}

fn expect_sku(outcome: Outcome) -> Result<Sku> {
    match outcome {
        Outcome::Sku(view) => Ok(view.into()),
        other => Err(unexpected(other)),
    }
}

fn expect_cart(outcome: Outcome) -> Result<Cart> {
    match outcome {
        Outcome::Cart(cart) => Ok(Cart { items: cart.lines.into_iter().map(Item::from).collect() }),
        other => Err(unexpected(other)),
    }
}

fn expect_order(outcome: Outcome) -> Result<(OrderBody, bool)> {
    match outcome {
        Outcome::Order { order, replayed } => Ok((order.into(), replayed)),
        other => Err(unexpected(other)),
    }
}

/// A rejection becomes its problem document; any other mismatch is a bug
/// between the handler and the state machine, reported as unavailable rather
/// than a panic in a worker.
fn unexpected(outcome: Outcome) -> ApiError {
    match outcome {
        Outcome::Rejected(rejection) => ApiError::Rejected(rejection),
        other => {
            tracing::error!(?other, "state machine answered with an unexpected outcome");
            ApiError::Unavailable(cluster::ProposeError::Unavailable("unexpected outcome".into()))
        }
    }
}

#[utoipa::path(post, path = "/v1/sales", tag = "operator", request_body = CreateSale,
    security(("operator" = [])),
    responses((status = 201, body = Sku), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "the SKU is on sale already, or there are too many sales"),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
/// Put a SKU on sale.
pub async fn create_sale(_: Operator, state: web::Data<AppState>, body: web::Json<CreateSale>) -> Result<HttpResponse> {
    let body = body.into_inner();
    let sale = domain::Sale {
        sku: body.sku,
        name: body.name,
        price_minor: body.price_minor,
        stock: body.stock,
        starts_at_ms: body.starts_at_ms,
        ends_at_ms: body.ends_at_ms,
        limit_per_shopper: body.limit_per_shopper,
    };
    let outcome = state.node.operator(Command::CreateSale(sale)).await?;
    Ok(HttpResponse::Created().json(expect_sku(outcome)?))
}

#[utoipa::path(post, path = "/v1/skus/{sku}/restock", tag = "operator", request_body = Restock,
    params(("sku" = String, Path, description = "The SKU: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"),
        ("Idempotency-Key" = String, Header, description = "1 to 128 visible ASCII characters; a retry with the same key and units adds nothing and returns the SKU")),
    security(("operator" = [])),
    responses((status = 200, body = Sku), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 413, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem)))]
/// Add units to a SKU's stock, once per Idempotency-Key.
pub async fn restock(
    _: Operator,
    state: web::Data<AppState>,
    req: HttpRequest,
    sku: web::Path<String>,
    body: web::Json<Restock>,
) -> Result<HttpResponse> {
    let sku = sku_path(&sku)?.to_string();
    let idempotency_key = idempotency_key(&req)?;
    let outcome = state.node.operator(Command::Restock { sku, units: body.units, idempotency_key }).await?;
    Ok(HttpResponse::Ok().json(expect_sku(outcome)?))
}

/// The request's `Idempotency-Key`, which every write that may be retried
/// after a timeout carries.
fn idempotency_key(req: &HttpRequest) -> Result<String> {
    let key = req
        .headers()
        .get("Idempotency-Key")
        .ok_or_else(|| ApiError::BadHeader("the Idempotency-Key header is required".into()))?
        .to_str()
        .map_err(|_| ApiError::BadHeader("Idempotency-Key must be visible ASCII".into()))?
        .to_string();
    domain::validate_idempotency_key(&key)?;
    Ok(key)
}

/// The header on a read a DR replica served from its own copy: the copy
/// holds every write the primary committed up to at most this many
/// milliseconds ago.
pub const STALE_MS_HEADER: HeaderName = HeaderName::from_static("surge-stale-ms");

/// A shopper's read, answered as 200 with `body` of what it found. A voter
/// reads linearizably. A DR replica reads its own copy, so reads go on when
/// the primary region is far away or gone, and says in `Surge-Stale-Ms` how
/// stale the copy may be; one that has not yet heard from a leader reads
/// through the leader instead.
///
/// A replica's copy may not have the order or SKU yet, one a shopper just
/// made through another endpoint: before it answers 404 it asks the leader.
/// Only if there is no leader to ask (none known, or it cannot be reached)
/// does it say 404 from its copy, marked as stale; a leader that is busy or
/// silent, or a copy that does not catch up in time, gets a 503.
/// Bounded: the forwarded read index and the wait to apply up to it each
/// have their timeout.
async fn shopper_read<T, B: serde::Serialize>(
    node: &cluster::Node,
    read: impl Fn(&domain::GroupState) -> std::result::Result<T, Rejection>,
    body: impl FnOnce(T) -> B,
) -> Result<HttpResponse> {
    let stale_ms = if node.is_replica() { node.group().stale_ms_max() } else { None };
    let Some(stale_ms) = stale_ms else {
        return Ok(read_answer(body(node.read(read).await??), None));
    };
    match node.read_local(&read) {
        Ok(found) => Ok(read_answer(body(found), Some(stale_ms))),
        Err(missing @ (Rejection::UnknownSku { .. } | Rejection::UnknownOrder { .. })) => {
            match node.read(&read).await {
                Ok(current) => Ok(read_answer(body(current?), None)),
                // The leader is busy, or it answered and the copy did not
                // catch up in time: whether it exists is not known.
                Err(unknown @ (ProposeError::Overloaded | ProposeError::Timeout)) => Err(unknown.into()),
                // No leader to ask: the copy's answer is the best there is.
                Err(ProposeError::NotLeader { .. } | ProposeError::Unavailable(_)) => {
                    let mut response = ApiError::from(missing).error_response();
                    let stale_ms = HeaderValue::from(node.group().stale_ms_max().unwrap_or(stale_ms));
                    response.headers_mut().insert(STALE_MS_HEADER, stale_ms);
                    Ok(response)
                }
            }
        }
        Err(rejection) => Err(rejection.into()),
    }
}

/// 200 with `body`, marked with its staleness when a DR replica served it.
fn read_answer(body: impl serde::Serialize, stale_ms: Option<u64>) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    if let Some(stale_ms) = stale_ms {
        response.insert_header((STALE_MS_HEADER, stale_ms));
    }
    response.json(body)
}

#[utoipa::path(get, path = "/v1/skus/{sku}", tag = "shopper",
    params(("sku" = String, Path, description = "The SKU: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")),
    responses((status = 200, body = Sku, headers(("Surge-Stale-Ms" = u64,
        description = "Only from a DR replica, which serves the read from its own copy: the copy holds every write committed up to at most this many milliseconds ago."))),
        (status = 404, body = Problem, headers(("Surge-Stale-Ms" = u64,
        description = "Only from a DR replica that reached no leader: its copy lacks it, and may be this many milliseconds stale."))),
        (status = 422, body = Problem, description = "not a valid SKU"), (status = 503, body = Problem)))]
/// A SKU's sale and current stock: a linearizable read, or on a DR
/// replica a read of its copy marked with how stale it may be.
pub async fn get_sku(state: web::Data<AppState>, sku: web::Path<String>) -> Result<HttpResponse> {
    let sku = sku_path(&sku)?;
    let read = |s: &domain::GroupState| s.sku_view(sku).ok_or_else(|| Rejection::UnknownSku { sku: sku.to_string() });
    shopper_read(&state.node, read, Sku::from).await
}

#[utoipa::path(post, path = "/v1/sessions", tag = "shopper", request_body = CreateSession,
    responses((status = 201, body = SessionCreated), (status = 400, body = Problem), (status = 413, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
/// Start a shopper session; the answer carries its bearer token. A session
/// holding no order pending payment or paid closes after six hours without
/// a cart change, a checkout or an order ending (or sooner, idle longest
/// first, once half a million such sessions are open), and its cancelled
/// and expired orders with it; its token then gets 401, and the shopper
/// opens a new one. A session holding an order stays open.
pub async fn create_session(state: web::Data<AppState>, body: web::Json<CreateSession>) -> Result<HttpResponse> {
    domain::validate_shopper(&body.shopper)?;
    let token = crate::new_token();
    let outcome = state.node.open_session(body.into_inner().shopper, token_hash(&token)).await?;
    match outcome {
        Outcome::SessionOpened { session } => {
            Ok(HttpResponse::Created().json(SessionCreated { session_id: session, token }))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(get, path = "/v1/cart", tag = "shopper", security(("session" = [])),
    responses((status = 200, body = Cart), (status = 401, body = Problem), (status = 503, body = Problem)))]
/// The session's cart.
pub async fn get_cart(shopper: Shopper, state: web::Data<AppState>) -> Result<HttpResponse> {
    let cart = state.node.read(|s| s.cart(shopper.session)).await??;
    Ok(HttpResponse::Ok().json(Cart { items: cart.lines.into_iter().map(Item::from).collect() }))
}

#[utoipa::path(put, path = "/v1/cart/items/{sku}", tag = "shopper", request_body = SetCartItem,
    params(("sku" = String, Path, description = "The SKU: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")),
    security(("session" = [])),
    responses((status = 200, body = Cart), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "the cart is full"),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
/// Set a cart line's quantity.
pub async fn put_cart_item(
    shopper: Shopper,
    state: web::Data<AppState>,
    sku: web::Path<String>,
    body: web::Json<SetCartItem>,
) -> Result<HttpResponse> {
    let sku = sku_path(&sku)?.to_string();
    domain::validate_qty(body.qty)?;
    let command = Command::SetCartItem { session: shopper.session, sku, qty: body.qty };
    let outcome = state.node.shopper(shopper.session, command).await?;
    Ok(HttpResponse::Ok().json(expect_cart(outcome)?))
}

#[utoipa::path(delete, path = "/v1/cart/items/{sku}", tag = "shopper",
    params(("sku" = String, Path, description = "The SKU: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")),
    security(("session" = [])),
    responses((status = 200, body = Cart), (status = 401, body = Problem),
        (status = 422, body = Problem, description = "not a valid SKU"), (status = 503, body = Problem)))]
/// Drop a cart line.
pub async fn delete_cart_item(
    shopper: Shopper,
    state: web::Data<AppState>,
    sku: web::Path<String>,
) -> Result<HttpResponse> {
    let sku = sku_path(&sku)?.to_string();
    let command = Command::RemoveCartItem { session: shopper.session, sku };
    let outcome = state.node.shopper(shopper.session, command).await?;
    Ok(HttpResponse::Ok().json(expect_cart(outcome)?))
}

#[utoipa::path(post, path = "/v1/checkout", tag = "shopper",
    request_body(content = Option<Checkout>, description = "optional; absent means the cart"),
    params(("Idempotency-Key" = String, Header, description = "1 to 128 visible ASCII characters; a retry with the same key and body returns the same order")),
    security(("session" = [])),
    responses((status = 201, body = OrderBody, description = "reserved"), (status = 200, body = OrderBody, description = "a retry: the order the key placed"),
        (status = 400, body = Problem, description = "malformed JSON, or no Idempotency-Key"), (status = 401, body = Problem),
        (status = 404, body = Problem, description = "unknown SKU"),
        (status = 409, body = Problem, description = "sold out, limit exceeded, sale not open or ended"),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
/// Reserve the cart (or the given items) as one order, all lines or none.
pub async fn checkout(
    shopper: Shopper,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let key = idempotency_key(&req)?;
    let body: Checkout = optional_json(&body)?;
    let items: Option<Vec<Line>> = body.items.map(|items| items.into_iter().map(Line::from).collect());
    if let Some(items) = &items {
        domain::validate_lines(items)?;
    }
    let command = Command::Checkout { session: shopper.session, idempotency_key: key, items, hold_ms: state.hold_ms };
    let outcome = state.node.shopper(shopper.session, command).await;
    crate::metrics::count_checkout(&outcome);
    let (order, replayed) = expect_order(outcome?)?;
    Ok(if replayed {
        HttpResponse::Ok().insert_header(("Idempotent-Replayed", "true")).json(order)
    } else {
        HttpResponse::Created().json(order)
    })
}

#[utoipa::path(post, path = "/v1/orders/{id}/pay", tag = "shopper", request_body = Pay,
    params(("id" = u64, Path, description = "The order id, as the checkout answered it")),
    security(("session" = [])),
    responses((status = 200, body = OrderBody),
        (status = 400, body = Problem, description = "malformed order id or body, or an unknown payment_token"),
        (status = 401, body = Problem), (status = 402, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "the order is paid, cancelled or expired"),
        (status = 413, body = Problem), (status = 503, body = Problem)))]
/// Pay an order with the built-in test payment provider.
pub async fn pay(
    shopper: Shopper,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<Pay>,
) -> Result<HttpResponse> {
    let order = order_path(&id)?;
    // Fail fast on an order the shopper cannot pay, before charging them.
    // Local first; a replica that has not yet applied an order placed
    // through another node confirms with a linearizable read before it
    // answers 404.
    let lookup = |s: &domain::GroupState| s.order(shopper.session, order);
    let current = match state.node.read_local(lookup) {
        Err(Rejection::UnknownOrder { .. }) => state.node.read(lookup).await??,
        local => local?,
    };
    if current.status == domain::OrderStatus::PendingPayment {
        payments::authorize(&body.payment_token, current.amount_minor)?;
    }
    let outcome = state.node.shopper(shopper.session, Command::Pay { session: shopper.session, order }).await?;
    let (order, _) = expect_order(outcome)?;
    metrics::counter!("surge_orders_total", "status" => "paid").increment(1);
    Ok(HttpResponse::Ok().json(order))
}

#[utoipa::path(post, path = "/v1/orders/{id}/cancel", tag = "shopper",
    params(("id" = u64, Path, description = "The order id, as the checkout answered it")),
    security(("session" = [])),
    responses((status = 200, body = OrderBody), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "the order is paid, cancelled or expired"),
        (status = 503, body = Problem)))]
/// Cancel an unpaid order; its units return to stock.
pub async fn cancel(shopper: Shopper, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let order = order_path(&id)?;
    let outcome = state.node.shopper(shopper.session, Command::Cancel { session: shopper.session, order }).await?;
    let (order, _) = expect_order(outcome)?;
    metrics::counter!("surge_orders_total", "status" => "cancelled").increment(1);
    Ok(HttpResponse::Ok().json(order))
}

#[utoipa::path(get, path = "/v1/orders/{id}", tag = "shopper",
    params(("id" = u64, Path, description = "The order id, as the checkout answered it")),
    security(("session" = [])),
    responses((status = 200, body = OrderBody, headers(("Surge-Stale-Ms" = u64,
        description = "Only from a DR replica, which serves the read from its own copy: the copy holds every write committed up to at most this many milliseconds ago."))),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem, headers(("Surge-Stale-Ms" = u64,
        description = "Only from a DR replica that reached no leader: its copy lacks it, and may be this many milliseconds stale."))),
        (status = 503, body = Problem)))]
/// One of the session's orders: a linearizable read, or on a DR replica a
/// read of its copy marked with how stale it may be. An order the copy
/// lacks yet is looked up through the leader, so a shopper reads their
/// new order at any endpoint.
pub async fn get_order(shopper: Shopper, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let order = order_path(&id)?;
    shopper_read(&state.node, |s| s.order(shopper.session, order), OrderBody::from).await
}

#[utoipa::path(get, path = "/v1/cluster", tag = "operator", security(("operator" = [])),
    responses((status = 200, body = ClusterStatus), (status = 401, body = Problem)))]
/// The cluster as this node sees it: every node's region and zone, and each
/// node's own report of its groups (role, leader, term, commit and applied
/// index, follower lag). A node that does not answer within a second is
/// listed with the error.
pub async fn cluster_status(_: Operator, state: web::Data<AppState>) -> Result<HttpResponse> {
    let node = &state.node;
    let asks = node.topology().nodes.iter().map(|spec| async move {
        let answer = actix_web::rt::time::timeout(STATUS_TIMEOUT, node.node_status(spec.id)).await;
        let (status, error) = match answer {
            Ok(Ok(status)) => (Some(status), None),
            Ok(Err(error)) => (None, Some(error.to_string())),
            Err(_) => (None, Some(format!("no answer within {STATUS_TIMEOUT:?}"))),
        };
        NodeView {
            id: spec.id,
            region: spec.region.clone(),
            zone: spec.zone.clone(),
            api: spec.api.clone(),
            peer: spec.peer.clone(),
            status,
            error,
        }
    });
    let nodes = futures::future::join_all(asks).await;
    let (sku_actors, session_actors) = node.live_actors();
    Ok(HttpResponse::Ok().json(ClusterStatus {
        node_id: node.id(),
        primary_region: node.primary_region(),
        epoch: node.read_local(domain::GroupState::epoch),
        frozen: node.read_local(domain::GroupState::is_frozen),
        nodes,
        sku_actors,
        session_actors,
        orders: node.read_local(domain::GroupState::order_counts).into(),
    }))
}

/// How long `GET /v1/cluster` waits for each node's answer.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[utoipa::path(post, path = "/v1/admin/leader", tag = "operator", request_body = MoveLeader,
    security(("operator" = [])),
    responses((status = 200, body = LeaderMoved), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
/// Moves the group's leadership to a node (leadership transfer), e.g. before
/// maintenance on the leader's machine. Writes are refused (503, retried)
/// for about one election timeout while it happens.
pub async fn move_leader(_: Operator, state: web::Data<AppState>, body: web::Json<MoveLeader>) -> Result<HttpResponse> {
    let moved = state.node.transfer_leadership(body.node).await?;
    Ok(HttpResponse::Ok().json(moved))
}

#[utoipa::path(post, path = "/v1/admin/drills/zone-loss", tag = "operator", request_body = ZoneLossDrill,
    security(("operator" = [])),
    responses((status = 202, body = DrillReport, description = "started; poll its Location"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 409, body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem)))]
/// Starts a zone-loss drill coordinated by this node: every node of the zone
/// is cut off from the others for `isolate_for_ms`, while a probe shopper
/// checks out through this node; then the isolated nodes catch up and every
/// acknowledged probe order is read back. Answers at once; the report fills
/// in as the drill runs.
pub async fn start_zone_loss_drill(
    _: Operator,
    state: web::Data<AppState>,
    body: web::Json<ZoneLossDrill>,
) -> Result<HttpResponse> {
    let isolate_for = std::time::Duration::from_millis(body.isolate_for_ms);
    let report = state.node.start_zone_loss_drill(&body.zone, isolate_for, "operator").await?;
    Ok(HttpResponse::Accepted()
        .insert_header((actix_web::http::header::LOCATION, format!("/v1/admin/drills/{}", report.id)))
        .json(report))
}

#[utoipa::path(post, path = "/v1/admin/switchover", tag = "operator", request_body = Switchover,
    security(("operator" = [])),
    responses((status = 202, body = DrillReport, description = "started; poll its Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "not the leader, the region takes writes already, or it could not survive losing a zone"),
        (status = 413, body = Problem), (status = 422, body = Problem)))]
/// Starts a planned switchover of writes to another region. Ask the
/// group's leader. Writes are refused (503, retried) until the target
/// region has every entry; then its nodes and this leader become the
/// voters, every other node follows as a learner, and the region takes
/// writes in a new epoch. Answers at once; the report fills in as it runs.
pub async fn start_switchover(
    _: Operator,
    state: web::Data<AppState>,
    body: web::Json<Switchover>,
) -> Result<HttpResponse> {
    let report = state.node.start_switchover(&body.to, "operator").await?;
    Ok(HttpResponse::Accepted()
        .insert_header((actix_web::http::header::LOCATION, format!("/v1/admin/drills/{}", report.id)))
        .json(report))
}

#[utoipa::path(get, path = "/v1/admin/failover/preview", tag = "operator", security(("operator" = [])),
    responses((status = 200, body = FailoverPreview), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "this node is in the region that takes writes")))]
/// What an unplanned failover to this node's region would cost if the
/// region that takes writes were lost now, from this node's copy: units
/// taken out of sale, order ids that may be lost, payments in doubt.
/// Changes nothing. Ask every node of the region; the one with the highest
/// `applied_index` is the one a failover promotes.
pub async fn failover_preview(_: Operator, state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.node.failover_preview()?))
}

#[utoipa::path(post, path = "/v1/admin/failover", tag = "operator", request_body = Failover,
    security(("operator" = [])),
    responses((status = 202, body = DrillReport, description = "started; poll its Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "the writing region answers, a node of this region does not, \
            another node's copy is more advanced, or this node is fenced"),
        (status = 413, body = Problem),
        (status = 422, body = Problem, description = "`force` is not true, or no such region")))]
/// Forces an unplanned failover to this node's region: the region that
/// takes writes is lost. Ask the region's node with the most advanced copy
/// (the preview says which). Refused while any node of the writing region
/// answers. This node's copy is promoted in a new epoch and generation: the
/// old primary's nodes are fenced and take no writes if they return; units
/// the old primary may have sold go out of sale; the report names the order
/// ids that may be lost. Answers at once; the report fills in as it runs.
pub async fn start_failover(
    _: Operator,
    state: web::Data<AppState>,
    body: web::Json<Failover>,
) -> Result<HttpResponse> {
    if !body.force {
        let why = "a failover may lose acknowledged orders: say \"force\": true, after reading \
                   GET /v1/admin/failover/preview";
        return Err(ApiError::Rejected(domain::Rejection::Invalid(why.into())));
    }
    let report = state.node.start_failover(&body.to, "operator").await?;
    Ok(HttpResponse::Accepted()
        .insert_header((actix_web::http::header::LOCATION, format!("/v1/admin/drills/{}", report.id)))
        .json(report))
}

#[utoipa::path(post, path = "/v1/admin/failback", tag = "operator", request_body = Failback,
    security(("operator" = [])),
    responses((status = 202, body = DrillReport, description = "started; poll its Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "not the leader, no failover happened, a node of the region \
            does not answer, or nothing is due"),
        (status = 413, body = Problem),
        (status = 422, body = Problem, description = "no such region, or a lost copy named outside it")))]
/// Fails back after a forced failover, from the region it lost. Ask the
/// group's leader. Once per failover, every node of that region must
/// answer: the most advanced one's copy is compared with this region's,
/// the orders they disagree on are reported for an operator to settle,
/// and the units nobody bought go back on sale. Nodes whose disks are gone
/// for good may be named in `copies_lost`: the reconciliation then goes
/// without them and returns no unit to sale. Then the region's nodes
/// whose data was wiped (started with `join = true`) join as learners: the
/// DR copy again. Answers at once; the report fills in as it runs.
pub async fn start_failback(
    _: Operator,
    state: web::Data<AppState>,
    body: web::Json<Failback>,
) -> Result<HttpResponse> {
    let report = state.node.start_failback(&body.from, &body.copies_lost, "operator").await?;
    Ok(HttpResponse::Accepted()
        .insert_header((actix_web::http::header::LOCATION, format!("/v1/admin/drills/{}", report.id)))
        .json(report))
}

#[utoipa::path(post, path = "/v1/admin/replace-node", tag = "operator", request_body = ReplaceNode,
    security(("operator" = [])),
    responses((status = 202, body = DrillReport, description = "started; poll its Location"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 409, body = Problem, description = "not the leader, the node leads, it answers with \
            its log, or as a voter it would leave no DR copy to confirm escrow"),
        (status = 413, body = Problem),
        (status = 422, body = Problem, description = "no such node")))]
/// Replaces a member whose disk is gone for good. Ask the group's leader.
/// It removes the node from the group (unless it is no member any more),
/// adds it back as a learner with nothing acknowledged, waits (up to 5
/// minutes) until the node, started wiped with `join = true`, has the
/// whole log, then makes it a voter again if it was one or `voter` says
/// so. Answers at once; the report fills in as it runs.
pub async fn start_replace(
    _: Operator,
    state: web::Data<AppState>,
    body: web::Json<ReplaceNode>,
) -> Result<HttpResponse> {
    let report = state.node.start_replace(body.node, body.voter, "operator").await?;
    Ok(HttpResponse::Accepted()
        .insert_header((actix_web::http::header::LOCATION, format!("/v1/admin/drills/{}", report.id)))
        .json(report))
}

#[utoipa::path(get, path = "/v1/admin/drills", tag = "operator", security(("operator" = [])),
    responses((status = 200, body = Vec<DrillReport>), (status = 401, body = Problem)))]
/// Every drill on record in the cluster (the latest 100), oldest first: any
/// node lists them, and the node running a drill shows its progress.
pub async fn list_drills(_: Operator, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.node.drill_reports())
}

#[utoipa::path(get, path = "/v1/admin/drills/{id}", tag = "operator",
    params(("id" = u64, Path, description = "The drill id, as its start answered it")),
    security(("operator" = [])),
    responses((status = 200, body = DrillReport), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem)))]
/// One drill's report, while it runs and after.
pub async fn get_drill(_: Operator, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    let id: u64 = id.parse().map_err(|_| ApiError::Malformed(format!("drill id {id:?} is not a number")))?;
    let report = state.node.drill_report(id).ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(report))
}

/// Liveness: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: this node's group has a leader (this node or one it forwards
/// to), so it can take writes.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse> {
    let leader = state.node.group().raft().metrics().borrow().current_leader;
    match leader {
        Some(leader) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "leader": leader }))),
        None => Err(ApiError::Unavailable(cluster::ProposeError::NotLeader { leader: None })),
    }
}

/// Unmatched routes.
pub async fn not_found() -> Result<HttpResponse> {
    Err(ApiError::NotFound)
}
