//! The gateway under test as a process of its own: the real `nuropb-gateway` binary, started
//! in its own process group so its CPU time and memory are its own, and stopped by PID
//! (SIGTERM, then SIGKILL after a grace period). Used by the benchmark, and by the suites that
//! measure the gateway from outside (RSS, signals, a broker that goes away).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::SECRET;

/// Where `cargo xtask` puts the path of the gateway binary it built.
pub const GATEWAY_BIN_ENV: &str = "NUROPB_GATEWAY_BIN";
const START_WAIT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Most stderr lines kept by [`GatewayProcess::start_capturing`]; later ones are counted only.
const MAX_CAPTURED_LINES: usize = 200_000;

pub struct GatewayProcess {
    child: Child,
    pub pid: u32,
    /// `ws://127.0.0.1:<port>/ws`, or `wss://…` when started with `--tls-cert-file`.
    pub url: String,
    /// `127.0.0.1:<port>` of the WebSocket listener.
    pub addr: String,
    /// `127.0.0.1:<port>` of the operations endpoint, when started with `--ops-listen`.
    pub ops_addr: Option<String>,
    /// The gateway's stderr lines (its log), when started with [`GatewayProcess::start_capturing`].
    stderr: Option<Arc<Mutex<Captured>>>,
    /// The gateway's stdout lines (its banner and what it prints).
    stdout: Arc<Mutex<Captured>>,
}

/// How [`GatewayProcess::launch`] starts the gateway (in-memory mode, on a free loopback
/// port, its stderr captured).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Flags after `--listen 127.0.0.1:0`.
    pub args: Vec<String>,
    /// Environment variables set for the gateway (on top of this process's environment,
    /// where every `NUROPB_` variable is removed first).
    pub env: Vec<(String, String)>,
    /// Whether to pass `--jwt-secret` [`SECRET`] (the other starters always do); without
    /// it the key comes from `args`, `env` or the configuration file.
    pub test_secret: bool,
}

/// Stderr as captured: the first [`MAX_CAPTURED_LINES`] lines and how many there were.
#[derive(Debug, Default)]
struct Captured {
    lines: Vec<String>,
    total: usize,
}

/// The mesh behind the gateway.
pub enum Mesh<'a> {
    /// RabbitMQ at this URL; the gateway takes `service_name` as its own NuroPb name.
    Amqp { url: &'a str, service_name: &'a str },
    /// The embedded in-memory mesh with its `demo` service.
    InMemory,
}

/// The gateway binary the suites run: [`GATEWAY_BIN_ENV`] when set, else the build of
/// this profile in the workspace's target directory.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os(GATEWAY_BIN_ENV) {
        return PathBuf::from(bin);
    }
    // Run by hand without `cargo xtask`: the build of this profile first (`cargo test
    // --workspace` builds it), else the other, so a release binary left by a benchmark
    // run does not stand in for the one just built.
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let release = target.join("release/nuropb-gateway");
    let debug = target.join("debug/nuropb-gateway");
    let (first, second) = if cfg!(debug_assertions) { (debug, release) } else { (release, debug) };
    if first.exists() { first } else { second }
}

/// The benchmark's limits: abuse limits out of the way (rate, per user, per address), room
/// for 19k connections and 64 requests in flight each, every broadcast under `bench.#`
/// delivered to every session, idle connections held for the whole scenario.
#[rustfmt::skip]
pub fn bench_args() -> Vec<String> {
    [
        "--rate-per-second", "1000000", "--rate-burst", "1000000",
        "--max-connections", "19500", "--max-in-flight", "64",
        // Every client is one user on one address: the per-user and per-address
        // limits would refuse the benchmark's own connections.
        "--max-sessions-per-user", "20000", "--max-connections-per-ip", "20000",
        "--connect-rate-per-ip", "1000000", "--connect-burst-per-ip", "1000000",
        "--max-in-flight-total", "100000", "--outbound-queue", "256",
        "--request-timeout-ms", "10000", "--log", "warn,lapin=off",
        "--broadcast-topics", "bench.#", "--event-bindings", "bench.#",
        "--idle-timeout-secs", "600", "--ping-interval-secs", "300",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

impl GatewayProcess {
    /// Starts the gateway on a free loopback port with the benchmark's limits ([`bench_args`]).
    pub fn start(mesh: Mesh<'_>) -> GatewayProcess {
        GatewayProcess::start_with(mesh, &bench_args())
    }

    /// Starts the gateway on a free loopback port with a test secret (HS256, [`SECRET`]) and
    /// `args` (flags as the binary takes them); the binary's defaults for everything else.
    pub fn start_with(mesh: Mesh<'_>, args: &[String]) -> GatewayProcess {
        GatewayProcess::spawn(mesh, args, false)
    }

    /// As [`GatewayProcess::start_with`], but the gateway's stderr (its log) is kept for
    /// [`GatewayProcess::stderr_lines`] instead of going to this process's stderr.
    pub fn start_capturing(mesh: Mesh<'_>, args: &[String]) -> GatewayProcess {
        GatewayProcess::spawn(mesh, args, true)
    }

    /// Starts the in-memory gateway as `launch` says, its stderr captured.
    pub fn launch(launch: &Launch) -> GatewayProcess {
        let mut cmd = Command::new(binary());
        cmd.args(["--listen", "127.0.0.1:0"]);
        if launch.test_secret {
            cmd.args(["--jwt-secret", SECRET]);
        }
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("NUROPB_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        cmd.args(&launch.args);
        GatewayProcess::spawn_command(cmd, &launch.args, true)
    }

    fn spawn(mesh: Mesh<'_>, args: &[String], capture_stderr: bool) -> GatewayProcess {
        let mut cmd = Command::new(binary());
        cmd.args(["--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--jwt-algorithm", "hs256"])
            .args(args);
        if let Mesh::Amqp { url, service_name } = mesh {
            cmd.args(["--amqp-url", url, "--service-name", service_name]);
        }
        GatewayProcess::spawn_command(cmd, args, capture_stderr)
    }

    fn spawn_command(mut cmd: Command, args: &[String], capture_stderr: bool) -> GatewayProcess {
        let bin = PathBuf::from(cmd.get_program());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr { Stdio::piped() } else { Stdio::inherit() })
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (`cargo xtask` builds it; {GATEWAY_BIN_ENV})",
                bin.display()
            )
        });
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let (ops_tx, ops_rx) = mpsc::channel();
        let stdout_lines = Arc::new(Mutex::new(Captured::default()));
        let stdout_sink = Arc::clone(&stdout_lines);
        // Reads stdout to its end, so the gateway never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut sink) = stdout_sink.lock() {
                    sink.total += 1;
                    if sink.lines.len() < MAX_CAPTURED_LINES {
                        sink.lines.push(line.clone());
                    }
                }
                let listening = line.strip_prefix("nuropb-gateway listening on ");
                if let Some((scheme, rest)) = listening.and_then(|l| l.split_once("://")) {
                    let _ = tx.send((scheme.to_owned(), rest.trim_end_matches('/').to_owned()));
                } else if let Some(rest) = line.strip_prefix("nuropb-gateway ops on http://") {
                    let _ = ops_tx.send(rest.trim_end_matches('/').to_owned());
                }
            }
        });
        let stderr = child.stderr.take().map(|pipe| {
            let captured = Arc::new(Mutex::new(Captured::default()));
            let sink = Arc::clone(&captured);
            // Reads stderr to its end, so the gateway never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut sink = sink.lock().expect("stderr lock");
                    sink.total += 1;
                    if sink.lines.len() < MAX_CAPTURED_LINES {
                        sink.lines.push(line);
                    }
                }
            });
            captured
        });
        let (scheme, addr) = match rx.recv_timeout(START_WAIT) {
            Ok(listening) => listening,
            Err(_) => {
                let _ = child.kill();
                panic!("the gateway did not say where it listens within {START_WAIT:?}");
            }
        };
        // The ops line follows the listening line (gateway-bin/src/main.rs).
        let ops_addr = if args.iter().any(|a| a == "--ops-listen") {
            match ops_rx.recv_timeout(START_WAIT) {
                Ok(ops) => Some(ops),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "the gateway did not say where its ops endpoint is within {START_WAIT:?}"
                    );
                }
            }
        } else {
            None
        };
        GatewayProcess {
            child,
            pid,
            url: format!("{scheme}://{addr}/ws"),
            addr,
            ops_addr,
            stderr,
            stdout: stdout_lines,
        }
    }

    /// Sends SIGHUP (a configuration reload).
    pub fn hangup(&self) {
        let status = Command::new("kill").args(["-HUP", &self.pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -HUP {}", self.pid);
    }

    /// The stdout lines so far (the banner and anything printed after it).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").lines.clone()
    }

    /// Stops the gateway (SIGTERM, SIGKILL after a grace period) and waits for it.
    pub fn stop(mut self) {
        self.stop_now();
    }

    /// Sends SIGTERM and waits up to `wait` for the exit: its status, or `None` when the
    /// gateway had to be killed (it did not exit in time).
    pub fn terminate(mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        if let Some(status) = exited_within(&mut self.child, wait) {
            return Some(status);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The stderr lines captured so far (the first `MAX_CAPTURED_LINES`) and the number of
    /// lines written in all; empty unless started with [`GatewayProcess::start_capturing`].
    pub fn stderr_lines(&self) -> (Vec<String>, usize) {
        match &self.stderr {
            Some(captured) => {
                let captured = captured.lock().expect("stderr lock");
                (captured.lines.clone(), captured.total)
            }
            None => (Vec::new(), 0),
        }
    }

    /// Resident memory of the gateway in bytes, `None` once it is gone.
    pub fn rss_bytes(&self) -> Option<u64> {
        crate::sys::rss_bytes(self.pid)
    }

    fn stop_now(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        if exited_within(&mut self.child, STOP_GRACE).is_some() {
            return;
        }
        eprintln!("the gateway did not stop within {STOP_GRACE:?}; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `wait` for `child` to exit: its status, or `None` if it still runs then.
pub fn exited_within(child: &mut Child, wait: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A benchmark that panics must not leave the gateway running.
impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.stop_now();
    }
}
