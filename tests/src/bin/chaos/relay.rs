//! A TCP relay of the suite's own in front of the shared broker, for a service that must
//! die abruptly: [`Relay::cut`] drops both sides of every connection made so far, which is
//! what the broker sees when a service process is killed (its socket closes, its unacked
//! deliveries go back to the queue). New connections pass through as before.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Relay {
    pub port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Relays `127.0.0.1:<port>` to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
        let port = listener.local_addr().expect("relay address").port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&conns);
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut up) = TcpStream::connect(&upstream).await else { continue };
                let task = tokio::spawn(async move {
                    // Either side closing ends the relay of this connection.
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
                keep.lock().expect("lock").push(task);
            }
        });
        Relay { port, conns, accept }
    }

    /// Drops both sides of every connection made so far (FIN to both peers).
    pub fn cut(&self) {
        for t in self.conns.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
