//! One connection, owned by one task: hyper's HTTP/1.1 server reads one request head
//! (bounded in size by `max_buf_size` and in time by `header_read_timeout`), the route
//! answers it, and the connection closes (no keep-alive: probes and scrapes open a
//! connection per request anyway, and one exchange per connection keeps every
//! connection's life short and bounded). The whole exchange is also bounded by
//! `read_timeout + write_timeout`, which covers a client that does not read its answer.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::OpsConfig;
use crate::routes;
use crate::source::OpsSource;

/// Unread request bytes drained after a response before the socket is closed anyway.
const LINGER_MAX_BYTES: usize = 64 << 10;

/// What a connection task needs besides its socket.
pub(crate) struct Shared {
    pub(crate) config: OpsConfig,
    pub(crate) source: Arc<dyn OpsSource>,
    pub(crate) registry: Arc<Registry>,
}

/// Runs one connection until it is answered, fails, times out or `cancel` fires.
pub(crate) async fn run(
    mut stream: TcpStream,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // The connection slot is held until the socket is dropped.
    let _permit = permit;
    tokio::select! {
        // Cancellation drops the exchange wherever it is (reading, writing or lingering):
        // nothing in an ops exchange needs settling.
        () = cancel.cancelled() => tracing::debug!("ops connection cancelled by shutdown"),
        () = exchange(&mut stream, &shared) => {}
    }
}

async fn exchange(stream: &mut TcpStream, shared: &Shared) {
    let config = &shared.config;
    let service = service_fn(|request| {
        let response = routes::respond(&request, shared.source.as_ref(), &shared.registry);
        tracing::debug!(
            method = %request.method(),
            path = request.uri().path(),
            status = response.status().as_u16(),
            "ops request"
        );
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(false)
        // The head must fit in this buffer, else 431 (hyper's own answer).
        .max_buf_size(config.max_head_bytes)
        // Counted from the start of the head, not per read: trickling bytes (slowloris)
        // does not extend it. A client still sending by then is disconnected unanswered.
        .header_read_timeout(config.read_timeout)
        .timer(TokioTimer::new());
    // hyper borrows the socket so that it is still ours for the lingering close below.
    let served = builder.serve_connection(TokioIo::new(&mut *stream), service);
    let deadline = config.read_timeout + config.write_timeout;
    match tokio::time::timeout(deadline, served).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // Malformed heads were answered (400, 431) before this; a timeout or a
            // peer that went away was not. Either way the socket closes.
            tracing::debug!(error = %e, "ops connection ended with an error");
        }
        Err(_elapsed) => {
            tracing::debug!(timeout = ?deadline, "ops exchange not finished in time");
            return;
        }
    }
    // Lingering close: send FIN (if hyper has not), so the client sees the end of the
    // response at once, then read what the client still sends (a body, the rest of an
    // oversized head) so that closing does not reset the connection before the response is
    // read. Its outcome does not matter: the socket is closed either way.
    let linger = async {
        let _ = stream.shutdown().await;
        drain(stream).await;
    };
    let _ = tokio::time::timeout(config.linger_timeout, linger).await;
}

/// Reads and discards until the peer closes, an error, or [`LINGER_MAX_BYTES`].
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_MAX_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
