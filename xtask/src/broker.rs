//! RabbitMQ for integration and interop runs: make sure one answers on 127.0.0.1:5672
//! (start it with `rabbitmq-server -detached` if not), and give each run a fresh vhost
//! ([`TempVhost`]) so runs never see each other's queues. Also the bounded child-process
//! helpers the interop runner shares: every external command xtask waits for has a deadline.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the broker must answer. Integration tests and the interop suite assume it.
pub const AMQP_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 5672);

/// How long a freshly started broker may take to accept AMQP connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on one `rabbitmqctl` invocation (it boots an Erlang VM each time: ~1 s).
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

const HOW_TO_START: &str = "start RabbitMQ so that it accepts AMQP on 127.0.0.1:5672 with the \
     default guest/guest user (e.g. `rabbitmq-server -detached`, `systemctl start rabbitmq-server`, \
     or on Debian `apt-get install rabbitmq-server`), then run this again";

/// Ensures a broker answers on 127.0.0.1:5672, starting one if needed.
pub fn ensure_running() -> Result<()> {
    ensure_running_with(AMQP_ADDR, "rabbitmq-server", START_TIMEOUT)
}

fn ensure_running_with(addr: SocketAddr, server: &str, timeout: Duration) -> Result<()> {
    if port_answers(addr) {
        return Ok(());
    }
    eprintln!("broker: nothing accepts AMQP on {addr}; starting `{server} -detached`");
    match output_bounded(Command::new(server).arg("-detached"), CTL_TIMEOUT) {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "`{server} -detached` failed with {}: {}\n{HOW_TO_START}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("cannot start RabbitMQ: {e:#}\n{HOW_TO_START}"),
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if port_answers(addr) {
            // The listener opens late in the boot; await_startup confirms the node is fully
            // up (plugins, default vhost). Its own failure is not fatal once the port answers.
            let remaining =
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
            if let Err(e) =
                output_bounded(Command::new("rabbitmqctl").arg("await_startup"), remaining)
            {
                eprintln!("broker: `rabbitmqctl await_startup` did not confirm startup: {e:#}");
            }
            eprintln!("broker: RabbitMQ is up on {addr}");
            return Ok(());
        }
        thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "RabbitMQ did not accept connections on {addr} within {timeout:?} of starting it.\n{HOW_TO_START}"
    )
}

fn port_answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// A vhost that exists for as long as this value: created with full permissions for the
/// `guest` user, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct TempVhost {
    // Invariant: matches `nuropb-<purpose>-<16 hex>`, so it needs no quoting anywhere.
    name: String,
}

impl TempVhost {
    /// Creates `nuropb-<purpose>-<random hex>`. `purpose` is lowercase ASCII letters,
    /// digits and `-`.
    pub fn create(purpose: &str) -> Result<TempVhost> {
        let name = vhost_name(purpose, &random_hex(8)?)?;
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = TempVhost { name };
        // From here on, Drop removes the vhost even if granting permissions fails.
        rabbitmqctl(&["set_permissions", "-p", &vhost.name, "guest", ".*", ".*", ".*"])?;
        eprintln!("broker: created vhost {}", vhost.name);
        Ok(vhost)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<vhost>`.
    pub fn amqp_url(&self) -> String {
        amqp_url(&self.name)
    }
}

impl Drop for TempVhost {
    fn drop(&mut self) {
        match rabbitmqctl(&["delete_vhost", &self.name]) {
            Ok(()) => eprintln!("broker: deleted vhost {}", self.name),
            // Nothing more to do from a destructor; the message names the leftover.
            Err(e) => eprintln!("broker: could not delete vhost {}: {e:#}", self.name),
        }
    }
}

fn vhost_name(purpose: &str, suffix: &str) -> Result<String> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !valid(purpose) {
        bail!("vhost purpose {purpose:?} must be lowercase letters, digits and '-'");
    }
    Ok(format!("nuropb-{purpose}-{suffix}"))
}

fn amqp_url(vhost: &str) -> String {
    format!("amqp://guest:guest@{}:{}/{}", AMQP_ADDR.ip(), AMQP_ADDR.port(), percent_encode(vhost))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a vhost may contain `/`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = output_bounded(Command::new("rabbitmqctl").args(args), CTL_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`rabbitmqctl {}` failed with {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// `bytes` random bytes from the OS, as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

// --- bounded child processes ----------------------------------------------------------------

/// Runs `cmd` with captured output; kills it and fails if it runs longer than `timeout`.
pub fn output_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = crate::cmd::display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let status = wait_bounded(&mut child, timeout, &shown, None)?;
    let collect =
        |h: Option<thread::JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output { status, stdout: collect(stdout), stderr: collect(stderr) })
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error only truncates diagnostics; the exit status is what matters.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` with inherited stdio, echoing it first; kills it and fails after `timeout`.
/// With `interrupt_grace`, a late child first gets SIGINT and that long to clean up (pytest
/// then runs its teardown, which stops the processes it started) before SIGKILL.
pub fn status_bounded(
    cmd: &mut Command,
    timeout: Duration,
    interrupt_grace: Option<Duration>,
) -> Result<ExitStatus> {
    let shown = crate::cmd::display(cmd);
    eprintln!("$ {shown}");
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
    wait_bounded(&mut child, timeout, &shown, interrupt_grace)
}

fn wait_bounded(
    child: &mut Child,
    timeout: Duration,
    shown: &str,
    interrupt_grace: Option<Duration>,
) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) =
            child.try_wait().with_context(|| format!("cannot wait for `{shown}`"))?
        {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if let Some(grace) = interrupt_grace {
        eprintln!("xtask: `{shown}` still running after {timeout:?}; interrupting it");
        // `kill -INT <pid>`: std has no portable way to send SIGINT without unsafe code.
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                bail!("`{shown}` did not finish within {timeout:?} (interrupted)");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    // Already exited between the checks is fine; either way it is gone after wait().
    let _ = child.kill();
    let _ = child.wait();
    bail!("`{shown}` did not finish within {timeout:?} (killed)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_names() {
        assert_eq!(vhost_name("interop", "00ff").ok().as_deref(), Some("nuropb-interop-00ff"));
        for bad in ["", "Interop", "a b", "a/b", "x_y"] {
            assert!(vhost_name(bad, "00").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn urls_quote_what_a_path_segment_cannot_hold() {
        assert_eq!(
            amqp_url("nuropb-interop-0a"),
            "amqp://guest:guest@127.0.0.1:5672/nuropb-interop-0a"
        );
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(percent_encode("a b/c%"), "a%20b%2Fc%25");
    }

    #[test]
    fn random_hex_is_hex_and_varies() -> Result<()> {
        let (a, b) = (random_hex(8)?, random_hex(8)?);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        Ok(())
    }

    #[test]
    fn missing_broker_fails_with_instructions() {
        // A port nothing listens on (bind and drop), and a server command that does not exist.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        let Ok(addr) = addr else { return };
        let err =
            ensure_running_with(addr, "nuropb-no-such-rabbitmq-server", Duration::from_secs(1))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
        assert!(err.contains("start RabbitMQ"), "{err}");
    }

    #[test]
    fn late_commands_are_interrupted_first() {
        // The child exits 3 on SIGINT: the grace path must see it go without a SIGKILL.
        let started = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'exit 3' INT; sleep 5 & wait"]);
        let err =
            status_bounded(&mut cmd, Duration::from_millis(200), Some(Duration::from_secs(3)))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
        assert!(err.contains("interrupted"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn bounded_commands_are_killed() {
        let started = Instant::now();
        let result = output_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200));
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
