//! A [`FakeService`] that roams over the nodes of a RabbitMQ cluster, as a nuropb service
//! given several broker URLs would: it connects to the first node that accepts it, and when
//! that connection is lost it connects again, to the next node of the list first. The
//! cluster suite uses it to show that a service comes back on another node after its node
//! stops (which takes its service queue being a quorum queue, docs/OPERATIONS.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::fake_service::{FakeService, ServiceOptions};

/// How often the service looks at whether its connection is still up.
const POLL: Duration = Duration::from_millis(100);
/// Pause after a full round over the nodes failed.
const ROUND_PAUSE: Duration = Duration::from_millis(250);
/// `node` while the service is connected nowhere.
pub const NOWHERE: usize = usize::MAX;

/// A running roaming service; stopped by [`RoamingService::stop`] or when dropped.
pub struct RoamingService {
    /// The node (index into the URL list) it is connected to now, [`NOWHERE`] between
    /// connections.
    pub node: Arc<AtomicUsize>,
    /// When each connection came up, and on which node, in order.
    pub connections: Arc<Mutex<Vec<(Instant, usize)>>>,
    /// When each connection was seen lost (not counting the one [`RoamingService::stop`]
    /// closes), in order.
    pub losses: Arc<Mutex<Vec<Instant>>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RoamingService {
    /// Starts roaming over `urls` (the nodes of one cluster, one vhost) as service `name`;
    /// returns at once.
    pub fn start(urls: Vec<String>, name: &str, options: ServiceOptions<'static>) -> Self {
        assert!(!urls.is_empty(), "a roaming service needs at least one node");
        let node = Arc::new(AtomicUsize::new(NOWHERE));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let losses = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let log = Log {
            node: Arc::clone(&node),
            connections: Arc::clone(&connections),
            losses: Arc::clone(&losses),
        };
        let task = tokio::spawn(roam(urls, name.to_owned(), options, log, stop.clone()));
        RoamingService { node, connections, losses, stop, task: Some(task) }
    }

    /// Waits (at most `within`) until it is connected; the node it is on.
    pub async fn connected(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let node = self.node.load(Ordering::SeqCst);
            if node != NOWHERE {
                return Some(node);
            }
            tokio::time::sleep(POLL / 2).await;
        }
        None
    }

    /// Stops it and closes its connection (bounded).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // A panic in the task has been reported already; the service is gone either way.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for RoamingService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the roaming task reports (the public fields of [`RoamingService`]).
struct Log {
    node: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<(Instant, usize)>>>,
    losses: Arc<Mutex<Vec<Instant>>>,
}

async fn roam(
    urls: Vec<String>,
    name: String,
    options: ServiceOptions<'static>,
    log: Log,
    stop: CancellationToken,
) {
    let Log { node, connections, losses } = log;
    let mut next = 0_usize;
    let mut failed_in_round = 0_usize;
    while !stop.is_cancelled() {
        let at = next;
        next = (next + 1) % urls.len();
        match FakeService::try_start_opts(&urls[at], &name, options).await {
            Ok(service) => {
                failed_in_round = 0;
                node.store(at, Ordering::SeqCst);
                connections.lock().expect("lock").push((Instant::now(), at));
                while service.is_connected() && !stop.is_cancelled() {
                    // Cancellation safety: a sleep and a notification.
                    tokio::select! {
                        () = tokio::time::sleep(POLL) => {}
                        () = stop.cancelled() => {}
                    }
                }
                node.store(NOWHERE, Ordering::SeqCst);
                if !stop.is_cancelled() {
                    losses.lock().expect("lock").push(Instant::now());
                }
                service.stop().await;
            }
            Err(_) => {
                failed_in_round += 1;
                if failed_in_round >= urls.len() {
                    failed_in_round = 0;
                    // Cancellation safety: a sleep and a notification.
                    tokio::select! {
                        () = tokio::time::sleep(ROUND_PAUSE) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        }
    }
}
