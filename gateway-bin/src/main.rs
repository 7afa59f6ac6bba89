//! The `nuropb-gateway` binary, a composition root only: load and validate config (flags,
//! environment, configuration file), install the tracing subscriber, build the mesh adapter
//! and the core, serve WebSockets (and the operations endpoint when asked), reload what can
//! change on SIGHUP, and on Ctrl-C/SIGTERM drain: refuse new sessions (503) while still
//! accepting, close the sessions spread over the lame-duck window, each once its in-flight
//! requests are answered, then stop.

mod config;
mod config_doc;
mod config_file;
mod demo;
mod identity;
mod jwks;
mod log;
mod ops;
mod reload;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use handler_core::coordinator::CoreConfig;
use handler_core::mesh_manager::MeshManagerConfig;
use handler_core::session_registry::SessionRegistryConfig;
use handler_core::{CallLabelConfig, Coordinator, CoreMetrics, ServiceMesh};
use nuropb_wire::client::ClientLimits;
use ops_http::OpsConfig;
use prometheus_client::registry::Registry;
use ws_adapter::{AuthSources, OriginPolicyHandle, WsConfig, WsStatsHandle};

use crate::config::{Cli, Command, LogFormat};
use crate::config_file::{LoadError, Loaded};
use crate::reload::{Reloadable, ReloadableAuthenticator};

/// Longest wait at start for the first round over the broker nodes before serving anyway.
const FIRST_ROUND_WAIT: Duration = Duration::from_secs(10);

/// Prints a line to stdout for the operator. A closed stdout (e.g. the reader went away)
/// must not bring the gateway down, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// mimalloc rather than glibc's malloc: a request allocates and frees dozens of small
/// blocks across two threads (tokio's workers and lapin's I/O thread), and glibc's arenas
/// spent a fifth of the gateway's CPU on it (docs/BENCHMARKS.md, "Profile").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if config_file::wants_config_doc(&args) {
        use std::io::Write as _;
        // As `say!`: a closed stdout is the reader's business.
        let _ = std::io::stdout().write_all(config_doc::markdown().as_bytes());
        return ExitCode::SUCCESS;
    }
    let loaded = match config_file::load(&args) {
        Ok(loaded) => loaded,
        // Usage errors, `--help` and `--version`, printed and exited as clap does (2, 0).
        Err(LoadError::CommandLine(e)) => e.exit(),
        Err(LoadError::Invalid(e)) => {
            eprintln!("nuropb-gateway: invalid configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig { file }) = &loaded.cli.command {
        say!("configuration OK: {}", file.display());
        return ExitCode::SUCCESS;
    }
    let cli = &loaded.cli;
    let json = cli.log_format == LogFormat::Json;
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nuropb-gateway: invalid configuration: --log {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    // The filter is reloadable (`--log` on SIGHUP); the format is not.
    let log_filter: reload::LogFilterHandle = match cli.log_format {
        LogFormat::Text => {
            // Colours only on a terminal: logs piped to files or collectors stay plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                // Logged values come from clients (headers, claims): escaped, so none
                // starts a line.
                .fmt_fields(log::escaping_fields())
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        // JSON strings escape every control character: one event, one line.
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            fatal(json, &format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(loaded, args, log_filter)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(json, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The last word of a failed gateway: a log event in the JSON format (so that every stderr
/// line stays one JSON object), a plain line otherwise.
fn fatal(json: bool, error: &str) {
    if json {
        tracing::error!(error, "nuropb-gateway stopped");
    } else {
        eprintln!("nuropb-gateway: {error}");
    }
}

async fn run(
    loaded: Loaded,
    args: Vec<OsString>,
    log_filter: reload::LogFilterHandle,
) -> Result<()> {
    let cli = loaded.cli.clone();
    // Caught from here on: SIGHUP reloads the configuration instead of ending the process.
    let mut hangups = hangup_signals();
    // Shutdown order: `shutdown` refuses new sessions and calls (the listener still accepts:
    // upgrades get 503, `/healthz` 503, the lame-duck window); the coordinator then closes
    // the sessions spread over the window, each once its calls are answered, by the drain
    // deadline; then the listener stops (`accept_shutdown`); only then does the mesh stop
    // (`mesh_shutdown`), and last the operations endpoint (`ops_shutdown`).
    let shutdown = CancellationToken::new();
    let accept_shutdown = CancellationToken::new();
    let mesh_shutdown = CancellationToken::new();
    let calls = TaskTracker::new();
    let connections = TaskTracker::new();
    let background = TaskTracker::new();

    // The mesh: RabbitMQ when configured, else the in-memory demo.
    // Already checked by `validate`.
    let (mesh, inbound, amqp): (Arc<dyn ServiceMesh>, _, _) = match cli.amqp_mesh_urls()? {
        Some((url, failover_urls)) => {
            let config = amqp_config(&cli, url, failover_urls)?;
            let nodes: Vec<String> =
                (0..config.node_urls().len()).map(|i| config.redacted_node_url(i)).collect();
            tracing::info!(nodes = ?nodes, service = %config.service_name, "connecting to the mesh");
            // Started unconnected: a broker that is down at start is waited for (readiness
            // 503, calls answered at once with an error) instead of ending the process.
            let (mesh, inbound) =
                amqp_mesh::AmqpMesh::start_unconnected(config, mesh_shutdown.clone())
                    .context("invalid mesh configuration (--amqp-url)")?;
            // Serving starts once the broker had its chance (so a gateway whose broker is up
            // says it listens only once it is connected, as before), but never waits long
            // for one that is down: refused connections end the round at once.
            match tokio::time::timeout(FIRST_ROUND_WAIT, mesh.first_round()).await {
                Ok(true) => {}
                Ok(false) | Err(_) => tracing::warn!(
                    "no node of --amqp-url is reachable yet; serving meanwhile (/readyz 503, \
                     calls answered with NuropbTransportError) and retrying"
                ),
            }
            (Arc::new(mesh.clone()), inbound, Some(mesh))
        }
        None => {
            let (mesh, inbound) = demo::demo_mesh();
            if cli.demo_tick_secs > 0 {
                background.spawn(demo::tick(
                    mesh.clone(),
                    Duration::from_secs(cli.demo_tick_secs),
                    shutdown.clone(),
                ));
            }
            (Arc::new(mesh), inbound, None)
        }
    };
    let demo_mode = amqp.is_none();
    let amqp_for_close = amqp.clone();

    // Read and checked in `validate`; read again here, as the files are at start-up.
    let tls = cli.tls_acceptor()?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };

    // Static keys, JWKS (its refresh task spawned here), the mesh token check; swapped on
    // SIGHUP when it is built from static keys only (`reload`).
    let (authenticator, dev_secret) =
        identity::authenticator(&cli, Arc::clone(&mesh), &background, &shutdown).await?;
    let authenticator = Arc::new(ReloadableAuthenticator::new(authenticator));

    let subscribable = cli.subscribable(demo_mode);
    // Every metric is registered here, before anything is served: the registry does not
    // change once `/metrics` can be scraped.
    let mut registry = Registry::default();
    let core_metrics = CoreMetrics::new(CallLabelConfig {
        services: cli.metrics_services.clone(),
        max_methods_per_service: cli.metrics_max_methods,
    });
    core_metrics.register(&mut registry);
    let core = CoreConfig {
        sessions: SessionRegistryConfig { subscribable, ..SessionRegistryConfig::default() },
        mesh: MeshManagerConfig {
            request_timeout: cli.request_timeout(),
            max_in_flight_per_session: cli.max_in_flight,
            max_in_flight_total: cli.max_in_flight_total,
            max_in_flight_bytes_per_session: cli.max_in_flight_bytes,
            max_in_flight_bytes_total: cli.max_in_flight_bytes_total,
            // The gateway's own methods are for mesh peers, never for clients.
            reserved_services: vec![cli.service_name.clone()],
            // Already checked by `validate`.
            callable: cli.callable_patterns()?,
            client_describe: cli.client_describe,
        },
        client_limits: ClientLimits {
            max_decoded_values: cli.max_decoded_values,
            max_decoded_bytes: cli.max_decoded_bytes,
            ..ClientLimits::default()
        },
        broadcast_topics: cli.broadcast_topics.clone(),
        max_sessions_per_user: cli.max_sessions_per_user,
        lame_duck: cli.lame_duck(),
        metrics: core_metrics,
    };
    let (coordinator, handle) =
        Coordinator::new(core, authenticator.clone(), mesh, inbound, calls, shutdown.clone());
    // Already checked by `validate`.
    let origins = OriginPolicyHandle::new(cli.origin_policy()?);
    let mut reloadable = Reloadable {
        args,
        running: loaded,
        demo_mode,
        dev_secret: dev_secret.clone(),
        authenticator,
        static_auth: reload::static_auth(&cli),
        origins: origins.clone(),
        tls: tls.clone(),
        core: handle.clone(),
        log_filter,
    };

    let ws = WsConfig {
        max_connections: cli.max_connections,
        max_handshakes_in_flight: cli.max_handshakes_in_flight,
        max_connections_per_ip: cli.max_connections_per_ip,
        connect_rate_per_ip: cli.connect_rate_per_ip,
        connect_burst_per_ip: cli.connect_burst_per_ip,
        max_message_size: cli.max_message_bytes,
        max_frame_size: cli.max_message_bytes,
        outbound_queue: cli.outbound_queue,
        outbound_queue_bytes: cli.outbound_queue_bytes,
        max_outbound_message_size: cli.max_outbound_message_bytes,
        ping_interval: Duration::from_secs(cli.ping_interval_secs),
        idle_timeout: Duration::from_secs(cli.idle_timeout_secs),
        rate_per_second: cli.rate_per_second,
        rate_burst: cli.rate_burst,
        origins: origins.clone(),
        auth: AuthSources {
            cookie: cli.cookie_auth.then(|| "Authorization".to_owned()),
            query_param: cli.token_query_param.clone(),
            ..AuthSources::default()
        },
        // The demo page, the library and `/demo/token` in demo mode only; `/healthz` always.
        http_routes: demo::http_routes(
            demo_mode,
            // The demo signs tokens with the secret it verifies with.
            dev_secret.as_deref().or(cli.jwt_secret.as_ref().map(|s| s.expose())),
            demo::TokenClaims {
                issuer: cli.jwt_issuer.clone(),
                audience: cli.jwt_audience.clone(),
            },
            origins,
        ),
        auth_timeout: Duration::from_secs(cli.auth_timeout_secs),
        // Reload: `tls.reload()` on a clone of this handle (see docs/OPERATIONS.md, TLS).
        tls: tls.clone(),
        // Already checked by `validate`.
        trusted_proxies: cli.trusted_proxies()?,
        proxy_protocol: cli.proxy_protocol,
        ..WsConfig::default()
    };

    let listener = listen(cli.listen, cli.listen_backlog)
        .with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    let addr = listener.local_addr().context("cannot read the listening address")?;
    say!("nuropb-gateway listening on {scheme}://{addr}/");

    // The operations endpoint stops only after the drain, on its own signal: meanwhile
    // /readyz answers 503 ("shutting down") and /metrics can still be scraped.
    let ops_shutdown = CancellationToken::new();
    let ws_stats = WsStatsHandle::new();
    ws_stats.register(&mut registry);
    let ops_server = match cli.ops_listen {
        Some(ops_addr) => {
            let listener = TcpListener::bind(ops_addr)
                .await
                .with_context(|| format!("cannot listen on {ops_addr} (--ops-listen)"))?;
            let ops_addr = listener.local_addr().context("cannot read the ops address")?;
            say!("nuropb-gateway ops on http://{ops_addr}/");
            let source = Arc::new(ops::GatewayOps::new(handle.clone()));
            registry.register_collector(Box::new(ops::StatsCollector::new(
                handle.clone(),
                ws_stats.clone(),
                amqp,
            )));
            let serve = ops_http::serve(
                listener,
                OpsConfig::default(),
                source,
                Arc::new(std::mem::take(&mut registry)),
                ops_shutdown.clone(),
            );
            Some(background.spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!(
                        error = format!("{:#}", anyhow::Error::new(e)),
                        "operations endpoint failed"
                    );
                }
            }))
        }
        None => None,
    };
    if demo_mode {
        // The configured secret signs the demo token; it is never printed itself.
        let configured = cli.jwt_secret.as_ref().map(|s| s.expose());
        print_demo_banner(scheme, &addr.to_string(), dev_secret.as_deref(), configured)?;
    }

    let drain = Duration::from_secs(cli.drain_timeout_secs);
    let routing = tokio::spawn(coordinator.run(drain));
    let mut server = tokio::spawn(ws_adapter::serve(
        listener,
        ws,
        handle,
        accept_shutdown.clone(),
        connections.clone(),
        ws_stats,
    ));

    // A WebSocket server that stops on its own (it only should at shutdown) takes the
    // gateway down with it rather than leaving a process that serves nobody.
    let stop = wait_for_signal();
    tokio::pin!(stop);
    let server_result = loop {
        tokio::select! {
            // All three are cancel-safe waits (`stop` is pinned outside the loop, so a
            // reload does not re-register it); the server handle is awaited below if not
            // here.
            () = &mut stop => break None,
            r = &mut server => break Some(r),
            () = next_hangup(&mut hangups) => reloadable.reload(),
        }
    };
    let lame_duck = cli.lame_duck();
    tracing::info!(
        drain_timeout_secs = cli.drain_timeout_secs,
        lame_duck_grace_secs = lame_duck.grace.as_secs(),
        lame_duck_secs = lame_duck.window.as_secs(),
        "shutting down: refusing new sessions, closing sessions over the lame-duck window"
    );
    shutdown.cancel();
    let stopped_early = server_result.is_some();
    // The listener keeps answering (503) while the coordinator drains, unless it stopped.
    if let Err(e) = routing.await {
        tracing::error!(error = %e, "routing task panicked");
    }
    accept_shutdown.cancel();
    let server_result = match server_result {
        Some(r) => r,
        None => server.await,
    };
    match server_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "WebSocket server failed"),
        Err(e) => tracing::error!(error = %e, "WebSocket server task panicked"),
    }
    // In-flight calls are settled; now the mesh may go.
    mesh_shutdown.cancel();
    if let Some(amqp) = &amqp_for_close
        && tokio::time::timeout(Duration::from_secs(10), amqp.closed()).await.is_err()
    {
        tracing::warn!("mesh connection did not close in time");
    }
    // Sessions were told to close; give their tasks a moment to send the close frames.
    connections.close();
    if tokio::time::timeout(Duration::from_secs(5), connections.wait()).await.is_err() {
        tracing::warn!("some connections did not close in time");
    }
    // Last the operations endpoint (it reported "shutting down" throughout) and the demo.
    ops_shutdown.cancel();
    if let Some(ops) = ops_server
        && let Err(e) = ops.await
    {
        tracing::error!(error = %e, "operations endpoint task panicked");
    }
    background.close();
    if tokio::time::timeout(Duration::from_secs(2), background.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop in time");
    }
    tracing::info!("stopped");
    if stopped_early {
        anyhow::bail!("the WebSocket server stopped unexpectedly");
    }
    Ok(())
}

fn amqp_config(
    cli: &Cli,
    url: String,
    failover_urls: Vec<String>,
) -> Result<amqp_mesh::AmqpMeshConfig> {
    let mut c = amqp_mesh::AmqpMeshConfig::new(url);
    c.failover_urls = failover_urls;
    c.service_name.clone_from(&cli.service_name);
    if let Some(id) = &cli.instance_id {
        c.instance_id.clone_from(id);
    }
    c.event_bindings.clone_from(&cli.event_bindings);
    c.request_ttl = cli.request_timeout();
    c.prefetch = cli.prefetch;
    c.reconnect_min = Duration::from_millis(cli.reconnect_min_ms);
    c.reconnect_max = Duration::from_millis(cli.reconnect_max_ms);
    c.drain_timeout = Duration::from_secs(cli.drain_timeout_secs);
    c.encryption = match cli.encryption {
        config::Encryption::Off => amqp_mesh::EncryptionMode::Off,
        config::Encryption::Auto => amqp_mesh::EncryptionMode::Auto,
        config::Encryption::Required => amqp_mesh::EncryptionMode::Required,
    };
    c.encryption_key_ttl = Duration::from_secs(cli.encryption_key_ttl_secs);
    // Nothing larger than a client may receive is worth taking off the broker.
    c.max_inbound_body_bytes = cli.max_outbound_message_bytes;
    c.tls = cli.amqp_tls()?;
    Ok(c)
}

/// Binds the WebSocket listener with an explicit backlog: `TcpListener::bind` uses 1024
/// (tokio) or 128 (std), which a reconnect storm of thousands of clients overflows, and
/// the kernel then drops SYNs and clients back off for seconds.
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does on Unix: a restarted gateway can rebind at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn print_demo_banner(
    scheme: &str,
    addr: &str,
    dev_secret: Option<&str>,
    configured: Option<&str>,
) -> Result<()> {
    // `https` for the page when the port speaks TLS.
    let page = if scheme == "wss" { "https" } else { "http" };
    let secret = dev_secret.or(configured);
    say!("running on the embedded in-memory mesh (no --amqp-url): service `demo`");
    say!("demo page: {page}://{addr}/");
    if secret.is_none() {
        say!(
            "no HS256 secret to sign demo tokens with: /demo/token is off (--jwt-public-key-file)"
        );
    }
    if let Some(secret) = secret {
        let token = demo::demo_token(secret.as_bytes())?;
        if dev_secret.is_some() {
            say!("generated dev JWT secret (HS256): {secret}");
        }
        say!("demo token (user demo-user, 24 h): {token}");
        say!("try:");
        // The URL first: websocat 1.14's `-H` swallows the argument after its value.
        say!("  websocat {scheme}://{addr}/ws -H 'Authorization: Bearer {token}'");
        say!(
            "  {{\"type\":\"request\",\"payload\":{{\"service\":\"demo\",\"method\":\"add\",\"params\":{{\"a\":2,\"b\":40}}}}}}"
        );
    }
    Ok(())
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

/// SIGHUP, caught (its default would end the process); `None` if it cannot be.
fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for SIGHUP: no configuration reload");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// The next SIGHUP; never, without the signal. Cancel-safe.
async fn next_hangup(hangups: &mut Hangups) {
    #[cfg(unix)]
    if let Some(signal) = hangups {
        if signal.recv().await.is_some() {
            return;
        }
        // The signal stream ended: no more reloads.
        *hangups = None;
    }
    #[cfg(not(unix))]
    let _ = hangups;
    std::future::pending::<()>().await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    // Both are cancel-safe one-shot waits.
                    r = tokio::signal::ctrl_c() => if let Err(e) = r {
                        tracing::error!(error = %e, "cannot wait for Ctrl-C");
                    },
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::error!(error = %e, "cannot wait for SIGTERM"),
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %e, "cannot wait for Ctrl-C; running until killed");
        std::future::pending::<()>().await;
    }
}
