//! Keys, certificate requests and certificates (rcgen, ECDSA P-256: what rustls, OpenSSL,
//! GnuTLS (qemu-nbd) and libnbd all speak).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::identity::Identity;
use crate::AuthError;

fn rc(e: rcgen::Error) -> AuthError {
    AuthError::Pki(e.to_string())
}

/// A new private key (PKCS#8 PEM).
pub fn new_key() -> Result<KeyPair, AuthError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc)
}

/// A new CA: its key and its self-signed certificate (PEM), valid for `days`.
pub fn new_ca(cluster: &str, days: i64) -> Result<(KeyPair, String), AuthError> {
    let key = new_key()?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    p.distinguished_name.push(
        DnType::CommonName,
        format!("ferry cluster {cluster} authority"),
    );
    p.distinguished_name.push(DnType::OrganizationName, "ferry");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    let cert = p.self_signed(&key).map_err(rc)?;
    Ok((key, cert.pem()))
}

/// A self-signed server certificate for `names` (DNS names or IP addresses), valid for
/// `days`: its key and certificate, both PEM. For a web console no cluster issued a
/// certificate for; browsers ask the user to accept it once (its fingerprint is printed).
pub fn new_self_signed(names: &[String], days: i64) -> Result<(String, String), AuthError> {
    let key = new_key()?;
    let mut p = CertificateParams::new(names.to_vec()).map_err(rc)?;
    p.distinguished_name
        .push(DnType::CommonName, "ferry web console");
    p.distinguished_name.push(DnType::OrganizationName, "ferry");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    let cert = p.self_signed(&key).map_err(rc)?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// A key and a certificate request for `id`, made where the key will live.
pub fn new_request(id: &Identity) -> Result<(KeyPair, String), AuthError> {
    let key = new_key()?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    p.distinguished_name
        .push(DnType::CommonName, id.name.clone());
    let csr = p.serialize_request(&key).map_err(rc)?;
    Ok((key, csr.pem().map_err(rc)?))
}

/// Sign a certificate request for `id` (the identity comes from the authority, never from the
/// request), valid from `not_before` for `valid`.
pub fn sign_request(
    ca_key: &KeyPair,
    ca_cert_pem: &str,
    csr_pem: &str,
    id: &Identity,
    serial: u64,
    not_before: OffsetDateTime,
    valid: Duration,
) -> Result<String, AuthError> {
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(rc)?;
    let mut req = CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc)?;
    let p = &mut req.params;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, id.name.clone());
    p.distinguished_name.push(DnType::OrganizationName, "ferry");
    let mut sans = vec![SanType::URI(id.uri().try_into().map_err(rc)?)];
    if id.role != crate::identity::Role::Admin {
        sans.push(SanType::DnsName(id.dns().try_into().map_err(rc)?));
    }
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
    p.not_before = not_before;
    p.not_after = not_before + valid;
    let cert = req.signed_by(&issuer).map_err(rc)?;
    Ok(cert.pem())
}

/// PEM blocks of `kind` ("CERTIFICATE", ...) in `pem`, as DER.
pub fn pem_blocks(pem: &str, kind: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {kind}-----");
    let end = format!("-----END {kind}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(a) = rest.find(&begin) {
        let body = &rest[a + begin.len()..];
        let Some(b) = body.find(&end) else { break };
        let b64: String = body[..b].split_whitespace().collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &body[b + end.len()..];
    }
    out
}

/// The first certificate in `pem`, as DER.
pub fn cert_der(pem: &str) -> Result<Vec<u8>, AuthError> {
    pem_blocks(pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| AuthError::BadCert("no certificate in the PEM".into()))
}

/// SHA-256 of a certificate (hex), as join tokens pin the CA.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
