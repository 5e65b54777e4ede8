//! Every error the API returns, as an RFC 9457 problem document with a
//! stable `type` per kind.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use cluster::{DrillError, ProposeError, TransferError};
use domain::Rejection;

use crate::dto::Problem;

/// An API error: what the shopper or operator did wrong, or why the node
/// cannot answer now.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The request could not be parsed (bad JSON, bad path parameter).
    #[error("{0}")]
    Malformed(String),
    /// The request body is larger than the API accepts.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// A required header is missing or malformed.
    #[error("{0}")]
    BadHeader(String),
    /// No valid bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The test payment provider declined the payment.
    #[error("payment declined: {0}")]
    PaymentDeclined(&'static str),
    /// No such route.
    #[error("no such resource")]
    NotFound,
    /// Leadership did not move.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A drill could not start; nothing was cut off.
    #[error(transparent)]
    Drill(#[from] DrillError),
    /// The node could not get an outcome: overloaded, no leader, timed out.
    #[error(transparent)]
    Unavailable(#[from] ProposeError),
}

impl ApiError {
    /// `(status, type slug, title)`: stable per kind of error, so clients can
    /// branch on `type` without parsing `detail`.
    fn kind(&self) -> (StatusCode, &'static str, &'static str) {
        use Rejection as R;
        match self {
            ApiError::Rejected(rejection) => match rejection {
                R::Invalid(_) | R::StockOverflow => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request")
                }
                R::EmptyOrder => (StatusCode::UNPROCESSABLE_ENTITY, "empty-order", "Nothing to order"),
                R::IdempotencyConflict => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-conflict",
                    "Idempotency key reused with a different request",
                ),
                R::UnknownSku { .. } => (StatusCode::NOT_FOUND, "unknown-sku", "Unknown SKU"),
                R::UnknownOrder { .. } => (StatusCode::NOT_FOUND, "unknown-order", "Unknown order"),
                R::UnknownSession => (StatusCode::UNAUTHORIZED, "unauthorized", "Unknown session"),
                R::SaleExists { .. } => (StatusCode::CONFLICT, "sale-exists", "Sale exists"),
                R::TooManySales => (StatusCode::CONFLICT, "too-many-sales", "Too many sales"),
                R::SaleNotOpen { .. } => (StatusCode::CONFLICT, "sale-not-open", "Sale not open"),
                R::SaleEnded { .. } => (StatusCode::CONFLICT, "sale-ended", "Sale ended"),
                R::SoldOut { .. } => (StatusCode::CONFLICT, "sold-out", "Sold out"),
                R::LimitExceeded { .. } => (StatusCode::CONFLICT, "limit-exceeded", "Per-shopper limit exceeded"),
                R::CartFull => (StatusCode::CONFLICT, "cart-full", "Cart full"),
                R::TooManyCheckouts => (StatusCode::CONFLICT, "too-many-checkouts", "Too many checkouts"),
                R::OrderFinal { .. } => (StatusCode::CONFLICT, "order-final", "Order is final"),
                R::Frozen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "switchover", "A switchover is under way"),
                R::EscrowPending { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "escrow-pending", "Stock is on its way into escrow")
                }
                R::StaleEpoch { .. } => (StatusCode::CONFLICT, "stale-epoch", "Switchover step out of turn"),
            },
            ApiError::Malformed(_) | ApiError::BadHeader(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Request body too large"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::PaymentDeclined(_) => (StatusCode::PAYMENT_REQUIRED, "payment-declined", "Payment declined"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Transfer(TransferError::UnknownNode(_) | TransferError::MayNotLead(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request")
            }
            ApiError::Transfer(TransferError::NoLeader | TransferError::Failed(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Temporarily unavailable")
            }
            ApiError::Drill(
                DrillError::UnknownZone(_)
                | DrillError::UnknownRegion(_)
                | DrillError::BadDuration { .. }
                | DrillError::NotOfRegion { .. }
                | DrillError::UnknownNode(_),
            ) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request"),
            ApiError::Drill(DrillError::ReplacesLeader(_)) => {
                (StatusCode::CONFLICT, "replaces-leader", "Move leadership away from the node first")
            }
            ApiError::Drill(DrillError::HoldsItsCopy { .. }) => {
                (StatusCode::CONFLICT, "holds-its-copy", "The node answers with its log: its disk is not lost")
            }
            ApiError::Drill(DrillError::AwaitsFailback { .. }) => {
                (StatusCode::CONFLICT, "awaits-failback", "Fail back first: the node holds a lost primary's copy")
            }
            ApiError::Drill(DrillError::LeavesNoDrCopy { .. }) => {
                (StatusCode::CONFLICT, "leaves-no-dr-copy", "No DR copy would be left to confirm escrow")
            }
            ApiError::Drill(DrillError::CoordinatorInZone { .. }) => {
                (StatusCode::CONFLICT, "coordinator-in-zone", "Ask a node outside the zone")
            }
            ApiError::Drill(DrillError::LosesQuorum { .. }) => {
                (StatusCode::CONFLICT, "drill-loses-quorum", "The drill would stop checkout")
            }
            ApiError::Drill(DrillError::NotLeader { .. }) => (StatusCode::CONFLICT, "not-leader", "Ask the leader"),
            ApiError::Drill(DrillError::AlreadyPrimary(_)) => {
                (StatusCode::CONFLICT, "already-primary", "The region takes writes already")
            }
            ApiError::Drill(DrillError::RegionLosesQuorum { .. }) => {
                (StatusCode::CONFLICT, "region-loses-quorum", "The region could not survive losing a zone")
            }
            ApiError::Drill(DrillError::PrimaryReachable { .. }) => {
                (StatusCode::CONFLICT, "primary-reachable", "The region that takes writes is not lost")
            }
            ApiError::Drill(DrillError::CopyUnreachable(_)) => {
                (StatusCode::CONFLICT, "copy-unreachable", "A node of the region does not answer")
            }
            ApiError::Drill(DrillError::CopyBehind { .. } | DrillError::OutsideRegion { .. }) => {
                (StatusCode::CONFLICT, "not-most-advanced", "Ask the region's node with the most advanced copy")
            }
            ApiError::Drill(DrillError::NoFailover | DrillError::NothingToFailBack(_)) => {
                (StatusCode::CONFLICT, "nothing-to-fail-back", "Nothing to fail back")
            }
            ApiError::Drill(DrillError::CopyUnbounded { .. }) => {
                (StatusCode::CONFLICT, "copy-unbounded", "The copy cannot bound what a failover would lose")
            }
            ApiError::Drill(DrillError::Fenced(_)) => {
                (StatusCode::CONFLICT, "fenced", "This node's copy was superseded by a failover")
            }
            ApiError::Drill(DrillError::AlreadyRunning(_) | DrillError::AlreadyIsolated(_)) => {
                (StatusCode::CONFLICT, "drill-running", "A drill is running")
            }
            ApiError::Unavailable(ProposeError::Overloaded) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Overloaded")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Temporarily unavailable"),
        }
    }

    /// The problem document this error renders as.
    pub fn problem(&self) -> Problem {
        let (status, slug, title) = self.kind();
        let mut detail = self.to_string();
        if matches!(self, ApiError::Unavailable(ProposeError::Timeout | ProposeError::Unavailable(_))) {
            detail.push_str("; the command may still apply: retry with the same Idempotency-Key");
        }
        Problem { kind: format!("/problems/{slug}"), title: title.to_string(), status: status.as_u16(), detail }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.kind().0
    }

    fn error_response(&self) -> HttpResponse {
        let problem = self.problem();
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("application/problem+json");
        match self {
            // Backpressure: tell the client when to come back.
            ApiError::Unavailable(_)
            | ApiError::Rejected(Rejection::Frozen { .. } | Rejection::EscrowPending { .. })
            | ApiError::Transfer(TransferError::NoLeader | TransferError::Failed(_)) => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::Unauthorized(_) | ApiError::Rejected(Rejection::UnknownSession) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.json(problem)
    }
}

/// Rewrites any error response that is not yet a problem document (actix's
/// own extractor errors, e.g. a raw body over the size limit) into one, so
/// that every error the API returns has the same shape.
pub fn fallback<B>(
    res: actix_web::dev::ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    use actix_web::middleware::ErrorHandlerResponse;
    let is_problem =
        res.headers().get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes() == b"application/problem+json");
    if is_problem {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (slug, title) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("too-large", "Request body too large"),
        StatusCode::NOT_FOUND => ("not-found", "Not found"),
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "Method not allowed"),
        s if s.is_client_error() => ("bad-request", "Bad request"),
        _ => ("internal", "Internal error"),
    };
    // A 405 comes from a resource's default service with the methods the
    // path takes in `Allow` (RFC 9110 §15.5.6 requires it), and no error.
    let allow = res.headers().get(header::ALLOW).cloned();
    let detail = match (res.response().error(), &allow) {
        (Some(error), _) => error.to_string(),
        (None, Some(allow)) if status == StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.to_str().unwrap_or_default();
            format!("{} is not allowed here; allowed: {allowed}", res.request().method())
        }
        (None, _) => title.to_string(),
    };
    let problem = Problem { kind: format!("/problems/{slug}"), title: title.into(), status: status.as_u16(), detail };
    let (req, _) = res.into_parts();
    let mut response = HttpResponse::build(status);
    if let Some(allow) = allow {
        response.insert_header((header::ALLOW, allow));
    }
    let response = response.content_type("application/problem+json").json(problem);
    Ok(ErrorHandlerResponse::Response(actix_web::dev::ServiceResponse::new(req, response).map_into_right_body()))
}
