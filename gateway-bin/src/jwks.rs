//! The JWKS adapter: reads the key set from `--jwks-file` and/or fetches it from
//! `--jwks-url` (hyper's HTTP/1.1 client over rustls, bounded in time and size), and feeds
//! it to handler-core's `KeySet` at start, every `--jwks-refresh-secs`, and when a token
//! names an unknown `kid` (at most once per `--jwks-min-refresh-secs`; concurrent requests
//! share one fetch). A failed refresh keeps the keys in use and is logged.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use handler_core::auth::{JwkKeys, KeySet};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Checks a `--jwks-url`: https, or http to a loopback address (a key set fetched in the
/// clear from elsewhere could be replaced on the way).
pub fn check_url(url: &str) -> Result<Uri> {
    let uri: Uri = url.parse().context("not a URL")?;
    let host = uri.host().context("the URL has no host")?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => bail!("http is allowed to a loopback address only; use https"),
        _ => bail!("the scheme must be https (or http to a loopback address)"),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Where the keys come from, and the bounds of one fetch.
pub struct JwksSource {
    file: Option<PathBuf>,
    url: Option<(Uri, HttpsClient)>,
    timeout: Duration,
    max_bytes: usize,
}

impl JwksSource {
    /// The sources of the options (at least one is set).
    pub fn new(
        file: Option<PathBuf>,
        url: Option<&str>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Self> {
        let url = match url {
            None => None,
            Some(url) => {
                let uri = check_url(url).context("--jwks-url")?;
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_native_roots()
                    .context("--jwks-url: cannot load the system's trusted roots")?
                    .https_or_http()
                    .enable_http1()
                    .build();
                // One idle connection kept: a refresh every few minutes needs no pool.
                let client = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(https);
                Some((uri, client))
            }
        };
        Ok(JwksSource { file, url, timeout, max_bytes })
    }

    /// The keys of every source, merged (the file's first); fails when any source fails.
    pub async fn fetch(&self) -> Result<JwkKeys> {
        let mut keys: Option<JwkKeys> = None;
        if let Some(path) = &self.file {
            let read = tokio::time::timeout(self.timeout, tokio::fs::read(path)).await;
            let bytes = read
                .map_err(|_| anyhow::anyhow!("timed out"))
                .and_then(|r| r.map_err(anyhow::Error::from))
                .with_context(|| format!("--jwks-file: cannot read {}", path.display()))?;
            if bytes.len() > self.max_bytes {
                bail!("--jwks-file: {} is over --jwks-max-bytes", path.display());
            }
            let parsed = JwkKeys::parse(&bytes).context("--jwks-file")?;
            keys = Some(parsed);
        }
        if let Some((uri, client)) = &self.url {
            let bytes = tokio::time::timeout(self.timeout, self.get(client, uri))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.timeout))
                .and_then(|r| r)
                .context("--jwks-url")?;
            let parsed = JwkKeys::parse(&bytes).context("--jwks-url")?;
            keys = Some(match keys {
                Some(file) => file.merged(parsed),
                None => parsed,
            });
        }
        keys.context("no JWKS source")
    }

    async fn get(&self, client: &HttpsClient, uri: &Uri) -> Result<Bytes> {
        let request = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Empty::new())
            .context("cannot build the request")?;
        let response = client.request(request).await.context("request failed")?;
        // No redirect is followed: the key set is where it was configured to be.
        if response.status() != http::StatusCode::OK {
            bail!("answered {}", response.status());
        }
        let body = Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the answer (over --jwks-max-bytes?): {e}"))?;
        Ok(body.to_bytes())
    }
}

/// Keeps `keys` fresh until `shutdown`: every `every`, and when a token asks (no sooner than
/// `min_gap` after the previous fetch, which ended at `last`).
pub async fn refresh(
    source: JwksSource,
    keys: Arc<KeySet>,
    every: Duration,
    min_gap: Duration,
    shutdown: CancellationToken,
) {
    let mut last = Instant::now();
    // Bounded by the process's life; each turn waits at least `min_gap` (or the interval).
    loop {
        let asked = tokio::select! {
            // All three cancel-safe: a dropped `refresh_wanted` loses no request (the
            // permit stays with the `Notify`).
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(last + every) => false,
            () = keys.refresh_wanted() => true,
        };
        if asked {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(last + min_gap) => {}
            }
        }
        let started = Instant::now();
        match source.fetch().await {
            Ok(fresh) => {
                tracing::info!(
                    kids = ?fresh.kids(),
                    keys = fresh.len(),
                    skipped = fresh.skipped(),
                    unknown_kid = asked,
                    "jwks refreshed"
                );
                keys.replace(fresh);
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "jwks refresh failed; the current keys stay"
                );
                keys.refresh_failed();
            }
        }
        last = started;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]/k",
            "http://localhost:1/",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com/jwks",
            "ftp://127.0.0.1/",
            "not a url",
            "/jwks",
            "http://10.0.0.1/",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
