//! The OpenAPI document, generated from the handlers and DTOs themselves so
//! it cannot drift from what the server does.

use actix_web::http::StatusCode;
use utoipa::openapi::content::Content;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Required};
use utoipa::{Modify, OpenApi, PartialSchema};

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
    modifiers(&BearerSchemes, &ProblemResponses, &AbsentNotNull),
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

/// States once what every error response has in common, so that no
/// handler's annotation can get it wrong: each error is a problem document
/// sent as `application/problem+json` (`ApiError`'s `ResponseError` impl
/// and `problem::fallback` see to that), and each 503 carries `Retry-After`
/// (`ApiError::error_response` sets it on every 503 it sends). The handlers
/// list which statuses they return; a response left without a description
/// gets the status's meaning here.
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for operation in operations(openapi) {
            for (status, response) in &mut operation.responses.responses {
                let RefOr::T(response) = response else { continue };
                let status = status.parse().ok().and_then(|code| StatusCode::from_u16(code).ok());
                let Some(status) = status else { continue };
                if response.description.is_empty() {
                    response.description = describe(status);
                }
                if !(status.is_client_error() || status.is_server_error()) {
                    continue;
                }
                let problem = response
                    .content
                    .shift_remove("application/json")
                    .unwrap_or_else(|| Content::new(Some(Ref::from_schema_name("Problem"))));
                response.content.insert("application/problem+json".into(), problem);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    let retry_after = HeaderBuilder::new()
                        .schema(u64::schema())
                        .description(Some("Seconds to wait before retrying."))
                        .build();
                    response.headers.insert("Retry-After".into(), retry_after);
                }
            }
        }
    }
}

/// What a status means from this API, for responses documented without a
/// description of their own.
fn describe(status: StatusCode) -> String {
    let meaning = match status {
        StatusCode::BAD_REQUEST => "Malformed request: unparsable body, header or path parameter.",
        StatusCode::UNAUTHORIZED => "No valid bearer token.",
        StatusCode::PAYMENT_REQUIRED => "The payment provider declined the payment.",
        StatusCode::NOT_FOUND => "No such SKU, order or drill.",
        StatusCode::CONFLICT => "Refused in the current state; nothing changed.",
        StatusCode::PAYLOAD_TOO_LARGE => return format!("Request body larger than {} bytes.", crate::BODY_BYTES_MAX),
        StatusCode::UNPROCESSABLE_ENTITY => "A value breaks a rule or limit; nothing changed.",
        StatusCode::SERVICE_UNAVAILABLE => {
            "Not now: overloaded, no leader, a switchover under way, or no outcome in time. Retry after \
             Retry-After seconds, with the same Idempotency-Key for a checkout."
        }
        other => other.canonical_reason().unwrap_or_default(),
    };
    meaning.to_string()
}

/// An optional request body (`content = Option<T>`) may be left out, and
/// the handler then reads it as `T::default()`; it may not be JSON `null`,
/// which the handler refuses. utoipa renders `Option<T>` as "null or `T`":
/// this drops the null, leaving a body that is `T` when present.
struct AbsentNotNull;

impl Modify for AbsentNotNull {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for operation in operations(openapi) {
            let Some(body) = &mut operation.request_body else { continue };
            if body.required == Some(Required::True) {
                continue;
            }
            for content in body.content.values_mut() {
                let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema else { continue };
                let mut present = one_of.items.iter().filter(|schema| !is_null(schema));
                if let (Some(schema), None) = (present.next(), present.next()) {
                    content.schema = Some(schema.clone());
                }
            }
        }
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::Object(object)) if object.schema_type == SchemaType::Type(Type::Null))
}

/// Every operation of the document, whatever its method.
fn operations(openapi: &mut utoipa::openapi::OpenApi) -> impl Iterator<Item = &mut Operation> {
    openapi.paths.paths.values_mut().flat_map(
        |PathItem { get, put, post, delete, options, head, patch, trace, .. }| {
            [get, put, post, delete, options, head, patch, trace].into_iter().flatten()
        },
    )
}
