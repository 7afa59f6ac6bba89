//! The publisher task: the one owner of publishing on a connection's channel. Callers send
//! it messages through a bounded queue and get the broker's verdict back.
//!
//! The channel runs in publisher-confirm mode. That is how lapin 4 reports `basic.return`:
//! without confirms, returned messages are only kept in a list that nobody is told about
//! (and that grows until drained); with confirms, the returned message rides on the
//! confirmation of its own publish (RabbitMQ sends `basic.return` before `basic.ack`).
//! Every confirmation must be awaited or lapin keeps it, so the task owns them all in a
//! `FuturesUnordered`: a caller that gives up (timeout, dropped future) cannot leak one.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use handler_core::MeshError;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
pub(crate) fn channel(capacity: usize, counters: Arc<Counters>) -> (Publisher, PublisherTask) {
    let (tx, rx) = mpsc::channel(capacity);
    (Publisher { tx, counters: Arc::clone(&counters) }, PublisherTask { rx, capacity, counters })
}

/// The receiving half, run by [`PublisherTask::run`] on one connection.
#[derive(Debug)]
pub(crate) struct PublisherTask {
    rx: mpsc::Receiver<Command>,
    capacity: usize,
    counters: Arc<Counters>,
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
                    let routing_key = message.routing_key.clone();
                    let publish = publish_one(&channel, message);
                    // Cancellation safety: lapin queues all frames before its first await,
                    // so dropping the publish on shutdown cannot send half a message.
                    let confirm = tokio::select! {
                        confirm = publish => confirm,
                        () = link.cancelled() => break,
                    };
                    match confirm {
                        Ok(confirm) => {
                            let counters = Arc::clone(&self.counters);
                            unconfirmed.push(async move {
                                let verdict = verdict(confirm.await, &counters);
                                // The caller may have given up; the verdict is counted anyway.
                                let _ = reply.send(verdict);
                            });
                        }
                        Err(error) => {
                            warn!(error = %error, routing_key, "publish failed, dropping the connection");
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

async fn publish_one(channel: &Channel, message: Outgoing) -> lapin::Result<lapin::PublisherConfirm> {
    let Outgoing { exchange, routing_key, mandatory, body, properties } = message;
    // Names were validated (config, guard) to fit in short strings; refuse rather than
    // panic in `ShortString::from` if one slipped through.
    let short = |s: String| ShortString::try_new(s).map_err(|e| lapin::Error::from(std::io::Error::other(e)));
    channel
        .basic_publish(
            short(exchange)?,
            short(routing_key)?,
            BasicPublishOptions { mandatory, immediate: false },
            &body,
            properties,
        )
        .await
}

fn verdict(confirmation: lapin::Result<Confirmation>, counters: &Counters) -> Verdict {
    match confirmation {
        Ok(Confirmation::Ack(None)) => {
            bump(&counters.published);
            Ok(Published::Routed)
        }
        Ok(Confirmation::Ack(Some(returned))) => {
            debug!(reply_code = returned.reply_code, routing_key = %returned.delivery.routing_key, "message returned by the broker");
            bump(&counters.returned);
            Ok(Published::Returned)
        }
        Ok(Confirmation::Nack(_)) => {
            bump(&counters.publish_failures);
            Err(MeshError::Unavailable("the broker refused the message".into()))
        }
        // Confirm mode is always on for our channel; NotRequested would mean it was not.
        Ok(Confirmation::NotRequested) => {
            bump(&counters.published);
            Ok(Published::Routed)
        }
        Err(error) => {
            debug!(error = %error, "publish not confirmed");
            bump(&counters.publish_failures);
            Err(MeshError::Unavailable("connection lost before the broker confirmed".into()))
        }
    }
}
