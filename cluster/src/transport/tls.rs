//! Mutual TLS between nodes: who may connect, and how a node knows it
//! reached the peer it meant to.
//!
//! Every node holds the cluster CA certificate and a certificate of its own
//! signed by that CA (see [`super::certs`] for development ones). Both ends
//! present their certificate and verify the other's against the cluster CA
//! only: not the system roots, so a certificate from any public CA is
//! worthless here, and a connection without a cluster certificate never gets
//! as far as sending a frame.
//!
//! **Naming.** A client always verifies the server against the DNS name
//! [`node_dns_name`]`(target id)` (`node-<id>.surge`), whatever address it
//! dialled. The address comes from the Raft membership and may be an IP,
//! a container name or a load balancer; the name binds the connection to the
//! node id Raft thinks it is talking to, so node 2's certificate cannot
//! answer for node 3 even at node 3's address. The server accepts any client
//! certificate the cluster CA signed: every cluster member may send any
//! group's Raft traffic, and which node sent it is in the Raft message.
//!
//! Only TLS 1.3, with rustls' `ring` provider, set explicitly rather than
//! taken from a process-wide default, so another crate's choice of provider
//! cannot change (or break) this one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol both ends insist on, so a Surge node never mistakes
/// another TLS service (or an older peer protocol) for a peer.
pub const ALPN_PEER_PROTOCOL: &[u8] = b"surge-peer/1";

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM input holds no usable item of the expected kind.
    #[error("parse {what} PEM")]
    Pem {
        /// Which input: "CA certificate", "node certificate" or "node key".
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The CA certificate is not a usable trust anchor.
    #[error("use the CA certificate as a trust anchor")]
    Anchor(#[source] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls rejected the configuration (e.g. the key does not match the
    /// certificate, or the key type is unsupported).
    #[error("build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The node's TLS configurations, one per direction, built once and shared
/// by every connection.
#[derive(Clone, Debug)]
pub struct PeerTls {
    /// For the peer listener: demands a client certificate from the cluster CA.
    pub server: Arc<rustls::ServerConfig>,
    /// For outgoing connections: presents the node's certificate and trusts
    /// only servers with a certificate from the cluster CA.
    pub client: Arc<rustls::ClientConfig>,
}

impl PeerTls {
    /// Builds both configurations from PEM files: the cluster CA certificate,
    /// this node's certificate (chain), and its private key.
    pub fn load(ca_pem: &Path, cert_pem: &Path, key_pem: &Path) -> Result<PeerTls, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source });
        PeerTls::from_pem(&read(ca_pem)?, &read(cert_pem)?, &read(key_pem)?)
    }

    /// Like [`PeerTls::load`], from PEM bytes already in memory (tests,
    /// secrets handed over by an orchestrator).
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<PeerTls, TlsError> {
        let roots = Arc::new(root_store(ca_pem)?);
        let chain = certificates(cert_pem, "node certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem { what: "node key", source })?;
        let provider = provider();

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        server.alpn_protocols = vec![ALPN_PEER_PROTOCOL.to_vec()];

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::Config)?;
        client.alpn_protocols = vec![ALPN_PEER_PROTOCOL.to_vec()];

        Ok(PeerTls { server: Arc::new(server), client: Arc::new(client) })
    }
}

/// A server configuration without client certificates, for the public API:
/// shoppers have no certificates. TLS 1.3 only, like the peer transport.
pub fn public_server_config(cert_pem: &Path, key_pem: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source });
    let chain = certificates(&read(cert_pem)?, "API certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(&read(key_pem)?).map_err(|source| TlsError::Pem { what: "API key", source })?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)
}

/// A client configuration that trusts exactly the CA in `ca_pem` and
/// presents no certificate: how `surge ctl` reaches a public API served
/// with a certificate from that CA.
pub fn public_client_config(ca_pem: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let ca = std::fs::read(ca_pem).map_err(|source| TlsError::Read { path: ca_pem.to_owned(), source })?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(root_store(&ca)?)
        .with_no_client_auth())
}

/// The crypto provider of every peer connection: rustls' `ring` backend (see
/// the workspace manifest for why not aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS name in node `node_id`'s certificate, and the name a client
/// verifies when it connects to that node.
pub fn node_dns_name(node_id: u64) -> String {
    format!("node-{node_id}.surge")
}

/// [`node_dns_name`] as the name a TLS client verifies.
pub fn server_name(node_id: u64) -> ServerName<'static> {
    ServerName::try_from(node_dns_name(node_id)).expect("node-<u64>.surge is a valid DNS name")
}

/// A trust store holding exactly the certificates in `ca_pem`.
pub fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(TlsError::Anchor)?;
    }
    Ok(roots)
}

/// Every certificate in a PEM input; none at all is an error, since an empty
/// trust store or chain would only fail later and less clearly.
fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, source: rustls::pki_types::pem::Error::NoItemsFound });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::certs::DevCa;

    #[test]
    fn builds_from_generated_certificates() {
        let ca = DevCa::generate().unwrap();
        let node = ca.issue(1).unwrap();
        PeerTls::from_pem(ca.cert_pem().as_bytes(), node.cert_pem.as_bytes(), node.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn rejects_missing_and_mismatched_inputs() {
        let ca = DevCa::generate().unwrap();
        let one = ca.issue(1).unwrap();
        let two = ca.issue(2).unwrap();
        let empty = PeerTls::from_pem(b"", one.cert_pem.as_bytes(), one.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(empty, TlsError::Pem { what: "CA certificate", .. }), "{empty:?}");
        let mismatched = PeerTls::from_pem(ca.cert_pem().as_bytes(), one.cert_pem.as_bytes(), two.key_pem.as_bytes());
        assert!(matches!(mismatched, Err(TlsError::Config(_))), "{mismatched:?}");
        let missing = PeerTls::load(Path::new("/nonexistent/ca.pem"), Path::new("a"), Path::new("b")).unwrap_err();
        assert!(matches!(missing, TlsError::Read { .. }), "{missing:?}");
    }
}
