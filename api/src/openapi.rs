//! The OpenAPI document, generated from the handlers and DTOs themselves so
//! it cannot drift from what the server does.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::dto::*;
use crate::handlers;

/// Surge's public API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Surge", description = "Flash-sale commerce: sales, stock, sessions, carts, checkout and orders."),
    paths(
        handlers::create_sale, handlers::restock, handlers::get_sku, handlers::create_session,
        handlers::get_cart, handlers::put_cart_item, handlers::delete_cart_item, handlers::checkout,
        handlers::pay, handlers::cancel, handlers::get_order, handlers::cluster_status,
        handlers::start_zone_loss_drill, handlers::start_switchover, handlers::failover_preview, handlers::start_failover, handlers::start_failback, handlers::start_replace, handlers::list_drills, handlers::get_drill,
        handlers::move_leader,
    ),
    components(schemas(CreateSale, Restock, Sku, CreateSession, SessionCreated, SetCartItem, Item, Cart,
        Checkout, Pay, OrderBody, ClusterStatus, NodeView, OrderCounts, ZoneLossDrill, Switchover, Failover, Failback, ReplaceNode, MoveLeader, Problem,
        cluster::LeaderMoved, cluster::DrillReport, cluster::FailoverPreview, cluster::DrillEvent, cluster::NodeStatus, cluster::GroupStatus,
        cluster::ReplicaLag)),
    modifiers(&BearerSchemes),
)]
pub struct ApiDoc;

/// Declares the two bearer schemes the paths refer to.
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["operator", "session"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}
