//! The `nuropb-gateway` binary, a composition root only: parse and validate config, install
//! the tracing subscriber, build the mesh adapter and the core, serve WebSockets (and the
//! operations endpoint when asked), and on Ctrl-C/SIGTERM drain in-flight requests before
//! closing every session.

mod config;
mod demo;
mod log;
mod ops;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use handler_core::auth::JwtKey;
use handler_core::coordinator::CoreConfig;
use handler_core::mesh_manager::MeshManagerConfig;
use handler_core::session_registry::SessionRegistryConfig;
use handler_core::{Coordinator, JwtAuthenticator, JwtConfig, ServiceMesh};
use nuropb_wire::client::ClientLimits;
use ops_http::OpsConfig;
use ws_adapter::{AuthSources, WsConfig, WsStatsHandle};

use crate::config::Cli;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("nuropb-gateway: invalid configuration: {e:#}");
        return ExitCode::from(2);
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nuropb-gateway: invalid configuration: --log {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    // Colours only on a terminal: logs piped to files or collectors stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // Logged values come from clients (headers, claims): escaped, so none starts a line.
        .fmt_fields(log::escaping_fields())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nuropb-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nuropb-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    // Shutdown order: `shutdown` stops accepting and refuses new calls; the coordinator then
    // drains in-flight calls and closes sessions; only then does the mesh stop
    // (`mesh_shutdown`), and last the operations endpoint (`ops_shutdown`).
    let shutdown = CancellationToken::new();
    let mesh_shutdown = CancellationToken::new();
    let calls = TaskTracker::new();
    let connections = TaskTracker::new();
    let background = TaskTracker::new();

    // The mesh: RabbitMQ when configured, else the in-memory demo.
    // Already checked by `validate`.
    let (mesh, inbound, amqp): (Arc<dyn ServiceMesh>, _, _) = match cli.amqp_mesh_urls()? {
        Some((url, failover_urls)) => {
            let config = amqp_config(&cli, url, failover_urls);
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

    let (jwt, dev_secret) = match cli.jwt_config()? {
        Some(c) => (c, None),
        None => {
            let secret = demo::generate_secret();
            (JwtConfig::new(JwtKey::Hs256Secret(secret.clone().into_bytes())), Some(secret))
        }
    };
    let authenticator = Arc::new(JwtAuthenticator::new(jwt).context("invalid JWT key")?);

    // The demo is meant to be explored: its topics are open to subscription by default.
    let subscribable = if cli.subscribable_topics.is_empty() && demo_mode {
        vec!["demo.#".to_owned()]
    } else {
        cli.subscribable_topics.clone()
    };
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
    };
    let (coordinator, handle) =
        Coordinator::new(core, authenticator, mesh, inbound, calls, shutdown.clone());

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
        // Already checked by `validate`.
        origins: cli.origin_policy()?,
        auth: AuthSources {
            cookie: cli.cookie_auth.then(|| "Authorization".to_owned()),
            query_param: cli.token_query_param.clone(),
            ..AuthSources::default()
        },
        // The demo page, the library and `/demo/token` in demo mode only; `/healthz` always.
        http_routes: demo::http_routes(
            demo_mode,
            dev_secret.as_deref().or(cli.jwt_secret.as_deref()),
            demo::TokenClaims {
                issuer: cli.jwt_issuer.clone(),
                audience: cli.jwt_audience.clone(),
            },
            cli.origin_policy()?,
        ),
        auth_timeout: Duration::from_secs(cli.auth_timeout_secs),
        ..WsConfig::default()
    };

    let listener = listen(cli.listen, cli.listen_backlog)
        .with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    let addr = listener.local_addr().context("cannot read the listening address")?;
    say!("nuropb-gateway listening on ws://{addr}/");

    // The operations endpoint stops only after the drain, on its own signal: meanwhile
    // /readyz answers 503 ("shutting down") and /metrics can still be scraped.
    let ops_shutdown = CancellationToken::new();
    let ws_stats = WsStatsHandle::new();
    let ops_server = match cli.ops_listen {
        Some(ops_addr) => {
            let listener = TcpListener::bind(ops_addr)
                .await
                .with_context(|| format!("cannot listen on {ops_addr} (--ops-listen)"))?;
            let ops_addr = listener.local_addr().context("cannot read the ops address")?;
            say!("nuropb-gateway ops on http://{ops_addr}/");
            let source = Arc::new(ops::GatewayOps::new(handle.clone(), ws_stats.clone(), amqp));
            let serve =
                ops_http::serve(listener, OpsConfig::default(), source, ops_shutdown.clone());
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
        print_demo_banner(&addr.to_string(), dev_secret.as_deref(), cli.jwt_secret.as_deref())?;
    }

    let drain = Duration::from_secs(cli.drain_timeout_secs);
    let routing = tokio::spawn(coordinator.run(drain));
    let mut server = tokio::spawn(ws_adapter::serve(
        listener,
        ws,
        handle,
        shutdown.clone(),
        connections.clone(),
        ws_stats,
    ));

    // A WebSocket server that stops on its own (it only should at shutdown) takes the
    // gateway down with it rather than leaving a process that serves nobody.
    let server_result = tokio::select! {
        // Both are cancel-safe waits; the server handle is awaited below if not here.
        () = wait_for_signal() => None,
        r = &mut server => Some(r),
    };
    tracing::info!("shutting down: draining in-flight requests");
    shutdown.cancel();
    let stopped_early = server_result.is_some();
    let server_result = match server_result {
        Some(r) => r,
        None => server.await,
    };
    match server_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "WebSocket server failed"),
        Err(e) => tracing::error!(error = %e, "WebSocket server task panicked"),
    }
    if let Err(e) = routing.await {
        tracing::error!(error = %e, "routing task panicked");
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

fn amqp_config(cli: &Cli, url: String, failover_urls: Vec<String>) -> amqp_mesh::AmqpMeshConfig {
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
    c
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

fn print_demo_banner(addr: &str, dev_secret: Option<&str>, configured: Option<&str>) -> Result<()> {
    let secret = dev_secret.or(configured);
    say!("running on the embedded in-memory mesh (no --amqp-url): service `demo`");
    say!("demo page: http://{addr}/");
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
        say!("  websocat ws://{addr}/ws -H 'Authorization: Bearer {token}'");
        say!(
            "  {{\"type\":\"request\",\"payload\":{{\"service\":\"demo\",\"method\":\"add\",\"params\":{{\"a\":2,\"b\":40}}}}}}"
        );
    }
    Ok(())
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
