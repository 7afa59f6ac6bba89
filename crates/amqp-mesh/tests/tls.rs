//! amqps:// against a RabbitMQ node of the test's own with a TLS listener (certificates made
//! by the test, client certificates required): the adapter connects with the CA and a
//! client certificate and serves a request to a fake service; a wrong CA or a missing
//! client certificate fails to start with a clear error. Needs no vhost of the shared
//! broker: the node is the test's alone.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::Duration;

use amqp_mesh::{
    AmqpMesh, AmqpMeshConfig, AmqpMeshError, AmqpTlsConfig, ClientIdentity, EncryptionMode,
};
use handler_core::{MeshCall, ServiceMesh, TraceId};
use nuropb_testkit::FakeService;
use nuropb_testkit::node::{NodeTls, RabbitNode};
use nuropb_testkit::tls::{TempDir, TestPki};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn config(url: &str, tls: AmqpTlsConfig) -> AmqpMeshConfig {
    AmqpMeshConfig {
        service_name: "gw-tls".to_owned(),
        encryption: EncryptionMode::Off,
        connect_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(1),
        tls,
        ..AmqpMeshConfig::new(url)
    }
}

/// The error and all its causes, one line.
fn chain(error: &AmqpMeshError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_ca_file_and_client_certificate() {
    let dir = TempDir::new("amqps");
    let pki = TestPki::generate("broker CA");
    let files = pki.write(dir.path(), "broker");
    let node = RabbitNode::start_with_tls("amqps", NodeTls { files, require_client_cert: true });
    let url = node.amqps_url().unwrap();
    // The fake service is on the plain listener of the same node.
    let service = FakeService::start(&node.amqp_url(), "svc-tls", false).await;
    let identity =
        Some(ClientIdentity { cert_pem: pki.cert_pem.clone(), key_pem: pki.key_pem.clone() });

    let good =
        AmqpTlsConfig { ca_pem: Some(pki.ca_pem.clone()), client_identity: identity.clone() };
    let shutdown = CancellationToken::new();
    let (mesh, _inbound) =
        AmqpMesh::start(config(&url, good), shutdown.clone()).await.expect("amqps start");
    let params = json!({"over": "tls"});
    let call = MeshCall {
        service: "svc-tls".to_owned(),
        method: "echo".to_owned(),
        params: params.as_object().unwrap().clone(),
        context: json!({"user_id": "alice-id"}).as_object().unwrap().clone(),
        trace_id: TraceId::new("tls-1"),
    };
    let answer = tokio::time::timeout(WAIT, mesh.request(call, WAIT))
        .await
        .expect("answered in time")
        .expect("answered");
    assert_eq!(answer.result, params);
    shutdown.cancel();
    tokio::time::timeout(WAIT, mesh.closed()).await.expect("closed in time");

    // A CA that did not sign the broker's certificate.
    let other = TestPki::generate("other CA");
    let wrong_ca = AmqpTlsConfig { ca_pem: Some(other.ca_pem.clone()), client_identity: identity };
    let error =
        AmqpMesh::start(config(&url, wrong_ca), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, AmqpMeshError::Connect { .. }), "{error:?}");
    let text = chain(&error);
    assert!(text.contains("UnknownIssuer") || text.contains("unknown issuer"), "{text}");

    // The broker requires a client certificate.
    let no_identity = AmqpTlsConfig { ca_pem: Some(pki.ca_pem.clone()), client_identity: None };
    let error =
        AmqpMesh::start(config(&url, no_identity), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, AmqpMeshError::Connect { .. }), "{error:?}");

    // amqp:// with TLS settings is refused before any connection.
    let plain = AmqpTlsConfig { ca_pem: Some(pki.ca_pem.clone()), client_identity: None };
    let error = AmqpMesh::start(config(&node.amqp_url(), plain), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(error, AmqpMeshError::Config { field: "tls", .. }), "{error:?}");
    service.stop().await;
}
