//! A development cluster CA and node certificates, for `surge certs` and the
//! transport tests, so both use the very same certificates.
//!
//! Production clusters should get their certificates from their own PKI; what
//! the transport needs is only what [`super::tls`] checks: a CA, and per node
//! a certificate signed by it with the DNS name `node-<id>.surge` and usable
//! for both TLS client and server authentication (every node is both).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::tls::node_dns_name;

/// How many years a development certificate stays valid. Long enough that a
/// dev cluster does not break mid-week, short enough to be obviously not a
/// production credential.
pub const VALID_YEARS: i32 = 5;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not generate a key or sign a certificate.
    #[error("generate certificate")]
    Generate(#[from] rcgen::Error),
    /// A file to write exists already. Nothing is overwritten: replacing the
    /// CA silently would lock every node holding the old one out.
    #[error("{0} exists already; remove it (and every certificate the old CA signed) to make new ones")]
    Exists(PathBuf),
    /// The output directory or a file could not be written.
    #[error("write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A freshly generated cluster CA: its certificate and the key that signs
/// node certificates.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// One node's certificate and private key, PEM encoded.
#[derive(Clone)]
pub struct NodeCertificate {
    /// The node id the certificate names (`node-<id>.surge`).
    pub node_id: u64,
    /// The certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// Its private key (PKCS#8). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCertificate {
    // Keys stay out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCertificate").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DevCa {
    // The signing key stays out of logs and panic messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// Generates a new CA (ECDSA P-256) that may sign node certificates but no
    /// intermediate CA.
    pub fn generate() -> Result<DevCa, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("Surge cluster CA (development)");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa { cert, key })
    }

    /// The CA certificate every node trusts.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key: whoever holds it can mint node certificates.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues node `node_id`'s certificate, with a fresh key, naming
    /// `node-<id>.surge`, `localhost` and `127.0.0.1`.
    pub fn issue(&self, node_id: u64) -> Result<NodeCertificate, CertError> {
        let names = vec![node_dns_name(node_id), "localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = distinguished_name(&node_dns_name(node_id));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCertificate { node_id, cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes a new CA and one certificate per node into `out_dir` (created if
/// missing): `ca.pem`, `ca-key.pem`, `node-<id>.pem`, `node-<id>-key.pem`.
/// Keys are written owner-only on Unix. Refuses, before writing anything, if
/// any of the files exists. Returns the paths written.
pub fn write_dev_certs(out_dir: &Path, node_ids: &[u64]) -> Result<Vec<PathBuf>, CertError> {
    let ca = DevCa::generate()?;
    let mut files =
        vec![(out_dir.join("ca.pem"), ca.cert_pem(), false), (out_dir.join("ca-key.pem"), ca.key_pem(), true)];
    let mut ids = node_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let node = ca.issue(id)?;
        files.push((out_dir.join(format!("node-{id}.pem")), node.cert_pem, false));
        files.push((out_dir.join(format!("node-{id}-key.pem")), node.key_pem, true));
    }
    if let Some((path, _, _)) = files.iter().find(|(path, _, _)| path.exists()) {
        return Err(CertError::Exists(path.clone()));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Write { path: out_dir.to_owned(), source })?;
    for (path, contents, secret) in &files {
        write_new(path, contents, *secret).map_err(|source| CertError::Write { path: path.clone(), source })?;
    }
    Ok(files.into_iter().map(|(path, _, _)| path).collect())
}

/// Creates `path` (failing if it exists, so a race with another writer
/// cannot clobber it) and writes `contents`; secrets are owner-only.
fn write_new(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Surge");
    name.push(DnType::CommonName, common_name);
    name
}

/// From the start of last year (tolerates clocks that lag) to
/// [`VALID_YEARS`] later. Years are all the precision a development
/// certificate needs, and this keeps a date library out of the tree.
fn set_validity(params: &mut CertificateParams) {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // 365.2425 days
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let this_year = 1970 + i32::try_from(since_epoch / SECONDS_PER_YEAR).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(this_year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(this_year + VALID_YEARS, 1, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let written = write_dev_certs(&out, &[2, 1, 2]).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_owned()).collect();
        assert_eq!(names, ["ca.pem", "ca-key.pem", "node-1.pem", "node-1-key.pem", "node-2.pem", "node-2-key.pem"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("node-1-key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        let before = std::fs::read(out.join("ca.pem")).unwrap();
        assert!(matches!(write_dev_certs(&out, &[3]), Err(CertError::Exists(_))));
        assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), before);
        assert!(!out.join("node-3.pem").exists());
    }
}
