//! The public API over TLS: a node with `[public_tls]` serves HTTPS with a
//! certificate from the cluster CA; `surge ctl --ca` reaches it, while plain
//! HTTP and clients that do not trust that CA get nowhere.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;

fn surge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surge")).args(args).output().unwrap()
}

fn certs(out: &Path) {
    let made = surge(&["certs", "--out", out.to_str().unwrap(), "--nodes", "1"]);
    assert!(made.status.success(), "surge certs: {}", String::from_utf8_lossy(&made.stderr));
}

#[test]
fn the_public_api_is_served_over_tls_to_clients_that_trust_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("certs"), dir.path().join("other-certs"));
    certs(&ours);
    certs(&theirs);
    let config = write_config(dir.path(), 600_000);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!("[public_tls]\ncert = {:?}\nkey = {:?}\n", ours.join("node-1.pem"), ours.join("node-1-key.pem"));
    std::fs::write(&config, text).unwrap();

    let node = Surge::start(&config);
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    let ctl = |endpoint: &str, ca: Option<&Path>| {
        let mut args = vec!["ctl", "--endpoint", endpoint, "--token", OPERATOR];
        if let Some(ca) = ca {
            args.extend(["--ca", ca.to_str().unwrap()]);
        }
        args.push("status");
        surge(&args)
    };

    let trusted = ctl(&node.url, Some(&ours.join("ca.pem")));
    let table = String::from_utf8_lossy(&trusted.stdout);
    assert!(trusted.status.success(), "{}", String::from_utf8_lossy(&trusted.stderr));
    assert!(table.contains(" leader "), "{table}");

    // Another CA's client, a client with no CA, and plain HTTP all fail.
    assert!(!ctl(&node.url, Some(&theirs.join("ca.pem"))).status.success());
    assert!(!ctl(&node.url, None).status.success());
    let plain = node.url.replacen("https://", "http://", 1);
    assert!(!ctl(&plain, Some(&ours.join("ca.pem"))).status.success());
}
