//! Starting, killing and talking to `surge` processes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `surge start` process and its data directory's config.
pub struct Surge {
    child: Child,
    /// Base URL it serves, read from its "surge listening on" line.
    pub url: String,
    config: PathBuf,
}

pub const OPERATOR: &str = "multiprocess-operator-token";

/// Writes a config for a node keeping its data in `dir`, on any free port.
pub fn write_config(dir: &Path, hold_ms: u64) -> PathBuf {
    let config = dir.join("surge.toml");
    let text = format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\noperator_token = \"{OPERATOR}\"\nhold_ms = {hold_ms}\n\
         [raft]\nsnapshot_every_entries = 500\nlog_kept_behind_snapshot = 50\n",
        dir.join("data")
    );
    std::fs::write(&config, text).unwrap();
    config
}

impl Surge {
    /// Starts `surge start --config <config>` and waits (bounded) until it
    /// says where it listens.
    pub fn start(config: &Path) -> Surge {
        Surge::spawn(config).wait_listening()
    }

    /// Starts `surge start --config <config>` without waiting for it, so
    /// that nodes that need each other can start together.
    pub fn spawn(config: &Path) -> Launching {
        Surge::spawn_with(config, &[])
    }

    /// Like [`Surge::spawn`], with these `SURGE_*` overrides.
    pub fn spawn_with(config: &Path, overrides: &[(&str, &str)]) -> Launching {
        let mut child = Command::new(env!("CARGO_BIN_EXE_surge"))
            .args(["start", "--config"])
            .arg(config)
            .envs(overrides.iter().copied())
            .env("RUST_LOG", "warn,openraft::replication=off,openraft::engine::handler::replication_handler=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn surge");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("surge listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        Launching { child, url: rx, config: config.to_path_buf() }
    }

    /// SIGKILL: no shutdown hook, no flush, like a power cut to the process.
    pub fn kill(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.config.clone()
    }
}

/// A `surge start` process that has not yet said where it listens.
pub struct Launching {
    child: Child,
    url: mpsc::Receiver<String>,
    config: PathBuf,
}

impl Launching {
    /// Waits (bounded) for the "surge listening on" line.
    pub fn wait_listening(self) -> Surge {
        let url = self.url.recv_timeout(Duration::from_secs(60)).expect("surge did not start within 60 s");
        Surge { child: self.child, url, config: self.config }
    }
}

impl Drop for Surge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bounded HTTP client for the tests.
///
/// An idle pooled connection is dropped after 2 s, before the server's
/// keep-alive (actix-web's 5 s) closes it: a request sent on a connection
/// the server is closing fails with "connector has been disconnected", and
/// a test that paused for a while (a blocking `surge ctl`) would see that.
pub fn client() -> awc::Client {
    let connector = awc::Connector::new().conn_keep_alive(Duration::from_secs(2));
    awc::Client::builder().connector(connector).timeout(Duration::from_secs(10)).finish()
}

/// What an HTTP exchange ended as: a status and JSON body, or no answer.
pub type Reply = Result<(u16, Value), String>;

/// Sends `body` (if any) as JSON with the given headers.
pub async fn call(
    client: &awc::Client,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Value>,
) -> Reply {
    let mut req = client.request(method.parse().unwrap(), url);
    for (name, value) in headers {
        req = req.insert_header((*name, value.as_str()));
    }
    let sent = match body {
        Some(body) => req.send_json(&body).await,
        None => req.send().await,
    };
    let mut response = sent.map_err(|e| e.to_string())?;
    let bytes = response.body().await.map_err(|e| e.to_string())?;
    Ok((response.status().as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

pub fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// (region, zone, role) of each node of a test cluster, ids from 1.
pub type Shape = [(&'static str, &'static str, &'static str)];

/// Ids 1, 2 in zone a, 3, 4 in zone b, 5 the tiebreaker in region dr.
pub const FIVE_VOTERS: [(&str, &str, &str); 5] = [
    ("primary", "a", "voter"),
    ("primary", "a", "voter"),
    ("primary", "b", "voter"),
    ("primary", "b", "voter"),
    ("dr", "t", "voter"),
];

/// Real `surge` processes on loopback with mutual TLS, one per node of a
/// [`Shape`].
pub struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<Option<Surge>>,
    /// Base URL of each node's API, node 1 first.
    pub api: Vec<String>,
}

impl Cluster {
    /// Writes certificates and configs for `shape` and starts every node.
    pub fn start(shape: &Shape) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let status = Command::new(env!("CARGO_BIN_EXE_surge"))
            .args(["certs", "--out"])
            .arg(&certs)
            .args(["--nodes", &(1..=shape.len()).map(|id| id.to_string()).collect::<Vec<_>>().join(",")])
            .status()
            .unwrap();
        assert!(status.success(), "surge certs failed");
        let ports: Vec<(u16, u16)> =
            cluster::ports::loopback_ports(2 * shape.len()).unwrap().chunks(2).map(|pair| (pair[0], pair[1])).collect();
        let mut topology = String::from("[cluster]\nprimary_region = \"primary\"\n");
        for (i, ((region, zone, role), (api, peer))) in shape.iter().zip(&ports).enumerate() {
            topology += &format!(
                "[[cluster.nodes]]\nid = {}\nregion = \"{region}\"\nzone = \"{zone}\"\napi = \"127.0.0.1:{api}\"\npeer = \"127.0.0.1:{peer}\"\nrole = \"{role}\"\n",
                i + 1
            );
        }
        for (i, (api, _)) in ports.iter().enumerate() {
            let id = i + 1;
            let config = format!(
                "node_id = {id}\ndata_dir = {:?}\nlisten = \"127.0.0.1:{api}\"\noperator_token = \"{OPERATOR}\"\nhold_ms = 600000\n\
                 [raft]\nheartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n\
                 escrow_block_min = 32\nescrow_block_max = 64\n\
                 [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{topology}",
                dir.path().join(format!("data-{id}")),
                certs.join("ca.pem"),
                certs.join(format!("node-{id}.pem")),
                certs.join(format!("node-{id}-key.pem")),
            );
            std::fs::write(dir.path().join(format!("node-{id}.toml")), config).unwrap();
        }
        let api = ports.iter().map(|(api, _)| format!("http://127.0.0.1:{api}")).collect();
        let mut cluster = Cluster { dir, nodes: Vec::new(), api };
        // All at once: a node elects nobody until enough of its peers run.
        let launching: Vec<_> = (1..=shape.len()).map(|id| cluster.launch(id)).collect();
        cluster.nodes = launching.into_iter().map(|node| Some(node.wait_listening())).collect();
        cluster
    }

    fn launch(&self, id: usize) -> Launching {
        Surge::spawn(&self.dir.path().join(format!("node-{id}.toml")))
    }

    /// Waits (bounded) until every node answers /readyz.
    pub async fn ready(&self, client: &awc::Client) {
        for url in &self.api {
            ready(client, url, Duration::from_secs(30)).await;
        }
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: usize) {
        self.nodes[id - 1].take().unwrap().kill();
    }

    /// Starts node `id` again on its data directory.
    pub fn restart(&mut self, id: usize) {
        self.nodes[id - 1] = Some(self.launch(id).wait_listening());
    }

    /// Starts node `id` again with its data wiped and `join = true`, as an
    /// operator brings back a node of a region a failover lost.
    pub fn rejoin_wiped(&mut self, id: usize) {
        let data = self.dir.path().join(format!("data-{id}"));
        std::fs::remove_dir_all(&data).unwrap();
        let config = self.dir.path().join(format!("node-{id}.toml"));
        self.nodes[id - 1] = Some(Surge::spawn_with(&config, &[("SURGE_JOIN", "true")]).wait_listening());
    }

    /// The directory holding the configs and data.
    pub fn config(&self) -> &Path {
        self.dir.path()
    }
}

/// A GET that also returns the `Surge-Stale-Ms` header.
pub async fn get_marked(client: &awc::Client, url: &str, headers: &[(&str, String)]) -> (u16, Value, Option<u64>) {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.insert_header((*name, value.as_str()));
    }
    let mut response = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let stale_ms = response.headers().get("surge-stale-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = response.body().await.unwrap();
    (response.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null), stale_ms)
}

/// A GET whose answer is definite: a 503 (an election under way) or no
/// answer says nothing either way, so it is asked again, for up to 10 s.
pub async fn get(client: &awc::Client, url: &str, headers: &[(&str, String)]) -> (u16, serde_json::Value) {
    let started = Instant::now();
    loop {
        match call(client, "GET", url, headers, None).await {
            Ok((503, _)) | Err(_) if started.elapsed() < Duration::from_secs(10) => {
                actix_rt::time::sleep(Duration::from_millis(100)).await
            }
            Ok(answer) => return answer,
            Err(error) => panic!("GET {url}: no answer within 10 s: {error}"),
        }
    }
}

/// Waits (bounded) until `url` answers /readyz with 200.
pub async fn ready(client: &awc::Client, url: &str, within: Duration) {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = call(client, "GET", &format!("{url}/readyz"), &[], None).await {
            return;
        }
        assert!(started.elapsed() < within, "{url} not ready within {within:?}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `surge ctl` against `endpoint`.
pub fn ctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    ctl_command(endpoint, args).output().unwrap()
}

/// `surge ctl` against `endpoint`, not started yet: for a command that
/// waits while the test does something else.
pub fn ctl_command(endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_surge"));
    command.arg("ctl").args(["--endpoint", endpoint, "--token", OPERATOR]).args(args);
    command
}
