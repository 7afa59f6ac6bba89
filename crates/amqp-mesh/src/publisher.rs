//! The publisher task: the one owner of publishing on a connection's channel. Callers send
//! it messages through a bounded queue and get the broker's verdict back.
//!
//! The channel runs in publisher-confirm mode. That is how lapin 4 reports `basic.return`:
//! without confirms, returned messages are only kept in a list that nobody is told about
//! (and that grows until drained); with confirms, a returned message rides on a
//! confirmation (RabbitMQ sends `basic.return` before the `basic.ack`). Every confirmation
//! must be awaited or lapin keeps it, so the task owns them all in a `FuturesUnordered`: a
//! caller that gives up (timeout, dropped future) cannot leak one.
//!
//! lapin pairs returned messages with confirmations by arrival order, and when the broker
//! acknowledges several publishes at once (`multiple`), in hash-map order: a return can
//! ride on another message's confirmation. So a return counts for the message whose
//! correlation id it carries; one that arrives on someone else's confirmation is handed to
//! the waiting request directly, through the pending table.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use handler_core::MeshError;
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::pending::PendingTable;
use crate::stats::{Counters, bump};

/// A message ready for the wire.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// `true` for requests and commands: the broker returns them when no queue is bound.
    pub(crate) mandatory: bool,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
}

/// What the broker did with a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// Routed to at least one queue (or, when not mandatory, accepted).
    Routed,
    /// Returned as unroutable (`basic.return`, 312 NO_ROUTE).
    Returned,
}

type Verdict = Result<Published, MeshError>;

#[derive(Debug)]
struct Command {
    message: Outgoing,
    reply: oneshot::Sender<Verdict>,
}

/// The way in to a connection's publisher task.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl Publisher {
    /// Publishes and waits for the broker's confirmation. Fails at once when the queue to
    /// the publisher task is full (overload policy: the broker is not keeping up, so
    /// waiting would only hide it). Has no timeout of its own; callers bound the wait.
    /// Cancellation safe: a dropped call leaves the message to the task, which still
    /// collects its confirmation.
    pub(crate) async fn publish(&self, message: Outgoing) -> Verdict {
        let (reply, verdict) = oneshot::channel();
        let failed = |why: &str| {
            bump(&self.counters.publish_failures);
            Err(MeshError::Unavailable(why.to_owned()))
        };
        match self.tx.try_send(Command { message, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return failed("publish queue full"),
            Err(mpsc::error::TrySendError::Closed(_)) => return failed("connection lost"),
        }
        // The task drops the reply only when its connection is going away.
        verdict.await.unwrap_or_else(|_| failed("connection lost"))
    }
}

/// Creates the queue to a publisher task; `capacity` bounds both waiting messages and
/// unconfirmed ones.
pub(crate) fn channel(
    capacity: usize,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
) -> (Publisher, PublisherTask) {
    let (tx, rx) = mpsc::channel(capacity);
    let publisher = Publisher { tx, counters: Arc::clone(&counters) };
    (publisher, PublisherTask { rx, capacity, counters, pending })
}

/// The receiving half, run by [`PublisherTask::run`] on one connection.
#[derive(Debug)]
pub(crate) struct PublisherTask {
    rx: mpsc::Receiver<Command>,
    capacity: usize,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
}

impl PublisherTask {
    /// Publishes until `link` is cancelled or every [`Publisher`] is gone. A publish error
    /// means the channel is broken: it cancels `link` so the supervisor reconnects.
    pub(crate) async fn run(mut self, channel: Channel, link: CancellationToken) {
        let mut unconfirmed = FuturesUnordered::new();
        loop {
            // Cancellation safety: `recv` and `FuturesUnordered::next` lose nothing when
            // another branch wins; `cancelled` is a plain notification.
            tokio::select! {
                biased;
                () = link.cancelled() => break,
                Some(()) = unconfirmed.next(), if !unconfirmed.is_empty() => {}
                command = self.rx.recv(), if unconfirmed.len() < self.capacity => {
                    let Some(Command { message, reply }) = command else { break };
                    let (exchange, routing_key) = match (
                        ShortString::try_new(message.exchange.as_str()),
                        ShortString::try_new(message.routing_key.as_str()),
                    ) {
                        (Ok(exchange), Ok(routing_key)) => (exchange, routing_key),
                        // The guard and the config rule this out; refuse rather than let
                        // lapin's `ShortString::from` panic.
                        _ => {
                            let why = "exchange or routing key longer than 255 bytes";
                            // The caller may be gone; nothing else to tell.
                            let _ = reply.send(Err(MeshError::Rejected(why.into())));
                            continue;
                        }
                    };
                    let correlation_id = message
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default();
                    let options = BasicPublishOptions { mandatory: message.mandatory, immediate: false };
                    let publish = channel.basic_publish(
                        exchange,
                        routing_key.clone(),
                        options,
                        &message.body,
                        message.properties,
                    );
                    // Cancellation safety: lapin queues all frames before its first await,
                    // so dropping the publish on shutdown cannot send half a message.
                    let confirm = tokio::select! {
                        confirm = publish => confirm,
                        () = link.cancelled() => break,
                    };
                    match confirm {
                        Ok(confirm) => {
                            let counters = Arc::clone(&self.counters);
                            let pending = Arc::clone(&self.pending);
                            unconfirmed.push(async move {
                                let confirmation = confirm.await;
                                let verdict = verdict(confirmation, &correlation_id, &counters, &pending);
                                // The caller may have given up; the verdict is counted anyway.
                                let _ = reply.send(verdict);
                            });
                        }
                        Err(error) => {
                            warn!(error = %error, routing_key = %routing_key, "publish failed, dropping the connection");
                            bump(&self.counters.publish_failures);
                            // The caller learns it from the error; it may have gone.
                            let _ = reply.send(Err(MeshError::Unavailable("publish failed".into())));
                            link.cancel();
                            break;
                        }
                    }
                }
            }
        }
        debug!(unconfirmed = unconfirmed.len(), "publisher stopped");
        // Unconfirmed publishes die with the channel; their callers see "connection lost"
        // when the replies are dropped here.
    }
}

/// The broker's verdict on the message published under `correlation_id`.
fn verdict(
    confirmation: lapin::Result<Confirmation>,
    correlation_id: &str,
    counters: &Counters,
    pending: &PendingTable,
) -> Verdict {
    let (acked, returned) = match confirmation {
        Ok(Confirmation::Ack(returned)) => (true, returned),
        Ok(Confirmation::Nack(returned)) => (false, returned),
        // Confirm mode is always on for our channel; NotRequested would mean it was not.
        Ok(Confirmation::NotRequested) => (true, None),
        Err(error) => {
            debug!(error = %error, "publish not confirmed");
            bump(&counters.publish_failures);
            return Err(MeshError::Unavailable(
                "connection lost before the broker confirmed".into(),
            ));
        }
    };
    let own_return =
        returned.is_some_and(|returned| claim_return(returned, correlation_id, counters, pending));
    if !acked {
        bump(&counters.publish_failures);
        return Err(MeshError::Unavailable("the broker refused the message".into()));
    }
    if own_return {
        Ok(Published::Returned)
    } else {
        bump(&counters.published);
        Ok(Published::Routed)
    }
}

/// Whether `returned` is the message published under `correlation_id`; if it is another
/// one, its waiting request (if any) is told directly.
fn claim_return(
    returned: BasicReturnMessage,
    correlation_id: &str,
    counters: &Counters,
    pending: &PendingTable,
) -> bool {
    bump(&counters.returned);
    let properties = &returned.delivery.properties;
    let theirs = properties.correlation_id().as_ref().map(|c| c.as_str()).unwrap_or_default();
    let routing_key = returned.delivery.routing_key.as_str();
    debug!(
        reply_code = returned.reply_code,
        routing_key,
        correlation_id = theirs,
        "message returned by the broker"
    );
    if theirs == correlation_id {
        return true;
    }
    debug!(correlation_id = theirs, "return arrived on another message's confirmation");
    // The request path puts its own method name into the error.
    let not_delivered =
        MeshError::NotDelivered { service: routing_key.to_owned(), method: String::new() };
    pending.complete(theirs, Err(not_delivered));
    false
}

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;

    use super::*;

    fn returned(correlation_id: &str) -> BasicReturnMessage {
        let mut delivery =
            Delivery::mock(0, "nuropb-rpc-exchange".into(), "gone".into(), false, vec![]);
        delivery.properties = BasicProperties::default().with_correlation_id(correlation_id.into());
        BasicReturnMessage { delivery, reply_code: 312, reply_text: "NO_ROUTE".into() }
    }

    #[test]
    fn returns_count_for_the_message_they_carry() {
        let counters = Counters::default();
        let pending = Arc::new(PendingTable::default());
        let (_guard, mut waiting) = pending.register("theirs".into(), 1).expect("register");

        let own =
            verdict(Ok(Confirmation::Ack(Some(returned("mine")))), "mine", &counters, &pending);
        assert_eq!(own, Ok(Published::Returned));

        // A return riding on another message's confirmation goes to its own request.
        let other =
            verdict(Ok(Confirmation::Ack(Some(returned("theirs")))), "mine", &counters, &pending);
        assert_eq!(other, Ok(Published::Routed));
        match waiting.try_recv() {
            Ok(Err(MeshError::NotDelivered { service, .. })) => assert_eq!(service, "gone"),
            other => panic!("the waiting request was not told: {other:?}"),
        }

        let refused = verdict(Ok(Confirmation::Nack(None)), "mine", &counters, &pending);
        assert!(matches!(refused, Err(MeshError::Unavailable(_))));
        let snapshot = counters.snapshot(true, 0);
        assert_eq!((snapshot.returned, snapshot.published, snapshot.publish_failures), (2, 1, 1));
    }
}
