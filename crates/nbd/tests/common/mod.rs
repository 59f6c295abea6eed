//! Helpers shared by the integration tests: a ferry server on a background runtime, sparse
//! test images, external tools (skipped with a reason when missing, failing under CI=true),
//! and test certificates.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_nbd::export::{ExportProvider, RawFileExport, StaticProvider};
use ferry_nbd::server::{serve, ServerTls};

/// Whether `tool` can be run. Missing: panics under CI=true, else prints why and returns
/// false so the test can return early.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required tool {tool} is not installed (CI=true)");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

/// Start a ferry server for `provider` on 127.0.0.1 (any port); returns its address.
pub fn start_server(provider: Arc<dyn ExportProvider>, tls: Option<ServerTls>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            serve(l, provider, tls).await.unwrap();
        });
    });
    addr
}

/// Serve the raw file at `path` as export "disk".
pub fn serve_file(path: &Path, read_only: bool, tls: Option<ServerTls>) -> SocketAddr {
    let e = RawFileExport::open(path, read_only).unwrap();
    start_server(
        Arc::new(StaticProvider::new().with("disk", Arc::new(e))),
        tls,
    )
}

/// xorshift64* bytes.
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.extend_from_slice(&r.to_le_bytes()[..(n - v.len()).min(8)]);
    }
    v
}

pub const MIB: u64 = 1 << 20;
pub const IMAGE_SIZE: u64 = 16 * MIB;
/// Data ranges of [`make_image`]; everything else is a hole.
pub const DATA: [(u64, u64); 3] = [(0, MIB), (5 * MIB, 300 * 1024), (IMAGE_SIZE - 4096, 4096)];
/// An offset in the middle of a hole of [`make_image`].
pub const HOLE_AT: u64 = 8 * MIB;

/// A sparse image of [`IMAGE_SIZE`] with data at [`DATA`]; returns its full content.
pub fn make_image(path: &Path, seed: u64) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let mut all = vec![0u8; IMAGE_SIZE as usize];
    for (i, (off, len)) in DATA.iter().enumerate() {
        let d = pattern(seed + i as u64, *len as usize);
        f.write_all_at(&d, *off).unwrap();
        all[*off as usize..(*off + *len) as usize].copy_from_slice(&d);
    }
    all
}

/// An empty (all-hole) file of `size`.
pub fn make_empty(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Compare two contents without dumping megabytes on failure.
#[track_caller]
pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Run a command under `timeout 120`, returning its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "$ {cmd} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run and require success; returns stdout.
#[track_caller]
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(out.status.success(), "{cmd} failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (for external servers that need one named).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd args` and wait until 127.0.0.1:`port` accepts connections.
pub fn start_daemon(cmd: &str, args: &[&str], port: u16) -> Daemon {
    let child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon(child);
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{cmd} did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// Test PKI: a CA, a server certificate for 127.0.0.1/localhost, a client certificate
/// (CN "client-1"), written in the layout qemu and libnbd expect (ca-cert.pem,
/// client-cert.pem, client-key.pem).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_der: Vec<u8>,
    pub server_chain: Vec<u8>,
    pub server_key: Vec<u8>,
    pub client_cert: Vec<u8>,
    pub client_key: Vec<u8>,
}

pub fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "ferry-nbd test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);

    let skey = KeyPair::generate().unwrap();
    let mut s =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    s.distinguished_name.push(DnType::CommonName, "localhost");
    s.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    s.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let scert = s.signed_by(&skey, &issuer).unwrap();

    let ckey = KeyPair::generate().unwrap();
    let mut c = CertificateParams::new(Vec::<String>::new()).unwrap();
    c.distinguished_name.push(DnType::CommonName, "client-1");
    c.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    c.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let ccert = c.signed_by(&ckey, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, s: &str| {
        let mut f = std::fs::File::create(dir.path().join(name)).unwrap();
        f.write_all(s.as_bytes()).unwrap();
    };
    w("ca-cert.pem", &ca_cert.pem());
    w("client-cert.pem", &ccert.pem());
    w("client-key.pem", &ckey.serialize_pem());
    Pki {
        ca_der: ca_cert.der().to_vec(),
        server_chain: scert.der().to_vec(),
        server_key: skey.serialize_der(),
        client_cert: ccert.der().to_vec(),
        client_key: ckey.serialize_der(),
        dir,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(p: &Pki) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(rustls::pki_types::CertificateDer::from(p.ca_der.clone()))
        .unwrap();
    Arc::new(r)
}

/// A server config that requires a client certificate from the test CA.
pub fn server_config(p: &Pki) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(p), provider())
            .build()
            .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(p.server_chain.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.server_key.clone())),
        )
        .unwrap();
    Arc::new(cfg)
}

/// A client config trusting the test CA and presenting the client certificate.
pub fn client_config(p: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(p))
        .with_client_auth_cert(
            vec![CertificateDer::from(p.client_cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.client_key.clone())),
        )
        .unwrap();
    Arc::new(cfg)
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path(d: &tempfile::TempDir, name: &str) -> PathBuf {
    d.path().join(name)
}
