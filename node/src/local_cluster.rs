//! The default topology on one machine: zones `a` and `b` of region
//! `primary` with two nodes each, the tiebreaker voter in region `dr`, and
//! the DR replica (node 6) in region `dr`, zone `d`.
//!
//! Every node is a whole Surge node: its own thread and actix system, its own
//! redb files, a mutual-TLS peer transport and an HTTP API, all on real
//! loopback sockets. They share the process, and so the CPU and the disk
//! (every voter fsyncs every entry). `surge demo` and `surge bench --cluster`
//! run on it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cluster::{NodeSpec, Role, Topology};

use crate::config::{Config, TlsConfig};
use crate::server::{self, Server};

/// (region, zone, role) of nodes 1 to 6.
const SHAPE: [(&str, &str, Role); 6] = [
    ("primary", "a", Role::Voter),
    ("primary", "a", Role::Voter),
    ("primary", "b", Role::Voter),
    ("primary", "b", Role::Voter),
    ("dr", "t", Role::Voter),
    ("dr", "d", Role::Replica),
];

/// A running local cluster.
pub struct LocalCluster {
    /// Each node as the topology names it, with its running server.
    pub nodes: Vec<(NodeSpec, Server)>,
}

impl LocalCluster {
    /// Generates a development CA and node certificates in `dir`, then
    /// starts six nodes whose data lives under `dir`, each configured like
    /// `template` (tokens, hold time, tuning). Returns once every node has a
    /// leader, so the cluster takes writes.
    pub async fn start(dir: &Path, template: &Config) -> anyhow::Result<LocalCluster> {
        let certs = dir.join("certs");
        let ids: Vec<u64> = (1..=SHAPE.len() as u64).collect();
        crate::certs::generate(&certs, &ids)?;
        let mut ports =
            cluster::ports::loopback_ports(2 * SHAPE.len()).context("find free loopback ports")?.into_iter();
        let mut port = || ports.next().expect("two ports per node");
        let mut topology = Topology { primary_region: "primary".into(), nodes: Vec::new() };
        for (id, (region, zone, role)) in ids.iter().zip(SHAPE) {
            topology.nodes.push(NodeSpec {
                id: *id,
                region: region.into(),
                zone: zone.into(),
                api: format!("127.0.0.1:{}", port()),
                peer: format!("127.0.0.1:{}", port()),
                role,
            });
        }
        let mut nodes = Vec::new();
        for spec in &topology.nodes {
            let config = Config {
                node_id: spec.id,
                data_dir: dir.join(format!("node-{}", spec.id)),
                listen: spec.api.clone(),
                // Six nodes share this machine's cores: one HTTP worker
                // each keeps the threads few (measured: p99 at half the
                // peak rate 14 ms with one, 26 ms with two; docs/benchmarks.md).
                workers: 1,
                cluster: Some(topology.clone()),
                tls: Some(TlsConfig {
                    ca: certs.join("ca.pem"),
                    cert: certs.join(format!("node-{}.pem", spec.id)),
                    key: certs.join(format!("node-{}-key.pem", spec.id)),
                }),
                ..template.clone()
            };
            // A clustered node serves before its group has a leader, so they
            // start one after another without waiting for each other.
            let server = server::start(config).await.with_context(|| format!("start node {}", spec.id))?;
            nodes.push((spec.clone(), server));
        }
        let cluster = LocalCluster { nodes };
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Base URL of the DR replica.
    pub fn replica(&self) -> Option<String> {
        self.nodes.iter().find(|(spec, _)| spec.role == Role::Replica).map(|(_, server)| server.url.clone())
    }

    /// Base URLs of the nodes in `zones`.
    pub fn endpoints(&self, zones: &[&str]) -> Vec<String> {
        self.nodes.iter().filter(|(spec, _)| zones.contains(&spec.zone.as_str())).map(|(_, s)| s.url.clone()).collect()
    }

    /// Waits until every node answers `/readyz` (its group has a leader).
    async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let client = awc::Client::builder().timeout(Duration::from_secs(2)).finish();
        let started = Instant::now();
        for (spec, server) in &self.nodes {
            loop {
                let ready = client.get(format!("{}/readyz", server.url)).send().await;
                if ready.is_ok_and(|response| response.status().is_success()) {
                    break;
                }
                if started.elapsed() > within {
                    bail!("node {} did not find a leader within {within:?}", spec.id);
                }
                actix_rt::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Stops every node of `region`, as if the region were lost; the others
    /// run on.
    pub async fn stop_region(&mut self, region: &str) {
        let (gone, kept) = std::mem::take(&mut self.nodes).into_iter().partition(|(spec, _)| spec.region == region);
        self.nodes = kept;
        for (_, server) in gone {
            server.stop().await;
        }
    }

    /// Stops every node.
    pub async fn stop(self) {
        for (_, server) in self.nodes {
            server.stop().await;
        }
    }
}
