//! How scopegate verifies an `https://` upstream and proves itself to it: the trust store
//! (the machine's CA store, or the upstream's `ca_file`), the client certificate for mutual
//! TLS, and the name the certificate must carry. There is no switch that turns verification
//! off. One rustls client configuration per upstream, shared by every worker, so its session
//! cache lets pooled connections resume instead of paying a full handshake.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use crate::tls::{self, ALPN_HTTP11};

/// The per-upstream TLS settings of the policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// Trusted instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// The name the certificate must carry (and SNI), when not the URL's host.
    pub server_name: Option<String>,
}

impl TlsOptions {
    pub fn is_empty(&self) -> bool {
        *self == TlsOptions::default()
    }
}

/// A bad TLS setting: the policy field it came from and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettingError {
    pub field: &'static str,
    pub problem: String,
}

/// Everything a TLS connection to one upstream needs.
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub options: TlsOptions,
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        self.options == other.options && self.server_name == other.server_name
    }
}

impl Eq for TlsClient {}

impl TlsClient {
    /// Reads the files `options` names; `host` is the URL's host (no brackets).
    pub fn new(host: &str, options: TlsOptions) -> Result<TlsClient, TlsSettingError> {
        let fail = |field: &'static str| move |problem: String| TlsSettingError { field, problem };
        let name = options.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|_| {
            fail(if options.server_name.is_some() {
                "upstream.tls_server_name"
            } else {
                "upstream.url"
            })(format!("{name:?} is not a valid DNS name or IP address"))
        })?;
        let roots = match &options.ca_file {
            Some(path) => Arc::new(
                tls::read_roots(path, "upstream.ca_file").map_err(fail("upstream.ca_file"))?,
            ),
            None => system_roots().map_err(fail("upstream.url"))?,
        };
        let builder = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("upstream.url")(format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&options.client_cert_file, &options.client_key_file) {
            (Some(cert), Some(key)) => {
                let certs = tls::read_certs(cert, "upstream.client_cert_file")
                    .map_err(fail("upstream.client_cert_file"))?;
                let key = tls::read_key(key, "upstream.client_key_file")
                    .map_err(fail("upstream.client_key_file"))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    fail("upstream.client_key_file")(format!(
                        "does not fit the certificate in client_cert_file: {e}"
                    ))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(fail("upstream.client_key_file")(
                    "client_cert_file is set: give the key too".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(fail("upstream.client_cert_file")(
                    "client_key_file is set: give the certificate too".into(),
                ));
            }
        };
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(TlsClient {
            options,
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The machine's CA store, read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| tls::system_roots().map(Arc::new))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_errors_name_the_field() {
        let missing = TlsOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        let e = TlsClient::new("example.com", missing).unwrap_err();
        assert_eq!(e.field, "upstream.ca_file");
        assert!(e.problem.contains("/nonexistent/ca.pem"), "{}", e.problem);
        let half = TlsOptions {
            client_cert_file: Some("/nonexistent/c.pem".into()),
            ..TlsOptions::default()
        };
        let e = TlsClient::new("example.com", half).unwrap_err();
        assert_eq!(e.field, "upstream.client_key_file");
        let bad_name = TlsOptions {
            server_name: Some("not a name".into()),
            ..TlsOptions::default()
        };
        let e = TlsClient::new("example.com", bad_name).unwrap_err();
        assert_eq!(e.field, "upstream.tls_server_name");
    }

    #[test]
    fn system_roots_verify_by_default() {
        // The CI machines have the Debian bundle (scripts/test.sh installs ca-certificates).
        let c = TlsClient::new("example.com", TlsOptions::default()).unwrap();
        assert_eq!(c.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert_eq!(c.server_name, ServerName::try_from("example.com").unwrap());
    }
}
