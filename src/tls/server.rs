//! The HTTPS listener's configuration: certificate, key and (optionally) the CA agents'
//! certificates must come from, read from PEM files at start and again on reload. A reload
//! swaps the configuration new handshakes use; connections already open keep theirs, so
//! nothing is dropped when a renewed certificate is installed.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use super::{ALPN_HTTP11, provider, read_certs, read_key, read_roots};

/// Where the listener's certificate, key and client CA are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, agents must present a certificate issued by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The listener's current TLS configuration, shared by every worker.
pub struct ListenerTls {
    files: ListenerFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ListenerTls {
    /// Reads the files; an error names the variable and the file.
    pub fn load(files: ListenerFiles) -> Result<ListenerTls, String> {
        let config = build(&files)?;
        Ok(ListenerTls {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The configuration a new handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again. On error the running configuration stays in place.
    pub fn reload(&self) -> Result<(), String> {
        let config = Arc::new(build(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    pub fn requires_client_certificate(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn build(files: &ListenerFiles) -> Result<ServerConfig, String> {
    let certs = read_certs(&files.cert, "SCOPEGATE_TLS_CERT")?;
    let key = read_key(&files.key, "SCOPEGATE_TLS_KEY")?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = read_roots(ca, "SCOPEGATE_TLS_CLIENT_CA")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("SCOPEGATE_TLS_CLIENT_CA: {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "SCOPEGATE_TLS_KEY: {} does not fit the certificate in {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Resumption without a handshake's signature: stateless tickets (TLS 1.2 and 1.3).
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| format!("TLS setup: session tickets: {e}"))?;
    Ok(config)
}
