//! The configuration as an operator meets it, on the real binary (in-memory mode): the
//! TOML file and its precedence under the environment and the flags, `check-config`,
//! refused files, secrets that never reach any output, SIGHUP reloads that keep sessions
//! open, and JSON logs. See docs/CONFIGURATION.md.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::process::{GatewayProcess, Launch, binary};
use e2e_tests::{Client, token_with};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

const SECRET_A: &str = "first-secret-of-the-config-test";
const SECRET_B: &str = "second-secret-of-the-config-test";
/// How long a log line may take to appear after a signal.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A temporary directory for configuration and secret files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nuropb-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir harms nothing.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn token(user: &str, secret: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    token_with(json!({"sub": user, "username": user, "exp": exp}), secret)
}

/// Connects with `token` (and `origin`, if any) and reads the hello; the HTTP status of a
/// refused upgrade otherwise.
async fn connect(url: &str, token: &str, origin: Option<&str>) -> Result<Client, u16> {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if let Some(origin) = origin {
        headers.push(("origin", origin));
    }
    match Client::connect(url, &headers).await {
        Ok(mut client) => {
            let hello = client.recv_json().await;
            assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
            Ok(client)
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// `demo.add` answers 42 on `client`: the session serves.
async fn serves(client: &mut Client) {
    client.request("demo", "add", json!({"a": 2, "b": 40}), "t-1").await;
    let r = client.recv_json().await;
    assert_eq!(r["payload"]["result"], 42, "{r}");
}

/// Subscribes `client` to `topic`: `subscribed`, or the error's name.
async fn subscribe(client: &mut Client, topic: &str) -> String {
    client
        .send_json(&json!({"type": "subscribe", "payload": {"topics": [topic]}, "id": "s"}))
        .await;
    let r = client.recv_json().await;
    match r["type"].as_str() {
        Some(kind) => kind.to_owned(),
        None => r["error"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Waits until a captured stderr line contains every one of `parts`; returns it.
fn wait_for_log(gateway: &GatewayProcess, parts: &[&str], skip: usize) -> String {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let (lines, _) = gateway.stderr_lines();
        if let Some(line) = lines.iter().skip(skip).find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "no log line with {parts:?} in:\n{}", lines.join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn launch(args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
    GatewayProcess::launch(&Launch {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        test_secret: false,
    })
}

fn config_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Runs the binary to its end (a bounded wait) with no NUROPB_ variable but `env`.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("NUROPB_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn nuropb-gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nuropb-gateway {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn the_file_applies_and_a_flag_beats_the_environment_which_beats_the_file() {
    let dir = TempDir::new("precedence");
    let file = dir.write(
        "gateway.toml",
        &format!("jwt_secret = \"{SECRET_A}\"\nallowed_origins = [\"file.example\"]\n"),
    );
    let config = config_arg(&file);
    let tok = token("alice", SECRET_A);
    let env = [("NUROPB_ALLOWED_ORIGINS", "env.example")];
    for (args, env, allowed, refused) in [
        (vec!["--config", &config], &[][..], "http://file.example", "http://env.example"),
        (vec!["--config", &config], &env[..], "http://env.example", "http://file.example"),
        (
            vec!["--config", &config, "--allowed-origins", "flag.example"],
            &env[..],
            "http://flag.example",
            "http://env.example",
        ),
    ] {
        let gateway = launch(&args, env);
        // The file's secret is the key (the file applies).
        let mut client = connect(&gateway.url, &tok, Some(allowed)).await.unwrap();
        serves(&mut client).await;
        assert_eq!(connect(&gateway.url, &tok, Some(refused)).await.err(), Some(403), "{args:?}");
        gateway.stop();
    }
}

#[test]
fn check_config_and_start_up_refuse_bad_files_naming_the_key() {
    let dir = TempDir::new("check");
    let empty = dir.write("empty.toml", "");
    let out = run_binary(&["check-config", &config_arg(&empty)], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("configuration OK"), "{}", text(&out));

    let unknown = dir.write("unknown.toml", "max_conections = 5\n");
    let bad_type = dir.write("type.toml", "max_connections = \"many\"\n");
    for (file, expected) in [
        (&unknown, "unknown key `max_conections` (did you mean `max_connections`?)"),
        (&bad_type, "key `max_connections`: expected an integer"),
    ] {
        for args in [
            vec!["check-config", file.to_str().unwrap()],
            vec!["--listen", "127.0.0.1:0", "--config", file.to_str().unwrap()],
        ] {
            let out = run_binary(&args, &[]);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
            assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
        }
    }
    // As at start-up: `Cli::validate` runs too, and the environment counts.
    let out =
        run_binary(&["check-config", &config_arg(&empty)], &[("NUROPB_MAX_CONNECTIONS", "0")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--max-connections must be greater than 0"), "{}", text(&out));
}

#[tokio::test]
async fn a_secret_never_appears_in_any_output() {
    let dir = TempDir::new("secret");
    let secret_file = dir.write("jwt-secret", &format!("{SECRET_A}\n"));
    let good = format!("jwt_secret_file = \"{}\"\n", secret_file.display());
    let file = dir.write("gateway.toml", &good);
    let inline = dir.write("inline.toml", &format!("jwt_secret = \"{SECRET_A}\"\n"));
    let broken =
        dir.write("broken.toml", &format!("jwt_secret = \"{SECRET_A}\nmax_connections = 1\n"));
    let both = dir.write(
        "both.toml",
        &format!("jwt_secret = \"{SECRET_A}\"\njwt_secret_file = \"{}\"\n", secret_file.display()),
    );
    let amqp = dir.write(
        "amqp.toml",
        &format!("amqp_url = \"amqp://guest:{SECRET_B}@127.0.0.1:1/x\"\nmax_connections = 0\n"),
    );
    let mut outputs = Vec::new();
    for path in [&file, &inline, &broken, &both, &amqp] {
        let out = run_binary(&["check-config", &config_arg(path)], &[]);
        outputs.push(text(&out));
    }
    assert!(outputs[0].contains("configuration OK") && outputs[1].contains("configuration OK"));
    assert!(outputs[3].contains("exclusive"), "{}", outputs[3]);
    // Started, with a debug log, a client served, and a reload to a new secret file.
    let gateway = launch(&["--config", &config_arg(&file), "--log", "debug"], &[]);
    let mut client = connect(&gateway.url, &token("alice", SECRET_A), None).await.unwrap();
    serves(&mut client).await;
    std::fs::write(&secret_file, SECRET_B).unwrap();
    gateway.hangup();
    let line = wait_for_log(&gateway, &["jwt_secret_file", "applied"], 0);
    assert!(!line.contains(SECRET_B));
    let mut fresh = connect(&gateway.url, &token("bob", SECRET_B), None).await.unwrap();
    serves(&mut fresh).await;
    let (stderr, _) = gateway.stderr_lines();
    outputs.push(stderr.join("\n"));
    outputs.push(gateway.stdout_lines().join("\n"));
    drop(client);
    gateway.stop();
    for output in &outputs {
        for secret in [SECRET_A, SECRET_B] {
            assert!(!output.contains(secret), "a secret in:\n{output}");
        }
    }
}

#[tokio::test]
async fn sighup_reloads_keys_origins_and_limits_without_dropping_a_session() {
    let dir = TempDir::new("reload");
    let config = |secret: &str, origin: &str, max_connections: u32, topic: &str| {
        format!(
            "jwt_secret = \"{secret}\"\nallowed_origins = [\"{origin}\"]\n\
             max_connections = {max_connections}\nsubscribable_topics = [\"{topic}\"]\n\
             max_sessions_per_user = {max_connections}\n"
        )
    };
    let file = dir.write("gateway.toml", &config(SECRET_A, "one.example", 100, "news.#"));
    let gateway = launch(&["--config", &config_arg(&file)], &[]);
    let mut old_session = connect(&gateway.url, &token("alice", SECRET_A), None).await.unwrap();
    serves(&mut old_session).await;
    assert_eq!(
        connect(&gateway.url, &token("bob", SECRET_A), Some("http://two.example")).await.err(),
        Some(403)
    );

    assert_eq!(subscribe(&mut old_session, "news.sport").await, "subscribed");
    assert_eq!(subscribe(&mut old_session, "weather.today").await, "NuropbValidationError");

    dir.write("gateway.toml", &config(SECRET_B, "two.example", 1, "weather.#"));
    gateway.hangup();
    wait_for_log(&gateway, &["configuration reloaded"], 0);
    for key in ["jwt_secret", "allowed_origins", "subscribable_topics", "max_sessions_per_user"] {
        let line = wait_for_log(&gateway, &[key, "applied"], 0);
        assert!(!line.contains(SECRET_B), "{line}");
    }
    wait_for_log(&gateway, &["max_connections", "needs a restart"], 0);
    // The old session is still open and served; a new token is accepted, the old refused.
    serves(&mut old_session).await;
    let mut fresh =
        connect(&gateway.url, &token("bob", SECRET_B), Some("http://two.example")).await.unwrap();
    serves(&mut fresh).await;
    assert_eq!(connect(&gateway.url, &token("carol", SECRET_A), None).await.err(), Some(401));
    // The new topics and the new per-user limit (bob has one session: the limit).
    assert_eq!(subscribe(&mut old_session, "weather.today").await, "subscribed");
    assert_eq!(subscribe(&mut old_session, "news.politics").await, "NuropbValidationError");
    assert_eq!(connect(&gateway.url, &token("bob", SECRET_B), None).await.err(), Some(429));
    assert_eq!(
        connect(&gateway.url, &token("carol", SECRET_B), Some("http://one.example")).await.err(),
        Some(403)
    );

    // An invalid file: the error is logged, the old configuration stays, the gateway serves.
    let (before, _) = gateway.stderr_lines();
    dir.write("gateway.toml", "jwt_secret = \"x\"\nallowed_origins = 5\n");
    gateway.hangup();
    let line = wait_for_log(&gateway, &["reload refused", "allowed_origins"], before.len());
    assert!(line.contains("old configuration stays in force"), "{line}");
    let mut after =
        connect(&gateway.url, &token("dave", SECRET_B), Some("http://two.example")).await.unwrap();
    serves(&mut after).await;
    serves(&mut old_session).await;
    gateway.stop();
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_connection_span() {
    let gateway = launch(
        &["--jwt-secret", SECRET_A, "--log-format", "json", "--log", "debug,lapin=off"],
        &[],
    );
    let mut client = connect(&gateway.url, &token("alice", SECRET_A), None).await.unwrap();
    serves(&mut client).await;
    // A refused upgrade is logged too (with the client's origin, a client-chosen value).
    assert_eq!(
        connect(&gateway.url, "not-a-token", Some("http://x\"},{\"level\":\"forged")).await.err(),
        Some(403)
    );
    drop(client);
    gateway.hangup();
    wait_for_log(&gateway, &["configuration reloaded"], 0);
    let (lines, total) = gateway.stderr_lines();
    assert!(total > 3, "{lines:?}");
    let (mut with_user, mut with_session) = (0, 0);
    for line in &lines {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["fields"].is_object(), "{line}");
        if event["span"]["user.id"] == "alice" {
            assert_eq!(event["span"]["name"], "conn", "{line}");
            assert!(event["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
            with_user += 1;
            // Recorded once the session is open.
            with_session += usize::from(event["span"]["session.id"].is_string());
        }
    }
    assert!(with_session > 0, "no line in the session's span:\n{}", lines.join("\n"));
    assert!(with_user >= with_session);
    gateway.stop();
}

#[tokio::test]
async fn sighup_applies_the_callable_list_and_the_log_filter() {
    let dir = TempDir::new("callable");
    let first = format!("jwt_secret = \"{SECRET_A}\"\nlog = \"info\"\n");
    let file = dir.write("gateway.toml", &first);
    let gateway = launch(&["--config", &config_arg(&file)], &[]);
    let mut session = connect(&gateway.url, &token("alice", SECRET_A), None).await.unwrap();
    serves(&mut session).await;
    let debug_lines =
        |g: &GatewayProcess| g.stderr_lines().0.iter().filter(|l| l.contains("DEBUG")).count();
    assert_eq!(debug_lines(&gateway), 0);
    let second =
        format!("jwt_secret = \"{SECRET_A}\"\ncallable = [\"demo.echo\"]\nlog = \"debug\"\n");
    dir.write("gateway.toml", &second);
    gateway.hangup();
    wait_for_log(&gateway, &["key=callable", "applied"], 0);
    wait_for_log(&gateway, &["key=log", "applied"], 0);
    session.request("demo", "add", json!({"a": 2, "b": 40}), "t-2").await;
    let r = session.recv_json().await;
    assert!(r["payload"]["error"].is_object(), "{r}");
    assert!(r["payload"]["result"].is_null(), "{r}");
    // The new filter: a new session's debug lines are logged now.
    let _bob = connect(&gateway.url, &token("bob", SECRET_A), None).await.unwrap();
    wait_for_log(&gateway, &["DEBUG"], 0);
    gateway.stop();
}
