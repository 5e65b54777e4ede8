//! A node's configuration: a TOML file, then `SURGE_*` environment variables
//! on top, then defaults for anything neither names.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cluster::{ActorLimits, GroupConfig, NodeConfig, TlsFiles, Topology};
use serde::{Deserialize, Serialize};

/// Everything `surge start` reads. Every field has a default; see
/// `deploy/surge.toml` for a commented example.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id.
    pub node_id: u64,
    /// Where the node keeps its Raft log, snapshots and state.
    pub data_dir: PathBuf,
    /// Address of the public HTTP API.
    pub listen: String,
    /// Bearer token of operator endpoints. Set it: the default is for local use only.
    pub operator_token: String,
    /// How long a checkout holds stock waiting for payment.
    pub hold_ms: u64,
    /// HTTP worker threads.
    pub workers: usize,
    /// Open connections per worker; more wait in the listen backlog.
    pub max_connections: usize,
    /// How often the leader checks for passed payment deadlines.
    pub expiry_tick_ms: u64,
    /// Never found a new cluster, even as the topology's first node: wait
    /// for a leader to add this node. For a node whose data was wiped to
    /// rejoin (after a failover, the old primary's nodes).
    pub join: bool,
    /// Raft tuning.
    pub raft: RaftConfig,
    /// Actor bounds and timings.
    pub actors: ActorLimits,
    /// The cluster's nodes, regions and zones (`[cluster]` with
    /// `[[cluster.nodes]]`). Absent: this node alone.
    pub cluster: Option<Topology>,
    /// This node's certificate for mutual TLS with its peers; required when
    /// `[cluster]` names more than one node (`surge certs` makes a set).
    pub tls: Option<TlsConfig>,
    /// Serve the public API over TLS with this certificate (`[public_tls]`);
    /// absent: plain HTTP.
    pub public_tls: Option<PublicTlsConfig>,
}

/// The `[public_tls]` table: the public API's certificate and key (PEM).
/// A `surge certs` node certificate works for local use: it names
/// `localhost` and `127.0.0.1`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicTlsConfig {
    /// The certificate chain shoppers' clients verify.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The `[tls]` table: PEM files for mutual TLS between nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This node's certificate, signed by the cluster CA.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// The `[raft]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log behind it) every this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept behind the latest snapshot.
    pub log_kept_behind_snapshot: u64,
    /// With a DR replica: the smallest escrow block a SKU is granted, in
    /// units. See ARCHITECTURE.md, "Escrow".
    pub escrow_block_min: u64,
    /// With a DR replica: the largest escrow block a hot SKU grows to. A
    /// failover takes up to two blocks per SKU out of sale.
    pub escrow_block_max: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("surge-data"),
            listen: "127.0.0.1:8080".into(),
            operator_token: "dev-operator-token".into(),
            hold_ms: 10 * 60 * 1000,
            workers: 2,
            max_connections: 25_000,
            expiry_tick_ms: 200,
            join: false,
            raft: RaftConfig::default(),
            actors: ActorLimits::default(),
            cluster: None,
            tls: None,
            public_tls: None,
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        let group = GroupConfig::default();
        RaftConfig {
            heartbeat_ms: group.heartbeat_ms,
            election_timeout_min_ms: group.election_timeout_min_ms,
            election_timeout_max_ms: group.election_timeout_max_ms,
            snapshot_every_entries: group.snapshot_every_entries,
            log_kept_behind_snapshot: group.log_kept_behind_snapshot,
            escrow_block_min: group.escrow_block_min,
            escrow_block_max: group.escrow_block_max,
        }
    }
}

/// Prefix of the environment variables that override the file. A nested key
/// uses a double underscore: `SURGE_RAFT__HEARTBEAT_MS=50`.
const ENV_PREFIX: &str = "SURGE_";

impl Config {
    /// Reads `path` (if given), applies `SURGE_*` overrides from the
    /// environment, and fills the rest with defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
            None => String::new(),
        };
        let overrides = std::env::vars().filter(|(name, _)| name.starts_with(ENV_PREFIX));
        Self::parse(&text, overrides)
    }

    fn parse(text: &str, overrides: impl Iterator<Item = (String, String)>) -> anyhow::Result<Config> {
        let mut table: toml::Table = toml::from_str(text).context("parse the config file")?;
        for (name, value) in overrides {
            let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            set(&mut table, &path, value).with_context(|| format!("apply {name}"))?;
        }
        let config: Config = table.try_into().context("check the configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.operator_token.is_empty(), "operator_token must not be empty");
        let topology = self.topology();
        topology.validate().context("check the [cluster] topology")?;
        anyhow::ensure!(topology.node(self.node_id).is_some(), "node_id {} is not in [cluster]", self.node_id);
        anyhow::ensure!(
            topology.nodes.len() == 1 || self.tls.is_some(),
            "a cluster of more than one node needs [tls]: peers authenticate each other (see `surge certs`)"
        );
        anyhow::ensure!(self.hold_ms > 0, "hold_ms must be positive");
        anyhow::ensure!(self.workers > 0, "workers must be positive");
        anyhow::ensure!(
            self.actors.batch_max > 0 && self.actors.queue_max > 0 && self.actors.proposals_in_flight_max > 0,
            "actor limits must be positive"
        );
        anyhow::ensure!(
            self.raft.election_timeout_min_ms > self.raft.heartbeat_ms
                && self.raft.election_timeout_max_ms > self.raft.election_timeout_min_ms,
            "need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
        );
        anyhow::ensure!(
            0 < self.raft.escrow_block_min && self.raft.escrow_block_min <= self.raft.escrow_block_max,
            "need 0 < escrow_block_min <= escrow_block_max"
        );
        Ok(())
    }

    /// A node for `surge demo` and `surge bench`: the defaults with any
    /// `SURGE_*` tuning from the environment, then a random operator token,
    /// any free loopback port, and holds short enough to watch them expire.
    pub fn for_demo(data_dir: &Path) -> anyhow::Result<Config> {
        Ok(Config {
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            operator_token: api::new_token(),
            hold_ms: 3_000,
            ..Config::load(None)?
        })
    }

    /// The `[cluster]` table, or this node alone.
    pub fn topology(&self) -> Topology {
        self.cluster.clone().unwrap_or_else(|| Topology::single(self.node_id, &self.listen, &self.listen))
    }

    /// The cluster crate's view of this configuration.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            topology: self.topology(),
            tls: self.tls.as_ref().map(|tls| TlsFiles {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            }),
            group: GroupConfig {
                node_id: self.node_id,
                heartbeat_ms: self.raft.heartbeat_ms,
                election_timeout_min_ms: self.raft.election_timeout_min_ms,
                election_timeout_max_ms: self.raft.election_timeout_max_ms,
                snapshot_every_entries: self.raft.snapshot_every_entries,
                log_kept_behind_snapshot: self.raft.log_kept_behind_snapshot,
                // Leaders stay in the primary region (see `Topology::may_lead`).
                may_lead: self.topology().may_lead(self.node_id),
                region: self.topology().node(self.node_id).map(|spec| spec.region.clone()),
                replicas: self.topology().replicas(),
                escrow_block_min: self.raft.escrow_block_min,
                escrow_block_max: self.raft.escrow_block_max,
                log_write_delay: None,
            },
            actors: self.actors.clone(),
            expiry_tick_ms: self.expiry_tick_ms,
            join: self.join,
        }
    }
}

/// Sets `path` in `table` to `value`, read as a TOML value when it is one
/// (`50`, `true`) and as a string otherwise (`127.0.0.1:8080`).
fn set(table: &mut toml::Table, path: &[String], value: String) -> anyhow::Result<()> {
    let (last, parents) = path.split_last().context("empty variable name")?;
    let mut table = table;
    for key in parents {
        table = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("{key} is not a table"))?;
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v"));
    table.insert(last.clone(), parsed.unwrap_or(toml::Value::String(value)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
        Config::parse(text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn file_then_environment_then_defaults() {
        let config = parse(
            "listen = \"127.0.0.1:9000\"\nhold_ms = 5000\n[raft]\nheartbeat_ms = 50\n",
            &[
                ("SURGE_HOLD_MS", "7000"),
                ("SURGE_RAFT__ELECTION_TIMEOUT_MIN_MS", "400"),
                ("SURGE_OPERATOR_TOKEN", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000");
        assert_eq!(config.hold_ms, 7000);
        assert_eq!(config.raft.heartbeat_ms, 50);
        assert_eq!(config.raft.election_timeout_min_ms, 400);
        assert_eq!(config.operator_token, "s3cret");
        assert_eq!(config.workers, Config::default().workers);
        let tuned = parse("[actors]\nqueue_max = 100\n", &[("SURGE_ACTORS__BATCH_MAX", "64")]).unwrap();
        assert_eq!((tuned.actors.queue_max, tuned.actors.batch_max), (100, 64));
        assert_eq!(tuned.node_config().actors.batch_max, 64);
    }

    #[test]
    fn the_local_cluster_example_is_a_valid_topology_with_a_dr_replica() {
        let example = include_str!("../../deploy/local-cluster/cluster.toml");
        let replica = parse(example, &[("SURGE_NODE_ID", "6")]).unwrap();
        let topology = replica.topology();
        assert_eq!(topology.members().len(), 5);
        assert_eq!(topology.replicas().keys().copied().collect::<Vec<_>>(), vec![6]);
        let config = replica.node_config();
        assert!(!config.group.may_lead);
        assert_eq!(config.group.replicas.len(), 1);
    }

    #[test]
    fn mistakes_are_reported_not_ignored() {
        assert!(parse("hold_ms = \"soon\"", &[]).is_err());
        assert!(parse("no_such_field = 1", &[]).is_err());
        assert!(parse("[actors]\nbatch_maximum = 1\n", &[]).is_err());
        assert!(parse("", &[("SURGE_HOLD_MS", "0")]).is_err());
        assert!(parse("[raft]\nheartbeat_ms = 1000\n", &[]).is_err());
        let two_zones = "node_id = 1\n[cluster]\nprimary_region = \"primary\"\n".to_string()
            + &(1..=4)
                .map(|id| {
                    format!(
                        "[[cluster.nodes]]\nid = {id}\nregion = \"primary\"\nzone = \"{}\"\napi = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\n",
                        if id <= 2 { "a" } else { "b" },
                        8000 + id,
                        9000 + id
                    )
                })
                .collect::<String>();
        let error = format!("{:#}", parse(&two_zones, &[]).unwrap_err());
        assert!(error.contains("losing zone"), "{error}");
    }
}
