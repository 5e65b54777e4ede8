//! `surge bench`: the hot-SKU benchmark. Many shoppers, each with its own
//! session and keep-alive connection, check out one unit of the same SKU
//! over and over (a fresh Idempotency-Key each time) for a fixed time; the
//! figure is reservations per second with exact p50/p99 latency, comparable
//! with `bench/compare.sh`'s Redis and PostgreSQL "decrement if positive".
//!
//! By default it starts its own node on a temporary directory; `--cluster`
//! starts the five-node, two-zone topology instead (every voter fsyncs every
//! entry; shoppers spread over the zone a and b endpoints); `--url` (and
//! `--operator-token`, to create the sale) point it at running nodes.
//! `--rate` paces the clients to a total rate instead of running them flat
//! out, for latency at a given load (e.g. half the peak).

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::crowd::{self, Http, Req, Stats, StockRead};
use crate::local_cluster::LocalCluster;
use crate::server::{self, Server};

/// Error answers kept verbatim for the report; the rest are counted.
const ERROR_SAMPLES_MAX: usize = 10;
/// How long a benchmark sale stays open: far longer than any run.
const SALE_OPEN_MS: u64 = 24 * 3_600_000;
/// Progress refresh.
const TICK: Duration = Duration::from_millis(250);

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Concurrent shoppers, each with its own session and keep-alive connection.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of load before measuring starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub warmup: u64,
    /// Threads generating the load; the clients are split among them.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Benchmark the nodes at these URLs (comma separated; clients spread
    /// over them) instead of starting any.
    #[arg(long = "url", value_name = "URL", value_delimiter = ',', conflicts_with = "cluster")]
    pub urls: Vec<String>,
    /// Start the five-node, two-zone topology (in this process, loopback,
    /// mutual TLS) instead of one node.
    #[arg(long)]
    pub cluster: bool,
    /// Pace the clients to this many checkouts per second in total, instead
    /// of each sending its next request as soon as the last is answered.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Operator token of the node at --url: creates the sale if missing and
    /// restocks it if it sells out.
    #[arg(long, env = "SURGE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// The hot SKU (created with no per-shopper limit if missing).
    #[arg(long, default_value = "bench-hot")]
    pub sku: String,
    /// Payment window of the node this starts, in ms. The default is a
    /// production node's, so no hold expires during a run and the figure is
    /// the checkout path alone; a short one adds the expiry work to it.
    #[arg(long, value_name = "MS")]
    pub hold_ms: Option<u64>,
    /// Units put on sale, and added again whenever the SKU sells out.
    #[arg(long, default_value_t = 100_000_000)]
    pub stock: u64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.clients >= 1 && args.seconds >= 1 && args.stock >= 1,
        "--clients, --seconds and --stock must be at least 1"
    );
    ensure!((1..=args.clients).contains(&args.client_threads), "--client-threads must be between 1 and --clients");
    ensure!(args.rate.is_none_or(|rate| rate > 0.0), "--rate must be positive");
    let mut own = None;
    let (endpoints, operator_token) = if args.urls.is_empty() {
        let data = tempfile::Builder::new().prefix("surge-bench-").tempdir().context("create a data directory")?;
        let mut config = Config::for_demo(data.path())?;
        config.hold_ms = own_hold_ms(&args);
        let token = Some(config.operator_token.clone());
        let nodes = if args.cluster {
            Own::Cluster(LocalCluster::start(data.path(), &config).await.context("start the benchmark cluster")?)
        } else {
            Own::Node(server::start(config).await.context("start the benchmark node")?)
        };
        let endpoints = match &nodes {
            Own::Node(server) => vec![server.url.clone()],
            Own::Cluster(cluster) => cluster.endpoints(&["a", "b"]),
        };
        own = Some((nodes, data));
        (endpoints, token)
    } else {
        (args.urls.iter().map(|url| url.trim_end_matches('/').to_string()).collect(), args.operator_token.clone())
    };
    println!(
        "Surge hot-SKU benchmark: 1 SKU ({}), {} clients on keep-alive connections{}, {} s measured after {} s warm-up, {}{}",
        args.sku,
        args.clients,
        args.rate.map_or(String::new(), |rate| format!(" paced to {rate:.0} checkouts/s")),
        args.seconds,
        args.warmup,
        endpoints.join(" "),
        match &own {
            Some((Own::Node(_), _)) => format!(" (a node of its own; orders hold stock for {} ms)", own_hold_ms(&args)),
            Some((Own::Cluster(_), _)) => format!(
                " (five nodes of its own, zones a and b and a tiebreaker, every voter fsyncing; orders hold stock for {} ms)",
                own_hold_ms(&args)
            ),
            None => String::new(),
        }
    );
    let result = bench(&args, &endpoints, operator_token).await;
    if let Some((nodes, data)) = own.take() {
        match nodes {
            Own::Node(server) => server.stop().await,
            Own::Cluster(cluster) => cluster.stop().await,
        }
        drop(data);
    }
    let summary = result?;
    print!("{}", summary.render());
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(&summary).context("encode the results")? + "\n";
        std::fs::write(path, text).with_context(|| format!("write the results to {}", path.display()))?;
        println!("Results written to {}", path.display());
    }
    if summary.reserved == 0 {
        bail!("no checkout succeeded");
    }
    Ok(())
}

/// What the bench started for itself.
enum Own {
    Node(Server),
    Cluster(LocalCluster),
}

/// The payment window of the node the bench starts.
fn own_hold_ms(args: &BenchArgs) -> u64 {
    args.hold_ms.unwrap_or(Config::default().hold_ms)
}

/// What one load thread is to do.
struct LoadPlan {
    /// Where the clients go; client `i` starts at `endpoints[i % len]`.
    endpoints: Vec<String>,
    /// Time between two checkouts of one client when paced.
    pace: Option<Duration>,
    operator_token: Option<String>,
    sku: String,
    restock_units: u64,
    /// Indices of this thread's clients.
    clients: Range<usize>,
    /// Distinguishes this run's sessions and keys from earlier runs'.
    nonce: String,
    measure_from: Instant,
    measure_until: Instant,
    /// Requests completed so far by all threads, for the progress bar.
    completed: Arc<AtomicU64>,
}

/// What one load thread measured.
#[derive(Default)]
struct LoadReport {
    stats: Stats,
    sold_out: u64,
    restocks: u64,
    /// Shopper sessions started (one per client, and another each time one
    /// has used up its checkouts).
    sessions: u64,
    sessions_failed: u64,
    /// Answers other than an order, "sold out" or an overload retried away.
    errors: u64,
    error_samples: Vec<String>,
}

async fn bench(args: &BenchArgs, endpoints: &[String], operator_token: Option<String>) -> anyhow::Result<BenchSummary> {
    let (setup_endpoints, setup_token, sku, stock) =
        (endpoints.to_vec(), operator_token.clone(), args.sku.clone(), args.stock);
    let sale = crowd::on_client_thread("surge-bench-setup", move || async move {
        ensure_sale(&setup_endpoints, setup_token.as_deref(), &sku, stock).await
    })
    .await??;
    if sale.available < args.clients as u64 && operator_token.is_none() {
        eprintln!("warning: {} has {} units available and no operator token to restock", sale.sku, sale.available);
    }

    let nonce = format!("{:08x}", rand::random::<u32>());
    let completed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(args.warmup);
    let measure_until = measure_from + Duration::from_secs(args.seconds);
    let threads = (0..args.client_threads).map(|thread| {
        // Clients split as evenly as possible.
        let first = args.clients * thread / args.client_threads;
        let last = args.clients * (thread + 1) / args.client_threads;
        let plan = LoadPlan {
            endpoints: endpoints.to_vec(),
            pace: args.rate.map(|rate| Duration::from_secs_f64(args.clients as f64 / rate)),
            operator_token: operator_token.clone(),
            sku: args.sku.clone(),
            restock_units: args.stock,
            clients: first..last,
            nonce: nonce.clone(),
            measure_from,
            measure_until,
            completed: completed.clone(),
        };
        crowd::on_client_thread(&format!("surge-bench-{thread}"), move || load(plan))
    });
    let progress =
        ProgressBar::with_draw_target(Some((measure_until - started).as_millis() as u64), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .expect("progress template is valid")
            .progress_chars("=> "),
    );
    let (reports, ()) = futures::join!(
        futures::future::join_all(threads),
        show_progress(&progress, &completed, started, measure_from, measure_until)
    );
    progress.finish_and_clear();

    let mut total = LoadReport::default();
    for report in reports {
        let report = report?;
        total.stats.merge(report.stats);
        total.sold_out += report.sold_out;
        total.restocks += report.restocks;
        total.sessions += report.sessions;
        total.sessions_failed += report.sessions_failed;
        total.errors += report.errors;
        let room = ERROR_SAMPLES_MAX.saturating_sub(total.error_samples.len());
        total.error_samples.extend(report.error_samples.into_iter().take(room));
    }
    Ok(BenchSummary::new(args, endpoints, total))
}

/// Creates the benchmark sale, or finds it; returns its stock.
async fn ensure_sale(
    endpoints: &[String],
    operator_token: Option<&str>,
    sku: &str,
    stock: u64,
) -> anyhow::Result<StockRead> {
    let http = Http::spread(endpoints, 0, Default::default());
    if let Some(token) = operator_token {
        let now = crowd::now_ms();
        let sale = json!({
            "sku": sku, "name": "Benchmark hot SKU", "price_minor": 100, "stock": stock,
            "starts_at_ms": now - 1000, "ends_at_ms": now + SALE_OPEN_MS, "limit_per_shopper": 0,
        });
        let reply = http.call(&Req::post("/v1/sales", Some(sale)).bearer(token)).await.map_err(anyhow::Error::msg)?;
        // 409: the sale exists already (an earlier run); it is checked below.
        if reply.status != 201 && reply.status != 409 {
            bail!("create the sale {sku}: {}", reply.describe());
        }
    }
    let reply = http.call(&Req::get(format!("/v1/skus/{sku}"))).await.map_err(anyhow::Error::msg)?;
    if reply.status != 200 {
        bail!("read the sale {sku}: {} (pass --operator-token to create it)", reply.describe());
    }
    let read = StockRead::from_reply(&reply).with_context(|| format!("unreadable SKU: {}", reply.body))?;
    let limit = reply.u64_field("limit_per_shopper").unwrap_or(0);
    ensure!(limit == 0, "{sku} has a per-shopper limit of {limit}; the benchmark needs a SKU without one");
    let now = crowd::now_ms();
    let (starts, ends) = (reply.u64_field("starts_at_ms").unwrap_or(0), reply.u64_field("ends_at_ms").unwrap_or(0));
    ensure!(starts <= now && now + 60_000 < ends, "the sale of {sku} is not open for the next minute");
    Ok(read)
}

/// One load thread: its clients check out until the run ends.
async fn load(plan: LoadPlan) -> LoadReport {
    let stats = Rc::new(RefCell::new(Stats::default()));
    let report = RefCell::new(LoadReport::default());
    let restocking = Cell::new(false);
    let error = |what: String| {
        let mut report = report.borrow_mut();
        report.errors += 1;
        if report.error_samples.len() < ERROR_SAMPLES_MAX {
            report.error_samples.push(what);
        }
    };
    let clients = plan.clients.clone().map(|client| {
        let http = Http::spread(&plan.endpoints, client, stats.clone());
        let (plan, report, restocking, error) = (&plan, &report, &restocking, &error);
        async move {
            // Paced clients start spread over one interval, not all at once.
            let mut next_send = plan.pace.map(|pace| Instant::now() + pace.mul_f64(rand::random::<f64>()));
            let body = json!({ "items": [{ "sku": plan.sku, "qty": 1 }] });
            // A session decides a bounded number of checkouts; a client moves
            // on to a new session (a new shopper) when it has used one up.
            let mut session = 0u64;
            'sessions: while Instant::now() < plan.measure_until {
                let shopper = format!("bench-{}-{client}-{session}", plan.nonce);
                session += 1;
                let Some(token) = start_session(&http, &shopper, error).await else {
                    report.borrow_mut().sessions_failed += 1;
                    actix_rt::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                report.borrow_mut().sessions += 1;
                for sequence in 0..domain::CHECKOUTS_PER_SESSION_MAX {
                    if Instant::now() >= plan.measure_until {
                        break 'sessions;
                    }
                    let scheduled = match &mut next_send {
                        Some(next) => {
                            // On schedule, or at once when behind (the server
                            // is slower than the pace); latency counts from
                            // the schedule either way.
                            let at = *next;
                            actix_rt::time::sleep_until(at.into()).await;
                            *next += plan.pace.expect("paced");
                            Some(at)
                        }
                        None => None,
                    };
                    let key = format!("{shopper}-{sequence}");
                    let mut req = Req::post("/v1/checkout", Some(body.clone())).bearer(&token).idempotency_key(&key);
                    if let Some(at) = scheduled {
                        req = req.scheduled(at);
                    }
                    let reply = http.call(&req).await;
                    plan.completed.fetch_add(1, Ordering::Relaxed);
                    match reply {
                        Ok(reply) if matches!(reply.status, 200 | 201) => {}
                        Ok(reply) if reply.is_problem(409, "sold-out") => {
                            report.borrow_mut().sold_out += 1;
                            restock(plan, report, restocking, &format!("{key}-restock")).await;
                        }
                        // A node with a lower bound than this build's.
                        Ok(reply) if reply.is_problem(409, "too-many-checkouts") => continue 'sessions,
                        Ok(reply) => error(format!("POST /v1/checkout -> {}", reply.describe())),
                        Err(failure) => {
                            error(format!("POST /v1/checkout -> {failure}"));
                            actix_rt::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }
    });
    // Counts only what completes inside the measured window.
    let window = async {
        actix_rt::time::sleep_until(plan.measure_from.into()).await;
        stats.borrow_mut().recording = true;
        actix_rt::time::sleep_until(plan.measure_until.into()).await;
        stats.borrow_mut().recording = false;
    };
    futures::join!(futures::future::join_all(clients), window);
    let mut report = report.into_inner();
    report.stats = std::mem::take(&mut *stats.borrow_mut());
    report
}

/// A new shopper session; its token. Session starts are not measured: the
/// benchmark is about checkouts.
async fn start_session(http: &Http, shopper: &str, error: &impl Fn(String)) -> Option<String> {
    let req = Req::post("/v1/sessions", Some(json!({ "shopper": shopper }))).unrecorded();
    match http.call(&req).await {
        Ok(reply) if reply.status == 201 => {
            let token = reply.body.get("token").and_then(Value::as_str).map(str::to_string);
            if token.is_none() {
                error(format!("POST /v1/sessions -> 201 without a token: {}", reply.body));
            }
            token
        }
        Ok(reply) => {
            error(format!("POST /v1/sessions -> {}", reply.describe()));
            None
        }
        Err(failure) => {
            error(format!("POST /v1/sessions -> {failure}"));
            None
        }
    }
}

/// Puts the stock back on sale after a sell-out, once per thread at a time.
/// `key` is the restock's Idempotency-Key, one per sell-out a client saw.
async fn restock(plan: &LoadPlan, report: &RefCell<LoadReport>, restocking: &Cell<bool>, key: &str) {
    let Some(token) = &plan.operator_token else {
        // Nothing to do but wait: holds expire and units come back.
        return actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    if restocking.replace(true) {
        return actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let http = Http::spread(&plan.endpoints, 0, Default::default());
    let body = json!({ "units": plan.restock_units });
    let req = Req::post(format!("/v1/skus/{}/restock", plan.sku), Some(body)).bearer(token).idempotency_key(key);
    if let Ok(reply) = http.call(&req).await {
        if reply.status == 200 {
            report.borrow_mut().restocks += 1;
        }
    }
    restocking.set(false);
}

async fn show_progress(
    progress: &ProgressBar,
    completed: &AtomicU64,
    started: Instant,
    measure_from: Instant,
    measure_until: Instant,
) {
    let (mut last_at, mut last_count) = (started, 0);
    loop {
        actix_rt::time::sleep(TICK).await;
        let now = Instant::now();
        let count = completed.load(Ordering::Relaxed);
        let rate = (count - last_count) as f64 / now.duration_since(last_at).as_secs_f64().max(1e-3);
        (last_at, last_count) = (now, count);
        progress.set_position(now.duration_since(started).as_millis() as u64);
        let phase = if now < measure_from { "warming up" } else { "measuring" };
        progress.set_message(format!("{phase}: {rate:.0} checkouts/s"));
        if now >= measure_until {
            return;
        }
    }
}

/// The benchmark's results; `throughput_per_s`, `p50_ms` and `p99_ms` are
/// what `bench/compare.sh` reads.
#[derive(Debug, Serialize)]
struct BenchSummary {
    /// Checkouts that reserved a unit, per second of the measured window.
    throughput_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    /// Requests completed in the window (every answer, any status).
    requests: u64,
    requests_per_s: f64,
    /// Checkouts that reserved a unit in the window.
    reserved: u64,
    sold_out: u64,
    restocks: u64,
    /// 503/429 answers retried after a backoff (each retry is a request).
    overload_retries: u64,
    errors: u64,
    transport_errors: u64,
    /// Sessions started (not measured; see `start_session`).
    sessions: u64,
    sessions_failed: u64,
    clients: usize,
    client_threads: usize,
    /// Length of the measured window.
    seconds: f64,
    warmup_seconds: u64,
    /// The total rate the clients were paced to, if they were.
    paced_per_s: Option<f64>,
    /// The endpoints the clients used.
    endpoints: Vec<String>,
    sku: String,
    /// `single` or `cluster` when the bench started its own; absent with --url.
    own_topology: Option<&'static str>,
    /// The payment window of the node the bench started (absent with --url).
    hold_ms: Option<u64>,
    error_samples: Vec<String>,
}

impl BenchSummary {
    fn new(args: &BenchArgs, endpoints: &[String], report: LoadReport) -> BenchSummary {
        let seconds = args.seconds as f64;
        let latency = report.stats.latency();
        let reserved = report.stats.status_count(201) + report.stats.status_count(200);
        BenchSummary {
            throughput_per_s: reserved as f64 / seconds,
            p50_ms: latency.p50_ms,
            p99_ms: latency.p99_ms,
            p999_ms: latency.p999_ms,
            max_ms: latency.max_ms,
            mean_ms: latency.mean_ms,
            requests: report.stats.requests(),
            requests_per_s: report.stats.requests() as f64 / seconds,
            reserved,
            sold_out: report.sold_out,
            restocks: report.restocks,
            overload_retries: report.stats.overload_retries,
            errors: report.errors,
            transport_errors: report.stats.transport_errors,
            sessions: report.sessions,
            sessions_failed: report.sessions_failed,
            clients: args.clients,
            client_threads: args.client_threads,
            seconds,
            warmup_seconds: args.warmup,
            paced_per_s: args.rate,
            endpoints: endpoints.to_vec(),
            sku: args.sku.clone(),
            own_topology: args.urls.is_empty().then_some(if args.cluster { "cluster" } else { "single" }),
            hold_ms: args.urls.is_empty().then(|| own_hold_ms(args)),
            error_samples: report.error_samples,
        }
    }

    fn render(&self) -> String {
        let mut out = format!(
            "  reserved    {} checkouts = {:.0}/s\n  requests    {} = {:.0}/s ({} overload retries, {} sold out, {} errors, {} without an answer; {} sessions)\n  latency     p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms, mean {:.2} ms\n",
            self.reserved,
            self.throughput_per_s,
            self.requests,
            self.requests_per_s,
            self.overload_retries,
            self.sold_out,
            self.errors,
            self.transport_errors,
            self.sessions,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.mean_ms,
        );
        for sample in &self.error_samples {
            out.push_str(&format!("  error: {sample}\n"));
        }
        out
    }
}
