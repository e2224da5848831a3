//! How a connection between an agent and an orchestrator is protected.
//!
//! By default: the shared-key handshake of `distripool_protocol`, then every
//! byte sealed with the session's keys. Sites with their own PKI may instead
//! run every connection inside mutual TLS 1.3 (certificates required on both
//! sides, checked against the site's CA); the distripool handshake still runs
//! inside it, so versions, roles and clusters are checked the same way, and
//! the key, if one is set, must match too.
//!
//! rustls is given its crypto provider (*ring*) explicitly for every
//! configuration; nothing is installed as the process-wide default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use distripool_protocol::Binding;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// PEM files for mutual TLS: the CA that signs every certificate of the
/// cluster, this side's certificate (chain) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One side's protection settings.
#[derive(Debug, Clone)]
pub struct Security {
    /// The shared key (may be empty on loopback, or under TLS).
    pub key: Vec<u8>,
    /// Workers join only an orchestrator of the same cluster.
    pub cluster: String,
    /// Seal every byte after the handshake. Turning it off is for
    /// measurements and networks the operator trusts; both sides must agree.
    pub encrypt: bool,
    pub tls: Option<TlsFiles>,
}

impl Default for Security {
    fn default() -> Self {
        Self { key: Vec::new(), cluster: Binding::default().cluster, encrypt: true, tls: None }
    }
}

impl Security {
    /// What the handshake binds. Under TLS the stream is already protected,
    /// so frames are not sealed a second time.
    pub fn binding(&self) -> Binding {
        Binding::new(self.cluster.clone(), self.encrypt && self.tls.is_none())
    }

    /// Check the settings before anything listens or connects.
    pub fn validate(&self) -> Result<()> {
        if self.cluster.len() > distripool_protocol::handshake::MAX_CLUSTER {
            return Err(Error::Config(format!(
                "cluster name is {} bytes long; the limit is {}",
                self.cluster.len(),
                distripool_protocol::handshake::MAX_CLUSTER
            )));
        }
        Ok(())
    }
}

/// Any byte stream a session can run over: plain TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("TLS {what} {}: {e}", path.display()))
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(what, path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, path, e))?;
    if certs.is_empty() {
        return Err(tls_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_error("private key", path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path, "CA file")? {
        store.add(cert).map_err(|e| tls_error("CA file", path, e))?;
    }
    Ok(Arc::new(store))
}

/// The orchestrator's side: TLS 1.3 only, client certificates required and
/// checked against the CA.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| tls_error("CA file", &files.ca, e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert, "certificate")?, load_key(&files.key)?)
        .map_err(|e| tls_error("certificate or key", &files.cert, e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The agent's side: TLS 1.3 only, presents its certificate, and checks
/// the orchestrator's against the CA and the host name it dialled.
pub fn tls_connector(files: &TlsFiles) -> Result<tokio_rustls::TlsConnector> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert, "certificate")?, load_key(&files.key)?)
        .map_err(|e| tls_error("certificate or key", &files.cert, e))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name an orchestrator's certificate must carry for `addr` (`host:port`).
pub fn server_name(addr: &str) -> Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::Config(format!("{host:?} cannot be checked against a TLS certificate: {e}")))
}

/// How an agent dials: TLS or not, decided once.
#[derive(Clone)]
pub enum Dialer {
    Plain,
    Tls(tokio_rustls::TlsConnector),
}

impl Dialer {
    pub fn new(security: &Security) -> Result<Self> {
        security.validate()?;
        Ok(match &security.tls {
            None => Dialer::Plain,
            Some(files) => Dialer::Tls(tls_connector(files)?),
        })
    }

    /// Wrap a connected socket; `addr` names the orchestrator for TLS.
    pub async fn wrap(&self, tcp: TcpStream, addr: &str) -> Result<Box<dyn Stream>> {
        match self {
            Dialer::Plain => Ok(Box::new(tcp)),
            Dialer::Tls(c) => {
                let tls = c
                    .connect(server_name(addr)?, tcp)
                    .await
                    .map_err(|e| Error::Tls(format!("TLS handshake with {addr} failed: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }
}

/// An I/O error that is really TLS refusing us (in TLS 1.3 a server's
/// verdict on our certificate arrives with the first read, after the TLS
/// handshake seemed to succeed) becomes a TLS error that says so.
pub fn explain_tls(e: Error, addr: &str) -> Error {
    match e {
        Error::Io(io) => match io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => Error::Tls(format!("TLS handshake with {addr} failed: {tls}")),
            None => Error::Io(io),
        },
        other => other,
    }
}

/// How an orchestrator accepts: TLS or not, decided once.
#[derive(Clone)]
pub enum Acceptor {
    Plain,
    Tls(tokio_rustls::TlsAcceptor),
}

impl Acceptor {
    pub fn new(security: &Security) -> Result<Self> {
        security.validate()?;
        Ok(match &security.tls {
            None => Acceptor::Plain,
            Some(files) => Acceptor::Tls(tls_acceptor(files)?),
        })
    }

    pub async fn wrap(&self, tcp: TcpStream) -> Result<Box<dyn Stream>> {
        match self {
            Acceptor::Plain => Ok(Box::new(tcp)),
            Acceptor::Tls(a) => {
                let tls =
                    a.accept(tcp).await.map_err(|e| Error::Tls(format!("TLS handshake failed: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }
}
