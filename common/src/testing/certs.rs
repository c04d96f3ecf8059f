//! Certificates for TLS tests, generated in the test (rcgen): a CA, server certificates for
//! `localhost` / `127.0.0.1`, client certificates with a CN and SANs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A certificate authority that issues test certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate, DER (to compare with what a peer presented).
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate a CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, common_name: &str) -> Issued {
        let sans = vec![
            SanType::DnsName("localhost".try_into().expect("dns name")),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ];
        self.issue(common_name, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with `common_name` and DNS SANs (`scheme://...` become URI SANs).
    pub fn client(&self, common_name: &str, sans: &[&str]) -> Issued {
        let sans = sans
            .iter()
            .map(|san| {
                if san.contains("://") {
                    SanType::URI((*san).try_into().expect("uri"))
                } else {
                    SanType::DnsName((*san).try_into().expect("dns name"))
                }
            })
            .collect();
        self.issue(common_name, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, common_name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes the CA certificate to `dir/<name>`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write the CA certificate");
        path
    }
}

impl Issued {
    /// Writes `dir/<stem>.crt` and `dir/<stem>.key`, replacing them atomically (a rename), as
    /// a secret mount or cert-manager would.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let write = |name: String, text: &str| {
            let path = dir.join(&name);
            let staged = dir.join(format!(".{name}.tmp"));
            std::fs::write(&staged, text).expect("write a certificate file");
            std::fs::rename(&staged, &path).expect("rename a certificate file into place");
            path
        };
        (
            write(format!("{stem}.crt"), &self.cert_pem),
            write(format!("{stem}.key"), &self.key_pem),
        )
    }
}
