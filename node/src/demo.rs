//! `surge demo`: a flash sale on a throwaway cluster, with a crowd racing for
//! it over real HTTP, a zone-loss drill in the middle of the sale, and an
//! audit of what the cluster says afterwards.
//!
//! The cluster is the default topology ([`LocalCluster`]): zones a and b of
//! the primary region, two nodes each, and the tiebreaker in the DR region,
//! all in this process on loopback sockets with mutual TLS between them.
//! Shoppers use the endpoints of both zones and fail over between them. At
//! 30 % of the sale the demo asks a node to run the zone-loss drill on the
//! zone that holds the leader (the worst case): that zone is cut off from
//! the others for a while, then comes back and catches up. Once it has, the
//! demo moves writes to the DR region (a planned switchover) and back (the
//! failback), still mid-sale unless the sale is short. `--single` runs one
//! node instead, without drills.
//!
//! `--drill region-failover` loses the primary region instead: at 30 % of
//! the sale its four nodes stop for good, shoppers move to the DR region's
//! endpoints, and the demo forces a failover to the DR node with the most
//! advanced copy. Acknowledged orders the promoted copy lacks must all be
//! named in the failover's report, and together with what the DR region
//! sells afterwards fit in the stock.
//!
//! The demo is also an honest end-to-end check. The crowd keeps a ledger of
//! every order the API acknowledged; when the crowd has gone and every hold
//! has had time to expire, the demo reads each of those orders back and the
//! stock of each SKU, and fails (non-zero exit) if a unit was oversold, an
//! acknowledged order is gone, or the books do not add up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use cluster::DrillReport;

use crate::config::Config;
use crate::crowd::{self, Acked, AckedStatus, CrowdReport, Http, Plan, Req, StockRead};
use crate::local_cluster::LocalCluster;
use crate::server::{self, Server};

/// Workers reading orders back in the audit.
const AUDIT_CONCURRENCY: usize = 32;
/// Slack on top of the hold time for the last holds to expire: expiry runs
/// on the node's timers and the last hold may have been placed just now.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);
/// How often the wait for expiry re-reads the stock.
const EXPIRY_POLL: Duration = Duration::from_millis(200);
/// When in the sale the zone-loss drill starts, as a fraction of `--duration`.
const DRILL_AT: f64 = 0.3;
/// How often the demo reads the running drill's report.
const DRILL_POLL: Duration = Duration::from_millis(250);
/// How long the drill may take beyond its isolation before the demo gives up.
const DRILL_SLACK: Duration = Duration::from_secs(90);

/// The flash-sale SKU and the two ordinary ones some shoppers add.
const HOT_SKU: &str = "hot-sneaker";
const COLD_SKUS: [(&str, &str, u64); 2] = [("cold-socks", "Socks", 900), ("cold-cap", "Cap", 1900)];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Units of the hot SKU on sale.
    #[arg(long, default_value_t = 1000)]
    pub stock: u64,
    /// Most units of the hot SKU one shopper may hold or buy (0: no limit).
    #[arg(long, default_value_t = 2)]
    pub limit: u32,
    /// Shoppers in the crowd.
    #[arg(long, default_value_t = 2000)]
    pub shoppers: usize,
    /// Shoppers active at the same time, each on its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds after which no new shopper arrives.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub duration: u64,
    /// Seed for the crowd's choices (random if absent; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Longest a shopper thinks between ordering and paying or cancelling.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub think_ms: u64,
    /// Payment window of an order, in ms (the demo node's default is short so
    /// that abandoned holds visibly expire).
    #[arg(long, value_name = "MS")]
    pub hold_ms: Option<u64>,
    /// Run one node instead of the default topology (no drills).
    #[arg(long)]
    pub single: bool,
    /// How long the zone-loss drill cuts the zone off (default: a quarter of
    /// the sale, 1 to 10 s).
    #[arg(long, value_name = "SECONDS")]
    pub drill_seconds: Option<u64>,
    /// Skip the switchover to the DR region and the failback that follow
    /// the zone-loss drill.
    #[arg(long)]
    pub no_switchover: bool,
    /// The drill in the middle of the sale: a zone-loss drill (then a
    /// switchover and a failback), or the loss of the whole primary region
    /// and a forced failover to the DR region.
    #[arg(long, value_enum, default_value = "zone-loss")]
    pub drill: DrillKind,
    /// Address for the single node's HTTP API (default: a free port on
    /// 127.0.0.1). With the cluster, every node takes a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Exit after the sale instead of keeping the node up to explore.
    #[arg(long)]
    pub exit: bool,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
}

/// Which drill `surge demo` runs mid-sale.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrillKind {
    /// Cut off the leader's zone for a while; then a switchover to the DR
    /// region and a failback.
    ZoneLoss,
    /// Stop every node of the primary region for good, and force a failover
    /// to the DR region (`POST /v1/admin/failover`).
    RegionFailover,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.shoppers == 0 || args.stock == 0 {
        bail!("--stock, --shoppers and --concurrency must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let data = tempfile::Builder::new().prefix("surge-demo-").tempdir().context("create a data directory")?;
    let mut config = Config::for_demo(data.path())?;
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(hold_ms) = args.hold_ms {
        config.hold_ms = hold_ms;
    }
    let hold_ms = config.hold_ms;
    let operator_token = config.operator_token.clone();
    let mut nodes = if args.single {
        let server = server::start(config).await.context("start the demo node")?;
        println!("Surge demo: one node up at {} (data in {}, removed on exit)", server.url, data.path().display());
        Nodes::Single(server)
    } else {
        let cluster = LocalCluster::start(data.path(), &config).await.context("start the demo cluster")?;
        println!("Surge demo: six nodes up (data in {}, removed on exit)", data.path().display());
        for (spec, server) in &cluster.nodes {
            println!("  node {} region {:<8} zone {}  {}", spec.id, spec.region, spec.zone, server.url);
        }
        Nodes::Cluster(cluster)
    };
    let drill_seconds = args.drill_seconds.unwrap_or(args.duration / 4).clamp(1, 10);
    let region_failover = !args.single && args.drill == DrillKind::RegionFailover;
    // The primary region's nodes, stopped when the client thread asks.
    let (stop_primary, mut stop_requests) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>(1);

    let setup = Setup {
        endpoints: nodes.shopper_endpoints(region_failover),
        operator_token: operator_token.clone(),
        plan: Plan {
            seed,
            shoppers: args.shoppers,
            concurrency: args.concurrency,
            duration: Duration::from_secs(args.duration),
            hot_sku: HOT_SKU.to_string(),
            hot_limit: args.limit,
            cold_skus: COLD_SKUS.iter().map(|(sku, _, _)| sku.to_string()).collect(),
            think_ms_max: args.think_ms,
        },
        hot_stock: args.stock,
        hold_ms,
        drill: (!args.single).then(|| DrillPlan {
            at: Duration::from_secs(args.duration).mul_f64(DRILL_AT),
            isolate_for: Duration::from_secs(drill_seconds),
        }),
        switchover: !args.single && !args.no_switchover && !region_failover,
        replica: if region_failover { None } else { nodes.replica() },
        failover: region_failover.then(|| RegionLoss { stop_primary, dr_endpoints: nodes.dr_endpoints() }),
    };
    println!(
        "Flash sale: {} units of {HOT_SKU} (limit {} per shopper) plus {} ordinary SKUs; \
         {} shoppers, {} at a time, for at most {} s; payment window {} ms; seed {seed}",
        args.stock,
        args.limit,
        COLD_SKUS.len(),
        args.shoppers,
        args.concurrency,
        args.duration,
        hold_ms,
    );
    match &setup.drill {
        Some(drill) if region_failover => println!(
            "Region failover at {:.1} s: every node of the primary region stops, and the DR region is promoted",
            drill.at.as_secs_f64()
        ),
        Some(drill) => println!(
            "Zone-loss drill at {:.1} s: the leader's zone is cut off for {} s",
            drill.at.as_secs_f64(),
            drill.isolate_for.as_secs()
        ),
        None => {}
    }
    let endpoints = setup.endpoints.clone();
    let client = crowd::on_client_thread("surge-demo-client", move || drive(setup));
    let stopper = async {
        // Ends when the client thread drops its sender.
        while let Some(done) = stop_requests.recv().await {
            nodes.stop_region("primary").await;
            let _ = done.send(());
        }
    };
    let (findings, ()) = futures::join!(client, stopper);
    let findings = match findings {
        Ok(Ok(findings)) => findings,
        Ok(Err(error)) | Err(error) => {
            nodes.stop().await;
            return Err(error);
        }
    };

    let summary = Summary::new(&args, seed, hold_ms, &endpoints, findings);
    print!("{}", summary.render());
    if let Some(path) = &args.summary_json {
        write_json(path, &summary)?;
        println!("Summary written to {}", path.display());
    }

    if !args.exit {
        println!("{}", explore_text(&endpoints, &operator_token));
        if let Err(error) = actix_rt::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot wait for Ctrl-C; stopping now");
        }
        println!("Stopping.");
    }
    nodes.stop().await;
    drop(data);
    if !summary.pass {
        let failed: Vec<&str> = summary.checks.iter().filter(|c| !c.pass).map(|c| c.name).collect();
        bail!("demo failed: {}", failed.join(", "));
    }
    Ok(())
}

/// What the demo runs on.
enum Nodes {
    Single(Server),
    Cluster(LocalCluster),
}

impl Nodes {
    /// Where shoppers go: the single node, or every node of zones a and b
    /// (the tiebreaker takes no shopper traffic; the DR replica's copy is
    /// read after the sale). When the primary region is to be lost, the DR
    /// region's nodes too, where shoppers move once it is gone.
    fn shopper_endpoints(&self, with_dr: bool) -> Vec<String> {
        match self {
            Nodes::Single(server) => vec![server.url.clone()],
            Nodes::Cluster(cluster) if with_dr => cluster.endpoints(&["a", "b", "t", "d"]),
            Nodes::Cluster(cluster) => cluster.endpoints(&["a", "b"]),
        }
    }

    /// The DR region's endpoints.
    fn dr_endpoints(&self) -> Vec<String> {
        match self {
            Nodes::Single(_) => Vec::new(),
            Nodes::Cluster(cluster) => cluster.endpoints(&["t", "d"]),
        }
    }

    /// Stops every node of `region`, as if it were lost.
    async fn stop_region(&mut self, region: &str) {
        if let Nodes::Cluster(cluster) = self {
            cluster.stop_region(region).await;
        }
    }

    /// The DR replica's endpoint, if the demo runs one.
    fn replica(&self) -> Option<String> {
        match self {
            Nodes::Single(_) => None,
            Nodes::Cluster(cluster) => cluster.replica(),
        }
    }

    async fn stop(self) {
        match self {
            Nodes::Single(server) => server.stop().await,
            Nodes::Cluster(cluster) => cluster.stop().await,
        }
    }
}

/// When the zone-loss drill starts and how long the zone stays cut off.
#[derive(Clone, Copy, Debug)]
struct DrillPlan {
    at: Duration,
    isolate_for: Duration,
}

/// What the client thread needs to run the sale.
struct Setup {
    /// Shoppers' endpoints; the operator and the audits use them too.
    endpoints: Vec<String>,
    operator_token: String,
    plan: Plan,
    hot_stock: u64,
    hold_ms: u64,
    drill: Option<DrillPlan>,
    /// Whether a switchover and a failback follow the zone-loss drill.
    switchover: bool,
    /// The DR replica's endpoint, whose copy is checked after the sale.
    replica: Option<String>,
    /// Instead of the zone-loss drill, the primary region is lost.
    failover: Option<RegionLoss>,
}

/// How the client thread has the primary region stopped, and where it
/// asks for the failover.
struct RegionLoss {
    /// Asks the main thread to stop the primary region's nodes; answered
    /// once they are down.
    stop_primary: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    dr_endpoints: Vec<String>,
}

/// A forced failover's report, and how long checkout was unavailable: from
/// the moment the primary region stopped to the first checkout the promoted
/// region acknowledged, the failover ordered at once.
struct FailoverFinding {
    report: DrillReport,
    unavailable_ms: u64,
}

/// What the client thread found.
struct Findings {
    crowd: CrowdReport,
    /// Whether `held` reached 0 on every SKU within the wait.
    holds_released: bool,
    expiry_wait: Duration,
    /// Every SKU's stock after the audit.
    stock: Vec<StockRead>,
    audit: Audit,
    /// The zone-loss drill's final report, or why there is none.
    drill: Option<Result<DrillReport, String>>,
    /// The switchover's and the failback's final reports, or why not.
    switchovers: Vec<(&'static str, Result<DrillReport, String>)>,
    /// How the DR replica's copy compared with the primary's, if there is one.
    dr_copy: Option<DrCopy>,
    /// The forced failover, when the primary region was lost.
    failover: Option<Result<FailoverFinding, String>>,
}

/// The DR replica's copy of every SKU against the primary's final stock.
#[derive(Debug, Serialize)]
struct DrCopy {
    /// How long after the primary's final reads the copy matched them on
    /// every SKU; `None` if it did not within [`DR_COPY_WAIT`].
    matched_after_ms: Option<u64>,
    /// The staleness the replica declared on its last read.
    stale_ms: Option<u64>,
    /// The SKUs that still differed, when the wait ran out.
    differences: Vec<String>,
}

/// How long the DR copy may take to match the primary after the sale.
const DR_COPY_WAIT: Duration = Duration::from_secs(15);

/// Reads every SKU from the DR replica until its copy matches `primary`
/// (replication is asynchronous, so it may trail for a moment).
async fn compare_dr_copy(replica: &str, primary: &[StockRead]) -> DrCopy {
    let http = Http::new(replica, Default::default());
    let started = Instant::now();
    loop {
        let mut differences = Vec::new();
        let mut stale_ms = None;
        for want in primary {
            match http.call(&Req::get(format!("/v1/skus/{}", want.sku))).await {
                Ok(reply) if reply.status == 200 => {
                    stale_ms = reply.stale_ms.or(stale_ms);
                    match StockRead::from_reply(&reply) {
                        Some(copy) if copy == *want => {}
                        Some(copy) => differences.push(format!("{}: DR has {copy:?}", want.sku)),
                        None => differences.push(format!("{}: unreadable {}", want.sku, reply.body)),
                    }
                }
                Ok(reply) => differences.push(format!("{}: {}", want.sku, reply.describe())),
                Err(error) => differences.push(format!("{}: {error}", want.sku)),
            }
        }
        if differences.is_empty() {
            return DrCopy { matched_after_ms: Some(started.elapsed().as_millis() as u64), stale_ms, differences };
        }
        if started.elapsed() > DR_COPY_WAIT {
            return DrCopy { matched_after_ms: None, stale_ms, differences };
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the sales, runs the crowd, waits for the holds to expire and
/// audits. Runs on a client thread.
async fn drive(setup: Setup) -> anyhow::Result<Findings> {
    let operator = Http::spread(&setup.endpoints, 0, Default::default());
    create_sales(&operator, &setup).await?;
    let mut skus = vec![setup.plan.hot_sku.clone()];
    skus.extend(setup.plan.cold_skus.iter().cloned());

    let progress = ProgressBar::with_draw_target(Some(setup.plan.shoppers as u64), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>3} [{bar:30}] {pos}/{len} shoppers  {msg}")
            .expect("progress template is valid")
            .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let drills = async {
        if let (Some(plan), Some(loss)) = (setup.drill, &setup.failover) {
            let failover = region_failover(&setup.operator_token, plan, loss).await;
            return (None, Vec::new(), Some(failover));
        }
        let drill = match setup.drill {
            Some(plan) => Some(zone_loss_drill(&operator, &setup.operator_token, plan).await),
            None => None,
        };
        let mut switchovers = Vec::new();
        if setup.switchover {
            for (name, region) in [("switchover", "dr"), ("failback", "primary")] {
                let report = switchover(&operator, &setup.operator_token, region).await;
                let failed = report.is_err();
                switchovers.push((name, report));
                if failed {
                    break;
                }
            }
        }
        (drill, switchovers, None)
    };
    let (crowd, (drill, switchovers, failover)) =
        futures::join!(crowd::run(&setup.endpoints, setup.plan.clone(), progress), drills);
    // Lets the main thread's stopper end.
    drop(setup.failover);

    let waited = Instant::now();
    let holds_released = wait_for_expiry(&operator, &skus, Duration::from_millis(setup.hold_ms) + EXPIRY_SLACK).await;
    let expiry_wait = waited.elapsed();
    let audit = audit(&setup.endpoints, &crowd.ledger).await;
    let mut stock = Vec::new();
    for sku in &skus {
        stock
            .push(read_stock(&operator, sku).await.with_context(|| format!("read the stock of {sku} after the sale"))?);
    }
    let dr_copy = match &setup.replica {
        Some(replica) => Some(compare_dr_copy(replica, &stock).await),
        None => None,
    };
    Ok(Findings { crowd, holds_released, expiry_wait, stock, audit, drill, switchovers, dr_copy, failover })
}

/// Waits until `plan.at`, stops the primary region, and forces a failover
/// to the DR node with the most advanced copy, as an operator would at once;
/// follows it to its final report.
async fn region_failover(token: &str, plan: DrillPlan, loss: &RegionLoss) -> Result<FailoverFinding, String> {
    actix_rt::time::sleep(plan.at).await;
    let (done, stopped) = tokio::sync::oneshot::channel();
    loss.stop_primary.send(done).await.map_err(|_| "the main thread is gone")?;
    stopped.await.map_err(|_| "the primary region was not stopped")?;
    let lost_at = Instant::now();
    let mut best: Option<(u64, String)> = None;
    for endpoint in &loss.dr_endpoints {
        let node = Http::unrecorded(endpoint);
        let reply = node.call(&Req::get("/v1/admin/failover/preview").bearer(token)).await?;
        let applied = reply.u64_field("applied_index").ok_or_else(|| format!("preview: {}", reply.describe()))?;
        if best.as_ref().is_none_or(|(most, _)| applied > *most) {
            best = Some((applied, endpoint.clone()));
        }
    }
    let (_, promoted) = best.ok_or("no DR node to promote")?;
    let promoted = Http::unrecorded(&promoted);
    let body = json!({ "to": "dr", "force": true });
    let started = promoted.call(&Req::post("/v1/admin/failover", Some(body)).bearer(token)).await?;
    if started.status != 202 {
        return Err(format!("forcing the failover: {}", started.describe()));
    }
    // The failover's timeline starts about now.
    let ordered_ms = lost_at.elapsed().as_millis() as u64;
    let id = started.u64_field("id").ok_or("the failover has no id")?;
    let report = follow_drill(&promoted, token, id, DRILL_SLACK).await?;
    let resumed = report
        .timeline
        .iter()
        .find(|event| event.what.starts_with("checkout works"))
        .map(|event| event.at_ms)
        .ok_or_else(|| format!("checkout never worked after the failover: {:?}", report.failure))?;
    Ok(FailoverFinding { unavailable_ms: ordered_ms + resumed, report })
}

/// Waits until `plan.at`, then has a node outside the leader's zone run the
/// zone-loss drill on that zone, and follows it to its final report.
async fn zone_loss_drill(operator: &Http, token: &str, plan: DrillPlan) -> Result<DrillReport, String> {
    actix_rt::time::sleep(plan.at).await;
    let status = operator.call(&Req::get("/v1/cluster").bearer(token)).await?;
    if status.status != 200 {
        return Err(format!("GET /v1/cluster: {}", status.describe()));
    }
    let nodes = status.body["nodes"].as_array().cloned().unwrap_or_default();
    let leader =
        nodes.iter().find_map(|node| node["status"]["groups"][0]["leader"].as_u64()).ok_or("no node knows a leader")?;
    let zone_of = |id: u64| nodes.iter().find(|n| n["id"] == id).and_then(|n| n["zone"].as_str()).map(str::to_string);
    // The leader's zone is the worst case; a tiebreaker leader loses nothing
    // with zone a, so cut zone a then.
    let zone = zone_of(leader).filter(|zone| zone == "a" || zone == "b").unwrap_or_else(|| "a".to_string());
    let coordinator = nodes
        .iter()
        .find(|n| n["region"] == "primary" && n["zone"] != zone.as_str())
        .and_then(|n| n["api"].as_str())
        .map(|api| format!("http://{api}"))
        .ok_or("no primary node outside the zone")?;
    let coordinator = Http::unrecorded(&coordinator);
    let body = json!({ "zone": zone, "isolate_for_ms": plan.isolate_for.as_millis() as u64 });
    let started = coordinator.call(&Req::post("/v1/admin/drills/zone-loss", Some(body)).bearer(token)).await?;
    if started.status != 202 {
        return Err(format!("starting the drill: {}", started.describe()));
    }
    let id = started.u64_field("id").ok_or("the drill has no id")?;
    follow_drill(&coordinator, token, id, plan.isolate_for + DRILL_SLACK).await
}

/// Has the group's leader move writes to `region`, and follows the
/// switchover to its final report.
async fn switchover(operator: &Http, token: &str, region: &str) -> Result<DrillReport, String> {
    let status = operator.call(&Req::get("/v1/cluster").bearer(token)).await?;
    let nodes = status.body["nodes"].as_array().cloned().unwrap_or_default();
    let leader = nodes
        .iter()
        .find(|node| node["status"]["groups"][0]["role"] == "leader")
        .and_then(|node| node["api"].as_str())
        .map(|api| Http::unrecorded(&format!("http://{api}")))
        .ok_or("no node says it leads")?;
    let started = leader.call(&Req::post("/v1/admin/switchover", Some(json!({ "to": region }))).bearer(token)).await?;
    if started.status != 202 {
        return Err(format!("starting the switchover to {region}: {}", started.describe()));
    }
    let id = started.u64_field("id").ok_or("the switchover has no id")?;
    follow_drill(&leader, token, id, DRILL_SLACK).await
}

/// Reads drill `id`'s report until it is no longer running, for up to `within`.
async fn follow_drill(coordinator: &Http, token: &str, id: u64, within: Duration) -> Result<DrillReport, String> {
    let deadline = Instant::now() + within;
    loop {
        actix_rt::time::sleep(DRILL_POLL).await;
        let reply = coordinator.call(&Req::get(format!("/v1/admin/drills/{id}")).bearer(token)).await?;
        let report: DrillReport =
            serde_json::from_value(reply.body.clone()).map_err(|e| format!("unreadable drill report: {e}"))?;
        if report.state != "running" {
            return Ok(report);
        }
        if Instant::now() > deadline {
            return Err(format!("drill {id} still running after {within:?}"));
        }
    }
}

async fn create_sales(operator: &Http, setup: &Setup) -> anyhow::Result<()> {
    let now = crowd::now_ms();
    let mut sales = vec![json!({
        "sku": setup.plan.hot_sku, "name": "Limited sneaker drop", "price_minor": 12_900,
        "stock": setup.hot_stock, "limit_per_shopper": setup.plan.hot_limit,
        "starts_at_ms": now - 1000, "ends_at_ms": now + 3_600_000,
    })];
    for (sku, name, price_minor) in COLD_SKUS {
        sales.push(json!({
            "sku": sku, "name": name, "price_minor": price_minor,
            "stock": setup.hot_stock, "limit_per_shopper": 0,
            "starts_at_ms": now - 1000, "ends_at_ms": now + 3_600_000,
        }));
    }
    for sale in sales {
        let req = Req::post("/v1/sales", Some(sale.clone())).bearer(&setup.operator_token);
        let reply = operator.call(&req).await.map_err(anyhow::Error::msg).context("create a sale")?;
        if reply.status != 201 {
            bail!("create sale {}: {}", sale["sku"], reply.describe());
        }
    }
    Ok(())
}

async fn read_stock(http: &Http, sku: &str) -> anyhow::Result<StockRead> {
    let reply = http.call(&Req::get(format!("/v1/skus/{sku}"))).await.map_err(anyhow::Error::msg)?;
    if reply.status != 200 {
        bail!("GET /v1/skus/{sku}: {}", reply.describe());
    }
    StockRead::from_reply(&reply).with_context(|| format!("unreadable SKU: {}", reply.body))
}

/// Polls until no SKU has units held; false if that did not happen in time.
async fn wait_for_expiry(http: &Http, skus: &[String], bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        let mut held = false;
        for sku in skus {
            // An unreadable SKU counts as held: the wait must not pass on a
            // failure to look.
            held |= read_stock(http, sku).await.map_or(true, |read| read.held > 0);
        }
        if !held {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        actix_rt::time::sleep(EXPIRY_POLL).await;
    }
}

/// What reading every acknowledged order back showed.
#[derive(Debug, Default)]
struct Audit {
    /// Orders read back.
    checked: u64,
    /// Acknowledged orders that are gone (404) or whose acknowledged state
    /// was undone (paid or cancelled, and now something else), with why.
    lost: Vec<(u64, String)>,
    /// Orders in a state the shopper never asked for, or with other lines.
    anomalies: Vec<(u64, String)>,
    /// Orders that could not be read (no answer, or an unexpected status).
    unverified: Vec<(u64, String)>,
    /// Orders by the status read back.
    statuses: BTreeMap<String, u64>,
    /// Units per SKU in orders read back as paid.
    paid_units: BTreeMap<String, u64>,
    /// Units per SKU in orders read back as still pending payment.
    pending_units: BTreeMap<String, u64>,
    /// Paid units of the hot SKU per shopper.
    hot_paid_by_shopper: BTreeMap<usize, u64>,
}

/// Reads every acknowledged order back with its shopper's token.
async fn audit(endpoints: &[String], ledger: &[Acked]) -> Audit {
    let next = std::cell::Cell::new(0);
    let audit = std::cell::RefCell::new(Audit::default());
    let workers = (0..AUDIT_CONCURRENCY).map(|worker| {
        let http = Http::spread(endpoints, worker, Default::default());
        let (next, audit) = (&next, &audit);
        async move {
            while let Some(acked) = ledger.get(next.get()) {
                next.set(next.get() + 1);
                let req = Req::get(format!("/v1/orders/{}", acked.order_id)).bearer(&acked.token);
                // No answer moves the client to the next endpoint: try each
                // (some may be down for good after a region's loss).
                let mut result = http.call(&req).await;
                for _ in 1..endpoints.len() {
                    if result.is_ok() {
                        break;
                    }
                    result = http.call(&req).await;
                }
                audit.borrow_mut().record(acked, result);
            }
        }
    });
    futures::future::join_all(workers).await;
    audit.into_inner()
}

impl Audit {
    /// Moves the lost and unreadable orders that a forced failover's report
    /// names (as maybe lost, or with their payment in doubt) out of those
    /// lists, and returns their ids: they are reported, for an operator to
    /// settle. What stays in `lost` the failover lost without saying so.
    fn settle_failover(&mut self, report: &DrillReport) -> Vec<u64> {
        let Some(cost) = &report.failover else { return Vec::new() };
        let mut reported = Vec::new();
        for list in [&mut self.lost, &mut self.unverified] {
            list.retain(|(id, _)| {
                let keep = !cost.names(*id);
                if !keep {
                    reported.push(*id);
                }
                keep
            });
        }
        reported.sort_unstable();
        reported
    }

    fn record(&mut self, acked: &Acked, result: Result<crowd::Reply, String>) {
        let id = acked.order_id;
        let reply = match result {
            Ok(reply) => reply,
            Err(error) => return self.unverified.push((id, error)),
        };
        match reply.status {
            200 => {}
            404 => return self.lost.push((id, format!("acknowledged {:?}, now 404", acked.status))),
            _ => return self.unverified.push((id, reply.describe())),
        }
        self.checked += 1;
        let Some(crowd::Placed { status, items, .. }) = crowd::Placed::from_reply(&reply) else {
            return self.unverified.push((id, format!("unreadable order: {}", reply.body)));
        };
        *self.statuses.entry(status.clone()).or_default() += 1;
        if items != acked.items {
            self.anomalies.push((id, format!("acknowledged with {:?}, now has {items:?}", acked.items)));
        }
        let units = match status.as_str() {
            "paid" => Some(&mut self.paid_units),
            "pending_payment" => Some(&mut self.pending_units),
            _ => None,
        };
        if let Some(units) = units {
            for (sku, qty) in &items {
                *units.entry(sku.clone()).or_default() += u64::from(*qty);
            }
        }
        if status == "paid" {
            let hot: u64 = items.iter().filter(|(sku, _)| sku == HOT_SKU).map(|(_, qty)| u64::from(*qty)).sum();
            *self.hot_paid_by_shopper.entry(acked.shopper).or_default() += hot;
        }
        let fine = match (acked.status, status.as_str()) {
            (AckedStatus::Paid, "paid") | (AckedStatus::Cancelled, "cancelled") => true,
            (AckedStatus::Paid | AckedStatus::Cancelled, now) => {
                return self.lost.push((id, format!("acknowledged {:?}, now {now}", acked.status)));
            }
            (AckedStatus::PendingPayment, "pending_payment" | "expired") => true,
            (AckedStatus::PendingPayment, "paid") => acked.pay_attempted,
            (AckedStatus::PendingPayment, "cancelled") => acked.cancel_attempted,
            (AckedStatus::PendingPayment, _) => false,
        };
        if !fine {
            self.anomalies.push((id, format!("acknowledged pending, now {status} though never asked to be")));
        }
    }
}

/// One pass/fail line of the summary.
#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    pass: bool,
    detail: String,
}

/// One SKU in the summary.
#[derive(Debug, Serialize)]
struct SkuSummary {
    #[serde(flatten)]
    stock: StockRead,
    /// Units in orders the audit read back as paid: must equal `sold`.
    paid_in_orders: u64,
}

/// The demo's outcome, printed and optionally written as JSON.
#[derive(Debug, Serialize)]
struct Summary {
    pass: bool,
    /// `cluster` (five voters in two zones and a tiebreaker, and a DR
    /// replica) or `single`.
    topology: &'static str,
    /// The endpoints shoppers used.
    endpoints: Vec<String>,
    seed: u64,
    shoppers: usize,
    concurrency: usize,
    hold_ms: u64,
    crowd_seconds: f64,
    /// Units of all SKUs on sale (the hot SKU's are in `skus`).
    stock_total: u64,
    units_sold: u64,
    units_held: u64,
    units_available: u64,
    orders_placed: u64,
    orders_paid: u64,
    orders_cancelled: u64,
    orders_expired: u64,
    orders_pending: u64,
    /// Units sold or held beyond stock, worst over every read of every SKU
    /// during and after the sale.
    oversell: u64,
    /// Acknowledged orders the node no longer has (or whose acknowledged
    /// paid/cancelled state was undone).
    lost_acknowledged: u64,
    lost_order_ids: Vec<u64>,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    throughput_per_s: f64,
    transport_errors: u64,
    overload_retries: u64,
    /// Times a shopper's client moved to another endpoint.
    failovers: u64,
    /// How long checkout was unavailable during the zone-loss drill: the
    /// longest stretch from the start of a failed probe checkout to the end
    /// of the next successful one, the rejoin after the heal included
    /// (cluster only).
    zone_loss_unavailable_ms: Option<u64>,
    /// The zone-loss drill's report (cluster only).
    zone_loss_drill: Option<DrillReport>,
    /// How long checkout was unavailable during the switchover to the DR
    /// region, and during the failback (cluster only).
    switchover_unavailable_ms: Option<u64>,
    /// See `switchover_unavailable_ms`.
    failback_unavailable_ms: Option<u64>,
    /// The switchover's and the failback's reports.
    switchovers: Vec<DrillReport>,
    /// The DR replica's copy after the sale (cluster only).
    dr_copy: Option<DrCopy>,
    /// With `--drill region-failover`: how long checkout was unavailable,
    /// from the moment the primary region stopped to the first checkout the
    /// promoted DR region acknowledged (the failover ordered at once).
    failover_unavailable_ms: Option<u64>,
    /// Acknowledged orders the promoted copy lacks (or has in an earlier
    /// state), every one of them named in the failover's report: for an
    /// operator to settle. `lost_acknowledged` counts those it did not name.
    lost_acknowledged_reported: Option<u64>,
    /// Their ids.
    reported_order_ids: Vec<u64>,
    /// The forced failover's report.
    failover: Option<DrillReport>,
    requests_by_status: BTreeMap<u16, u64>,
    crowd: crowd::Counters,
    watch: crowd::Watch,
    skus: Vec<SkuSummary>,
    checks: Vec<Check>,
    unexpected_samples: Vec<String>,
    #[serde(skip)]
    expiry_wait: Duration,
    #[serde(skip)]
    hot_limit: u32,
    #[serde(skip)]
    audit_notes: Vec<String>,
}

impl Summary {
    fn new(args: &DemoArgs, seed: u64, hold_ms: u64, endpoints: &[String], findings: Findings) -> Summary {
        let Findings { crowd, holds_released, expiry_wait, stock, mut audit, drill, switchovers, dr_copy, failover } =
            findings;
        let reported = failover.as_ref().and_then(|f| f.as_ref().ok()).map(|f| audit.settle_failover(&f.report));
        let latency = crowd.stats.latency();
        let crowd_seconds = crowd.wall.as_secs_f64();
        let requests = crowd.stats.requests();
        let sum = |field: fn(&StockRead) -> u64| stock.iter().map(field).sum::<u64>();
        let final_oversell = stock.iter().map(StockRead::oversell).max().unwrap_or(0);
        let oversell = final_oversell.max(crowd.watch.oversell_max);
        let status_count = |status: &str| audit.statuses.get(status).copied().unwrap_or(0);

        let skus: Vec<SkuSummary> = stock
            .iter()
            .map(|read| SkuSummary {
                stock: read.clone(),
                paid_in_orders: audit.paid_units.get(&read.sku).copied().unwrap_or(0),
            })
            .collect();
        let sold_mismatches: Vec<String> = skus
            .iter()
            .filter(|s| s.paid_in_orders != s.stock.sold)
            .map(|s| format!("{}: sold {} but paid orders hold {}", s.stock.sku, s.stock.sold, s.paid_in_orders))
            .collect();
        let still_held: Vec<String> = stock
            .iter()
            .filter(|read| read.held > 0)
            .map(|read| format!("{} held {}", read.sku, read.held))
            .chain(audit.pending_units.iter().map(|(sku, units)| format!("{units} units of {sku} in pending orders")))
            .collect();
        let conservation_breaks =
            crowd.watch.conservation_violations + stock.iter().filter(|r| !r.conserved()).count() as u64;
        let over_limit = if args.limit == 0 {
            0
        } else {
            audit.hot_paid_by_shopper.values().filter(|&&units| units > u64::from(args.limit)).count() as u64
        };
        let lost_acknowledged = audit.lost.len() as u64;
        // After a forced failover, an answer about an order its report names
        // (the promoted copy never heard of it, or of its payment) is what
        // the report said would happen.
        let cost = failover.as_ref().and_then(|f| f.as_ref().ok()).and_then(|f| f.report.failover.as_ref());
        let orders = crowd.unexpected_orders.iter().filter(|id| cost.is_some_and(|cost| cost.names(**id)));
        let sessions = crowd.unexpected_sessions.iter().filter(|id| cost.is_some_and(|cost| cost.names_session(**id)));
        let explained = (orders.count() + sessions.count()) as u64;
        let unexpected = crowd.counters.unexpected - explained;
        // A limit probe counted without an earlier order the failover named.
        let limit_explained = crowd.limit_passes.iter().filter(|id| cost.is_some_and(|cost| cost.names(**id))).count();
        let limit_violations = crowd.counters.limit_violations - limit_explained as u64;

        let mut checks = vec![
            Check {
                name: "no oversell",
                pass: oversell == 0,
                detail: format!(
                    "oversell = {oversell} (sold + held - total, worst of {} reads during the sale and the final ones)",
                    crowd.watch.reads
                ),
            },
            Check {
                name: "no lost acknowledgement",
                pass: lost_acknowledged == 0,
                detail: format!(
                    "lost_acknowledged = {lost_acknowledged} of {} acknowledged orders read back",
                    crowd.ledger.len()
                ),
            },
            Check {
                name: "sold units match paid orders",
                pass: sold_mismatches.is_empty(),
                detail: if sold_mismatches.is_empty() {
                    "every SKU's sold equals the units in orders read back as paid".to_string()
                } else {
                    sold_mismatches.join("; ")
                },
            },
            Check {
                name: "conservation",
                pass: conservation_breaks == 0,
                detail: format!("available + held + sold + unsettled != total in {conservation_breaks} reads"),
            },
            Check {
                name: "holds expire",
                pass: holds_released && still_held.is_empty(),
                detail: if still_held.is_empty() && holds_released {
                    format!("held = 0 everywhere {:.1} s after the crowd left", expiry_wait.as_secs_f64())
                } else {
                    format!(
                        "after {:.1} s: {}",
                        expiry_wait.as_secs_f64(),
                        if still_held.is_empty() { "stock unreadable".to_string() } else { still_held.join(", ") }
                    )
                },
            },
            Check {
                name: "idempotency",
                pass: crowd.counters.replay_mismatches == 0,
                detail: format!(
                    "{} checkouts sent again with the same key ({} at once), {} answered differently",
                    crowd.counters.replays_checked, crowd.counters.double_submits, crowd.counters.replay_mismatches
                ),
            },
            Check {
                name: "per-shopper limit",
                pass: limit_violations == 0 && over_limit == 0,
                detail: format!(
                    "{} tries past the limit, {limit_violations} accepted{}; {over_limit} shoppers paid for more than {}",
                    crowd.counters.limit_probes,
                    if limit_explained > 0 {
                        format!(" (and {limit_explained} after an order the failover reported)")
                    } else {
                        String::new()
                    },
                    args.limit
                ),
            },
            Check {
                name: "answers as documented",
                pass: unexpected == 0 && audit.anomalies.is_empty() && audit.unverified.is_empty(),
                detail: format!(
                    "{unexpected} unexpected answers during the sale{}, {} odd orders and {} unreadable ones in the audit",
                    if explained > 0 {
                        format!(" (and {explained} about orders or sessions the failover reported)")
                    } else {
                        String::new()
                    },
                    audit.anomalies.len(),
                    audit.unverified.len()
                ),
            },
        ];
        if let Some(drill) = &drill {
            checks.push(drill_check("zone-loss drill", drill));
        }
        for (name, report) in &switchovers {
            checks.push(drill_check(name, report));
        }
        if let Some(failover) = &failover {
            checks.push(failover_check(failover, reported.as_ref(), &crowd.ledger));
        }
        let unavailable = |name: &str| {
            switchovers
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, r)| r.as_ref().ok())
                .map(|r| r.checkout_unavailable_ms)
        };
        if let Some(copy) = &dr_copy {
            checks.push(Check {
                name: "DR copy",
                pass: copy.matched_after_ms.is_some(),
                detail: match copy.matched_after_ms {
                    // After a switchover and failback, the DR node that led may
                    // stay on as a voter: then it reads linearizably, unmarked.
                    Some(ms) => format!(
                        "the DR replica's copy matched the primary on every SKU {ms} ms after the final reads ({})",
                        copy.stale_ms.map_or("it votes now, so it read linearizably".into(), |ms| format!(
                            "it declared itself at most {ms} ms stale"
                        ))
                    ),
                    None => format!("after {DR_COPY_WAIT:?}: {}", copy.differences.join("; ")),
                },
            });
        }
        let audit_notes = audit
            .lost
            .iter()
            .map(|(id, why)| format!("lost order {id}: {why}"))
            .chain(audit.anomalies.iter().map(|(id, why)| format!("odd order {id}: {why}")))
            .chain(audit.unverified.iter().map(|(id, why)| format!("unreadable order {id}: {why}")))
            .take(20)
            .collect();

        Summary {
            pass: checks.iter().all(|check| check.pass),
            topology: if args.single { "single" } else { "cluster" },
            endpoints: endpoints.to_vec(),
            seed,
            shoppers: args.shoppers,
            concurrency: args.concurrency,
            hold_ms,
            crowd_seconds,
            stock_total: sum(|r| r.total),
            units_sold: sum(|r| r.sold),
            units_held: sum(|r| r.held),
            units_available: sum(|r| r.available),
            orders_placed: crowd.ledger.len() as u64,
            orders_paid: status_count("paid"),
            orders_cancelled: status_count("cancelled"),
            orders_expired: status_count("expired"),
            orders_pending: status_count("pending_payment"),
            oversell,
            lost_acknowledged,
            lost_order_ids: audit.lost.iter().map(|(id, _)| *id).collect(),
            requests,
            p50_ms: latency.p50_ms,
            p99_ms: latency.p99_ms,
            p999_ms: latency.p999_ms,
            max_ms: latency.max_ms,
            throughput_per_s: if crowd_seconds > 0.0 { requests as f64 / crowd_seconds } else { 0.0 },
            transport_errors: crowd.stats.transport_errors,
            overload_retries: crowd.stats.overload_retries,
            failovers: crowd.stats.failovers,
            zone_loss_unavailable_ms: drill.as_ref().and_then(|d| d.as_ref().ok()).map(|r| r.checkout_unavailable_ms),
            zone_loss_drill: drill.and_then(Result::ok),
            switchover_unavailable_ms: unavailable("switchover"),
            failback_unavailable_ms: unavailable("failback"),
            switchovers: switchovers.into_iter().filter_map(|(_, report)| report.ok()).collect(),
            dr_copy,
            failover_unavailable_ms: failover.as_ref().and_then(|f| f.as_ref().ok()).map(|f| f.unavailable_ms),
            lost_acknowledged_reported: reported.as_ref().map(|ids| ids.len() as u64),
            reported_order_ids: reported.unwrap_or_default(),
            failover: failover.and_then(Result::ok).map(|f| f.report),
            requests_by_status: crowd.stats.by_status.clone(),
            crowd: crowd.counters,
            watch: crowd.watch,
            skus,
            checks,
            unexpected_samples: crowd.unexpected_samples,
            expiry_wait,
            hot_limit: args.limit,
            audit_notes,
        }
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.crowd;
        let mut out = String::new();
        let _ = writeln!(out);
        let _ = writeln!(out, "What happened ({:.1} s, seed {})", self.crowd_seconds, self.seed);
        let _ = writeln!(
            out,
            "  {} of {} shoppers came; {} checkouts ({} came back after \"sold out\")",
            c.shoppers_served, self.shoppers, c.checkouts, c.came_back
        );
        let _ = writeln!(
            out,
            "  {} orders placed: {} paid, {} cancelled, {} expired unpaid, {} still pending",
            self.orders_placed, self.orders_paid, self.orders_cancelled, self.orders_expired, self.orders_pending
        );
        let _ = writeln!(
            out,
            "  refused: {} sold out, {} over the limit of {}, {} sale closed",
            c.refused_sold_out, c.refused_limit, self.hot_limit, c.refused_sale_closed
        );
        let _ = writeln!(
            out,
            "  payments: {} approved ({} after a declined card), {} too late (hold expired); \
             {} cancelled, {} cancels too late; {} walked away",
            c.payments_approved, c.payments_declined, c.payments_too_late, c.cancels, c.cancels_too_late, c.abandoned
        );
        let _ = writeln!(
            out,
            "  {} checkouts re-sent with the same key ({} as double clicks); {} tries past the limit \
             ({} refused as over the limit, the rest as sold out)",
            c.replays_checked, c.double_submits, c.limit_probes, c.limit_probes_refused
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "Stock after every hold expired (waited {:.1} s)", self.expiry_wait.as_secs_f64());
        let _ = writeln!(
            out,
            "  {:<12} {:>7} {:>7} {:>7} {:>10} {:>10} {:>15}",
            "sku", "total", "sold", "held", "available", "unsettled", "paid in orders"
        );
        for sku in &self.skus {
            let s = &sku.stock;
            let _ = writeln!(
                out,
                "  {:<12} {:>7} {:>7} {:>7} {:>10} {:>10} {:>15}",
                s.sku, s.total, s.sold, s.held, s.available, s.unsettled, sku.paid_in_orders
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Requests: {} in {:.1} s = {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; \
             {} overload retries, {} without an answer",
            self.requests,
            self.crowd_seconds,
            self.throughput_per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.overload_retries,
            self.transport_errors
        );
        let statuses: Vec<String> = self.requests_by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let _ = writeln!(out, "  by status: {}", statuses.join(", "));
        if self.endpoints.len() > 1 {
            let _ = writeln!(
                out,
                "  {} endpoints; clients moved to another endpoint {} times",
                self.endpoints.len(),
                self.failovers
            );
        }
        if let Some(drill) = &self.zone_loss_drill {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "Zone-loss drill {} on zone {} (nodes {:?}), coordinated by node {}",
                drill.id, drill.zone, drill.nodes, drill.coordinator
            );
            for event in &drill.timeline {
                let _ = writeln!(out, "  {:>7} ms  {}", event.at_ms, event.what);
            }
            let _ = writeln!(
                out,
                "  zone_loss_unavailable_ms = {} (longest outage; {} ms in all)",
                drill.checkout_unavailable_ms, drill.checkout_unavailable_total_ms
            );
        }
        for report in &self.switchovers {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "Switchover {} to region {}, voters after it {:?}, coordinated by node {}",
                report.id,
                report.region.as_deref().unwrap_or("?"),
                report.nodes,
                report.coordinator
            );
            for event in &report.timeline {
                let _ = writeln!(out, "  {:>7} ms  {}", event.at_ms, event.what);
            }
        }
        if let Some(report) = &self.failover {
            let _ = writeln!(out);
            let _ =
                writeln!(out, "Region failover {} to region dr, from node {}'s copy", report.id, report.coordinator);
            for event in &report.timeline {
                let _ = writeln!(out, "  {:>7} ms  {}", event.at_ms, event.what);
            }
            let _ = writeln!(
                out,
                "  failover_unavailable_ms = {} (from the primary region's loss), lost_acknowledged_reported = {}",
                self.failover_unavailable_ms.unwrap_or_default(),
                self.lost_acknowledged_reported.unwrap_or_default()
            );
        }
        if let (Some(there), Some(back)) = (self.switchover_unavailable_ms, self.failback_unavailable_ms) {
            let _ = writeln!(out, "  switchover_unavailable_ms = {there}, failback_unavailable_ms = {back}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Checks");
        for check in &self.checks {
            let _ =
                writeln!(out, "  {}  {:<30} {}", if check.pass { "PASS" } else { "FAIL" }, check.name, check.detail);
        }
        for sample in &self.unexpected_samples {
            let _ = writeln!(out, "  unexpected: {sample}");
        }
        for note in &self.audit_notes {
            let _ = writeln!(out, "  {note}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}",
            match (self.pass, self.lost_acknowledged_reported) {
                (false, _) => "DEMO FAILED".to_string(),
                (true, Some(reported)) => format!(
                    "Demo passed: nothing oversold; {reported} acknowledged orders lost or in doubt in the failover, \
                     every one of them reported."
                ),
                (true, None) => "Demo passed: nothing oversold, nothing acknowledged lost.".to_string(),
            }
        );
        out
    }
}

/// A drill passes if it ran to the end, every node caught up (for a
/// switchover: the target region had every entry), and no acknowledged
/// probe order was lost or unit oversold.
fn drill_check(name: &'static str, drill: &Result<DrillReport, String>) -> Check {
    let report = match drill {
        Err(why) => return Check { name, pass: false, detail: why.clone() },
        Ok(report) => report,
    };
    let state = format!("{}{}", report.state, report.failure.as_ref().map_or(String::new(), |why| format!(" ({why})")));
    let what = match &report.region {
        Some(region) => format!(
            "to region {region}: {state}; writes refused {} ms",
            report.frozen_ms.map_or("?".into(), |ms| ms.to_string())
        ),
        None => format!("zone {} cut off for {} ms: {state}", report.zone, report.isolated_for_ms),
    };
    let caught_up = match (&report.region, report.caught_up_ms) {
        (_, None) => "; never caught up".to_string(),
        (Some(_), Some(_)) => String::new(),
        (None, Some(ms)) => format!("; caught up {ms} ms after the heal"),
    };
    Check {
        name,
        pass: report.state == "completed"
            && report.orders_lost.is_empty()
            && report.oversold_units == 0
            && report.caught_up_ms.is_some(),
        detail: format!(
            "{what}; checkout unavailable {} ms; {} probe orders, {} lost; {} oversold{caught_up}",
            report.checkout_unavailable_ms,
            report.orders_acknowledged,
            report.orders_lost.len(),
            report.oversold_units,
        ),
    }
}

/// A forced failover passes if it completed with its probe orders intact,
/// and the acknowledged orders it lost fit in the units it took out of
/// sale: neither region sold a unit the other did.
fn failover_check(failover: &Result<FailoverFinding, String>, reported: Option<&Vec<u64>>, ledger: &[Acked]) -> Check {
    let name = "region failover";
    let finding = match failover {
        Err(why) => return Check { name, pass: false, detail: why.clone() },
        Ok(finding) => finding,
    };
    let report = &finding.report;
    let Some(cost) = &report.failover else {
        return Check { name, pass: false, detail: format!("no cost in the report: {:?}", report.failure) };
    };
    let lost_range = cost.orders_maybe_lost_from..cost.orders_maybe_lost_to;
    let reported = reported.map(Vec::as_slice).unwrap_or_default();
    let mut lost_units: BTreeMap<&str, u64> = BTreeMap::new();
    for acked in
        ledger.iter().filter(|acked| lost_range.contains(&acked.order_id) && reported.contains(&acked.order_id))
    {
        for (sku, qty) in &acked.items {
            *lost_units.entry(sku.as_str()).or_default() += u64::from(*qty);
        }
    }
    let oversold: Vec<String> = lost_units
        .iter()
        .filter(|(sku, units)| **units > cost.unsettled.get(**sku).copied().unwrap_or(0))
        .map(|(sku, units)| {
            format!(
                "{sku}: {units} units in lost orders, {} out of sale",
                cost.unsettled.get(*sku).copied().unwrap_or(0)
            )
        })
        .collect();
    Check {
        name,
        pass: report.state == "completed"
            && report.orders_lost.is_empty()
            && report.oversold_units == 0
            && oversold.is_empty(),
        detail: format!(
            "{}; checkout unavailable {} ms from the region's loss; {} acknowledged orders reported lost or in doubt, \
             their units within the {} taken out of sale{}",
            report.state,
            finding.unavailable_ms,
            reported.len(),
            cost.undersell_units,
            if oversold.is_empty() { String::new() } else { format!(": {}", oversold.join("; ")) }
        ),
    }
}

fn write_json(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(summary).context("encode the summary")?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("write the summary to {}", path.display()))
}

fn explore_text(endpoints: &[String], operator_token: &str) -> String {
    let url = &endpoints[0];
    let mut text = format!(
        "\nSurge stays up — explore it (Ctrl-C stops it and deletes its data):\n\
         \x20 curl -s {url}/v1/skus/{HOT_SKU}\n\
         \x20 TOKEN=$(curl -s -X POST {url}/v1/sessions -H 'content-type: application/json' -d '{{\"shopper\":\"me\"}}' \\\n\
         \x20      | sed 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/')\n\
         \x20 curl -s -X POST {url}/v1/checkout -H \"Authorization: Bearer $TOKEN\" -H 'Idempotency-Key: try-1' \\\n\
         \x20      -H 'content-type: application/json' -d '{{\"items\":[{{\"sku\":\"{HOT_SKU}\",\"qty\":1}}]}}'\n\
         \x20 operator token: {operator_token}\n\
         \x20 curl -s -X POST {url}/v1/skus/{HOT_SKU}/restock -H 'Authorization: Bearer {operator_token}' \\\n\
         \x20      -H 'Idempotency-Key: restock-1' -H 'content-type: application/json' -d '{{\"units\":100}}'\n\
         \x20 also: {url}/openapi.json  {url}/metrics  {url}/v1/cluster (operator)"
    );
    if endpoints.len() > 1 {
        text.push_str(&format!(
            "\n  every node answers: {}\n\
             \x20 export SURGE_ENDPOINT={} SURGE_OPERATOR_TOKEN={operator_token}\n\
             \x20 surge ctl status\n\
             \x20 surge ctl drill zone-loss --zone a --for 5",
            endpoints.join(" "),
            endpoints[endpoints.len() - 1],
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crowd::Reply;
    use serde_json::Value;

    fn acked(status: AckedStatus, pay_attempted: bool, cancel_attempted: bool) -> Acked {
        Acked {
            order_id: 7,
            shopper: 3,
            token: "t".into(),
            items: vec![(HOT_SKU.to_string(), 2)],
            status,
            pay_attempted,
            cancel_attempted,
        }
    }

    fn order(http_status: u16, status: &str, qty: u32) -> Result<Reply, String> {
        let body = json!({ "order_id": 7, "status": status, "items": [{ "sku": HOT_SKU, "qty": qty }] });
        Ok(Reply { status: http_status, body, replayed: false, retry_after_s: None, stale_ms: None })
    }

    /// (what the shopper was told, what the node says now) -> (lost, odd, unreadable)
    fn check(acked: Acked, now: Result<Reply, String>, expected: (usize, usize, usize)) {
        let mut audit = Audit::default();
        audit.record(&acked, now);
        let got = (audit.lost.len(), audit.anomalies.len(), audit.unverified.len());
        assert_eq!(got, expected, "{acked:?}: {audit:?}");
    }

    #[test]
    fn audit_classifies_orders() {
        use AckedStatus::*;
        // Fine.
        check(acked(Paid, true, false), order(200, "paid", 2), (0, 0, 0));
        check(acked(Cancelled, false, true), order(200, "cancelled", 2), (0, 0, 0));
        check(acked(PendingPayment, false, false), order(200, "expired", 2), (0, 0, 0));
        check(acked(PendingPayment, true, false), order(200, "paid", 2), (0, 0, 0));
        check(acked(PendingPayment, false, true), order(200, "cancelled", 2), (0, 0, 0));
        // Lost: gone, or an acknowledged outcome undone.
        check(acked(PendingPayment, false, false), order(404, "", 0), (1, 0, 0));
        check(acked(Paid, true, false), order(200, "expired", 2), (1, 0, 0));
        check(acked(Cancelled, false, true), order(200, "pending_payment", 2), (1, 0, 0));
        // Odd: a state nobody asked for, or other lines.
        check(acked(PendingPayment, false, false), order(200, "paid", 2), (0, 1, 0));
        check(acked(PendingPayment, false, false), order(200, "cancelled", 2), (0, 1, 0));
        check(acked(PendingPayment, false, false), order(200, "expired", 1), (0, 1, 0));
        // Unreadable: no proof either way.
        check(acked(Paid, true, false), Err("timed out".into()), (0, 0, 1));
        check(acked(Paid, true, false), order(500, "", 0), (0, 0, 1));
        let garbled = Reply { status: 200, body: Value::Null, replayed: false, retry_after_s: None, stale_ms: None };
        check(acked(Paid, true, false), Ok(garbled), (0, 0, 1));
    }

    #[test]
    fn audit_counts_paid_units_per_sku_and_shopper() {
        let mut audit = Audit::default();
        audit.record(&acked(AckedStatus::Paid, true, false), order(200, "paid", 2));
        audit.record(&acked(AckedStatus::PendingPayment, false, false), order(200, "pending_payment", 2));
        assert_eq!(audit.paid_units.get(HOT_SKU), Some(&2));
        assert_eq!(audit.pending_units.get(HOT_SKU), Some(&2));
        assert_eq!(audit.hot_paid_by_shopper.get(&3), Some(&2));
    }
}
