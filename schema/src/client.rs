//! ClickHouse clients for the services: `http://` or `https://` URLs, HTTPS verified against the
//! system's trusted roots or a private CA (`--clickhouse-ca`), and the login of
//! [`ClickHouseLoginArgs`] (password inline or from a secret file).
//!
//! The `clickhouse` crate's own rustls features offer only the system or webpki roots, so the
//! HTTP client is built here on hyper-rustls with hyper-util's pool, configured as the crate's
//! default one (TCP keepalive 60 s, idle connections dropped after 2 s, under ClickHouse's 3 s
//! keep-alive timeout). The same pieces ([`tcp_connector`], [`https_connector`], [`pool`],
//! [`rustls_config`]) build the router's webhook client.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chute_common::config::ClickHouseLoginArgs;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Builder as PoolBuilder, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};

const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The TCP connector under every outbound HTTP client: keepalive probes after 60 s idle.
pub fn tcp_connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    connector
}

/// HTTP/1 over TLS (verified by `tls`) on a [`tcp_connector`]; with `plain_http_too`, `http://`
/// URLs are served in the clear as well, else they are refused.
pub fn https_connector(tls: rustls::ClientConfig, plain_http_too: bool) -> HttpsConnector<HttpConnector> {
    let mut tcp = tcp_connector();
    tcp.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let builder = if plain_http_too {
        builder.https_or_http()
    } else {
        builder.https_only()
    };
    builder.enable_http1().wrap_connector(tcp)
}

/// hyper-util's connection pool on tokio, dropping connections idle for `idle_timeout` (keep it
/// under the server's own keep-alive timeout); `.build(connector)` makes the client.
pub fn pool(idle_timeout: Duration) -> PoolBuilder {
    let mut builder = HyperClient::builder(TokioExecutor::new());
    builder.pool_idle_timeout(idle_timeout);
    builder
}

/// rustls with the ring provider (the one the workspace already uses), TLS 1.2 and 1.3, trusting
/// `roots` only.
pub fn rustls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// A client for `url` with no login: HTTPS when the URL says so, verified against the CA
/// certificates in the PEM file `ca`, or the system's roots when `ca` is `None`.
pub fn client_for_url(url: &str, ca: Option<&Path>) -> Result<clickhouse::Client> {
    let pool = pool(POOL_IDLE_TIMEOUT);
    let client = if is_https(url) {
        clickhouse::Client::with_http_client(pool.build(https_connector(tls_config(ca)?, false)))
    } else {
        clickhouse::Client::with_http_client(pool.build(tcp_connector()))
    };
    Ok(client.with_url(url))
}

/// A client for `url` logged in as `login` (database, user, password or password file, CA).
pub fn client(url: &str, login: &ClickHouseLoginArgs) -> Result<clickhouse::Client> {
    let password = login.resolve_password().map_err(Error::Secret)?;
    Ok(client_for_url(url, login.ca.as_deref())?
        .with_database(&login.database)
        .with_user(&login.user)
        .with_password(password))
}

fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// [`rustls_config`] trusting the CA certificates in `ca`, or the system's roots.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig> {
    let roots = match ca {
        Some(path) => private_roots(path)?,
        None => system_roots()?,
    };
    rustls_config(roots).map_err(|err| Error::Tls(err.to_string()))
}

fn private_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|err| Error::Tls(format!("read CA file {}: {err}", path.display())))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|err| Error::Tls(format!("CA file {}: {err}", path.display())))?;
        roots
            .add(certificate)
            .map_err(|err| Error::Tls(format!("CA file {}: {err}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!("CA file {} holds no certificate", path.display())));
    }
    Ok(roots)
}

fn system_roots() -> Result<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "no trusted root certificates on this system ({:?}); give the CA with --clickhouse-ca",
            found.errors
        )));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_is_told_apart_by_scheme() {
        assert!(is_https("https://ch.example:8443"));
        assert!(is_https("HTTPS://ch.example"));
        assert!(!is_https("http://127.0.0.1:8123"));
        assert!(!is_https("http"));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let error = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
        let empty = std::env::temp_dir().join(format!("chute-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = tls_config(Some(&empty)).unwrap_err();
        let _ = std::fs::remove_file(&empty);
        assert!(error.to_string().contains("holds no certificate"), "{error}");
    }

    #[test]
    fn the_password_file_wins_over_the_inline_password() {
        let file = std::env::temp_dir().join(format!("chute-ch-password-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").unwrap();
        let login = ClickHouseLoginArgs {
            password: "inline".into(),
            password_file: Some(file.clone()),
            ..ClickHouseLoginArgs::default()
        };
        assert_eq!(login.resolve_password().unwrap(), "from-file");
        let _ = std::fs::remove_file(&file);
        let missing = ClickHouseLoginArgs {
            password_file: Some("/nonexistent/secret".into()),
            ..ClickHouseLoginArgs::default()
        };
        let error = client("http://127.0.0.1:1", &missing).err().unwrap();
        assert!(error.to_string().contains("/nonexistent/secret"), "{error}");
    }
}
