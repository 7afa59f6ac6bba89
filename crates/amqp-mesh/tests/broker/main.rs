//! Black-box tests of amqp-mesh against the real RabbitMQ on 127.0.0.1:5672 (guest/guest),
//! run with `cargo xtask integration`: it creates one throw-away vhost for the run, passes
//! its URL in `NUROPB_TEST_AMQP_URL` and deletes it afterwards (one vhost per run rather
//! than per test: each `rabbitmqctl` call costs half a second). Without the URL every test
//! fails saying so; nothing is skipped.
//!
//! The tests share the vhost and run in parallel, kept apart by service names of their own;
//! the few that watch or disturb the whole vhost run alone. Each is bounded by
//! `SCENARIO_LIMIT`. Set `RUST_LOG` to see the adapter's logs.

mod scenarios;
mod support;

use std::future::Future;

use nuropb_testkit::broker::{exclusive_use, scenario, shared_use};
use support::Ctx;

/// A scenario that shares the vhost with the others running at the same time.
async fn shared<Fut: Future<Output = ()>>(run: impl FnOnce(Ctx) -> Fut) {
    let _vhost = shared_use().await;
    scenario(|vhost| run(Ctx::from(vhost))).await;
}

/// A scenario that watches or disturbs the whole vhost (every event in it, every
/// connection, the permissions): it runs while no other does.
async fn exclusive<Fut: Future<Output = ()>>(run: impl FnOnce(Ctx) -> Fut) {
    let _vhost = exclusive_use().await;
    scenario(|vhost| run(Ctx::from(vhost))).await;
}

/// One `#[tokio::test]` per scenario of `scenarios.rs`, named after it, on a runtime of its
/// own (two workers, like the gateway's smallest deployment).
macro_rules! broker_tests {
    ($how:ident: $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $how(scenarios::$name).await;
        }
    )*};
}

broker_tests!(shared:
    start_fails_clearly,
    nodes_are_tried_in_order_and_start_unconnected_waits,
    topology_matches_nuropb,
    request_round_trip_matches_nuropb_bytes,
    unknown_service_is_not_delivered_within_500ms,
    a_routable_service_that_loses_its_queue_is_not_delivered,
    direct_publishes_give_their_room_back_once_written,
    duplicate_responses_first_wins,
    timeouts_and_dropped_calls_leave_nothing_pending,
    own_service_is_refused_before_publishing,
    encrypted_call_uses_describe,
    encryption_survives_a_describe_outage,
    encryption_key_follows_a_restarted_service,
    events_reach_every_instance,
    gateway_methods_and_fan_out,
    client_relayed_calls_cannot_use_another_gateways_methods,
    control_operations_survive_event_load_and_overflow_is_refused,
    events_the_full_events_queue_drops_are_counted,
    garbage_on_service_queue_is_rejected_and_queue_flows,
    garbage_on_response_queue_is_dropped,
    oversized_response_fails_its_request_at_once,
    reconnect_after_a_half_open_loss_is_immediate,
    a_black_holed_link_is_noticed_within_its_heartbeats,
    shutdown_drains_pending_requests,
    shutdown_settles_unconfirmed_commands,
);

// The guard test counts every event published anywhere in the vhost (it must see none);
// the connection-loss test closes every connection of the vhost and revokes permissions.
broker_tests!(exclusive:
    guard_rejects_before_publishing,
    connection_loss_fails_fast_and_recovers,
);
