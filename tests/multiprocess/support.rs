//! Starting, killing and talking to `surge` processes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
        let mut child = Command::new(env!("CARGO_BIN_EXE_surge"))
            .args(["start", "--config"])
            .arg(config)
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
pub fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(10)).finish()
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
