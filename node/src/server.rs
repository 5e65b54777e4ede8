//! Wiring: config → storage → Raft → actors → HTTP. The node runs in an actix
//! system of its own thread, so whatever else the process does (the demo's
//! crowd, a test) never shares the Raft thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use actix_web::{dev::ServerHandle, web, App, HttpServer};
use anyhow::Context as _;
use api::AppState;
use cluster::{Node, SystemClock};
use tokio::sync::oneshot;

use crate::config::Config;

/// A running node.
pub struct Server {
    /// Base URL of the public API, e.g. `http://127.0.0.1:8080` (`https`
    /// with `[public_tls]`).
    pub url: String,
    handle: ServerHandle,
    thread: JoinHandle<()>,
}

/// Starts a node and returns once it serves requests and leads its group.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("surge-node".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            system.block_on(run(config, ready_tx));
        })
        .context("spawn the node thread")?;
    match ready_rx.await {
        Ok(Ok((url, handle))) => Ok(Server { url, handle, thread }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            anyhow::bail!("the node thread stopped before it was ready")
        }
    }
}

/// The node's base URL, once it serves.
type Ready = anyhow::Result<(String, ServerHandle)>;

/// The node thread: starts everything, reports readiness, serves until
/// stopped, then shuts Raft down so the storage is closed cleanly.
async fn run(config: Config, ready: oneshot::Sender<Ready>) {
    let started = async {
        let metrics = api::metrics::install();
        let node = Node::start(&config.node_config(), &config.data_dir, Arc::new(SystemClock))
            .await
            .context("start the node's Raft group")?;
        let state = web::Data::new(AppState {
            node: node.clone(),
            operator_token: config.operator_token.clone(),
            hold_ms: config.hold_ms,
            metrics,
        });
        let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(api::configure))
            .workers(config.workers)
            .max_connections(config.max_connections)
            .disable_signals();
        let (server, scheme) = match &config.public_tls {
            None => (server.bind(&config.listen), "http"),
            Some(tls) => {
                let tls = cluster::transport::tls::public_server_config(&tls.cert, &tls.key)
                    .context("load the public API certificate ([public_tls])")?;
                (server.bind_rustls_0_23(&config.listen, tls), "https")
            }
        };
        let server = server.with_context(|| format!("listen on {}", config.listen))?;
        let addr = *server.addrs().first().context("bound to no address")?;
        let server = server.run();
        anyhow::Ok((node, format!("{scheme}://{addr}"), server))
    };
    match started.await {
        Ok((node, url, server)) => {
            let _ = ready.send(Ok((url, server.handle())));
            if let Err(error) = server.await {
                tracing::error!(%error, "the HTTP server failed");
            }
            if let Err(error) = node.group().raft().shutdown().await {
                tracing::warn!(%error, "Raft did not shut down cleanly");
            }
        }
        Err(error) => {
            let _ = ready.send(Err(error));
        }
    }
}

impl Server {
    /// Stops taking requests, finishes the ones in flight, shuts Raft down,
    /// and waits for the node thread to end.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        let thread = self.thread;
        // The thread ends right after the server; joining it blocks only briefly.
        let _ = actix_rt::task::spawn_blocking(move || thread.join()).await;
    }
}
