//! Per-client-address limits, checked at accept: live connections per address and a
//! connect-rate token bucket per address. IPv6 addresses count per /64 (one host gets a
//! whole /64 as easily as one address). One lock, held for a few instructions per accept
//! and per connection end; the table is bounded and forgets idle addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::token_bucket::TokenBucket;

/// The limits, from [`WsConfig`](crate::config::WsConfig).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerLimitsConfig {
    pub(crate) max_connections_per_ip: usize,
    pub(crate) connect_rate_per_ip: u32,
    pub(crate) connect_burst_per_ip: u32,
    /// Addresses tracked at most; see [`PeerLimits::admit`].
    pub(crate) max_tracked: usize,
}

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerRefusal {
    TooManyConnections,
    TooManyAttempts,
}

#[derive(Clone)]
pub(crate) struct PeerLimits {
    config: PeerLimitsConfig,
    table: Arc<Mutex<HashMap<IpAddr, PeerState>>>,
}

struct PeerState {
    live: usize,
    /// Connection attempts.
    attempts: TokenBucket,
}

/// A live connection of one address; the count drops with it.
pub(crate) struct PeerGuard {
    limits: PeerLimits,
    key: IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut table = self.limits.lock();
        if let Some(state) = table.get_mut(&self.key) {
            state.live = state.live.saturating_sub(1);
        }
    }
}

impl PeerLimits {
    pub(crate) fn new(config: PeerLimitsConfig) -> Self {
        PeerLimits { config, table: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerState>> {
        // A panic while holding the lock leaves plain counters behind; they stay usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `ip`, or says why not. A refused attempt still takes a
    /// token, so hammering keeps an address refused.
    ///
    /// Bound: at most `max_tracked` addresses. When the table is full, idle ones (no live
    /// connection, bucket full again) are forgotten; if none is idle, the new address is
    /// admitted untracked for its rate (its connections are still bounded by the global
    /// limits), because refusing every newcomer would let a few busy addresses lock
    /// everyone else out.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<Option<PeerGuard>, PeerRefusal> {
        let key = key_of(ip);
        let now = Instant::now();
        let config = self.config;
        let mut table = self.lock();
        if !table.contains_key(&key) && table.len() >= config.max_tracked {
            table.retain(|_, s| s.live > 0 || !s.attempts.refill(now));
            if table.len() >= config.max_tracked {
                return Ok(None);
            }
        }
        let state = table.entry(key).or_insert_with(|| PeerState {
            live: 0,
            attempts: TokenBucket::new(
                config.connect_rate_per_ip,
                config.connect_burst_per_ip,
                now,
            ),
        });
        if !state.attempts.take(now) {
            return Err(PeerRefusal::TooManyAttempts);
        }
        if state.live >= config.max_connections_per_ip {
            return Err(PeerRefusal::TooManyConnections);
        }
        state.live += 1;
        drop(table);
        Ok(Some(PeerGuard { limits: self.clone(), key }))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// IPv4 as is (IPv4-mapped IPv6 too); other IPv6 addresses by their /64.
fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::time::Duration;

    use super::*;

    fn limits(per_ip: usize, rate: u32, burst: u32, max_tracked: usize) -> PeerLimits {
        PeerLimits::new(PeerLimitsConfig {
            max_connections_per_ip: per_ip,
            connect_rate_per_ip: rate,
            connect_burst_per_ip: burst,
            max_tracked,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn connections_per_address_are_bounded_and_released() {
        let l = limits(2, 100, 100, 10);
        let a = l.admit(ip("10.0.0.1")).unwrap();
        let b = l.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).err(), Some(PeerRefusal::TooManyConnections));
        assert!(l.admit(ip("10.0.0.2")).is_ok(), "another address is not affected");
        drop(a);
        assert!(l.admit(ip("10.0.0.1")).is_ok());
        drop(b);
        // One /64 is one client.
        let _c = l.admit(ip("2001:db8::1")).unwrap();
        let _d = l.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(l.admit(ip("2001:db8::ffff")).err(), Some(PeerRefusal::TooManyConnections));
        assert!(l.admit(ip("2001:db8:0:1::1")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn connect_rate_per_address() {
        let l = limits(1000, 10, 3, 10);
        for _ in 0..3 {
            assert!(l.admit(ip("10.0.0.1")).is_ok());
        }
        assert_eq!(l.admit(ip("10.0.0.1")).err(), Some(PeerRefusal::TooManyAttempts));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.admit(ip("10.0.0.1")).is_ok());
        assert_eq!(l.admit(ip("10.0.0.1")).err(), Some(PeerRefusal::TooManyAttempts));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_forgets_idle_addresses() {
        let l = limits(10, 10, 2, 2);
        let busy = l.admit(ip("10.0.0.1")).unwrap();
        drop(l.admit(ip("10.0.0.2")).unwrap());
        // Full, nobody idle yet: admitted, untracked.
        assert!(l.admit(ip("10.0.0.3")).unwrap().is_none());
        assert_eq!(l.tracked(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        // 10.0.0.2 is idle now and makes room.
        assert!(l.admit(ip("10.0.0.3")).unwrap().is_some());
        assert_eq!(l.tracked(), 2);
        drop(busy);
    }
}
