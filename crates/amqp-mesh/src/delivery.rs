//! Helpers every consumer task shares: taking the next lapin delivery and settling one,
//! where a failure of either means the connection or channel is gone.

use futures::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The next delivery, or `None` when the link is cancelled or the consumer ended (which
/// cancels the link: the connection or channel is gone).
pub(crate) async fn next(
    consumer: &mut Consumer,
    link: &CancellationToken,
    queue: &str,
) -> Option<Delivery> {
    // Cancellation safety: deliveries wait in lapin's buffer until polled; dropping
    // `next` loses none.
    let delivery = tokio::select! {
        () = link.cancelled() => return None,
        delivery = consumer.next() => delivery,
    };
    match delivery {
        Some(Ok(delivery)) => Some(delivery),
        Some(Err(error)) => {
            if !link.is_cancelled() {
                warn!(queue, error = %error, "consumer failed");
                link.cancel();
            }
            None
        }
        None => {
            if !link.is_cancelled() {
                warn!(queue, "consumer cancelled by the broker");
                link.cancel();
            }
            None
        }
    }
}

/// An ack/reject result: a failure means the channel is gone; cancels the link.
pub(crate) fn settle(result: lapin::Result<bool>, link: &CancellationToken) -> bool {
    match result {
        Ok(_) => true,
        Err(error) => {
            if !link.is_cancelled() {
                warn!(error = %error, "acknowledgement failed");
                link.cancel();
            }
            false
        }
    }
}
