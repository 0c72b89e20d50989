//! rustls configurations from PEM: the client-facing server config (`[tls]`)
//! and each tenant's upstream client config (`upstream_ssl`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Where the system's CA bundle is on Debian-like systems: the roots for
/// `upstream_verify = "peer"` without `upstream_tls_ca`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))
}

/// The client-facing TLS configuration from a certificate chain and key file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let certs = parse_certs(&read(cert)?)?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(read(key)?.as_bytes())
        .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    // PostgreSQL clients speak the protocol right after the handshake; no ALPN needed.
    cfg.ignore_client_order = true;
    // No TLS 1.3 session tickets: libpq never resumes a session, and every
    // login made two tickets and stored two sessions in rustls' cache.
    cfg.send_tls13_tickets = 0;
    // The engine's sessions learn the client's SNI name through the
    // certificate resolver (rustls' unbuffered API does not report it).
    engine::tls::capture_sni(&mut cfg);
    Ok(Arc::new(cfg))
}

/// A tenant's TLS configuration towards its database.
pub fn upstream_config(
    verify: &str,
    ca: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let cfg = match verify {
        "none" => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        "peer" => {
            let pem = match ca {
                Some(ca) => ca.to_string(),
                None => std::fs::read_to_string(SYSTEM_CA_BUNDLE).map_err(|e| {
                    format!(
                        "upstream_verify = \"peer\" without upstream_tls_ca needs the system CA \
                         bundle {SYSTEM_CA_BUNDLE}: {e}"
                    )
                })?,
            };
            let mut roots = rustls::RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(parse_certs(&pem)?);
            if added == 0 {
                return Err("upstream_tls_ca holds no usable CA certificate".into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        other => {
            return Err(format!(
                "upstream_verify must be \"none\" or \"peer\", not {other:?}"
            ))
        }
    };
    Ok(Arc::new(cfg))
}

/// `upstream_verify = "none"`: encryption without authentication of the
/// database (signatures are still checked, so the handshake is sound).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
