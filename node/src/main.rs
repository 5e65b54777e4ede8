//! `surge`: run a node, watch a flash sale, measure one, or operate a cluster.

mod bench;
mod certs;
mod config;
mod crowd;
mod ctl;
mod demo;
mod local_cluster;
mod server;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Surge: a flash-sale commerce platform that sells every unit, never sells
/// one twice, and loses no acknowledged order.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a node and serve the public API until Ctrl-C.
    Start {
        /// A TOML config file (see deploy/surge.toml). `SURGE_*` variables
        /// override it, e.g. SURGE_LISTEN=127.0.0.1:9000.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start Surge on a temporary data directory and run a flash sale against
    /// it with a crowd of concurrent shoppers, then check the result.
    Demo(demo::DemoArgs),
    /// Measure hot-SKU checkout throughput and latency over HTTP.
    Bench(bench::BenchArgs),
    /// Generate a development CA and node certificates for mutual TLS
    /// between nodes (no keys are ever committed: write them outside the repo).
    Certs(certs::CertsArgs),
    /// Operate a running cluster through any node's API: status, drills.
    Ctl(ctl::CtlArgs),
}

/// Logging when `RUST_LOG` is unset. openraft's replication logs an error
/// for every failed attempt to reach a follower, every 50 ms per follower, as
/// long as a zone is down; a lagging or unreachable follower shows in `surge
/// ctl status` instead.
const DEFAULT_LOG_FILTER: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off";

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A node logs what an operator needs; the tools that start nodes in
    // this process (demo, bench) or only talk to them (ctl) print their own
    // report and log only errors.
    let default_filter = match cli.command {
        Command::Start { .. } => DEFAULT_LOG_FILTER,
        _ => "error,openraft=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Start { config } => start(config).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Certs(args) => certs::run(args),
        Command::Ctl(args) => ctl::run(args).await,
    }
}

async fn start(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = config::Config::load(config.as_deref())?;
    let server = server::start(config).await?;
    // One line on stdout, so scripts and tests can wait for it.
    println!("surge listening on {}", server.url);
    actix_rt::signal::ctrl_c().await?;
    tracing::info!("stopping");
    server.stop().await;
    Ok(())
}
