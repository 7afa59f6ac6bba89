//! TLS on the WebSocket port (`wss://`): a [`TlsAcceptorHandle`] holds the rustls server
//! configuration built from a PEM certificate chain and key, and swaps it on
//! [`reload`](TlsAcceptorHandle::reload) for the connections accepted afterwards;
//! [`Transport`] is a connection's byte stream, plain TCP or TLS over it.
//!
//! Unlike the rest of the crate's configuration, the handle reads files itself: reloading
//! means reading the same two files again, and the caller (the binary's SIGHUP handler)
//! should not have to know how. rustls runs on aws-lc-rs, the provider lapin's rustls uses,
//! with TLS 1.2 and 1.3 only and ALPN `http/1.1` (the port speaks HTTP/1.1 only).

use std::fmt;
use std::io::{self, IoSlice, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

use crate::error::WsError;

/// Largest certificate or key file read (1 MiB): a chain of a few certificates is a few
/// KiB, so anything near this is the wrong file.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// The TLS configuration of the WebSocket port, built from a certificate chain file and a
/// private key file (both PEM) and reloadable from them. Clones share it: give one to
/// [`WsConfig::tls`](crate::WsConfig::tls) and keep one to call
/// [`reload`](Self::reload) (on SIGHUP, say).
///
/// The certificate file holds the server certificate first, then any intermediates; the
/// key file one private key (PKCS#8, PKCS#1 or SEC1) that matches the certificate.
#[derive(Clone)]
pub struct TlsAcceptorHandle {
    inner: Arc<Inner>,
}

struct Inner {
    cert_file: PathBuf,
    key_file: PathBuf,
    // Invariant: always a configuration built from files that were valid when read. The
    // lock is held only to clone or replace the `Arc`.
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsAcceptorHandle {
    /// Reads and checks both files and builds the configuration; the error names the file
    /// at fault.
    pub fn from_pem_files(
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Result<Self, WsError> {
        let (cert_file, key_file) = (cert_file.into(), key_file.into());
        let config = server_config(&cert_file, &key_file)?;
        let current = RwLock::new(Arc::new(config));
        Ok(TlsAcceptorHandle { inner: Arc::new(Inner { cert_file, key_file, current }) })
    }

    /// Reads both files again and, if they are valid, serves every connection accepted from
    /// now on with them. Connections already accepted (sessions, handshakes in progress)
    /// keep the certificate they started with. On error nothing changes: the previous
    /// certificate stays in use, and the error names the file at fault.
    pub fn reload(&self) -> Result<(), WsError> {
        let prepared = self.prepare()?;
        self.install(prepared);
        Ok(())
    }

    /// The first half of [`reload`](Self::reload): reads and checks both files, changing
    /// nothing yet (a configuration reload builds every new part before it applies any).
    pub fn prepare(&self) -> Result<PreparedTls, WsError> {
        Ok(PreparedTls(Arc::new(server_config(&self.inner.cert_file, &self.inner.key_file)?)))
    }

    /// The second half of [`reload`](Self::reload): serves every connection accepted from
    /// now on with `prepared`.
    pub fn install(&self, prepared: PreparedTls) {
        // A poisoned lock still holds a complete `Arc`: nothing can panic half-way through
        // replacing it.
        *self.inner.current.write().unwrap_or_else(PoisonError::into_inner) = prepared.0;
    }

    /// The certificate chain file.
    pub fn cert_file(&self) -> &Path {
        &self.inner.cert_file
    }

    /// The private key file.
    pub fn key_file(&self) -> &Path {
        &self.inner.key_file
    }

    /// An acceptor with the configuration in use now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let config = self.inner.current.read().unwrap_or_else(PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&config))
    }
}

/// A certificate and key read and checked by [`TlsAcceptorHandle::prepare`], not yet in use.
pub struct PreparedTls(Arc<ServerConfig>);

impl fmt::Debug for PreparedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreparedTls(..)")
    }
}

impl fmt::Debug for TlsAcceptorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptorHandle")
            .field("cert_file", &self.inner.cert_file)
            .field("key_file", &self.inner.key_file)
            .finish_non_exhaustive()
    }
}

/// The server configuration from the two files.
fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, WsError> {
    let bad_pem = |path: &Path, reason: String| WsError::TlsPem { path: path.to_owned(), reason };
    let cert_pem = read_bounded(cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad_pem(cert_file, "no CERTIFICATE block".to_owned()));
    }
    let key_pem = read_bounded(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            bad_pem(key_file, "no PRIVATE KEY block".to_owned())
        }
        e => bad_pem(key_file, e.to_string()),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| WsError::TlsKeyRejected {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            source: e.into(),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| WsError::TlsKeyRejected {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            source: e.into(),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A file's bytes, at most [`MAX_TLS_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, WsError> {
    let read_error = |source| WsError::TlsFile { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_TLS_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > MAX_TLS_FILE_BYTES {
        return Err(WsError::TlsPem {
            path: path.to_owned(),
            reason: format!("larger than {MAX_TLS_FILE_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// A connection's byte stream: plain TCP, or TLS over it once the TLS handshake is done.
#[derive(Debug)]
pub(crate) enum Transport {
    Plain(TcpStream),
    // Boxed: rustls's connection state is large, and plain connections should not pay
    // for it.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
