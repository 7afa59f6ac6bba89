//! What every scenario gets: the run's vhost, with an adapter config and start-up for it.
//! The broker plumbing itself (peers, spies, `rabbitmqctl`) is in `nuropb-testkit`.

use std::time::Duration;

use amqp_mesh::{AmqpMesh, AmqpMeshConfig};
use handler_core::MeshInbound;
use nuropb_testkit::TestVhost;
use nuropb_testkit::broker::WAIT;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The run's vhost, as every scenario gets it.
#[derive(Clone)]
pub struct Ctx {
    pub vhost: String,
    pub url: String,
}

impl From<TestVhost> for Ctx {
    fn from(v: TestVhost) -> Ctx {
        Ctx { vhost: v.vhost, url: v.url }
    }
}

impl Ctx {
    /// An adapter config for this vhost with test-sized timeouts and a unique instance.
    pub fn config(&self, service_name: &str) -> AmqpMeshConfig {
        AmqpMeshConfig {
            service_name: service_name.to_owned(),
            request_ttl: Duration::from_secs(10),
            describe_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            ..AmqpMeshConfig::new(self.url.clone())
        }
    }

    pub async fn start(&self, config: AmqpMeshConfig) -> Gateway {
        let shutdown = CancellationToken::new();
        let (mesh, inbound) = AmqpMesh::start(config, shutdown.clone())
            .await
            .expect("the adapter starts against the test vhost");
        Gateway { mesh, inbound, shutdown }
    }
}

/// A started adapter with its inbound channel; shuts down when dropped.
pub struct Gateway {
    pub mesh: AmqpMesh,
    pub inbound: mpsc::Receiver<MeshInbound>,
    pub shutdown: CancellationToken,
}

impl Gateway {
    /// The next inbound message, within [`WAIT`].
    pub async fn next_inbound(&mut self) -> MeshInbound {
        tokio::time::timeout(WAIT, self.inbound.recv())
            .await
            .expect("an inbound message in time")
            .expect("inbound channel open")
    }

    /// Cancels and waits for the adapter to close.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.mesh.closed()).await.expect("the adapter closes in time");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
