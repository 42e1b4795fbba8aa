//! TLS on rustls with the ring provider, below HTTP: the stream ([`stream::TlsStream`]), the
//! PEM files that configure it (read once, errors naming the setting and the file), the
//! machine's CA store, the listener's reloadable configuration ([`server`]) and the counters
//! of failed handshakes. Nothing here knows about MCP or the policy.

pub mod server;
pub mod stream;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider every TLS configuration is built on.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN: scopegate speaks HTTP/1.1 on both sides.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Where Linux distributions keep the system CA bundle (Debian/Ubuntu first).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A certificate chain from a PEM file; `what` names the setting in errors.
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "{what}: {}: not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// A private key (PKCS#8, PKCS#1 or SEC1) from a PEM file; `what` names the setting in errors.
pub fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{what}: {}: no usable PEM private key: {e}", path.display()))
}

/// A trust store made of the certificates in a PEM bundle (a private CA).
pub fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certs(path, what)?);
    if added == 0 {
        return Err(format!(
            "{what}: {}: no certificate in it can be a trust anchor",
            path.display()
        ));
    }
    Ok(roots)
}

/// The machine's CA store: `SSL_CERT_FILE` when set, else the distribution's bundle.
pub fn system_roots() -> Result<RootCertStore, String> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        return read_roots(Path::new(&file), "SSL_CERT_FILE");
    }
    for bundle in SYSTEM_BUNDLES {
        if Path::new(bundle).exists() {
            return read_roots(Path::new(bundle), "the system CA bundle");
        }
    }
    Err(format!(
        "no system CA bundle found (looked for {}); install ca-certificates, set SSL_CERT_FILE, \
         or give the upstream a ca_file",
        SYSTEM_BUNDLES.join(", ")
    ))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))
}

/// Why a TLS handshake or session failed, in words an operator can act on; also the `reason`
/// label of `scopegate_tls_failures_total`.
pub fn failure_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "certificate expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate not yet valid",
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "certificate not valid for this host"
            }
            C::UnknownIssuer => "certificate from an unknown CA",
            C::Revoked => "certificate revoked",
            C::BadSignature => "certificate badly signed",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "certificate not for this purpose"
            }
            _ => "certificate rejected",
        },
        E::NoCertificatesPresented => "no certificate presented",
        E::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            "peer requires a client certificate"
        }
        E::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::CertificateExpired,
        ) => "peer rejected our certificate",
        E::AlertReceived(_) => "peer refused the handshake",
        E::NoApplicationProtocol => "no common application protocol (ALPN)",
        E::PeerIncompatible(_) => "no common TLS version or cipher suite",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => "peer does not speak TLS",
        _ => "handshake failed",
    }
}

/// The rustls error inside an I/O error from a [`stream::TlsStream`], if it is one.
pub fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Failed handshakes, by peer (an upstream's name, or `None` for agents at the listener) and
/// reason, for the whole process. Failures are per connection, not per call, so one lock is
/// cheap enough.
type Failures = BTreeMap<(Option<String>, &'static str), u64>;
static FAILURES: Mutex<Failures> = Mutex::new(BTreeMap::new());

/// Counts one failed handshake with an upstream (`Some(name)`) or an agent (`None`).
pub fn count_failure(upstream: Option<&str>, reason: &'static str) {
    let mut failures = FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    *failures
        .entry((upstream.map(str::to_owned), reason))
        .or_insert(0) += 1;
}

/// Every (upstream or listener, reason, count) so far, for the metrics scrape.
pub fn failures() -> Vec<(Option<String>, &'static str, u64)> {
    let failures = FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    failures
        .iter()
        .map(|((peer, reason), n)| (peer.clone(), *reason, *n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_name_the_setting_and_file() {
        let e = read_certs(Path::new("/nonexistent/ca.pem"), "upstream.ca_file").unwrap_err();
        assert!(
            e.starts_with("upstream.ca_file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("sg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = read_certs(&junk, "SCOPEGATE_TLS_CERT").unwrap_err();
        assert!(
            e.contains("SCOPEGATE_TLS_CERT") && e.contains("junk.pem"),
            "{e}"
        );
        let e = read_key(&junk, "SCOPEGATE_TLS_KEY").unwrap_err();
        assert!(
            e.contains("SCOPEGATE_TLS_KEY") && e.contains("no usable PEM private key"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reasons_say_what_went_wrong() {
        use rustls::CertificateError as C;
        let expired = rustls::Error::InvalidCertificate(C::Expired);
        assert_eq!(failure_reason(&expired), "certificate expired");
        let unknown = rustls::Error::InvalidCertificate(C::UnknownIssuer);
        assert_eq!(failure_reason(&unknown), "certificate from an unknown CA");
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown.clone());
        assert_eq!(tls_error(&io), Some(&unknown));
    }

    #[test]
    fn failures_are_counted_per_peer_and_reason() {
        count_failure(Some("tls-test-peer"), "certificate expired");
        count_failure(Some("tls-test-peer"), "certificate expired");
        let n = failures()
            .into_iter()
            .find(|(p, r, _)| p.as_deref() == Some("tls-test-peer") && *r == "certificate expired")
            .map(|(_, _, n)| n);
        assert_eq!(n, Some(2));
    }
}
