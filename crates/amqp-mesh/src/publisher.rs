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
//! ride on another message's confirmation, resolved before or after the returned message's
//! own. So a return counts for the message whose correlation id it carries, and the task
//! keeps a [`Ledger`] of the mandatory messages it has published (requests, commands,
//! control events):
//! - a return for one still awaiting its confirmation marks it; its confirmation then
//!   reports `Returned`;
//! - the `Routed` verdict of a command or control event ([`Mode::Mandatory`]) is held
//!   until every confirmation that is already resolved has been read (a return on one of
//!   them reaches it first), and for [`SUSPECT_GRACE`] when its own confirmation carried
//!   someone else's return (its own return may then be on a confirmation lapin resolves
//!   just after);
//! - a request gets its verdict at once: it waits for its response anyway, so a return
//!   that arrives later reaches it through the pending table.
//!
//! A negative acknowledgement (the broker refused the message, e.g. a queue with
//! `x-overflow: reject-publish` is full) is the verdict `Refused`.
//!
//! Confirms cost the broker (RabbitMQ tracks every unconfirmed message and sends a
//! `basic.ack` for it) and cost us a task hop and a ledger entry. So a request to a service
//! already known to be routable on this connection ([`Routes`]) takes the [`Direct`] path
//! instead: the caller's task publishes it itself, `mandatory`, on a second channel without
//! confirms, and, for a body of at most 4 KiB, without waiting for lapin to write it (see
//! [`Direct::publish`]: lapin's I/O thread gives its permit back). Should such a service
//! lose its queue, lapin keeps the returns of that channel in a list; the publisher task
//! reads it every [`RETURN_POLL`], fails the requests it names (`NotDelivered`, through the
//! pending table) and forgets the service, whose next request takes the confirmed path
//! again. A service never seen routable is always asked on the confirmed path, so an
//! unknown service is still answered at once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use handler_core::MeshError;
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::pending::PendingTable;
use crate::stats::{Counters, bump};

/// How long a command's `Routed` verdict is held when its own confirmation carried
/// another message's return. lapin resolves the confirmations of one `basic.ack` frame in
/// a single pass, within microseconds; this only has to outlast that pass.
const SUSPECT_GRACE: Duration = Duration::from_millis(20);

/// How often the publisher task reads the returns of the [`Direct`] channel: the longest a
/// request to a service that lost its queue (after it was known routable) waits for its
/// `NotDelivered`.
pub(crate) const RETURN_POLL: Duration = Duration::from_millis(5);

/// Most services remembered as routable per connection; beyond it, requests to the others
/// keep the confirmed path (correct, only dearer). Only services with a bound queue get
/// in, so this bounds a mesh's topology, not client input.
const MAX_ROUTES: usize = 4096;

/// How a message is published and how a return reaches its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A request: `mandatory`. Its verdict is given at once; a return that arrives later
    /// reaches the waiting request through the pending table.
    Request,
    /// A command or a control event: `mandatory`, and the verdict is all its sender ever
    /// learns, so `Routed` is held until returns riding on other confirmations are read.
    Mandatory,
    /// An event or a response: not mandatory (nuropb publishes them so, §3).
    Plain,
}

impl Mode {
    fn is_mandatory(self) -> bool {
        match self {
            Mode::Request | Mode::Mandatory => true,
            Mode::Plain => false,
        }
    }
}

/// A message ready for the wire.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) mode: Mode,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
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
    /// Refused by the broker (`basic.nack`): a queue it was routed to rejected it, e.g.
    /// one with `x-overflow: reject-publish` that is full. Queues that could take it may
    /// still have received it.
    Refused,
}

type Verdict = Result<Published, MeshError>;

#[derive(Debug)]
struct Command {
    message: Outgoing,
    reply: Reply,
}

/// Where a message's verdict goes. Counts as unsettled (see [`Publisher::unsettled`])
/// until the verdict is sent or the reply is dropped, wherever that happens: in the
/// queue, in the task, or with the task.
#[derive(Debug)]
struct Reply {
    tx: oneshot::Sender<Verdict>,
    _ticket: Ticket,
}

impl Reply {
    fn send(self, verdict: Verdict) {
        // The caller may have given up; the verdict is counted anyway.
        let _ = self.tx.send(verdict);
    }
}

/// One unit of [`Publisher::unsettled`], given back when dropped.
#[derive(Debug)]
struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    fn new(unsettled: &Arc<AtomicUsize>) -> Ticket {
        unsettled.fetch_add(1, Ordering::SeqCst);
        Ticket(Arc::clone(unsettled))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The way in to a connection's publisher task.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    unsettled: Arc<AtomicUsize>,
}

impl Publisher {
    /// Publishes and waits for the broker's confirmation. Fails at once when the queue to
    /// the publisher task is full (overload policy: the broker is not keeping up, so
    /// waiting would only hide it). Has no timeout of its own; callers bound the wait.
    /// Cancellation safe: a dropped call leaves the message to the task, which still
    /// collects its confirmation.
    pub(crate) async fn publish(&self, message: Outgoing) -> Verdict {
        let (tx, verdict) = oneshot::channel();
        let failed = |why: &str| {
            bump(&self.counters.publish_failures);
            Err(MeshError::Unavailable(why.to_owned()))
        };
        let reply = Reply { tx, _ticket: Ticket::new(&self.unsettled) };
        match self.tx.try_send(Command { message, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return failed("publish queue full"),
            Err(mpsc::error::TrySendError::Closed(_)) => return failed("connection lost"),
        }
        // The task drops the reply only when its connection is going away.
        verdict.await.unwrap_or_else(|_| failed("connection lost"))
    }

    /// [`Publisher::publish`], waiting for the broker at most `timeout`.
    pub(crate) async fn publish_within(&self, message: Outgoing, timeout: Duration) -> Verdict {
        tokio::time::timeout(timeout, self.publish(message)).await.unwrap_or_else(|_| {
            Err(MeshError::Unavailable(format!("publish not confirmed within {timeout:?}")))
        })
    }

    /// Messages handed to the publisher task whose verdict is not given yet (queued,
    /// awaiting the broker's confirmation, or held for a late return). The drain on
    /// shutdown waits for this to reach zero.
    pub(crate) fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::SeqCst)
    }
}

/// Services a request was routed to on this connection (the broker confirmed one without
/// a return). Per connection: a new connection starts empty. The lock is held for one set
/// operation, never across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    known: RwLock<HashSet<String>>,
}

impl Routes {
    pub(crate) fn is_routable(&self, service: &str) -> bool {
        self.known.read().unwrap_or_else(PoisonError::into_inner).contains(service)
    }

    pub(crate) fn routed(&self, service: &str) {
        if self.is_routable(service) {
            return;
        }
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if known.len() < MAX_ROUTES {
            known.insert(service.to_owned());
        }
    }

    pub(crate) fn forget(&self, service: &str) {
        self.known.write().unwrap_or_else(PoisonError::into_inner).remove(service);
    }
}

/// Requests to routable services, published by the caller's own task on the connection's
/// channel without confirms (see the module docs). Shares the [`Publisher`]'s bound and
/// unsettled count: at most `capacity` publishes in progress on both paths each.
#[derive(Debug, Clone)]
pub(crate) struct Direct {
    channel: Channel,
    pub(crate) routes: Arc<Routes>,
    permits: Arc<Semaphore>,
    counters: Arc<Counters>,
    unsettled: Arc<AtomicUsize>,
    link: CancellationToken,
}

impl Direct {
    /// Publishes a request (`mandatory`) without waiting for the broker; a return reaches
    /// the request through the pending table. Fails at once when `capacity` publishes are
    /// already in progress: handed to lapin and, as far as the request knows, not yet
    /// written (a request that ends first gives its permit back, though lapin may still
    /// hold its frames). A publish error means the channel is broken: the connection is
    /// dropped, as on the confirmed path.
    ///
    /// A body of at most [`KEPT_BODY_MAX`] bytes is not waited for: once lapin has queued
    /// its frames this returns, and the [`Sending`] it returns is kept by the request
    /// until it ends. lapin's I/O thread then gives the permit back itself once the
    /// frames are written, without waking the caller's task for it (a wake-up from
    /// another thread per request). A larger body is waited for until written, and freed
    /// then, as before. Cancellation safe: lapin queues all frames before its first await.
    pub(crate) async fn publish(&self, message: Outgoing) -> Result<Sending<'_>, MeshError> {
        let unavailable = |why: &str| Err(MeshError::Unavailable(why.to_owned()));
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            bump(&self.counters.publish_failures);
            return unavailable("publish queue full");
        };
        let held = (permit, Ticket::new(&self.unsettled));
        let (Ok(exchange), Ok(routing_key)) = (
            ShortString::try_new(message.exchange.as_str()),
            ShortString::try_new(message.routing_key.as_str()),
        ) else {
            // The guard and the config rule this out; see the publisher task.
            return Err(MeshError::Rejected(
                "exchange or routing key longer than 255 bytes".into(),
            ));
        };
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let Outgoing { body, properties, routing_key: key, .. } = message;
        let published = if body.len() <= KEPT_BODY_MAX {
            let channel = &self.channel;
            let mut publish: PublishFuture<'_> = Box::pin(async move {
                channel.basic_publish(exchange, routing_key, options, &body, properties).await
            });
            match poll_releasing(&mut publish, held) {
                Poll::Pending => return Ok(self.sending(Some(publish), key)),
                Poll::Ready(published) => published,
            }
        } else {
            let _held = held;
            self.channel.basic_publish(exchange, routing_key, options, &body, properties).await
        };
        if settle(published, &key, &self.counters, &self.link) {
            Ok(self.sending(None, key))
        } else {
            unavailable("publish failed")
        }
    }

    fn sending<'a>(&'a self, publish: Option<PublishFuture<'a>>, key: String) -> Sending<'a> {
        Sending { publish, routing_key: key, counters: &self.counters, link: &self.link }
    }
}

/// The largest request body a [`Direct`] publish keeps until its request ends instead of
/// waiting for it to be written: bounds what that keeps per request in flight.
const KEPT_BODY_MAX: usize = 4096;

/// A lapin publish, boxed so that [`Sending`] can keep it without naming its type.
type PublishFuture<'a> =
    Pin<Box<dyn Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send + 'a>>;

/// What a finished [`Direct`] publish came to; `false` if it failed.
///
/// Written: counted as published, and its confirm read (not in confirm mode, so it is
/// resolved already, `NotRequested`) so that lapin does not keep it among its dropped
/// confirmations. Failed: the channel is broken, so the connection is dropped, as when a
/// confirmed publish fails.
fn settle(
    published: lapin::Result<lapin::PublisherConfirm>,
    routing_key: &str,
    counters: &Counters,
    link: &CancellationToken,
) -> bool {
    match published {
        Ok(mut confirm) => {
            let _ = Pin::new(&mut confirm).poll(&mut Context::from_waker(Waker::noop()));
            bump(&counters.published);
            true
        }
        Err(error) => {
            warn!(error = %error, routing_key, "publish failed, dropping the connection");
            bump(&counters.publish_failures);
            link.cancel();
            false
        }
    }
}

/// The outcome of a [`Direct`] publish, kept by its request until the request ends. While
/// it holds the publish (queued in lapin when `publish` returned), the publish is not yet
/// settled: it counts as published, or as a failure, when the request ends. Dropping it
/// before lapin has written the frames does not unsend them (lapin queued them whole) and
/// gives the permit back at once.
///
/// A request that was answered ends with [`Sending::answered`]: its publish was written.
/// One that ends otherwise (timed out, cancelled, failed) drops it, and the drop looks at
/// the publish once more: if lapin failed to write it, the channel is broken, and the
/// connection is dropped as when a publish fails at once; if lapin has not written it yet,
/// it counts as published (lapin still writes it, and a later failure of the connection
/// is seen by the link).
#[must_use = "dropping it gives back the publish's permit before its frames are written"]
pub(crate) struct Sending<'a> {
    publish: Option<PublishFuture<'a>>,
    routing_key: String,
    counters: &'a Counters,
    link: &'a CancellationToken,
}

impl Sending<'_> {
    /// The request was answered, so its publish was written: it counts as published, and
    /// there is nothing left to look at.
    pub(crate) fn answered(mut self) {
        if self.publish.take().is_some() {
            bump(&self.counters.published);
        }
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        let Some(mut publish) = self.publish.take() else {
            return;
        };
        match publish.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(published) => {
                settle(published, &self.routing_key, self.counters, self.link);
            }
            // Not written yet: lapin still writes it (it queued every frame).
            Poll::Pending => bump(&self.counters.published),
        }
    }
}

impl std::fmt::Debug for Sending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending").field("queued", &self.publish.is_some()).finish()
    }
}

/// What a publish in progress holds: one of [`Direct`]'s permits and a ticket of the
/// unsettled count.
type Held = (OwnedSemaphorePermit, Ticket);

/// Polls `publish` once with a [`Release`] waker holding `held`. Pending: `held` is given
/// back when the publish wakes its waker (lapin: its frames are written) or when the
/// publish and every copy of the waker are dropped, whichever comes first. Ready: `held` is
/// given back now.
fn poll_releasing<F: Future + ?Sized>(publish: &mut Pin<Box<F>>, held: Held) -> Poll<F::Output> {
    let release = Waker::from(Arc::new(Release(Mutex::new(Some(held)))));
    publish.as_mut().poll(&mut Context::from_waker(&release))
}

/// The waker of a queued [`Direct`] publish: lapin wakes it, on its I/O thread, once the
/// publish's frames are written (or have failed), and it gives back the permit and the
/// unsettled ticket there. lapin keeps the waker in the publish's own promise, not on its
/// I/O thread, so it goes with the publish: if the request ends first, its [`Sending`]
/// drops the publish (after one look with a no-op waker), and the permit comes back then.
struct Release(Mutex<Option<Held>>);

impl Wake for Release {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// Fails the requests whose returns lapin keeps for the `direct` channel, and forgets
/// their services (see the module docs).
async fn fail_returned(
    direct: &Channel,
    routes: &Routes,
    pending: &PendingTable,
    counters: &Counters,
) {
    // Without confirm mode this waits for nothing; it only drains lapin's list.
    let Ok(returned) = direct.wait_for_confirms().await else {
        return;
    };
    for message in returned {
        bump(&counters.returned);
        let service = message.delivery.routing_key.as_str();
        let correlation_id = returned_correlation_id(&message);
        debug!(
            service,
            correlation_id,
            "request returned on the direct path; the service is no longer routable"
        );
        routes.forget(service);
        let not_delivered =
            MeshError::NotDelivered { service: service.to_owned(), method: String::new() };
        if !pending.complete(correlation_id, Err(not_delivered)) {
            debug!(correlation_id, "return for a request already settled");
        }
    }
}

/// Creates the queue to a publisher task; `capacity` bounds both waiting messages and
/// unconfirmed ones, and separately the [`Direct`] publishes in progress on `direct`.
pub(crate) fn channel(
    capacity: usize,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
    direct: Channel,
    link: CancellationToken,
) -> (Publisher, Direct, PublisherTask) {
    let (tx, rx) = mpsc::channel(capacity);
    let unsettled = Arc::<AtomicUsize>::default();
    let publisher =
        Publisher { tx, counters: Arc::clone(&counters), unsettled: Arc::clone(&unsettled) };
    let direct = Direct {
        channel: direct,
        routes: Arc::default(),
        permits: Arc::new(Semaphore::new(capacity)),
        counters: Arc::clone(&counters),
        unsettled,
        link,
    };
    (publisher, direct, PublisherTask { rx, capacity, counters, pending })
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
    ///
    /// `direct` is the channel of the [`Direct`] path, whose returns this task reads.
    pub(crate) async fn run(
        mut self,
        channel: Channel,
        direct: (Channel, Arc<Routes>),
        link: CancellationToken,
    ) {
        let mut unconfirmed = FuturesUnordered::new();
        let mut ledger = Ledger::default();
        let mut poll_returns = tokio::time::interval(RETURN_POLL);
        poll_returns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let release_at = ledger.next_release();
            // Cancellation safety: `recv` and `FuturesUnordered::next` lose nothing when
            // another branch wins; `cancelled` and the sleep are plain notifications.
            tokio::select! {
                biased;
                () = link.cancelled() => break,
                Some((seq, confirmation)) = unconfirmed.next(), if !unconfirmed.is_empty() => {
                    ledger.confirmed(seq, confirmation, Instant::now(), &self.counters, &self.pending);
                    // Whatever lapin resolved before this confirmation is ready now too:
                    // read it all before releasing held verdicts, so that a return riding
                    // on any of it reaches its command first.
                    while let Some((seq, confirmation)) = ready_now(&mut unconfirmed).await {
                        ledger.confirmed(seq, confirmation, Instant::now(), &self.counters, &self.pending);
                    }
                    ledger.release(Instant::now(), &self.counters);
                }
                () = tokio::time::sleep_until(release_at.unwrap_or_else(Instant::now)), if release_at.is_some() => {
                    ledger.release(Instant::now(), &self.counters);
                }
                _ = poll_returns.tick() => {
                    if self.pending.len() > 0 {
                        fail_returned(&direct.0, &direct.1, &self.pending, &self.counters).await;
                    }
                }
                command = self.rx.recv(), if ledger.len() < self.capacity => {
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
                            reply.send(Err(MeshError::Rejected(why.into())));
                            continue;
                        }
                    };
                    let correlation_id = message
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default();
                    let mandatory = message.mode.is_mandatory();
                    let options = BasicPublishOptions { mandatory, immediate: false };
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
                            let seq = ledger.sent(message.mode, correlation_id, reply);
                            unconfirmed.push(async move { (seq, confirm.await) });
                        }
                        Err(error) => {
                            warn!(error = %error, routing_key = %routing_key, "publish failed, dropping the connection");
                            bump(&self.counters.publish_failures);
                            reply.send(Err(MeshError::Unavailable("publish failed".into())));
                            link.cancel();
                            break;
                        }
                    }
                }
            }
        }
        // Held commands were confirmed by the broker: they get their verdict. Unconfirmed
        // publishes die with the channel; their callers see "connection lost" when the
        // replies are dropped here.
        ledger.release_all(&self.counters);
        debug!(unconfirmed = ledger.len(), "publisher stopped");
    }
}

/// The next item of `stream` if it is ready now, without waiting (with the task's own
/// waker, so a `FuturesUnordered` keeps waking this task).
async fn ready_now<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| match stream.poll_next_unpin(cx) {
        Poll::Ready(item) => Poll::Ready(item),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// One published message whose verdict is not given yet.
#[derive(Debug)]
struct Entry {
    mode: Mode,
    correlation_id: String,
    reply: Reply,
    /// A `basic.return` carrying this message's correlation id arrived (possibly on
    /// another message's confirmation).
    returned: bool,
}

/// The publisher task's record of what it published and has not settled. Owned by the
/// task alone, so no lock.
///
/// Invariant: `returnable` maps the correlation id of every mandatory message in
/// `entries` to its sequence number; `held` names only entries of `entries`.
#[derive(Debug, Default)]
struct Ledger {
    next_seq: u64,
    entries: HashMap<u64, Entry>,
    returnable: HashMap<String, u64>,
    /// [`Mode::Mandatory`] messages the broker confirmed without a return, with when they
    /// get `Routed`.
    held: Vec<(u64, Instant)>,
}

impl Ledger {
    /// Messages awaiting their confirmation or a held verdict.
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a message handed to lapin; returns its sequence number.
    fn sent(&mut self, mode: Mode, correlation_id: String, reply: Reply) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        if mode.is_mandatory() {
            // Correlation ids of mandatory messages are fresh uuids; were one reused, the
            // newer message would get the returns, which is the best guess anyway.
            self.returnable.insert(correlation_id.clone(), seq);
        }
        self.entries.insert(seq, Entry { mode, correlation_id, reply, returned: false });
        seq
    }

    /// The broker's confirmation of message `seq`, with any return lapin attached to it.
    fn confirmed(
        &mut self,
        seq: u64,
        confirmation: lapin::Result<Confirmation>,
        now: Instant,
        counters: &Counters,
        pending: &PendingTable,
    ) {
        let Some(mut entry) = self.take(seq) else {
            return;
        };
        let (acked, carried) = match confirmation {
            Ok(Confirmation::Ack(returned)) => (true, returned),
            Ok(Confirmation::Nack(returned)) => (false, returned),
            // Confirm mode is always on for our channel; NotRequested would mean it was not.
            Ok(Confirmation::NotRequested) => (true, None),
            Err(error) => {
                debug!(error = %error, "publish not confirmed");
                bump(&counters.publish_failures);
                entry.reply.send(Err(MeshError::Unavailable(
                    "connection lost before the broker confirmed".into(),
                )));
                return;
            }
        };
        let mut suspect = false;
        if let Some(returned) = carried {
            bump(&counters.returned);
            let theirs = returned_correlation_id(&returned);
            debug!(
                reply_code = returned.reply_code,
                routing_key = %returned.delivery.routing_key,
                correlation_id = theirs,
                "message returned by the broker"
            );
            if entry.mode.is_mandatory() && theirs == entry.correlation_id {
                entry.returned = true;
            } else {
                suspect = true;
                self.claim(&returned, pending);
            }
        }
        if !acked {
            bump(&counters.publish_failures);
            entry.reply.send(Ok(Published::Refused));
        } else if entry.returned {
            entry.reply.send(Ok(Published::Returned));
        } else if entry.mode == Mode::Mandatory {
            let release = if suspect { now + SUSPECT_GRACE } else { now };
            self.hold(seq, entry, release);
        } else {
            bump(&counters.published);
            entry.reply.send(Ok(Published::Routed));
        }
    }

    /// A return that lapin attached to someone else's confirmation.
    fn claim(&mut self, returned: &BasicReturnMessage, pending: &PendingTable) {
        let theirs = returned_correlation_id(returned);
        debug!(correlation_id = theirs, "return arrived on another message's confirmation");
        if let Some(entry) = self.returnable.get(theirs).and_then(|seq| self.entries.get_mut(seq)) {
            entry.returned = true;
            return;
        }
        // Settled already: a request still waits for its response and learns it there
        // (the request path puts its own method name into the error).
        let not_delivered = MeshError::NotDelivered {
            service: returned.delivery.routing_key.as_str().to_owned(),
            method: String::new(),
        };
        if !pending.complete(theirs, Err(not_delivered)) {
            debug!(correlation_id = theirs, "return for a message already settled");
        }
    }

    fn hold(&mut self, seq: u64, entry: Entry, release: Instant) {
        if entry.mode.is_mandatory() {
            self.returnable.insert(entry.correlation_id.clone(), seq);
        }
        self.entries.insert(seq, entry);
        self.held.push((seq, release));
    }

    /// When the next held verdict is due.
    fn next_release(&self) -> Option<Instant> {
        self.held.iter().map(|(_, at)| *at).min()
    }

    /// Gives the held verdicts due at `now`.
    fn release(&mut self, now: Instant, counters: &Counters) {
        let (due, later): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(_, at)| *at <= now);
        self.held = later;
        for (seq, _) in due {
            if let Some(entry) = self.take(seq) {
                if entry.returned {
                    entry.reply.send(Ok(Published::Returned));
                } else {
                    bump(&counters.published);
                    entry.reply.send(Ok(Published::Routed));
                }
            }
        }
    }

    /// Gives every held verdict now (the task is stopping).
    fn release_all(&mut self, counters: &Counters) {
        let last = self.held.iter().map(|(_, at)| *at).max();
        if let Some(last) = last {
            self.release(last, counters);
        }
    }

    /// Removes entry `seq` and its correlation id.
    fn take(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        if self.returnable.get(&entry.correlation_id) == Some(&seq) {
            self.returnable.remove(&entry.correlation_id);
        }
        Some(entry)
    }
}

fn returned_correlation_id(returned: &BasicReturnMessage) -> &str {
    returned.delivery.properties.correlation_id().as_ref().map(|c| c.as_str()).unwrap_or_default()
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

    /// A publish that is pending until its waker is taken out and woken, like lapin's
    /// until its frames are written.
    struct Queued(Arc<Mutex<Option<Waker>>>);

    impl Future for Queued {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.0.lock().expect("waker slot") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn held(permits: &Arc<Semaphore>, unsettled: &Arc<AtomicUsize>) -> Held {
        let permit = Arc::clone(permits).try_acquire_owned().expect("a permit");
        (permit, Ticket::new(unsettled))
    }

    #[test]
    fn a_queued_publish_gives_its_permit_back_when_written_or_dropped() {
        let permits = Arc::new(Semaphore::new(1));
        let unsettled = Arc::<AtomicUsize>::default();
        let room = || (permits.available_permits(), unsettled.load(Ordering::SeqCst));

        // Written while its request still waits: back on the waker's wake, not on drop.
        let waker = Arc::new(Mutex::new(None));
        let mut publish = Box::pin(Queued(Arc::clone(&waker)));
        assert!(poll_releasing(&mut publish, held(&permits, &unsettled)).is_pending());
        assert_eq!(room(), (0, 1), "held while queued");
        let woken = waker.lock().expect("waker slot").take().expect("a waker registered");
        woken.wake_by_ref();
        assert_eq!(room(), (1, 0), "given back once written, the publish and waker still kept");
        woken.wake();
        drop(publish);
        assert_eq!(room(), (1, 0));

        // Dropped before it is written (its request ended): back at once.
        let mut publish = Box::pin(Queued(Arc::clone(&waker)));
        assert!(poll_releasing(&mut publish, held(&permits, &unsettled)).is_pending());
        assert_eq!(room(), (0, 1));
        drop(publish);
        drop(waker.lock().expect("waker slot").take());
        assert_eq!(room(), (1, 0), "given back with the publish");

        // Written already at the first poll: back at once.
        let mut publish = Box::pin(std::future::ready(7));
        assert_eq!(poll_releasing(&mut publish, held(&permits, &unsettled)), Poll::Ready(7));
        assert_eq!(room(), (1, 0));
    }

    fn sending<'a>(
        publish: PublishFuture<'a>,
        counters: &'a Counters,
        link: &'a CancellationToken,
    ) -> Sending<'a> {
        Sending { publish: Some(publish), routing_key: "svc".into(), counters, link }
    }

    fn failed_write() -> PublishFuture<'static> {
        let error = lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed);
        Box::pin(std::future::ready(Err(lapin::Error::from(error))))
    }

    #[test]
    fn an_unanswered_request_whose_publish_failed_drops_the_connection() {
        let counters = Counters::default();
        let counts = || {
            let snapshot = counters.snapshot(true, 0);
            (snapshot.published, snapshot.publish_failures)
        };

        // Answered: the publish was written; nothing is looked at.
        let link = CancellationToken::new();
        sending(failed_write(), &counters, &link).answered();
        assert!(!link.is_cancelled());
        assert_eq!(counts(), (1, 0), "published once answered");

        // Not written yet when its request ends: lapin still writes it.
        let link = CancellationToken::new();
        let waker = Arc::new(Mutex::new(None));
        let queued: PublishFuture<'_> = Box::pin(async {
            Queued(waker).await;
            Err(lapin::Error::from(lapin::ErrorKind::ChannelsLimitReached))
        });
        drop(sending(queued, &counters, &link));
        assert!(!link.is_cancelled());
        assert_eq!(counts(), (2, 0));

        // Unanswered, and lapin failed to write it: the channel is broken.
        let link = CancellationToken::new();
        drop(sending(failed_write(), &counters, &link));
        assert!(link.is_cancelled(), "the connection is dropped");
        assert_eq!(counts(), (2, 1), "a failure, not also published");
    }

    /// A ledger with its collaborators and the receiving ends of every reply.
    struct Fixture {
        ledger: Ledger,
        counters: Counters,
        pending: Arc<PendingTable>,
        unsettled: Arc<AtomicUsize>,
        verdicts: HashMap<&'static str, oneshot::Receiver<Verdict>>,
        seqs: HashMap<&'static str, u64>,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                ledger: Ledger::default(),
                counters: Counters::default(),
                pending: Arc::new(PendingTable::default()),
                unsettled: Arc::default(),
                verdicts: HashMap::new(),
                seqs: HashMap::new(),
            }
        }

        fn sent(&mut self, mode: Mode, id: &'static str) {
            let (tx, rx) = oneshot::channel();
            let reply = Reply { tx, _ticket: Ticket::new(&self.unsettled) };
            let seq = self.ledger.sent(mode, id.to_owned(), reply);
            self.verdicts.insert(id, rx);
            self.seqs.insert(id, seq);
        }

        fn confirmed(&mut self, id: &str, carrying: Option<&str>, now: Instant) {
            let confirmation = Ok(Confirmation::Ack(carrying.map(returned)));
            let seq = self.seqs[id];
            self.ledger.confirmed(seq, confirmation, now, &self.counters, &self.pending);
        }

        /// The verdict given to `id` so far, if any.
        fn verdict(&mut self, id: &str) -> Option<Verdict> {
            self.verdicts.get_mut(id).and_then(|rx| rx.try_recv().ok())
        }
    }

    #[test]
    fn returns_count_for_the_message_they_carry() {
        let mut f = Fixture::new();
        let now = Instant::now();
        f.sent(Mode::Request, "mine");
        f.confirmed("mine", Some("mine"), now);
        assert_eq!(f.verdict("mine"), Some(Ok(Published::Returned)));

        // A return riding on another message's confirmation, for a request that already
        // has its verdict and waits for its response: it learns it through the table.
        let (_guard, mut waiting) = f.pending.register("theirs".into(), 1).expect("register");
        f.sent(Mode::Plain, "event");
        f.confirmed("event", Some("theirs"), now);
        assert_eq!(f.verdict("event"), Some(Ok(Published::Routed)));
        match waiting.try_recv() {
            Ok(Err(MeshError::NotDelivered { service, .. })) => assert_eq!(service, "gone"),
            other => panic!("the waiting request was not told: {other:?}"),
        }

        f.sent(Mode::Mandatory, "refused");
        let seq = f.seqs["refused"];
        f.ledger.confirmed(seq, Ok(Confirmation::Nack(None)), now, &f.counters, &f.pending);
        assert_eq!(f.verdict("refused"), Some(Ok(Published::Refused)));
        let snapshot = f.counters.snapshot(true, 0);
        assert_eq!((snapshot.returned, snapshot.published, snapshot.publish_failures), (2, 1, 1));
        assert_eq!(f.ledger.len(), 0);
        assert_eq!(f.unsettled.load(Ordering::SeqCst), 0, "every reply settled");
    }

    #[test]
    fn a_command_returned_on_another_confirmation_is_not_delivered() {
        let check = |command_first: bool| {
            let mut f = Fixture::new();
            let now = Instant::now();
            f.sent(Mode::Mandatory, "cmd");
            f.sent(Mode::Request, "req");
            // lapin resolves both in one pass and hands the command's return to the
            // request's confirmation; the task may read them in either order.
            if command_first {
                f.confirmed("cmd", None, now);
                assert_eq!(f.verdict("cmd"), None, "held until the batch is read");
                f.confirmed("req", Some("cmd"), now);
            } else {
                f.confirmed("req", Some("cmd"), now);
                f.confirmed("cmd", None, now);
            }
            f.ledger.release(now, &f.counters);
            assert_eq!(f.verdict("cmd"), Some(Ok(Published::Returned)), "{command_first}");
            assert_eq!(f.verdict("req"), Some(Ok(Published::Routed)));
            assert_eq!(f.ledger.len(), 0);
            assert_eq!(f.unsettled.load(Ordering::SeqCst), 0);
        };
        check(true);
        check(false);
    }

    #[test]
    fn a_command_carrying_another_return_waits_a_grace_period() {
        let mut f = Fixture::new();
        let now = Instant::now();
        for id in ["a", "b", "c"] {
            f.sent(Mode::Mandatory, id);
        }
        // a's confirmation carries b's return: a's own return may come next.
        f.confirmed("a", Some("b"), now);
        f.confirmed("c", None, now);
        f.ledger.release(now, &f.counters);
        assert_eq!(f.verdict("c"), Some(Ok(Published::Routed)));
        assert_eq!(f.verdict("a"), None, "suspect: held");
        assert_eq!(f.ledger.next_release(), Some(now + SUSPECT_GRACE));
        f.confirmed("b", Some("a"), now + Duration::from_millis(1));
        assert_eq!(f.verdict("b"), Some(Ok(Published::Returned)));
        f.ledger.release(now + SUSPECT_GRACE, &f.counters);
        assert_eq!(f.verdict("a"), Some(Ok(Published::Returned)));
        assert_eq!(f.ledger.len(), 0);
    }

    #[test]
    fn held_commands_are_routed_when_nothing_claims_them() {
        let mut f = Fixture::new();
        let now = Instant::now();
        f.sent(Mode::Mandatory, "a");
        f.sent(Mode::Mandatory, "b");
        f.confirmed("a", None, now);
        f.confirmed("b", Some("elsewhere"), now);
        f.ledger.release(now, &f.counters);
        assert_eq!(f.verdict("a"), Some(Ok(Published::Routed)));
        assert_eq!(f.unsettled.load(Ordering::SeqCst), 1, "b is still held");
        f.ledger.release_all(&f.counters);
        assert_eq!(f.verdict("b"), Some(Ok(Published::Routed)));
        assert_eq!(f.counters.snapshot(true, 0).published, 2);
        assert_eq!(f.unsettled.load(Ordering::SeqCst), 0);
    }
}
