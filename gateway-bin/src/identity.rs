//! Builds the authenticator from the options: static JWT keys, JWKS keys (their refresh task
//! is spawned here), and the mesh token check in front of them when configured. How they
//! combine is in docs/OPERATIONS.md ("Identity").

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use handler_core::auth::opaque::{MeshAuthConfig, MeshAuthenticator, OpaqueRoute};
use handler_core::auth::{Authenticator, JwtKey, KeySet};
use handler_core::{JwtAuthenticator, ServiceMesh};

use crate::config::Cli;
use crate::jwks::{self, JwksSource};

/// The JWT authenticator of a static key (a configured one, or the in-memory mode's
/// generated secret), with the configured claims checks (issuer, audience, username claim,
/// lifetime): the one builder of it, at start-up and on a reload (`reload::authenticator`).
pub fn static_jwt(cli: &Cli, key: JwtKey) -> Result<Arc<dyn Authenticator>> {
    let jwt = JwtAuthenticator::new(cli.jwt_config_with(key)).context("invalid JWT key")?;
    Ok(Arc::new(jwt))
}

/// The authenticator, and the dev secret generated when no key at all is configured (the
/// in-memory demo; `validate` refuses that with `--amqp-url`).
pub async fn authenticator(
    cli: &Cli,
    mesh: Arc<dyn ServiceMesh>,
    background: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(Arc<dyn Authenticator>, Option<String>)> {
    let fixed = cli.jwt_key()?;
    let mut dev_secret = None;
    let jwt: Option<Arc<dyn Authenticator>> = if cli.uses_jwks() {
        let timeout = Duration::from_millis(cli.jwks_timeout_ms);
        let keys = KeySet::new(fixed.into_iter().collect()).context("invalid JWT key")?;
        let keys = Arc::new(keys.refreshed_within(timeout));
        let source = JwksSource::new(
            cli.jwks_file.clone(),
            cli.jwks_url.as_deref(),
            timeout,
            cli.jwks_max_bytes,
        )?;
        let first = source.fetch().await.context("the first JWKS fetch failed")?;
        tracing::info!(kids = ?first.kids(), keys = first.len(), skipped = first.skipped(), "jwks loaded");
        keys.replace(first);
        background.spawn(
            jwks::refresh(
                source,
                Arc::clone(&keys),
                Duration::from_secs(cli.jwks_refresh_secs),
                Duration::from_secs(cli.jwks_min_refresh_secs),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("jwks")),
        );
        let config = cli.jwt_config_with(JwtKey::Set(keys));
        Some(Arc::new(JwtAuthenticator::new(config).context("invalid JWT key")?))
    } else if let Some(key) = fixed {
        Some(static_jwt(cli, key)?)
    } else if cli.auth_service_method.is_some() {
        // Opaque tokens only: a JWT is refused.
        None
    } else {
        let secret = crate::demo::generate_secret();
        let jwt = static_jwt(cli, JwtKey::Hs256Secret(secret.clone().into_bytes()))?;
        dev_secret = Some(secret);
        Some(jwt)
    };
    let Some((service, method)) = cli.auth_service_target()? else {
        // `validate` saw to it that some authenticator is configured.
        return Ok((jwt.context("no authenticator configured")?, dev_secret));
    };
    let mut config = MeshAuthConfig::new(service, method);
    config.timeout = Duration::from_millis(cli.auth_service_timeout_ms);
    config.cache_ttl = Duration::from_secs(cli.auth_cache_secs);
    config.cache_entries =
        NonZeroUsize::new(cli.auth_cache_entries).context("--auth-cache-entries")?;
    config.route = if cli.auth_service_all_tokens { OpaqueRoute::All } else { OpaqueRoute::NonJwt };
    Ok((Arc::new(MeshAuthenticator::new(mesh, jwt, config)), dev_secret))
}
