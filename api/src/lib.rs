//! Surge's public HTTP API: JSON over HTTP under `/v1`, an OpenAPI document
//! at `/openapi.json`, RFC 9457 problem documents for every error, bearer
//! tokens for shoppers and the operator, bounded bodies, and backpressure
//! (503 with `Retry-After`) when the node is overloaded.
//!
//! **Architecture invariant:** `api` is the only crate that knows HTTP and
//! JSON, and it decides nothing the state machine decides: it validates,
//! proposes, and maps outcomes to responses.

pub mod auth;
pub mod dto;
mod handlers;
pub mod metrics;
pub mod openapi;
mod payments;
pub mod problem;

use actix_web::{middleware, web, HttpRequest, HttpResponse};
use cluster::Node;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::RngCore;
use utoipa::OpenApi;

use crate::problem::ApiError;

/// Largest request body accepted, in bytes: a full cart is well under it.
pub const BODY_BYTES_MAX: usize = 16 * 1024;

/// What every handler shares.
pub struct AppState {
    /// The node's groups and actors.
    pub node: Node,
    /// The bearer token of operator endpoints.
    pub operator_token: String,
    /// How long a checkout holds stock before it expires unpaid.
    pub hold_ms: u64,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// Registers every route, the body limits and the request metrics.
///
/// Each path is one `web::resource` holding all of its methods, so a known
/// path asked with a method it lacks answers 405 with an `Allow` header
/// (actix's resource default, made a problem document by
/// [`problem::fallback`]); only an unknown path reaches the 404 default.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default().limit(BODY_BYTES_MAX).error_handler(|err, _req| json_error(err).into());
    let path = web::PathConfig::default().error_handler(|err, _| ApiError::Malformed(err.to_string()).into());
    cfg.app_data(json).app_data(path).app_data(web::PayloadConfig::new(BODY_BYTES_MAX)).service(
        web::scope("")
            .wrap(middleware::ErrorHandlers::new().default_handler(problem::fallback))
            .wrap(middleware::from_fn(metrics::record_requests))
            .service(readable("/healthz", handlers::healthz))
            .service(readable("/readyz", handlers::readyz))
            .service(readable("/metrics", metrics::render))
            .service(readable("/openapi.json", openapi_json))
            .service(
                web::scope("/v1")
                    .service(web::resource("/sales").post(handlers::create_sale))
                    .service(readable("/skus/{sku}", handlers::get_sku))
                    .service(web::resource("/skus/{sku}/restock").post(handlers::restock))
                    .service(web::resource("/sessions").post(handlers::create_session))
                    .service(readable("/cart", handlers::get_cart))
                    .service(
                        web::resource("/cart/items/{sku}")
                            .put(handlers::put_cart_item)
                            .delete(handlers::delete_cart_item),
                    )
                    .service(web::resource("/checkout").post(handlers::checkout))
                    .service(readable("/orders/{id}", handlers::get_order))
                    .service(web::resource("/orders/{id}/pay").post(handlers::pay))
                    .service(web::resource("/orders/{id}/cancel").post(handlers::cancel))
                    .service(readable("/cluster", handlers::cluster_status))
                    .service(web::resource("/admin/leader").post(handlers::move_leader))
                    .service(readable("/admin/drills", handlers::list_drills))
                    .service(web::resource("/admin/drills/zone-loss").post(handlers::start_zone_loss_drill))
                    .service(web::resource("/admin/switchover").post(handlers::start_switchover))
                    .service(readable("/admin/failover/preview", handlers::failover_preview))
                    .service(web::resource("/admin/failover").post(handlers::start_failover))
                    .service(web::resource("/admin/failback").post(handlers::start_failback))
                    .service(web::resource("/admin/replace-node").post(handlers::start_replace))
                    .service(readable("/admin/drills/{id}", handlers::get_drill)),
            )
            .default_service(web::to(handlers::not_found)),
    );
}

/// A resource answering GET with `handler`, and HEAD with what GET would
/// answer less the body (RFC 9110 §9.3.2; the server drops the body), so a
/// load balancer's HEAD probe of `/healthz` works.
fn readable<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path).get(handler.clone()).head(handler)
}

/// Maps actix's JSON extractor errors to problem documents: too large → 413,
/// anything else → 400.
fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => ApiError::TooLarge(limit),
        E::ContentType => ApiError::Malformed("Content-Type must be application/json".into()),
        other => ApiError::Malformed(format!("invalid JSON body: {other}")),
    }
}

async fn openapi_json(_req: HttpRequest) -> HttpResponse {
    HttpResponse::Ok().json(openapi::ApiDoc::openapi())
}

/// A fresh bearer token: 256 random bits from the OS-seeded thread RNG, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
