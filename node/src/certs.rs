//! `surge certs`: a development cluster CA and one certificate per node, for
//! the mutual-TLS peer transport.
//!
//! The certificates come from `cluster::transport::certs`, the same code the
//! transport tests use, so what this writes is what those tests prove works.
//! Keys go only to the directory the user names, never into the repository;
//! existing files are never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};

/// Where to write, and which nodes get certificates.
#[derive(Clone, Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory for ca.pem, ca-key.pem, node-<id>.pem and node-<id>-key.pem
    /// (created if missing; refuses to overwrite any of them).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Node ids, comma separated; each certificate names `node-<id>.surge`,
    /// `localhost` and `127.0.0.1`.
    #[arg(long, value_name = "IDS", value_delimiter = ',', default_value = "1,2,3,4,5")]
    pub nodes: Vec<u64>,
}

/// Runs `surge certs`: writes the files and says where they went.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    generate(&args.out, &args.nodes)?;
    println!("wrote a development CA and certificates for nodes {:?} to {}", args.nodes, args.out.display());
    println!("the *-key.pem files are secrets: keep them out of version control");
    Ok(())
}

/// Writes a new CA (`ca.pem`, `ca-key.pem`) and, for each node id,
/// `node-<id>.pem` and `node-<id>-key.pem` into `out_dir`.
pub fn generate(out_dir: &Path, node_ids: &[u64]) -> anyhow::Result<()> {
    ensure!(!node_ids.is_empty(), "name at least one node id");
    ensure!(!node_ids.contains(&0), "node ids start at 1");
    cluster::transport::write_dev_certs(out_dir, node_ids)
        .with_context(|| format!("write certificates to {}", out_dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_loadable_certificates_and_refuses_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[1, 2, 3]).unwrap();
        let path = |name: &str| dir.path().join(name);
        cluster::transport::PeerTls::load(&path("ca.pem"), &path("node-3.pem"), &path("node-3-key.pem")).unwrap();
        assert!(generate(&dir.path().join("other"), &[]).is_err());
        assert!(generate(&dir.path().join("other"), &[0]).is_err());
        assert!(generate(dir.path(), &[4]).is_err(), "overwrote an existing CA");
    }
}
