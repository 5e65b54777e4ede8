//! Prometheus metrics: HTTP requests and latencies, checkouts and orders by
//! outcome, stock levels; batch sizes and Raft commit latency are recorded
//! where they happen, in `cluster`.

use std::sync::OnceLock;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use cluster::ProposeError;
use domain::{Outcome, Rejection};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

/// Latency buckets, in seconds: from a fast read to a request timing out.
const LATENCY_BUCKETS_S: [f64; 14] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
/// Batch-size buckets, in commands per log entry.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Installs the process-wide Prometheus recorder once and returns its handle;
/// later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("seconds".into()),
                    &LATENCY_BUCKETS_S,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full("surge_batch_size".into()),
                        &BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Counts a checkout by what it became.
pub fn count_checkout(outcome: &Result<Outcome, ProposeError>) {
    let label = match outcome {
        Ok(Outcome::Order { replayed: false, .. }) => "reserved",
        Ok(Outcome::Order { replayed: true, .. }) => "replayed",
        Ok(Outcome::Rejected(Rejection::SoldOut { .. })) => "sold_out",
        Ok(Outcome::Rejected(Rejection::LimitExceeded { .. })) => "limit_exceeded",
        Ok(Outcome::Rejected(Rejection::SaleNotOpen { .. } | Rejection::SaleEnded { .. })) => "sale_closed",
        Ok(_) => "rejected",
        Err(ProposeError::Overloaded) => "overloaded",
        Err(_) => "unavailable",
    };
    metrics::counter!("surge_checkouts_total", "outcome" => label).increment(1);
}

/// Counts every request and records its latency, labelled by route pattern
/// (never by raw path, which would grow without bound).
pub async fn record_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let response = next.call(req).await?;
    let status = response.status().as_u16().to_string();
    metrics::counter!("surge_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("surge_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    Ok(response)
}

/// `GET /metrics`: refreshes the stock and order gauges from the applied
/// state, then renders everything in the Prometheus text format.
pub async fn render(state: web::Data<AppState>) -> HttpResponse {
    state.node.read_local(|group| {
        for view in group.sku_views() {
            let sku = view.sale.sku;
            let stock = view.stock;
            let kinds = [
                ("available", stock.for_sale()),
                ("escrowed", stock.escrowed),
                ("held", stock.held),
                ("sold", stock.sold),
                ("unsettled", stock.unsettled),
                ("total", stock.total),
            ];
            for (kind, units) in kinds {
                metrics::gauge!("surge_stock_units", "sku" => sku.clone(), "kind" => kind).set(units as f64);
            }
        }
        for (status, count) in crate::dto::ORDER_STATUSES.iter().zip(group.order_counts()) {
            metrics::gauge!("surge_orders", "status" => status.as_str()).set(count as f64);
        }
        let (holding_order, idle) = group.session_counts();
        metrics::gauge!("surge_sessions", "kind" => "holding_order").set(holding_order as f64);
        metrics::gauge!("surge_sessions", "kind" => "idle").set(idle as f64);
    });
    let (sku_actors, session_actors) = state.node.live_actors();
    metrics::gauge!("surge_live_actors", "kind" => "sku").set(sku_actors as f64);
    metrics::gauge!("surge_live_actors", "kind" => "session").set(session_actors as f64);
    state.metrics.run_upkeep();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}
