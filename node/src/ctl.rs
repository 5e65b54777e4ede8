//! `surge ctl`: the operator's view of a running cluster, through any node's
//! public API (operator token).

use std::time::Duration;

use anyhow::{bail, Context as _};
use cluster::{DrillReport, FailoverPreview, GroupStatus};
use serde_json::{json, Value};

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running drill's report is read.
const DRILL_POLL: Duration = Duration::from_millis(500);

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Base URL of any node's public API.
    #[arg(long, env = "SURGE_ENDPOINT", default_value = "http://127.0.0.1:8080", global = true)]
    endpoint: String,
    /// A CA certificate (PEM) to trust for an `https://` endpoint, e.g. the
    /// `ca.pem` of `surge certs`.
    #[arg(long, env = "SURGE_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// The operator bearer token.
    #[arg(
        long,
        env = "SURGE_OPERATOR_TOKEN",
        default_value = "dev-operator-token",
        global = true,
        hide_default_value = true
    )]
    token: String,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// Regions, zones and nodes, and each group's leader, term, commit index
    /// and follower lag, as the endpoint's node sees them.
    Status {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a drill and report what it cost.
    Drill {
        #[command(subcommand)]
        drill: Drill,
    },
    /// Move the group's leadership to a node (e.g. before maintenance on
    /// the leader's machine). Writes pause for about an election timeout.
    TransferLeader {
        /// The node that should lead.
        #[arg(long)]
        to: u64,
    },
    /// Move writes to another region (planned switchover; failback is a
    /// switchover back). Asks the group's leader, whichever node that is:
    /// writes pause until the region has every entry, its nodes become the
    /// voters, and the old primary's nodes follow as learners. Exits
    /// non-zero if it failed or lost an order.
    Switchover {
        /// The region to take writes, e.g. `dr`.
        #[arg(long)]
        to: String,
        /// Print the final report as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// What an unplanned failover to a region would cost if the region that
    /// takes writes were lost now: asks every node of the region and shows
    /// the most advanced copy's report (units taken out of sale, order ids
    /// that may be lost, payments in doubt). Changes nothing without
    /// `--force`.
    Failover {
        /// The region that would take writes, e.g. `dr`.
        #[arg(long)]
        to: String,
        /// Carry it out: the region that takes writes is lost. Promotes the
        /// most advanced copy in a new generation, which fences the old
        /// primary's nodes. Refused while any of them answers. Exits
        /// non-zero if it failed.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// After a forced failover, when the lost region is back: settle the
    /// orders the two regions disagree on and put back on sale the units
    /// nobody bought (every node of the region must answer), then take its
    /// nodes whose data was wiped (started with `join = true`) back as the
    /// DR copy. Asks the group's leader. Run it again after wiping.
    Failback {
        /// The region the failover lost, e.g. `primary`.
        #[arg(long)]
        from: String,
        /// Nodes of that region whose disks are gone for good: reconcile
        /// without their copies. Orders only they knew go unlisted, and no
        /// unit goes back on sale. Never name a node that is only down.
        #[arg(long, value_name = "IDS", value_delimiter = ',')]
        copies_lost: Vec<u64>,
        /// Print the final report as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// Replace a member whose disk is gone for good (a dead disk, a rebuilt
    /// machine). Asks the group's leader, which removes the node from the
    /// group and adds it back as a learner with nothing acknowledged; start
    /// the node wiped, with `join = true`, and once it has the whole log it
    /// is a voter again if it was one. Refused while the node answers with
    /// a log. Exits non-zero if it failed.
    ReplaceNode {
        /// The node whose data is gone.
        #[arg(long)]
        node: u64,
        /// End as a voter even if the node is a learner now. Without it: what
        /// the latest replacement of the node on record that did not
        /// complete meant it to be, or else what it is now.
        #[arg(long)]
        voter: bool,
        /// Print the final report as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// Every drill on record in the cluster (any node lists them all).
    Drills {
        /// Print the raw JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum Drill {
    /// Cut every node of a zone off from the cluster for a while, keep
    /// checking out through the endpoint's node, then check that every node
    /// caught up and nothing acknowledged was lost or oversold. Ask a node
    /// outside the zone. Exits non-zero if the drill failed, lost an order
    /// or oversold a unit.
    ZoneLoss {
        /// The zone to cut off, e.g. `a`.
        #[arg(long)]
        zone: String,
        /// How long to cut it off, in seconds.
        #[arg(long = "for", value_name = "SECONDS", default_value_t = 10)]
        seconds: u64,
        /// Print the final report as JSON too.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let connector = match &args.ca {
        None => awc::Connector::new(),
        Some(ca) => {
            let tls = cluster::transport::tls::public_client_config(ca)
                .with_context(|| format!("load the CA certificate {}", ca.display()))?;
            awc::Connector::new().rustls_0_23(std::sync::Arc::new(tls))
        }
    };
    let client = awc::Client::builder().connector(connector).timeout(CALL_TIMEOUT).finish();
    let api = Api { client, args: &args, endpoint: args.endpoint.trim_end_matches('/').to_string() };
    match &args.command {
        CtlCommand::Status { json } => {
            let status = api.get("/v1/cluster").await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(&status)?);
            }
            Ok(())
        }
        CtlCommand::TransferLeader { to } => {
            let moved = api.post("/v1/admin/leader", json!({ "node": to })).await?;
            println!(
                "group {}: leadership moved from node {} to node {} in {} ms",
                moved["group"], moved["from"], moved["to"], moved["took_ms"]
            );
            Ok(())
        }
        CtlCommand::Drills { json } => {
            let drills: Vec<DrillReport> = serde_json::from_value(api.get("/v1/admin/drills").await?)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&drills)?);
            } else if drills.is_empty() {
                println!("no drills on record");
            } else {
                drills.iter().for_each(|report| println!("{}", one_line(report)));
            }
            Ok(())
        }
        CtlCommand::Switchover { to, json } => {
            let leader = api.at(&leader_endpoint(&api).await?);
            let report: DrillReport =
                serde_json::from_value(leader.post("/v1/admin/switchover", json!({ "to": to })).await?)?;
            println!(
                "switchover {}: writes move to region {to}, coordinated by node {} (the leader); voters after it: {:?}",
                report.id, report.coordinator, report.nodes
            );
            verdict(&leader, report.id, *json, "the switchover").await
        }
        CtlCommand::Failover { to, force: true, json } => {
            let preview = failover_preview(&api, to).await?;
            let node = node_endpoint(&api, preview.node).await?;
            let promoted = api.at(&node);
            let report: DrillReport =
                serde_json::from_value(promoted.post("/v1/admin/failover", json!({ "to": to, "force": true })).await?)?;
            println!("failover {}: region {to} takes writes, from node {}'s copy", report.id, report.coordinator);
            verdict(&promoted, report.id, *json, "the failover").await
        }
        CtlCommand::Failback { from, copies_lost, json } => {
            let leader = api.at(&leader_endpoint(&api).await?);
            let body = json!({ "from": from, "copies_lost": copies_lost });
            let report: DrillReport = serde_json::from_value(leader.post("/v1/admin/failback", body).await?)?;
            println!("failback {}: from region {from}, coordinated by node {}", report.id, report.coordinator);
            verdict(&leader, report.id, *json, "the failback").await
        }
        CtlCommand::ReplaceNode { node, voter, json } => {
            let leader = api.at(&leader_endpoint(&api).await?);
            let body = json!({ "node": node, "voter": voter.then_some(true) });
            let report: DrillReport = serde_json::from_value(leader.post("/v1/admin/replace-node", body).await?)?;
            println!("replacing node {node}, coordinated by node {} (the leader)", report.coordinator);
            verdict(&leader, report.id, *json, "the replacement").await
        }
        CtlCommand::Failover { to, force: false, json } => {
            let preview = failover_preview(&api, to).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&preview)?);
            } else {
                print!("{}", render_preview(&preview));
            }
            Ok(())
        }
        CtlCommand::Drill { drill: Drill::ZoneLoss { zone, seconds, json } } => {
            let body = json!({ "zone": zone, "isolate_for_ms": seconds.saturating_mul(1000) });
            let report: DrillReport = serde_json::from_value(api.post("/v1/admin/drills/zone-loss", body).await?)?;
            println!(
                "drill {}: zone {} (nodes {:?}) cut off for {} s, coordinated by node {}",
                report.id, report.zone, report.nodes, seconds, report.coordinator
            );
            verdict(&api, report.id, *json, "the zone-loss drill").await
        }
    }
}

/// Follows drill `id` to its end, prints its report (and its JSON when
/// asked), and fails unless it completed with nothing lost or oversold.
async fn verdict(api: &Api<'_>, id: u64, json: bool, what: &str) -> anyhow::Result<()> {
    let report = follow(api, id).await?;
    print!("{}", render_report(&report));
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if report.state != "completed" || !report.orders_lost.is_empty() || report.oversold_units > 0 {
        bail!("{what} did not pass");
    }
    Ok(())
}

/// Prints a running drill's timeline as it grows, and returns its final report.
async fn follow(api: &Api<'_>, id: u64) -> anyhow::Result<DrillReport> {
    let mut shown = 0;
    loop {
        let report: DrillReport = serde_json::from_value(api.get(&format!("/v1/admin/drills/{id}")).await?)?;
        for event in &report.timeline[shown..] {
            println!("  {:>7} ms  {}", event.at_ms, event.what);
        }
        shown = report.timeline.len();
        if report.state != "running" {
            return Ok(report);
        }
        actix_rt::time::sleep(DRILL_POLL).await;
    }
}

/// The base URL of the group leader's API, from the endpoint's view of the
/// cluster, with the endpoint's scheme: the leader of the newest generation
/// that is not fenced.
async fn leader_endpoint(api: &Api<'_>) -> anyhow::Result<String> {
    let status = api.get("/v1/cluster").await?;
    let nodes = status["nodes"].as_array().context("no nodes in the answer")?;
    // A fenced node may still lead the group a forced failover superseded.
    let leader = nodes
        .iter()
        .filter(|node| {
            let group = &node["status"]["groups"][0];
            group["role"] == "leader" && group["fenced_by"].is_null()
        })
        .max_by_key(|node| node["status"]["groups"][0]["generation"].as_u64())
        .context("no node says it leads; try again in a moment")?;
    let scheme = api.endpoint.split_once("://").map_or("http", |(scheme, _)| scheme);
    Ok(format!("{scheme}://{}", leader["api"].as_str().context("the leader has no API address")?))
}

/// The base URL of node `id`'s API, from the endpoint's view of the
/// cluster, with the endpoint's scheme.
async fn node_endpoint(api: &Api<'_>, id: u64) -> anyhow::Result<String> {
    let status = api.get("/v1/cluster").await?;
    let nodes = status["nodes"].as_array().context("no nodes in the answer")?;
    let node = nodes.iter().find(|node| node["id"] == id).with_context(|| format!("no node {id} in the cluster"))?;
    let scheme = api.endpoint.split_once("://").map_or("http", |(scheme, _)| scheme);
    Ok(format!("{scheme}://{}", node["api"].as_str().context("the node has no API address")?))
}

/// The failover preview of the most advanced reachable node of `region`:
/// the copy a failover would promote.
async fn failover_preview(api: &Api<'_>, region: &str) -> anyhow::Result<FailoverPreview> {
    let status = api.get("/v1/cluster").await?;
    let nodes = status["nodes"].as_array().context("no nodes in the answer")?;
    let scheme = api.endpoint.split_once("://").map_or("http", |(scheme, _)| scheme);
    let mut best: Option<FailoverPreview> = None;
    let mut asked = 0;
    for node in nodes.iter().filter(|node| node["region"] == region) {
        asked += 1;
        let Some(address) = node["api"].as_str() else { continue };
        match api.at(&format!("{scheme}://{address}")).get("/v1/admin/failover/preview").await {
            Ok(answer) => {
                let preview: FailoverPreview = serde_json::from_value(answer)?;
                // The node a failover promotes: the most advanced copy,
                // the lowest id of equal ones.
                let rank = |p: &FailoverPreview| (p.applied_index, std::cmp::Reverse(p.node));
                if best.as_ref().is_none_or(|best| rank(&preview) > rank(best)) {
                    best = Some(preview);
                }
            }
            Err(error) => eprintln!("node {} of region {region}: {error:#}", node["id"]),
        }
    }
    anyhow::ensure!(asked > 0, "no node is in region {region}");
    best.with_context(|| format!("no node of region {region} answered"))
}

fn render_preview(preview: &FailoverPreview) -> String {
    render_cost(preview, "a failover to region {region} now would promote")
}

/// A failover's cost, under a headline whose `{region}` names its region.
fn render_cost(preview: &FailoverPreview, headline: &str) -> String {
    let stale = preview.stale_ms_max.map_or(String::new(), |ms| format!(", at most {ms} ms stale"));
    let mut out = format!(
        "{} node {} (applied index {}{stale}) in epoch {}, generation {}\n",
        headline.replace("{region}", &preview.region),
        preview.node,
        preview.applied_index,
        preview.epoch,
        preview.generation
    );
    out.push_str(&format!("  units out of sale until failback  {} {:?}\n", preview.undersell_units, preview.unsettled));
    let (from, to) = (preview.orders_maybe_lost_from, preview.orders_maybe_lost_to);
    let lost = if from == to { "none".to_string() } else { format!("ids {from} to {}", to - 1) };
    out.push_str(&format!("  orders that may be lost           {lost}\n"));
    out.push_str(&format!("  payments in doubt                 {:?}\n", preview.payments_in_doubt));
    if !preview.bounded {
        out.push_str(
            "  not a bound: the copy holds no escrow grant yet, so a forced failover is refused \
             (409 copy-unbounded)\n",
        );
    }
    out
}

struct Api<'a> {
    client: awc::Client,
    args: &'a CtlArgs,
    /// Base URL the calls go to: the endpoint, or a node found through it.
    endpoint: String,
}

impl Api<'_> {
    /// The same client and token, against another node.
    fn at(&self, endpoint: &str) -> Api<'_> {
        Api { client: self.client.clone(), args: self.args, endpoint: endpoint.trim_end_matches('/').to_string() }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.client.get(self.url(path)), None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(self.client.post(self.url(path)), Some(body)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    async fn send(&self, request: awc::ClientRequest, body: Option<Value>) -> anyhow::Result<Value> {
        let request = request.bearer_auth(&self.args.token);
        let sent = match body {
            Some(body) => request.send_json(&body).await,
            None => request.send().await,
        };
        let mut response = sent.map_err(|e| anyhow::anyhow!("{e}")).with_context(|| {
            format!("no answer from {} (is a node listening there? --endpoint / SURGE_ENDPOINT)", self.endpoint)
        })?;
        let bytes = response.body().limit(4 << 20).await.context("read the answer")?;
        let value: Value = serde_json::from_slice(&bytes).context("the answer is not JSON")?;
        if !response.status().is_success() {
            let detail = value["detail"].as_str().unwrap_or("no detail");
            bail!("{} {}: {detail}", response.status().as_u16(), value["title"].as_str().unwrap_or("error"));
        }
        Ok(value)
    }
}

/// `GET /v1/cluster` as a table, one row per node and group.
fn render_status(status: &Value) -> anyhow::Result<String> {
    let mut out = format!(
        "cluster as node {} sees it (primary region: {}, epoch {}{})\n",
        status["node_id"],
        status["primary_region"].as_str().unwrap_or("?"),
        status["epoch"],
        if status["frozen"] == true { ", writes frozen by a switchover" } else { "" }
    );
    let header = ["REGION", "ZONE", "NODE", "API", "GROUP", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "LOG"];
    let mut rows = vec![header.map(String::from).to_vec()];
    let mut notes = Vec::new();
    for node in status["nodes"].as_array().context("no nodes in the answer")? {
        let place = [&node["region"], &node["zone"], &node["id"], &node["api"]].map(plain);
        match node.get("status").filter(|s| !s.is_null()) {
            None => {
                let error = node["error"].as_str().unwrap_or("no answer");
                rows.push([place.to_vec(), vec!["-".into(), format!("unreachable: {error}")]].concat());
            }
            Some(own) => {
                if let Some(ms) = own["isolated_for_ms"].as_u64() {
                    notes.push(format!("node {} is isolated by a drill for {ms} ms more", node["id"]));
                }
                for group in own["groups"].as_array().into_iter().flatten() {
                    let group: GroupStatus = serde_json::from_value(group.clone())?;
                    let role = if group.cut_off { format!("{} (cut off)", group.role) } else { group.role.clone() };
                    let optional = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                    rows.push(
                        [
                            place.to_vec(),
                            vec![
                                group.group.to_string(),
                                role,
                                optional(group.leader),
                                group.term.to_string(),
                                optional(group.commit_index),
                                group.applied_index.to_string(),
                                group.last_log_index.to_string(),
                            ],
                        ]
                        .concat(),
                    );
                    if !group.follower_lag.is_empty() {
                        let lag: Vec<String> =
                            group.follower_lag.iter().map(|(id, behind)| format!("node {id}: {behind}")).collect();
                        notes.push(format!("group {} follower lag (entries) {}", group.group, lag.join(", ")));
                    }
                    if !group.replica_lag.is_empty() {
                        let lag: Vec<String> = group
                            .replica_lag
                            .iter()
                            .map(|(id, lag)| format!("node {id}: {} entries, {} ms", lag.entries, lag.ms))
                            .collect();
                        notes.push(format!("group {} DR replication lag {}", group.group, lag.join(", ")));
                    }
                    if let Some(ms) = group.stale_ms_max {
                        notes.push(format!(
                            "group {} on DR replica {}: copy at most {ms} ms stale",
                            group.group, node["id"]
                        ));
                    }
                }
            }
        }
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    for row in &rows {
        let cells: Vec<String> = row.iter().enumerate().map(|(c, cell)| format!("{cell:<w$}", w = widths[c])).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    Ok(out)
}

fn plain(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_string)
}

fn render_report(report: &DrillReport) -> String {
    let mut out = format!("drill {} {}", report.id, report.state);
    if let Some(failure) = &report.failure {
        out.push_str(&format!(": {failure}"));
    }
    out.push('\n');
    if report.kind == "replace-node" {
        let caught_up = report.caught_up_ms.map_or("not within the wait".into(), |ms| format!("{ms} ms after"));
        out.push_str(&format!("  node {:?} had the whole log {caught_up} it was added back\n", report.nodes));
        if let Some(voter) = report.voter_after {
            out.push_str(&format!("  ends as                   {}\n", if voter { "a voter" } else { "a learner" }));
        }
        return out;
    }
    if report.kind == "failback" {
        if let Some(reconciliation) = &report.reconciliation {
            if !reconciliation.copies_lost.is_empty() {
                out.push_str(&format!(
                    "  copies lost for good      nodes {:?}: orders only they knew are not listed\n",
                    reconciliation.copies_lost
                ));
            }
            out.push_str(&format!("  units back on sale        {:?}\n", reconciliation.units_returned));
            out.push_str(&format!("  units sold there only     {:?}\n", reconciliation.units_sold_there));
            out.push_str(&format!("  payments kept in doubt    {:?}\n", reconciliation.kept_in_doubt));
            out.push_str(&format!("  orders to settle          {}\n", reconciliation.orders_to_settle.len()));
            for order in &reconciliation.orders_to_settle {
                let here = order.here.map_or("unknown here".to_string(), |status| format!("{status:?} here"));
                out.push_str(&format!(
                    "    order {} of {}: {:?} there, {here}; {:?}\n",
                    order.id, order.shopper, order.there, order.lines
                ));
            }
        }
        if let Some(ms) = report.caught_up_ms {
            out.push_str(&format!("  rejoined nodes caught up  {ms} ms after they were added\n"));
        }
        return out;
    }
    out.push_str(&format!(
        "  checkout unavailable      {} ms at most, {} ms in all\n",
        report.checkout_unavailable_ms, report.checkout_unavailable_total_ms
    ));
    out.push_str(&format!(
        "  probe checkouts           {} attempted, {} acknowledged\n",
        report.probe_attempts, report.orders_acknowledged
    ));
    out.push_str(&format!("  acknowledged orders lost  {} {:?}\n", report.orders_lost.len(), report.orders_lost));
    out.push_str(&format!("  units oversold            {}\n", report.oversold_units));
    if let Some(cost) = &report.failover {
        out.push_str(&render_cost(cost, "failed over to region {region}: promoted"));
        return out;
    }
    if let Some(region) = &report.region {
        let copied = report.caught_up_ms.map_or("never".into(), |ms| format!("{ms} ms after the freeze"));
        out.push_str(&format!("  region {region} had every entry {copied}\n"));
        let frozen = report.frozen_ms.map_or("not promoted".into(), |ms| format!("{ms} ms"));
        out.push_str(&format!("  writes refused for        {frozen}\n"));
        return out;
    }
    let caught_up = report.caught_up_ms.map_or("not within the wait".into(), |ms| format!("{ms} ms after the heal"));
    out.push_str(&format!("  every node caught up      {caught_up}\n"));
    out
}

fn one_line(report: &DrillReport) -> String {
    let what = match &report.region {
        _ if report.kind == "replace-node" => format!("nodes {:?}", report.nodes),
        Some(region) => format!("to region {region}, voters {:?}", report.nodes),
        None => format!("zone {} nodes {:?} for {} ms", report.zone, report.nodes, report.isolated_for_ms),
    };
    format!(
        "{} {} {what} by {}: {}; unavailable {} ms, {} acknowledged, {} lost, {} oversold",
        report.id,
        report.kind,
        report.requested_by,
        report.state,
        report.checkout_unavailable_ms,
        report.orders_acknowledged,
        report.orders_lost.len(),
        report.oversold_units
    )
}
