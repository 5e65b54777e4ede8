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
pub fn configure(cfg: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default().limit(BODY_BYTES_MAX).error_handler(|err, _req| json_error(err).into());
    let path = web::PathConfig::default().error_handler(|err, _| ApiError::Malformed(err.to_string()).into());
    cfg.app_data(json).app_data(path).app_data(web::PayloadConfig::new(BODY_BYTES_MAX)).service(
        web::scope("")
            .wrap(middleware::ErrorHandlers::new().default_handler(problem::fallback))
            .wrap(middleware::from_fn(metrics::record_requests))
            .route("/healthz", web::get().to(handlers::healthz))
            .route("/readyz", web::get().to(handlers::readyz))
            .route("/metrics", web::get().to(metrics::render))
            .route("/openapi.json", web::get().to(openapi_json))
            .service(
                web::scope("/v1")
                    .route("/sales", web::post().to(handlers::create_sale))
                    .route("/skus/{sku}", web::get().to(handlers::get_sku))
                    .route("/skus/{sku}/restock", web::post().to(handlers::restock))
                    .route("/sessions", web::post().to(handlers::create_session))
                    .route("/cart", web::get().to(handlers::get_cart))
                    .route("/cart/items/{sku}", web::put().to(handlers::put_cart_item))
                    .route("/cart/items/{sku}", web::delete().to(handlers::delete_cart_item))
                    .route("/checkout", web::post().to(handlers::checkout))
                    .route("/orders/{id}", web::get().to(handlers::get_order))
                    .route("/orders/{id}/pay", web::post().to(handlers::pay))
                    .route("/orders/{id}/cancel", web::post().to(handlers::cancel))
                    .route("/cluster", web::get().to(handlers::cluster_status))
                    .route("/admin/leader", web::post().to(handlers::move_leader))
                    .route("/admin/drills", web::get().to(handlers::list_drills))
                    .route("/admin/drills/zone-loss", web::post().to(handlers::start_zone_loss_drill))
                    .route("/admin/switchover", web::post().to(handlers::start_switchover))
                    .route("/admin/failover/preview", web::get().to(handlers::failover_preview))
                    .route("/admin/failover", web::post().to(handlers::start_failover))
                    .route("/admin/failback", web::post().to(handlers::start_failback))
                    .route("/admin/replace-node", web::post().to(handlers::start_replace))
                    .route("/admin/drills/{id}", web::get().to(handlers::get_drill)),
            )
            .default_service(web::to(handlers::not_found)),
    );
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
