//! Certificates made by the test: a CA of its own and a certificate for `localhost` and
//! `127.0.0.1` signed by it (usable by a server and as a client certificate), as PEM,
//! written into a [`TempDir`] that is removed on drop. No key is ever checked in. And a
//! real TLS client ([`connect`]) that trusts only a given CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh CA and one leaf certificate signed by it, all PEM.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The leaf certificate (SANs `localhost` and `127.0.0.1`).
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
}

/// Where [`TestPki::write`] put the three files.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// `<name>-ca.pem`.
    pub ca: PathBuf,
    /// `<name>-cert.pem`.
    pub cert: PathBuf,
    /// `<name>-key.pem`.
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA (named `cn`) and a leaf certificate for `localhost` and `127.0.0.1`, with
    /// rcgen's validity (1975 to 4096: the tests are not about expiry).
    pub fn generate(cn: &str) -> TestPki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, cn);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");

        let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("leaf params");
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = leaf.signed_by(&key, &ca).expect("leaf signed by the CA");
        TestPki { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// Writes (or overwrites) `<name>-ca.pem`, `<name>-cert.pem` and `<name>-key.pem` in
    /// `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> PkiFiles {
        let files = PkiFiles {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        for (path, pem) in
            [(&files.ca, &self.ca_pem), (&files.cert, &self.cert_pem), (&files.key, &self.key_pem)]
        {
            std::fs::write(path, pem).expect("a PEM file");
        }
        files
    }
}

/// A folder of the test's own under the system's temporary folder, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `nuropb-<purpose>-<pid>-<n>`.
    pub fn new(purpose: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nuropb-{purpose}-{}-{n}", std::process::id()));
        // A leftover of a killed earlier run with the same pid is not ours to keep.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        TempDir(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bound on a TCP connect plus TLS handshake in [`connect`].
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A rustls client configuration that trusts `ca_pem` only (aws-lc-rs, as the gateway).
pub fn client_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a CA certificate")).expect("a usable CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to `addr` (as `localhost`) trusting `ca_pem` only, within 10 s;
/// `Err` is the TLS (or TCP) error, e.g. an unknown issuer.
pub async fn connect(addr: SocketAddr, ca_pem: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(client_config(ca_pem));
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("a server name");
        connector.connect(name, tcp).await
    };
    tokio::time::timeout(CONNECT_WAIT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
