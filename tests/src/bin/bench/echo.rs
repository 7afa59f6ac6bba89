//! The echo service behind every request row, in a process of its own: this same binary
//! started with [`ARG`], so that its CPU is measured apart from the load (the WebSocket
//! clients, or the ceiling's callers and its lapin connection), as a real service would be.
//!
//! The child answers on RabbitMQ until its stdin closes (the benchmark stops it, or dies),
//! so it never outlives the benchmark; it is started in its own process group and stopped
//! by PID.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use e2e_tests::process::exited_within;
use nuropb_testkit::{FakeService, ServiceOptions};

/// The first argument that makes the benchmark binary the echo service.
pub const ARG: &str = "--echo-service";
/// What the child prints once it consumes its queue.
const READY: &str = "echo service ready";
const START_WAIT: Duration = Duration::from_secs(20);
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The child's side: serves `service` on `amqp_url` until stdin closes.
pub async fn serve(amqp_url: &str, service: &str) {
    // The tests' nuropb look-alike, with a prefetch above everything in flight so requests
    // never wait in its queue: the service is not what is measured.
    let options = ServiceOptions { prefetch: 2048, ..ServiceOptions::bench() };
    let running = FakeService::start_opts(amqp_url, service, options).await;
    println!("{READY}");
    // Blocks a thread of the pool, not a worker: returns at EOF or on any read error.
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
    running.stop().await;
}

/// The benchmark's side: the child process, stopped on drop.
pub struct EchoProcess {
    child: Child,
    pub pid: u32,
}

impl EchoProcess {
    /// Starts the child and waits until it serves.
    pub fn start(amqp_url: &str, service: &str) -> EchoProcess {
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let mut child = Command::new(exe)
            .args([ARG, amqp_url, service])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("the echo service process starts");
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads to the end, so that the child never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == READY {
                    let _ = tx.send(true);
                }
            }
        });
        let ready = rx.recv_timeout(START_WAIT).unwrap_or(false);
        let mut echo = EchoProcess { child, pid };
        if !ready {
            echo.kill();
            panic!("the echo service did not start within {START_WAIT:?}");
        }
        echo
    }

    fn kill(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EchoProcess {
    /// Closes the child's stdin, its signal to stop, and waits for it (killed after
    /// [`STOP_WAIT`]).
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if exited_within(&mut self.child, STOP_WAIT).is_none() {
            eprintln!("the echo service did not stop within {STOP_WAIT:?}; killing it");
            self.kill();
        }
    }
}
