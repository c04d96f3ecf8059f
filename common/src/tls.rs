//! TLS for the services' own listeners (the ingestor's gRPC port, the query API's HTTP port):
//! `--tls-cert`, `--tls-key` and, for mutual TLS, `--tls-client-ca`.
//!
//! - The certificate, key and client CA are PEM files, read again on SIGHUP and whenever their
//!   bytes change (checked every `--tls-reload-interval`). A reload only changes what *new*
//!   connections are handshaken with: established connections keep their session. A set of
//!   files that does not load (e.g. the certificate replaced before its key) is logged and
//!   counted, and the previous configuration stays in use.
//! - Handshakes run off the accept loop, each bounded in time, at most
//!   [`MAX_PENDING_HANDSHAKES`] at once, so a slow or silent client delays nobody else.
//! - With `--tls-client-ca`, every client must present a certificate issued by that CA. Its
//!   subject CN, DNS and URI SANs are the caller's [`ClientIdentity`], which the API keys file
//!   can map to a tenant (`chute_common::auth`).
//!
//! The crypto provider is rustls' `ring`, the one async-nats already brings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::parse_duration;
use crate::telemetry::{MetricDescription, MetricKind};

/// Handshakes in progress at once; further connections wait in the kernel's accept queue.
pub const MAX_PENDING_HANDSHAKES: usize = 512;
/// A client that has not finished its handshake by then is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN of a gRPC (HTTP/2) listener.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];
/// ALPN of an HTTP/1.1 listener.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// The TLS metrics, described by every service that serves TLS.
pub const METRICS: &[MetricDescription] = &[
    MetricDescription {
        name: "chute_tls_reloads_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "Loads of the TLS certificate, key and client CA after SIGHUP or a file change, by outcome (ok, error: the previous files stay in use).",
        zero_at_start: false,
    },
    MetricDescription {
        name: "chute_tls_handshake_failures_total",
        kind: MetricKind::Counter,
        unit: None,
        help: "TLS handshakes that failed or timed out (plaintext clients, unknown client certificates, ...).",
        zero_at_start: true,
    },
];

/// The TLS flags of a listener. No `--tls-cert`: plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain of the listener (leaf first). Turns TLS on; needs --tls-key.
    #[arg(long = "tls-cert", value_name = "TLS_CERT", env = "CHUTE_TLS_CERT")]
    pub cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long = "tls-key", value_name = "TLS_KEY", env = "CHUTE_TLS_KEY")]
    pub key: Option<PathBuf>,

    /// PEM CA bundle for mutual TLS: every client must present a certificate it issued. Its CN
    /// and SANs can map to a tenant in the API keys file (`[client-certs]`).
    #[arg(long = "tls-client-ca", value_name = "TLS_CLIENT_CA", env = "CHUTE_TLS_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes (SIGHUP reloads at once).
    #[arg(long = "tls-reload-interval", value_name = "TLS_RELOAD_INTERVAL")]
    #[arg(env = "CHUTE_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub reload_interval: Duration,
}

impl TlsArgs {
    /// Whether the flags turn TLS on (checked for completeness by [`ReloadingConfig::load`]).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert and --tls-key go together (--tls-client-ca needs both)")]
    Incomplete,
    #[error("tls file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("tls file {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls client ca {path}: {reason}")]
    ClientCa { path: String, reason: String },
}

/// The three files as last read, to tell a change apart from a re-read of the same bytes.
#[derive(Clone, PartialEq, Eq)]
struct FileSet {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The current rustls configuration of a listener, replaced as a whole on reload.
#[derive(Clone)]
pub struct ReloadingConfig {
    inner: Arc<ReloadInner>,
}

struct ReloadInner {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
    /// The bytes of the last load attempt, successful or not (a broken set is retried when it
    /// changes again or on SIGHUP, not on every poll).
    last_seen: Mutex<FileSet>,
}

impl ReloadingConfig {
    /// Loads the files named by `args`; `None` when TLS is off. `alpn` is what the listener
    /// speaks ([`ALPN_H2`], [`ALPN_HTTP1`]).
    pub fn load(args: &TlsArgs, alpn: &[&[u8]]) -> Result<Option<Self>, TlsError> {
        if !args.enabled() {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
            return Err(TlsError::Incomplete);
        };
        crate::telemetry::describe(METRICS);
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        let files = read_files(cert, key, args.client_ca.as_deref())?;
        let config = build_config(&files, cert, key, args.client_ca.as_deref(), &alpn)?;
        Ok(Some(Self {
            inner: Arc::new(ReloadInner {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.client_ca.clone(),
                alpn,
                current: RwLock::new(Arc::new(config)),
                last_seen: Mutex::new(files),
            }),
        }))
    }

    /// The configuration new connections are handshaken with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.inner.current.read().expect("tls config lock").clone()
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.inner.client_ca.is_some()
    }

    /// Reads the files again and, when they changed (or `force`), builds and installs a new
    /// configuration. `Ok(true)`: a new configuration is in use.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let inner = &self.inner;
        let files = read_files(&inner.cert, &inner.key, inner.client_ca.as_deref())?;
        {
            let mut last_seen = inner.last_seen.lock().expect("tls files lock");
            if !force && *last_seen == files {
                return Ok(false);
            }
            *last_seen = files.clone();
        }
        let config = build_config(&files, &inner.cert, &inner.key, inner.client_ca.as_deref(), &inner.alpn)?;
        *inner.current.write().expect("tls config lock") = Arc::new(config);
        Ok(true)
    }

    /// Reloads on SIGHUP and when the files change (checked every `interval`), until `shutdown`.
    pub async fn watch(self, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(error = %err, "no SIGHUP handler: tls files reload on change only");
                None
            }
        };
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup_received = std::future::pending::<Option<()>>();
            let force = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => false,
                _ = hangup_received => true,
            };
            self.reload_logged(force);
        }
    }

    fn reload_logged(&self, force: bool) {
        let trigger = if force { "sighup" } else { "file change" };
        match self.reload(force) {
            Ok(false) => {}
            Ok(true) => {
                metrics::counter!("chute_tls_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(trigger, cert = %self.inner.cert.display(), "tls certificate reloaded: new connections use it");
            }
            Err(err) => {
                metrics::counter!("chute_tls_reloads_total", "outcome" => "error").increment(1);
                tracing::warn!(trigger, error = %err, "tls reload failed: the previous certificate stays in use");
            }
        }
    }
}

fn read_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<FileSet, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(FileSet {
        cert: read(cert)?,
        key: read(key)?,
        client_ca: client_ca.map(read).transpose()?,
    })
}

fn certificates(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(err.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}

fn build_config(
    files: &FileSet,
    cert_path: &Path,
    key_path: &Path,
    client_ca_path: Option<&Path>,
    alpn: &[Vec<u8>],
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|err| TlsError::Pem {
        path: key_path.display().to_string(),
        reason: err.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match (&files.client_ca, client_ca_path) {
        (Some(bytes), Some(path)) => {
            let ca_error = |reason: String| TlsError::ClientCa {
                path: path.display().to_string(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in certificates(bytes, path)? {
                roots.add(ca).map_err(|err| ca_error(err.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| ca_error(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // `with_single_cert` also checks that the key belongs to the certificate.
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// TLS connections accepted on a listener: handshakes run in their own tasks and only
/// completed ones come out, as a `Stream` (tonic's `serve_with_incoming`) and as an
/// [`axum::serve::Listener`].
pub struct TlsIncoming {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsIncoming {
    /// Starts accepting on `listener`; the accept loop ends when this value is dropped.
    pub fn new(listener: TcpListener, config: ReloadingConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, config, sender));
        Ok(Self {
            connections,
            local_addr,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: ReloadingConfig,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = handshakes.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = sender.closed() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sender.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(config.current());
        let sender = sender.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = sender.send((stream, peer)).await;
                }
                Ok(Err(err)) => handshake_failed(peer, &err.to_string()),
                Err(_) => handshake_failed(peer, "timed out"),
            }
        });
    }
}

fn handshake_failed(peer: SocketAddr, reason: &str) {
    metrics::counter!("chute_tls_handshake_failures_total").increment(1);
    tracing::debug!(%peer, reason, "tls handshake failed");
}

impl futures::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections
            .poll_recv(cx)
            .map(|connection| connection.map(|(stream, _)| Ok(stream)))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

/// Who a caller is by its verified client certificate: the subject CN and the DNS and URI
/// SANs of the leaf. Empty without mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    names: Arc<[String]>,
}

impl ClientIdentity {
    /// The identity of a peer's certificate chain (leaf first), as rustls verified it.
    pub fn from_chain(chain: Option<&[CertificateDer<'_>]>) -> Self {
        let names = chain
            .and_then(|chain| chain.first())
            .map(certificate_names)
            .unwrap_or_default();
        Self { names: names.into() }
    }

    pub fn of_stream(stream: &TlsStream<TcpStream>) -> Self {
        Self::from_chain(stream.get_ref().1.peer_certificates())
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsIncoming>> for ClientIdentity {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsIncoming>) -> Self {
        Self::of_stream(stream.io())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for ClientIdentity {
    fn connect_info(_stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Self::default()
    }
}

/// CN, DNS SANs and URI SANs of a certificate, in that order, without duplicates.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    let mut names = common_names(parsed.subject());
    for name in parsed.valid_dns_names().chain(parsed.valid_uri_names()) {
        if !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// The DER tag, contents and remainder of the first element of `input`.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let len = rest[..octets]
            .iter()
            .fold(0usize, |len, &byte| (len << 8) | usize::from(byte));
        (len, &rest[octets..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The commonName values of an X.509 `Name` (its contents, without the outer SEQUENCE).
fn common_names(subject: &[u8]) -> Vec<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    // UTF8String, PrintableString, T61String, IA5String.
    const STRINGS: &[u8] = &[0x0c, 0x13, 0x14, 0x16];
    let mut names = Vec::new();
    let mut relative_names = subject;
    while let Some((SET, attributes, rest)) = der_element(relative_names) {
        relative_names = rest;
        let mut attributes = attributes;
        while let Some((SEQUENCE, attribute, rest)) = der_element(attributes) {
            attributes = rest;
            let Some((OID, oid, value)) = der_element(attribute) else {
                continue;
            };
            if oid != COMMON_NAME {
                continue;
            }
            if let Some((tag, text, _)) = der_element(value) {
                if let (true, Ok(text)) = (STRINGS.contains(&tag), std::str::from_utf8(text)) {
                    names.push(text.to_owned());
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(common_name: &str, sans: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::default();
        for san in sans {
            params.subject_alt_names.push(if san.contains("://") {
                rcgen::SanType::URI((*san).try_into().unwrap())
            } else {
                rcgen::SanType::DnsName((*san).try_into().unwrap())
            });
        }
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Chute tests");
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&signing_key).unwrap();
        rcgen::CertifiedKey { cert, signing_key }
    }

    #[test]
    fn names_are_the_cn_then_the_sans() {
        let issued = certificate("ingest.acme.internal", &["a.acme.internal", "spiffe://acme/ingest"]);
        let der = issued.cert.der().clone();
        assert_eq!(
            certificate_names(&der),
            ["ingest.acme.internal", "a.acme.internal", "spiffe://acme/ingest"]
        );
        let identity = ClientIdentity::from_chain(Some(&[der]));
        assert_eq!(identity.names().len(), 3);
        assert!(ClientIdentity::from_chain(None).names().is_empty());
        assert!(certificate_names(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])).is_empty());
    }

    #[test]
    fn der_lengths_are_bounded_by_the_input() {
        assert_eq!(
            der_element(&[0x30, 0x02, 0x05, 0x00]),
            Some((0x30, &[0x05, 0x00][..], &[][..]))
        );
        assert_eq!(
            der_element(&[0x30, 0x81, 0x01, 0xff, 0x01]),
            Some((0x30, &[0xff][..], &[0x01][..]))
        );
        assert_eq!(der_element(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_element(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der_element(&[0x30]), None);
        assert!(common_names(&[0x31, 0x7f, 0x30]).is_empty());
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reload_installs_changed_files_and_keeps_the_old_config_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let first = certificate("first", &["localhost"]);
        let args = TlsArgs {
            cert: Some(write(dir.path(), "cert.pem", &first.cert.pem())),
            key: Some(write(dir.path(), "key.pem", &first.signing_key.serialize_pem())),
            client_ca: None,
            reload_interval: Duration::from_secs(1),
        };
        let config = ReloadingConfig::load(&args, ALPN_H2).unwrap().unwrap();
        let before = config.current();
        assert_eq!(before.alpn_protocols, [b"h2".to_vec()]);
        assert!(!config.reload(false).unwrap(), "unchanged files are not reloaded");
        assert!(config.reload(true).unwrap(), "a forced reload (SIGHUP) always rebuilds");

        // A certificate without its key: refused, the last good configuration stays.
        let second = certificate("second", &["localhost"]);
        let in_use = config.current();
        write(dir.path(), "cert.pem", &second.cert.pem());
        assert!(config.reload(false).is_err());
        assert!(Arc::ptr_eq(&in_use, &config.current()));
        write(dir.path(), "key.pem", &second.signing_key.serialize_pem());
        assert!(config.reload(false).unwrap());
        assert!(!Arc::ptr_eq(&in_use, &config.current()));
    }

    #[test]
    fn incomplete_flags_are_refused_and_no_flags_mean_plaintext() {
        assert!(ReloadingConfig::load(&TlsArgs::default(), ALPN_H2).unwrap().is_none());
        let half = TlsArgs {
            cert: Some("cert.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(
            ReloadingConfig::load(&half, ALPN_H2),
            Err(TlsError::Incomplete)
        ));
    }
}
