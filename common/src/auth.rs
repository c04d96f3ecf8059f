//! Per-tenant API keys, shared by the ingestor and the query API.
//!
//! The keys file has one key per line: `<tenant> <key>`; blank lines and lines starting with
//! `#` are ignored. A tenant may have several keys (rotation). Callers send
//! `authorization: Bearer <key>`.
//!
//! With mutual TLS (`--tls-client-ca`), a client certificate can stand for a key. Lines after a
//! `[client-certs]` line are `<tenant> <name>`: a caller whose verified certificate has `<name>`
//! as its subject CN, a DNS SAN or a URI SAN (e.g. `spiffe://acme/ingest`) is that tenant's.
//! An `[api-keys]` line switches back to keys. A call with an `authorization` header is judged
//! by its key alone; a call without one by its certificate.

use std::collections::HashMap;
use std::path::Path;

use crate::config::ConfigFile;
use crate::validate::is_valid_tenant;

/// Why a keys file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("api keys file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("api keys file {path} line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
    #[error("api keys file {path} has no keys")]
    Empty { path: String },
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization: send `authorization: Bearer <api key>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <api key>`")]
    Malformed,
    #[error("unknown api key")]
    UnknownKey,
    #[error("the client certificate ({0}) maps to no tenant and no api key was sent")]
    UnmappedCertificate(String),
}

/// The key -> tenant table. `None` in a service's config means keys are not enforced.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    tenant_by_key: HashMap<String, String>,
    tenant_by_client_name: HashMap<String, String>,
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, KeysFileError> {
        let file = ConfigFile::read(path).map_err(|(path, source)| KeysFileError::Read { path, source })?;
        Self::parse(&file.text)
            .map_err(|(line, reason)| KeysFileError::Line {
                path: file.path.clone(),
                line,
                reason,
            })
            .and_then(|keys| {
                if keys.tenant_by_key.is_empty() && keys.tenant_by_client_name.is_empty() {
                    Err(KeysFileError::Empty { path: file.path })
                } else {
                    Ok(keys)
                }
            })
    }

    /// Parses the file format; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut tenant_by_key = HashMap::new();
        let mut tenant_by_client_name = HashMap::new();
        let mut in_client_certs = false;
        for (number, line) in text.lines().enumerate().map(|(i, line)| (i + 1, line.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line {
                "[client-certs]" => in_client_certs = true,
                "[api-keys]" => in_client_certs = false,
                _ => {}
            }
            if line.starts_with('[') {
                if !matches!(line, "[client-certs]" | "[api-keys]") {
                    return Err((number, "sections are [api-keys] and [client-certs]".to_owned()));
                }
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(tenant), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
                let expected = if in_client_certs {
                    "<tenant> <certificate name>"
                } else {
                    "<tenant> <key>"
                };
                return Err((number, format!("expected `{expected}`")));
            };
            if !is_valid_tenant(tenant) {
                return Err((number, format!("tenant {tenant:?} must match [a-z0-9_-]{{1,64}}")));
            }
            if in_client_certs {
                if tenant_by_client_name
                    .insert(key.to_owned(), tenant.to_owned())
                    .is_some()
                {
                    return Err((number, "duplicate certificate name".to_owned()));
                }
                continue;
            }
            if key.len() < 16 {
                return Err((number, "api keys must be at least 16 characters".to_owned()));
            }
            if tenant_by_key.insert(key.to_owned(), tenant.to_owned()).is_some() {
                return Err((number, "duplicate key".to_owned()));
            }
        }
        Ok(Self {
            tenant_by_key,
            tenant_by_client_name,
        })
    }

    /// The tenant of the key in an `authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<&str, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(AuthError::Malformed)?;
        self.tenant_by_key
            .get(key)
            .map(String::as_str)
            .ok_or(AuthError::UnknownKey)
    }

    /// The tenant of a caller: by its key when it sends an `authorization` header, else by the
    /// names of its verified client certificate (`client_names`, empty without mutual TLS).
    pub fn authenticate_caller(&self, authorization: Option<&str>, client_names: &[String]) -> Result<&str, AuthError> {
        if authorization.is_some() || client_names.is_empty() {
            return self.authenticate(authorization);
        }
        client_names
            .iter()
            .find_map(|name| self.tenant_by_client_name.get(name))
            .map(String::as_str)
            .ok_or_else(|| AuthError::UnmappedCertificate(client_names.join(", ").chars().take(200).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# tenants\nacme  acme-key-0123456789\n\nglobex globex-key-0123456789\n";

    #[test]
    fn keys_map_to_tenants() {
        let keys = ApiKeys::parse(FILE).unwrap();
        assert_eq!(keys.authenticate(Some("Bearer acme-key-0123456789")), Ok("acme"));
        assert_eq!(keys.authenticate(Some("Bearer globex-key-0123456789")), Ok("globex"));
        assert_eq!(keys.authenticate(None), Err(AuthError::Missing));
        assert_eq!(keys.authenticate(Some("Basic abc")), Err(AuthError::Malformed));
        assert_eq!(keys.authenticate(Some("Bearer ")), Err(AuthError::Malformed));
        assert_eq!(
            keys.authenticate(Some("Bearer wrong-key-0123456789")),
            Err(AuthError::UnknownKey)
        );
    }

    #[test]
    fn client_certificate_names_map_to_tenants() {
        let file = "acme acme-key-0123456789\n[client-certs]\nacme ingest.acme.internal\n\
                    globex spiffe://globex/ingest\n[api-keys]\nglobex globex-key-0123456789\n";
        let keys = ApiKeys::parse(file).unwrap();
        let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            keys.authenticate_caller(None, &names(&["x", "ingest.acme.internal"])),
            Ok("acme")
        );
        assert_eq!(
            keys.authenticate_caller(None, &names(&["spiffe://globex/ingest"])),
            Ok("globex")
        );
        // A key, when sent, decides; the certificate does not rescue a wrong one.
        assert_eq!(
            keys.authenticate_caller(Some("Bearer globex-key-0123456789"), &names(&["ingest.acme.internal"])),
            Ok("globex")
        );
        assert_eq!(
            keys.authenticate_caller(Some("Bearer nope-0123456789abcdef"), &names(&["ingest.acme.internal"])),
            Err(AuthError::UnknownKey)
        );
        assert!(matches!(
            keys.authenticate_caller(None, &names(&["stranger"])),
            Err(AuthError::UnmappedCertificate(name)) if name == "stranger"
        ));
        assert_eq!(keys.authenticate_caller(None, &[]), Err(AuthError::Missing));
        // A file of certificate names only is valid; unknown sections are not.
        assert!(ApiKeys::parse("[client-certs]\nacme a.example\n").is_ok());
        assert_eq!(ApiKeys::parse("[certs]\nacme a.example\n").unwrap_err().0, 1);
        assert!(ApiKeys::parse("[client-certs]\nacme a\nglobex a\n")
            .unwrap_err()
            .1
            .contains("duplicate"));
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        assert_eq!(ApiKeys::parse("acme\n").unwrap_err().0, 1);
        assert_eq!(ApiKeys::parse("# c\nACME acme-key-0123456789\n").unwrap_err().0, 2);
        assert!(ApiKeys::parse("acme short\n").unwrap_err().1.contains("16"));
        assert!(ApiKeys::parse("a k0123456789abcdef\nb k0123456789abcdef\n")
            .unwrap_err()
            .1
            .contains("duplicate"));
    }
}
