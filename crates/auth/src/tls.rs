//! The TLS configs of every link (rustls, ring): mutual TLS, each side checked against the
//! cluster authority, and every handshake checked against the current revocation list (the
//! [`Trust`]'s cluster document, which a daemon updates while it runs).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::creds::Credentials;
use crate::doc::Trust;
use crate::identity::{self, Identity};
use crate::pki;
use crate::AuthError;

/// ring, with AES-128-GCM first: with AES-NI it is the cheapest suite per byte, and a
/// migration stream is gigabytes (ChaCha20 stays for peers without AES hardware).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn tls(e: impl std::fmt::Display) -> AuthError {
    AuthError::Tls(e.to_string())
}

fn roots(trust: &Trust) -> Result<Arc<RootCertStore>, AuthError> {
    let mut r = RootCertStore::empty();
    r.add(CertificateDer::from(trust.ca_der.clone()))
        .map_err(tls)?;
    Ok(Arc::new(r))
}

fn chain_and_key(
    c: &Credentials,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), AuthError> {
    let chain = vec![CertificateDer::from(c.cert_der()?)];
    let key = pki::pem_blocks(&c.key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| {
            AuthError::Tls(format!(
                "no private key in {}",
                Credentials::key_path(&c.dir).display()
            ))
        })?;
    Ok((chain, PrivateKeyDer::Pkcs8(key.into())))
}

/// Refuse a certificate the cluster revoked, or one that names no ferry identity.
fn check_revoked(trust: &Trust, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let bad = |m: String| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(AuthError::Tls(m)),
        )))
    };
    let (serial, _) =
        identity::cert_serial_and_expiry(end_entity).map_err(|e| bad(e.to_string()))?;
    let id = Identity::from_cert(end_entity).map_err(|e| bad(e.to_string()))?;
    if trust.is_revoked(&serial) {
        tracing::warn!("refused {id}: its certificate (serial {serial}) was revoked");
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust: Arc<Trust>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust(version {})", self.version())
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &ok {
            tracing::warn!("refused a client certificate: {e}");
        }
        let ok = ok?;
        check_revoked(&self.trust, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    trust: Arc<Trust>,
    /// Accept any file server or host of the cluster (its certificate checked against its own
    /// name) instead of the name dialled: for clients that reach an NBD server by address (a
    /// share's disk, or the copy a shared-nothing move's destination host serves).
    any_storage_peer: bool,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let own;
        let server_name = if self.any_storage_peer {
            let id = Identity::from_cert(end_entity)
                .map_err(|e| rustls::Error::General(format!("not a ferry certificate: {e}")))?;
            if !matches!(id.role, crate::Role::FileServer | crate::Role::Host) {
                return Err(rustls::Error::General(format!(
                    "{id} is neither a file server nor a host of this cluster"
                )));
            }
            own = self::server_name(&id.name).map_err(|e| rustls::Error::General(e.to_string()))?;
            &own
        } else {
            server_name
        };
        let ok =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        check_revoked(&self.trust, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server that requires every client to present a certificate of this cluster, not revoked.
pub fn server_config(c: &Credentials, trust: Arc<Trust>) -> Result<Arc<ServerConfig>, AuthError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(&trust)?, provider())
        .build()
        .map_err(tls)?;
    let (chain, key) = chain_and_key(c)?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(ClientVerifier { inner, trust }))
        .with_single_cert(chain, key)
        .map_err(tls)?;
    Ok(Arc::new(cfg))
}

/// A server for browsers (the web console): a certificate chain and key from PEM, no client
/// certificate asked, HTTP/1.1 offered by ALPN.
pub fn web_server_config(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, AuthError> {
    let chain: Vec<CertificateDer<'static>> = pki::pem_blocks(chain_pem, "CERTIFICATE")
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if chain.is_empty() {
        return Err(AuthError::Tls(
            "no CERTIFICATE in the certificate file".into(),
        ));
    }
    let key = pki::pem_blocks(key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| AuthError::Tls("no PRIVATE KEY (PKCS#8 PEM) in the key file".into()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key.into()))
        .map_err(tls)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A server that asks no client certificate (enrolment only: the join token authenticates).
pub fn enrolment_server_config(c: &Credentials) -> Result<Arc<ServerConfig>, AuthError> {
    let (chain, key) = chain_and_key(c)?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    Ok(Arc::new(cfg))
}

/// A client that presents `c`'s certificate and accepts only servers of this cluster, not
/// revoked, with the name it dials (see [`server_name`]).
pub fn client_config(c: &Credentials, trust: Arc<Trust>) -> Result<Arc<ClientConfig>, AuthError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(&trust)?, provider())
        .build()
        .map_err(tls)?;
    let (chain, key) = chain_and_key(c)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            inner,
            trust,
            any_storage_peer: false,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(tls)?;
    Ok(Arc::new(cfg))
}

/// A client that presents `c`'s certificate to any file server or host of this cluster (not
/// revoked), whatever address it was reached at: the VMM's NBD disks (`nbds://ADDR/share/disk`)
/// and the copies a shared-nothing move writes to its destination host. Which server may hold
/// what is the servers' business: each lets only the peers it expects open an export.
pub fn file_server_client_config(
    c: &Credentials,
    trust: Arc<Trust>,
) -> Result<Arc<ClientConfig>, AuthError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(&trust)?, provider())
        .build()
        .map_err(tls)?;
    let (chain, key) = chain_and_key(c)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            inner,
            trust,
            any_storage_peer: true,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(tls)?;
    Ok(Arc::new(cfg))
}

/// A client without a certificate that accepts servers certified by `ca_pem` (enrolment).
pub fn enrolment_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, AuthError> {
    let mut r = RootCertStore::empty();
    r.add(CertificateDer::from(pki::cert_der(ca_pem)?))
        .map_err(tls)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_root_certificates(r)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client that checks nothing: only for fetching the authority's certificate, which the
/// caller then checks against the pin in its join token before trusting anything.
pub fn pin_fetch_client_config() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth(),
    )
}

/// The name a client checks a host's (or file server's) certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, AuthError> {
    ServerName::try_from(identity::dns_name(host)).map_err(tls)
}

/// Who is on the other end of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    Identity::from_cert(certs?.first()?).ok()
}

/// The identity of a TLS client, as `role name` (an NBD server's view of who connected).
pub fn client_identity(c: &rustls::ServerConnection) -> Option<String> {
    peer_identity(c.peer_certificates()).map(|i| i.to_string())
}
