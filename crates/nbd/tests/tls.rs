//! STARTTLS: a server that requires TLS, against the ferry client, qemu-img and nbdinfo.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ferry_nbd::export::{Export, ExportProvider, Peer, RawFileExport, Refusal};
use ferry_nbd::{Client, ClientError, ClientTls, ServerTls};

/// The client's CN, found in its certificate (good enough for a test identity callback).
fn identity(c: &rustls::ServerConnection) -> Option<String> {
    let der = c.peer_certificates()?.first()?;
    der.windows(8)
        .any(|w| w == b"client-1")
        .then(|| "client-1".to_string())
}

/// Serves "disk" and records the TLS identity of every opener.
struct Recording {
    export: Arc<RawFileExport>,
    seen: Mutex<Vec<Option<String>>>,
}

impl ExportProvider for Recording {
    fn open(&self, name: &str, peer: &Peer) -> Result<Arc<dyn Export>, Refusal> {
        self.seen.lock().unwrap().push(peer.tls_identity.clone());
        if name == "disk" {
            Ok(self.export.clone())
        } else {
            Err(Refusal::Unknown(name.into()))
        }
    }
    fn list(&self, _peer: &Peer) -> Vec<String> {
        vec!["disk".into()]
    }
}

struct Setup {
    _d: tempfile::TempDir,
    pki: Pki,
    addr: std::net::SocketAddr,
    want: Vec<u8>,
    provider: Arc<Recording>,
}

fn setup() -> Setup {
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 21);
    let pki = make_pki();
    let provider = Arc::new(Recording {
        export: Arc::new(RawFileExport::open(&img, false).unwrap()),
        seen: Mutex::new(Vec::new()),
    });
    let tls = ServerTls {
        config: server_config(&pki),
        required: true,
        identity: Some(identity),
    };
    let addr = start_server(provider.clone(), Some(tls));
    Setup {
        _d: d,
        pki,
        addr,
        want,
        provider,
    }
}

#[test]
fn ferry_client_with_and_without_tls() {
    let s = setup();
    let tls = ClientTls {
        config: client_config(&s.pki),
        server_name: rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    };
    let c = Client::connect(s.addr, "disk", Some(tls)).unwrap();
    let mut b = vec![0u8; 2 * MIB as usize];
    c.read(0, &mut b).unwrap();
    assert_same(&b, &s.want[..b.len()], "read over TLS");
    // Enough writes in flight to fill the socket buffers both ways.
    let data = pattern(5, 8 * MIB as usize);
    c.write(4 * MIB, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(4 * MIB, &mut back).unwrap();
    assert_same(&back, &data, "round trip over TLS");
    let ex = c.block_status(0, IMAGE_SIZE as u32).unwrap();
    assert!(!ex.is_empty());
    drop(c);
    assert_eq!(
        s.provider.seen.lock().unwrap().as_slice(),
        &[Some("client-1".to_string())],
        "identity from the TLS callback"
    );

    // nbds:// URI with the same config.
    let uri = format!("nbds://127.0.0.1:{}/disk", s.addr.port());
    let c = Client::connect_uri(&uri, Some(client_config(&s.pki))).unwrap();
    assert_eq!(c.size(), IMAGE_SIZE);
    drop(c);
    assert!(matches!(
        Client::connect_uri(&uri, None).unwrap_err(),
        ClientError::TlsConfigMissing
    ));

    // Without TLS: refused, saying so.
    let e = Client::connect(s.addr, "disk", None).unwrap_err();
    assert!(matches!(e, ClientError::TlsRequired(_)), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
}

#[test]
fn qemu_img_with_x509_creds() {
    if !have_tool("qemu-img") {
        return;
    }
    let s = setup();
    let dir = s.pki.dir.path().to_str().unwrap().to_string();
    let obj = format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client");
    let opts = format!(
        "file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=disk",
        s.addr.port()
    );
    let out = run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &obj,
            "--image-opts",
            &format!("{opts},file.tls-creds=tls0"),
        ],
    );
    assert!(
        out.contains(&format!("\"virtual-size\": {IMAGE_SIZE}")),
        "{out}"
    );
    // Read the whole image over TLS.
    let outf = path(&s._d, "tls-out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "--image-opts",
            &format!("driver=raw,{opts},file.tls-creds=tls0"),
            "-O",
            "raw",
            outf.to_str().unwrap(),
        ],
    );
    assert_same(&std::fs::read(&outf).unwrap(), &s.want, "qemu-img over TLS");
    // Without credentials: refused.
    let out = run("qemu-img", &["info", "--image-opts", &opts]);
    assert!(!out.status.success(), "plain qemu-img was let in");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS"), "refusal does not mention TLS: {err}");
}

#[test]
fn nbdinfo_with_tls_certificates() {
    if !have_tool("nbdinfo") {
        return;
    }
    let s = setup();
    let dir = s.pki.dir.path().to_str().unwrap();
    let uri = format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={dir}",
        s.addr.port()
    );
    let out = run_ok("nbdinfo", &[&uri]);
    assert!(out.contains(&IMAGE_SIZE.to_string()), "{out}");
    let map = run_ok("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole"), "{map}");
    let out = run(
        "nbdinfo",
        &[&format!("nbd://127.0.0.1:{}/disk", s.addr.port())],
    );
    assert!(!out.status.success(), "plain nbdinfo was let in");
}
