//! SIGHUP: re-read the configuration and put in force what can change without dropping a
//! session. The one place that knows which parts of a running gateway are reloadable:
//! [`LIVE_KEYS`] lists the keys, [`Reloadable`] holds a handle to each part, and
//! [`Reloadable::reload`] builds every new part before it applies any, so an invalid
//! configuration changes nothing. The TLS certificate and key (`tls_cert_file`,
//! `tls_key_file`) are re-read from the files in use at every reload, so a renewed
//! certificate written over the old files is served to new connections; pointing the keys
//! at other files needs a restart. A new reloadable part is one more
//! handle in [`Reloadable`], one more build step and one more apply step in `reload`, and
//! its keys in [`LIVE_KEYS`] (docs/CONFIGURATION.md's "reload" column follows).

use std::ffi::OsString;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};

use handler_core::CoordinatorHandle;
use handler_core::auth::{AuthError, Authenticator, Identity, JwtKey};
use ws_adapter::{OriginPolicyHandle, PreparedTls, TlsAcceptorHandle};

use crate::config::Cli;
use crate::config_file::{self, LoadError, Loaded};
use crate::identity;

/// The keys a reload puts in force; every other key needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "jwt_secret",
    "jwt_secret_file",
    "jwt_public_key_file",
    "jwt_algorithm",
    "jwt_issuer",
    "jwt_audience",
    "jwt_username_claim",
    "jwt_max_lifetime_secs",
    "allowed_origins",
    "subscribable_topics",
    "max_sessions_per_user",
    "callable",
    "client_describe",
    "log",
];

/// Puts a new log filter in force (a closure over tracing-subscriber's reload handle, whose
/// type depends on the log format).
pub type LogFilterHandle =
    Arc<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

/// An [`Authenticator`] whose inner authenticator a reload replaces. Tokens presented
/// after [`ReloadableAuthenticator::set`] are checked by the new one; the lock is held
/// only to clone an `Arc`, never while a token is checked.
pub struct ReloadableAuthenticator {
    current: RwLock<Arc<dyn Authenticator>>,
}

impl ReloadableAuthenticator {
    pub fn new(inner: Arc<dyn Authenticator>) -> Self {
        ReloadableAuthenticator { current: RwLock::new(inner) }
    }

    pub fn set(&self, inner: Arc<dyn Authenticator>) {
        // Poisoning cannot leave a half-written `Arc`: ignored.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = inner;
    }

    fn current(&self) -> Arc<dyn Authenticator> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait::async_trait]
impl Authenticator for ReloadableAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        // The lock is released before the check waits (a JWKS refresh, the mesh).
        let current = self.current();
        current.authenticate(token).await
    }
}

/// The client JWT authenticator `cli` asks for; without a configured key, one for
/// `dev_secret` (the in-memory mode's generated secret).
pub fn authenticator(cli: &Cli, dev_secret: Option<&str>) -> Result<Arc<dyn Authenticator>> {
    let key = match (cli.jwt_key()?, dev_secret) {
        (Some(key), _) => key,
        (None, Some(secret)) => JwtKey::Hs256Secret(secret.as_bytes().to_vec()),
        // `Cli::validate` requires a key outside the demo mode, which always has a secret.
        (None, None) => anyhow::bail!("no JWT key configured (--jwt-secret)"),
    };
    // Built as at start-up.
    identity::static_jwt(cli, key)
}

/// Whether `cli`'s authenticator is built from static keys only (no JWKS, no auth service).
pub fn static_auth(cli: &Cli) -> bool {
    !cli.uses_jwks() && cli.auth_service_method.is_none()
}

/// The reloadable parts of a running gateway and the configuration they were built from.
pub struct Reloadable {
    /// The command line as given at start (a reload re-reads the file, not the flags).
    pub args: Vec<OsString>,
    /// The configuration in force: the live keys as last reloaded, the others as started.
    pub running: Loaded,
    /// Whether the gateway started on the in-memory demo mesh (that cannot change).
    pub demo_mode: bool,
    /// The generated dev secret of the in-memory mode, if any.
    pub dev_secret: Option<String>,
    pub authenticator: Arc<ReloadableAuthenticator>,
    /// Whether the authenticator was built from static keys only (no JWKS, no auth service
    /// method): only then do the `jwt_*` keys change on a reload. JWKS keys rotate through
    /// their own refresh; switching JWKS or the auth service on or off needs a restart.
    pub static_auth: bool,
    pub origins: OriginPolicyHandle,
    /// The WebSocket port's certificate (`wss://` only), re-read from its files.
    pub tls: Option<TlsAcceptorHandle>,
    pub core: CoordinatorHandle,
    pub log_filter: LogFilterHandle,
}

/// The new parts, all built before any is applied.
struct Parts {
    authenticator: Option<Arc<dyn Authenticator>>,
    origins: ws_adapter::OriginPolicy,
    tls: Option<PreparedTls>,
    subscribable: Vec<String>,
    max_sessions_per_user: usize,
    callable: Vec<handler_core::mesh_manager::CallPattern>,
    client_describe: bool,
    log_filter: tracing_subscriber::EnvFilter,
}

impl Reloadable {
    /// Re-reads the configuration file and applies what can change live; logs one line per
    /// changed key ("applied" or "needs a restart", never a value). An invalid
    /// configuration is logged and changes nothing.
    pub fn reload(&mut self) {
        tracing::info!("SIGHUP: reloading the configuration");
        let new = match config_file::load(&self.args) {
            Ok(new) => new,
            Err(LoadError::Invalid(e)) => {
                let error = format!("{e:#}");
                tracing::error!(%error, "reload refused; the old configuration stays in force");
                return;
            }
            Err(LoadError::CommandLine(e)) => {
                let error = e.kind().to_string();
                tracing::error!(%error, "reload refused; the old configuration stays in force");
                return;
            }
        };
        let parts = match self.build(&new.cli) {
            Ok(parts) => parts,
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(%error, "reload refused; the old configuration stays in force");
                return;
            }
        };
        if let Some(authenticator) = parts.authenticator {
            self.authenticator.set(authenticator);
        }
        self.origins.set(parts.origins);
        if let (Some(tls), Some(prepared)) = (&self.tls, parts.tls) {
            tls.install(prepared);
            tracing::info!(cert = %tls.cert_file().display(), "TLS certificate reloaded");
        }
        self.core.set_subscribable(parts.subscribable);
        self.core.set_max_sessions_per_user(parts.max_sessions_per_user);
        self.core.set_call_rules(parts.callable, parts.client_describe);
        if let Err(error) = (self.log_filter)(parts.log_filter) {
            tracing::error!(%error, "cannot change the log filter");
        }

        let mut changed = 0;
        for (key, value) in &new.values {
            let old = self.running.values.get(key);
            if old == Some(value) {
                continue;
            }
            changed += 1;
            if self.is_live(key) {
                tracing::info!(key = %key, "configuration changed: applied");
                self.running.values.insert(key.clone(), value.clone());
            } else {
                // `running` keeps the value in force, so the next reload says it again.
                tracing::warn!(key = %key, "configuration changed: needs a restart");
            }
        }
        tracing::info!(changed, "configuration reloaded");
        self.running.cli = new.cli;
    }

    /// Whether a change of `key` is put in force by a reload.
    fn is_live(&self, key: &str) -> bool {
        LIVE_KEYS.contains(&key) && (self.static_auth || !key.starts_with("jwt_"))
    }

    fn build(&self, cli: &Cli) -> Result<Parts> {
        let still_static = self.static_auth && static_auth(cli);
        Ok(Parts {
            authenticator: match still_static {
                true => Some(authenticator(cli, self.dev_secret.as_deref())?),
                false => None,
            },
            origins: cli.origin_policy_in(self.demo_mode)?,
            tls: match &self.tls {
                Some(tls) => Some(tls.prepare().context("TLS certificate (--tls-cert-file)")?),
                None => None,
            },
            subscribable: cli.subscribable(self.demo_mode),
            max_sessions_per_user: cli.max_sessions_per_user,
            callable: cli.callable_patterns()?,
            client_describe: cli.client_describe,
            log_filter: tracing_subscriber::EnvFilter::try_new(&cli.log)
                .with_context(|| format!("--log {:?}", cli.log))?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// Refuses every token as expired (`true`) or as missing.
    struct Fixed(bool);

    #[async_trait::async_trait]
    impl Authenticator for Fixed {
        async fn authenticate(&self, _token: &str) -> Result<Identity, AuthError> {
            Err(if self.0 { AuthError::Expired } else { AuthError::Missing })
        }
    }

    #[tokio::test]
    async fn the_authenticator_in_force_is_the_last_set() {
        let auth = ReloadableAuthenticator::new(Arc::new(Fixed(true)));
        assert!(matches!(auth.authenticate("t").await, Err(AuthError::Expired)));
        auth.set(Arc::new(Fixed(false)));
        assert!(matches!(auth.authenticate("t").await, Err(AuthError::Missing)));
    }

    #[test]
    fn live_keys_are_options() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for key in LIVE_KEYS {
            assert!(cmd.get_arguments().any(|a| a.get_id() == *key), "{key}");
        }
    }
}
