//! A RabbitMQ node of the test's own: `rabbitmq-server` as a child process in its own
//! process group, with its own node name, free loopback ports (AMQP and Erlang
//! distribution), its own Erlang cookie and its data, logs and pid file in a temporary
//! folder, and no plugins (so nothing fights over 15672). A test may stop, restart or
//! `kill -9` it; the shared broker on 5672, which other people's tests use, is never touched.
//! Dropping the handle kills the node's whole process group and removes the folder, also on
//! panic. The chaos suite stops and kills one; the cluster suite starts three and joins
//! them into one cluster ([`RabbitNode::start_cluster`]).
//! [`RabbitNode::start_with_tls`] adds an `amqps://` listener beside the plain one, with
//! certificates the test made (`crate::tls`), through a `rabbitmq.conf` in the node's folder.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::tls::PkiFiles;

/// Overrides where `rabbitmq-server` is (default: Debian's `/usr/lib/rabbitmq/bin`, which,
/// unlike the `/usr/sbin` wrapper, does not switch to the `rabbitmq` user and so keeps the
/// environment that makes this node its own).
pub const SERVER_BIN_ENV: &str = "NUROPB_RABBITMQ_SERVER";
const DEBIAN_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";
/// A cold boot of a node takes 5–12 s on the 2-core test machine.
const BOOT_WAIT: Duration = Duration::from_secs(60);
/// Bound on one `rabbitmqctl` invocation and on the node's exit after `stop`.
const CTL_WAIT: Duration = Duration::from_secs(30);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A running (or deliberately stopped) RabbitMQ node; see the module docs.
pub struct RabbitNode {
    /// `chaos-<pid>-<n>@localhost`.
    pub name: String,
    /// The AMQP listener, 127.0.0.1 only; the same across restarts.
    pub amqp_port: u16,
    /// The `amqps://` listener, 127.0.0.1 only, when started with TLS.
    pub amqps_port: Option<u16>,
    tls: Option<NodeTls>,
    dist_port: u16,
    dir: PathBuf,
    // Invariant: `Some` while a `rabbitmq-server` started by us may run.
    child: Option<Child>,
}

/// The TLS listener of a node: its certificate, key and the CA it verifies clients with.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// `cert` and `key` are the node's; `ca` verifies client certificates.
    pub files: PkiFiles,
    /// Whether a client without a certificate is refused (`fail_if_no_peer_cert`). A
    /// certificate a client does present is verified against `files.ca` either way.
    pub require_client_cert: bool,
}

impl RabbitNode {
    /// Starts a node with `purpose` in its name and waits (bounded) until it accepts AMQP.
    pub fn start(purpose: &str) -> RabbitNode {
        RabbitNode::start_inner(purpose, None)
    }

    /// As [`start`](Self::start), with an `amqps://` listener on a free loopback port
    /// besides the plain one; waits until both accept connections.
    pub fn start_with_tls(purpose: &str, tls: NodeTls) -> RabbitNode {
        RabbitNode::start_inner(purpose, Some(tls))
    }

    fn start_inner(purpose: &str, tls: Option<NodeTls>) -> RabbitNode {
        let cookie = uuid::Uuid::new_v4().simple().to_string();
        let mut node = RabbitNode::prepare(purpose, &cookie, tls);
        node.boot();
        node
    }

    /// Starts `n` nodes (booted in parallel, each bounded) sharing one Erlang cookie and
    /// joins the second and later ones to the first (`rabbitmqctl stop_app`,
    /// `join_cluster`, `start_app`): one RabbitMQ cluster on loopback, each node with its
    /// own name, AMQP and distribution ports. Panics naming the node and the command that
    /// failed; nodes already started are killed on the way out (their `Drop`).
    ///
    /// RabbitMQ's own clustering is not what the suites test: when a join fails, the seed's
    /// log tail and the failure are printed, all nodes are removed, and the whole cluster is
    /// set up once more with fresh nodes before giving up.
    pub fn start_cluster(purpose: &str, n: usize) -> Vec<RabbitNode> {
        match RabbitNode::try_start_cluster(purpose, n) {
            Ok(nodes) => nodes,
            Err(first) => {
                eprintln!("{first}\nsetting the cluster up again with fresh nodes");
                RabbitNode::try_start_cluster(purpose, n).unwrap_or_else(|again| panic!("{again}"))
            }
        }
    }

    fn try_start_cluster(purpose: &str, n: usize) -> Result<Vec<RabbitNode>, String> {
        let cookie = uuid::Uuid::new_v4().simple().to_string();
        let nodes: Vec<RabbitNode> =
            (0..n).map(|_| RabbitNode::prepare(purpose, &cookie, None)).collect();
        let nodes: Vec<RabbitNode> = std::thread::scope(|scope| {
            let boots: Vec<_> = nodes
                .into_iter()
                .map(|mut node| {
                    scope.spawn(move || {
                        node.boot();
                        node
                    })
                })
                .collect();
            // A boot that panicked has killed its own node; the others drop here.
            boots.into_iter().map(|b| b.join().expect("a node booted")).collect()
        });
        let seed = &nodes[0];
        for node in nodes.iter().skip(1) {
            for args in [&["stop_app"][..], &["join_cluster", seed.name.as_str()], &["start_app"]] {
                if let Err(why) = node.ctl_checked(args) {
                    // The nodes are killed when `nodes` drops, after the seed's log is read.
                    return Err(format!(
                        "node {}: `rabbitmqctl {}` failed: {why}\nthe seed's log ends:\n{}",
                        node.name,
                        args.join(" "),
                        seed.log_tail(40)
                    ));
                }
            }
        }
        let expected = nodes.len();
        for node in &nodes {
            node.wait_running_nodes(expected);
        }
        Ok(nodes)
    }

    /// The last `lines` lines of the node's own log and of what its start script printed.
    fn log_tail(&self, lines: usize) -> String {
        let mut logs = vec![self.dir.join("server.out")];
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log")) {
            logs.extend(entries.flatten().map(|e| e.path()));
        }
        logs.iter()
            .map(|path| format!("--- {}\n{}\n", path.display(), file_tail(path, lines)))
            .collect()
    }

    /// A node's folder, cookie and ports, not started.
    fn prepare(purpose: &str, cookie: &str, tls: Option<NodeTls>) -> RabbitNode {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{purpose}-{}-{n}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("nuropb-node-{}-{n}", std::process::id()));
        // A leftover of a killed earlier run with the same pid is not ours to keep.
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("the node's folder");
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("the plugins file");
        let cookie_file = dir.join(".erlang.cookie");
        std::fs::write(&cookie_file, cookie).expect("a cookie");
        // Erlang refuses a cookie file others may read.
        let _ = Command::new("chmod").arg("400").arg(&cookie_file).status();
        let amqps_port = tls.as_ref().map(|_| free_port());
        if let (Some(tls), Some(port)) = (&tls, amqps_port) {
            std::fs::write(dir.join("rabbitmq.conf"), tls_conf(tls, port)).expect("rabbitmq.conf");
        }
        RabbitNode {
            name,
            amqp_port: free_port(),
            amqps_port,
            tls,
            dist_port: free_port(),
            dir,
            child: None,
        }
    }

    /// `rabbitmqctl -n <node> <args>` with its output: the stdout on success, else what it
    /// said (bounded like every call).
    pub fn ctl_checked(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.ctl_command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let pid = child.id();
        // The wait runs on a thread of its own so that a hung call can be killed by PID.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(CTL_WAIT) {
            Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
            Ok(Ok(out)) => Err(format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
                Err(format!("no answer within {CTL_WAIT:?}"))
            }
        }
    }

    /// Waits (bounded by the boot wait) until this node sees `expected` running nodes in
    /// its cluster.
    fn wait_running_nodes(&self, expected: usize) {
        let deadline = Instant::now() + BOOT_WAIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.ctl_checked(&["eval", "length(rabbit_nodes:all_running())."]) {
                Ok(out) if out.trim() == expected.to_string() => return,
                Ok(out) => last = out,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("node {}: not {expected} running nodes within {BOOT_WAIT:?}: {last}", self.name);
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/<vhost>` (`vhost` taken as it is: use names
    /// without characters that need percent-encoding).
    pub fn amqp_url_for(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.amqp_port)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`: the node's default vhost is ours alone.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `amqps://guest:guest@127.0.0.1:<port>/%2f` (an address the test certificates
    /// name), when started with TLS.
    pub fn amqps_url(&self) -> Option<String> {
        self.amqps_port.map(|port| format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
    }

    /// Whether the node accepts AMQP connections now.
    pub fn accepts(&self) -> bool {
        port_accepts(self.amqp_port)
    }

    /// Stops the node cleanly (`rabbitmqctl stop`) and waits until its processes are gone.
    pub fn stop(&mut self) {
        let ctl = self.ctl(&["stop"]);
        if !ctl {
            eprintln!("node {}: `rabbitmqctl stop` failed; killing it", self.name);
        }
        self.reap(if ctl { CTL_WAIT } else { Duration::ZERO });
    }

    /// `kill -9` of the node's Erlang VM (by the PID in its pid file), then of whatever is
    /// left in its process group; waits until it is gone.
    pub fn kill9(&mut self) {
        match self.beam_pid() {
            Some(pid) => {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            None => eprintln!("node {}: no pid file; killing the process group", self.name),
        }
        self.reap(Duration::from_secs(5));
    }

    /// Starts the node again after [`stop`](Self::stop) or [`kill9`](Self::kill9), on the
    /// same ports and data, and waits until it accepts AMQP.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a node that runs: stop or kill9 it first");
        self.boot();
    }

    /// The node's Erlang VM, from its pid file.
    pub fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()
    }

    fn boot(&mut self) {
        let bin = std::env::var_os(SERVER_BIN_ENV).map(PathBuf::from).unwrap_or_else(|| {
            let debian = Path::new(DEBIAN_BIN_DIR).join("rabbitmq-server");
            if debian.exists() { debian } else { PathBuf::from("rabbitmq-server") }
        });
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let log = std::fs::File::create(self.dir.join("server.out")).expect("the server log");
        let mut cmd = Command::new(&bin);
        self.env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("the server log"))
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {} ({SERVER_BIN_ENV} overrides it): {e}", bin.display())
        });
        self.child = Some(child);
        let deadline = Instant::now() + BOOT_WAIT;
        loop {
            let tls_up = self.amqps_port.is_none_or(port_accepts);
            if self.accepts() && tls_up && self.beam_pid().is_some() {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                let tail = file_tail(&self.dir.join("server.out"), 20);
                self.reap(Duration::ZERO);
                panic!(
                    "node {} did not accept AMQP on 127.0.0.1:{} within {BOOT_WAIT:?} \
                     (exit: {exited:?}); its output ends:\n{}",
                    self.name, self.amqp_port, tail
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn env(&self, cmd: &mut Command) {
        let dir = &self.dir;
        // HOME holds the cookie, shared by the server and our `rabbitmqctl` calls only.
        cmd.env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            // No config file but our own: the machine's /etc/rabbitmq one belongs to the
            // shared broker.
            .env(
                "RABBITMQ_CONFIG_FILE",
                if self.tls.is_some() { dir.join("rabbitmq.conf") } else { dir.join("none") },
            )
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("none-advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("none-env.conf"));
    }

    /// `rabbitmqctl -n <node> <args>` in its own process group, with the node's
    /// environment (and so its cookie).
    fn ctl_command(&self, args: &[&str]) -> Command {
        let debian = Path::new(DEBIAN_BIN_DIR).join("rabbitmqctl");
        let bin = if debian.exists() { debian } else { PathBuf::from("rabbitmqctl") };
        let mut cmd = Command::new(bin);
        self.env(&mut cmd);
        cmd.arg("-n").arg(&self.name).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
        cmd
    }

    /// `rabbitmqctl -n <node> <args>`, bounded; whether it succeeded.
    fn ctl(&self, args: &[&str]) -> bool {
        let Ok(mut child) = self.ctl_command(args).spawn() else { return false };
        let deadline = Instant::now() + CTL_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Waits up to `grace` for the server to exit, then kills its process group; reaps it.
    fn reap(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The group also holds `erl_child_setup` and any VM the script left behind.
        let group = format!("-{}", child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = child.kill();
        let _ = child.wait();
        // Only once nothing listens does the port mean "stopped".
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.accepts() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.reap(Duration::ZERO);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` now.
fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The `rabbitmq.conf` of a node with a TLS listener on 127.0.0.1:`port` (the plain one
/// comes from the environment, as without TLS).
fn tls_conf(tls: &NodeTls, port: u16) -> String {
    let path = |p: &Path| p.display().to_string();
    format!(
        "listeners.ssl.default = 127.0.0.1:{port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = {}\n",
        path(&tls.files.ca),
        path(&tls.files.cert),
        path(&tls.files.key),
        tls.require_client_cert,
    )
}

/// A loopback port free now (the OS picks it; a race with another binder is possible but
/// shows as a boot failure that names the port).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// The last `lines` lines of a file, joined by newlines; empty when it cannot be read.
fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
