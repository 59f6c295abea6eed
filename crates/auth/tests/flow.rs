//! The authority, credentials, mutual TLS and grants together, on loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use ferry_auth::authority::Authority;
use ferry_auth::grant::{self, GrantClaims};
use ferry_auth::{pki, tls, Credentials, Identity};

fn enrol(a: &mut Authority, id: &Identity, dir: &std::path::Path) -> Credentials {
    let t = a.token(id, 60).unwrap();
    let (key, csr) = pki::new_request(id).unwrap();
    let (_, e) = a.redeem(&t, &csr).unwrap();
    Credentials::save(dir, &key.serialize_pem(), &e).unwrap()
}

/// One TLS exchange: the server answers "ok NAME" with the client's identity; `Err` if the
/// handshake (or the first read) fails.
fn exchange(server: &Credentials, client: &Credentials, dial_as: &str) -> Result<String, String> {
    let st = Arc::new(server.trust().unwrap());
    let ct = Arc::new(client.trust().unwrap());
    let scfg = tls::server_config(server, st).unwrap();
    let ccfg = tls::client_config(client, ct).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || -> Result<(), String> {
        let (s, _) = l.accept().unwrap();
        let conn = rustls::ServerConnection::new(scfg).unwrap();
        let mut t = rustls::StreamOwned::new(conn, s);
        let mut b = [0u8; 4];
        t.read_exact(&mut b).map_err(|e| e.to_string())?;
        let who = tls::peer_identity(t.conn.peer_certificates()).unwrap();
        t.write_all(format!("ok {}", who.name).as_bytes())
            .map_err(|e| e.to_string())?;
        t.conn.send_close_notify();
        let _ = t.flush();
        Ok(())
    });
    let s = TcpStream::connect(addr).unwrap();
    let conn = rustls::ClientConnection::new(ccfg, tls::server_name(dial_as).unwrap()).unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    let r = (|| {
        t.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut out = String::new();
        t.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })();
    let _ = srv.join();
    r
}

#[test]
fn mutual_tls_checks_names_authority_and_revocation() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Authority::init(&d.path().join("ca"), "lab").unwrap();
    let hv1 = enrol(
        &mut a,
        &Identity::host("hv1").unwrap(),
        &d.path().join("hv1"),
    );
    let hv2 = enrol(
        &mut a,
        &Identity::host("hv2").unwrap(),
        &d.path().join("hv2"),
    );
    assert_eq!(exchange(&hv2, &hv1, "hv2").unwrap(), "ok hv1");
    // The server must be the host dialled.
    assert!(exchange(&hv2, &hv1, "hv3").is_err());
    // Another cluster's certificate is refused.
    let mut other = Authority::init(&d.path().join("ca2"), "lab").unwrap();
    let stranger = enrol(
        &mut other,
        &Identity::host("hv1").unwrap(),
        &d.path().join("x"),
    );
    assert!(exchange(&hv2, &stranger, "hv2").is_err());
    // A removed host is refused by a part that has the new document.
    let jws = a.remove(&Identity::host("hv1").unwrap()).unwrap();
    hv2.save_doc(&jws).unwrap();
    let e = exchange(&hv2, &hv1, "hv2").unwrap_err();
    assert!(!e.is_empty());
}

#[test]
fn grants_are_checked_for_signer_expiry_and_tampering() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Authority::init(&d.path().join("ca"), "lab").unwrap();
    let alice = enrol(
        &mut a,
        &Identity::admin("alice").unwrap(),
        &d.path().join("alice"),
    );
    let hv1 = enrol(
        &mut a,
        &Identity::host("hv1").unwrap(),
        &d.path().join("hv1"),
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = GrantClaims {
        vm: "web01".into(),
        from: "hv1".into(),
        to: "hv2".into(),
        disks: vec!["/srv/web01.img".into()],
        shares: vec![],
        exp: now + 300,
        iat: now,
        jti: "j1".into(),
        admin: "alice".into(),
    };
    let t = grant::sign(&alice, &claims).unwrap();
    let trust = Arc::new(hv1.trust().unwrap());
    let (c, who) = grant::verify(&t, &trust).unwrap();
    assert_eq!(c, claims);
    assert_eq!(who.name, "alice");
    // A host cannot sign grants.
    assert!(grant::sign(&hv1, &claims).is_err());
    // Expired.
    let old = grant::sign(
        &alice,
        &GrantClaims {
            exp: now - 60,
            ..claims.clone()
        },
    )
    .unwrap();
    assert!(grant::verify(&old, &trust)
        .unwrap_err()
        .to_string()
        .contains("expired"));
    // Altered: another VM in the payload, same signature.
    let parts: Vec<&str> = t.split('.').collect();
    use base64::Engine;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut body: serde_json::Value = serde_json::from_slice(&b.decode(parts[1]).unwrap()).unwrap();
    body["vm"] = "db01".into();
    let forged = format!("{}.{}.{}", parts[0], b.encode(body.to_string()), parts[2]);
    let e = grant::verify(&forged, &trust).unwrap_err().to_string();
    assert!(e.contains("signature"), "{e}");
    // Signed by a removed admin.
    let jws = a.remove(&Identity::admin("alice").unwrap()).unwrap();
    trust.update(&jws).unwrap();
    assert!(grant::verify(&t, &trust)
        .unwrap_err()
        .to_string()
        .contains("removed"));
}
