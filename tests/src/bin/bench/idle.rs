//! Idle connections: authenticated sessions that only hold their socket. The gateway's RSS
//! is read before and after each level, and a probe (10 clients × 1 in flight) runs while
//! they are held, so the cost of a held connection shows in bytes and in latency.

use std::time::Duration;

use super::load::{self, Outcome, Window, Ws};
use e2e_tests::process::GatewayProcess;
use e2e_tests::sys;

pub struct IdleLevel {
    pub connections: usize,
    /// (RSS with them − RSS before any) / connections.
    pub rss_per_connection: f64,
    pub rss_bytes: u64,
    pub probe: Outcome,
    pub probe_seconds: f64,
}

/// Opens connections up to each level in turn (held until the end), measuring at each.
pub async fn run(
    gateway: &GatewayProcess,
    service: &str,
    levels: &[usize],
    probe_time: Duration,
) -> (Outcome, Vec<IdleLevel>) {
    let probe = || async {
        let clients = load::connect_many(&gateway.url, 10, true, 10).await;
        let window = Window::after(Duration::from_millis(300), probe_time);
        load::run(clients, service, 1, window).await
    };
    let unloaded = probe().await;
    // Let the allocator settle after the probe's connections went away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sys::rss_bytes(gateway.pid).expect("the gateway's RSS");
    let mut held: Vec<Ws> = Vec::new();
    let mut out = Vec::new();
    for &level in levels {
        let more = load::connect_many(&gateway.url, level - held.len(), true, 64).await;
        held.extend(more);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = sys::rss_bytes(gateway.pid).expect("the gateway's RSS");
        let probe_outcome = probe().await;
        out.push(IdleLevel {
            connections: level,
            rss_per_connection: rss.saturating_sub(before) as f64 / level as f64,
            rss_bytes: rss,
            probe: probe_outcome,
            probe_seconds: probe_time.as_secs_f64(),
        });
    }
    drop(held);
    (unloaded, out)
}
