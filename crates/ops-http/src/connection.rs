//! One connection, owned by one task: read the request head (bounded in size and in time),
//! answer it, close. No keep-alive: probes and scrapes open a connection per request anyway,
//! and one exchange per connection keeps every connection's life short and bounded.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::OpsConfig;
use crate::exposition;
use crate::http::{HeadError, RequestHead, Response, Status, head_end, parse_head};
use crate::source::OpsSource;

/// Unread request bytes drained after a response before the socket is closed anyway.
const LINGER_MAX_BYTES: usize = 64 << 10;

/// Runs one connection until it is answered, fails, times out or `cancel` fires.
pub(crate) async fn run(
    mut stream: TcpStream,
    permit: OwnedSemaphorePermit,
    config: Arc<OpsConfig>,
    source: Arc<dyn OpsSource>,
    cancel: CancellationToken,
) {
    // The connection slot is held until the socket is dropped.
    let _permit = permit;
    tokio::select! {
        // Cancellation drops the exchange wherever it is (reading, writing or lingering):
        // nothing in an ops exchange needs settling.
        () = cancel.cancelled() => tracing::debug!("ops connection cancelled by shutdown"),
        () = exchange(&mut stream, &config, source.as_ref()) => {}
    }
}

/// How reading the head ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadRead {
    /// The head is `buf[..end]`.
    Complete { end: usize },
    /// `buf` filled up before the head ended.
    TooLarge,
    /// The peer closed its side in the middle of a head.
    Truncated,
    /// The peer closed before sending anything (e.g. a TCP health check).
    Closed,
}

async fn exchange(stream: &mut TcpStream, config: &OpsConfig, source: &dyn OpsSource) {
    // Invariant: the head is never longer than `max_head_bytes`; this is the only buffer.
    let mut buf = vec![0u8; config.max_head_bytes];
    let read = match tokio::time::timeout(config.read_timeout, read_head(stream, &mut buf)).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "ops request head not read");
            return;
        }
        Err(_elapsed) => {
            // Slowloris or a stalled client: no answer, the slot is what matters.
            tracing::debug!(timeout = ?config.read_timeout, "ops request head not received in time");
            return;
        }
    };
    let (response, with_body) = match read {
        HeadRead::Closed => return,
        HeadRead::TooLarge => {
            (Response::text(Status::HeadTooLarge, "request head too large"), true)
        }
        HeadRead::Truncated => {
            (Response::text(Status::BadRequest, "incomplete request head"), true)
        }
        HeadRead::Complete { end } => match parse_head(&buf[..end]) {
            Ok(head) => {
                let response = route(&head, source);
                tracing::debug!(
                    method = head.method,
                    path = head.path,
                    status = response.status.code(),
                    "ops request"
                );
                (response, head.method != "HEAD")
            }
            Err(HeadError::Malformed(why)) => {
                (Response::text(Status::BadRequest, format!("bad request: {why}")), true)
            }
            Err(HeadError::UnsupportedVersion) => {
                (Response::text(Status::VersionNotSupported, "HTTP/1.0 and HTTP/1.1 only"), true)
            }
        },
    };
    let bytes = response.encode(with_body);
    let written = tokio::time::timeout(config.write_timeout, async {
        stream.write_all(&bytes).await?;
        // Sends FIN: the client sees the end of the response at once.
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "ops response not written");
            return;
        }
        Err(_elapsed) => {
            tracing::debug!(timeout = ?config.write_timeout, "ops response not written in time");
            return;
        }
    }
    // Lingering close: read what the client still sends (a body, the rest of an oversized
    // head) so that closing does not reset the connection before the response is read.
    // Its outcome does not matter: the socket is closed either way.
    let _ = tokio::time::timeout(config.linger_timeout, drain(stream, &mut buf)).await;
}

/// Reads until the head ends, `buf` is full, or the peer closes.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<HeadRead> {
    let mut len = 0;
    // Bounded: each pass reads at least one byte or returns, and `buf` is finite.
    loop {
        if len == buf.len() {
            return Ok(HeadRead::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(if len == 0 { HeadRead::Closed } else { HeadRead::Truncated });
        }
        let searched = len;
        len += n;
        if let Some(end) = head_end(&buf[..len], searched) {
            return Ok(HeadRead::Complete { end });
        }
    }
}

/// Reads and discards until the peer closes, an error, or [`LINGER_MAX_BYTES`].
async fn drain(stream: &mut TcpStream, buf: &mut [u8]) {
    let mut drained = 0;
    while drained < LINGER_MAX_BYTES {
        match stream.read(buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// The endpoints; the answer to a parsed request.
fn route(head: &RequestHead<'_>, source: &dyn OpsSource) -> Response {
    enum Endpoint {
        Health,
        Ready,
        Metrics,
    }
    let endpoint = match head.path {
        "/healthz" => Endpoint::Health,
        "/readyz" => Endpoint::Ready,
        "/metrics" => Endpoint::Metrics,
        _ => return Response::text(Status::NotFound, "not found"),
    };
    if !matches!(head.method, "GET" | "HEAD") {
        return Response::text(Status::MethodNotAllowed, "method not allowed");
    }
    match endpoint {
        Endpoint::Health => Response::text(Status::Ok, "ok"),
        Endpoint::Ready => match source.ready() {
            Ok(()) => Response::text(Status::Ok, "ok"),
            Err(why) => Response::text(Status::ServiceUnavailable, format!("not ready: {why}")),
        },
        Endpoint::Metrics => Response {
            status: Status::Ok,
            content_type: exposition::CONTENT_TYPE,
            body: exposition::encode(&source.metrics()),
        },
    }
}
