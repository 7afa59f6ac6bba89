//! `cargo xtask fuzz [--seconds N] [--runs N] [target …]`: runs each cargo-fuzz target in
//! `fuzz/` for a bounded time (default 10 s each; `--runs` stops a target earlier, after that
//! many executions), niced, from a seed corpus made of the captured vectors
//! (`spec/vectors/`), and prints each target's executions. cargo-fuzz is installed into
//! `target/tools/` when missing, and `RUSTC_BOOTSTRAP=1` lets the stable toolchain accept the
//! nightly flags it passes, so a fresh machine needs nothing by hand. Not part of `ci`:
//! the first build alone takes minutes, and fuzzing is CPU the other gates need.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Every target in `fuzz/Cargo.toml`.
const TARGETS: [&str; 4] = ["client_json", "client_msgpack", "mesh_body", "upgrade"];
const DEFAULT_SECONDS: u64 = 10;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let Args { seconds, runs, targets } = parse_args(args)?;
    let cargo_fuzz = ensure_cargo_fuzz(root)?;
    let work = root.join("target/fuzz");
    let seeds = seeds(root)?;
    let mut summary = Vec::new();
    for target in &targets {
        let corpus = work.join("corpus").join(target);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        for (i, seed) in seeds.for_target(target).iter().enumerate() {
            fs::write(corpus.join(format!("seed-{i:03}")), seed)?;
        }
        let artifacts = work.join("artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        let log = work.join(format!("{target}.log"));
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10"])
            .arg(&cargo_fuzz)
            .args(["fuzz", "run", "-O", "--target-dir"])
            .arg(work.join("build"))
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(runs.map(|n| format!("-runs={n}")))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // Frames are at most 1 MiB; short inputs find more per second.
            .arg("-max_len=65536")
            .arg("-rss_limit_mb=2048")
            .env("RUSTC_BOOTSTRAP", "1")
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        eprintln!("$ {} (output in {})", crate::cmd::display(&cmd), log.display());
        let status = cmd.status().context("cannot start cargo-fuzz")?;
        let output = fs::read_to_string(&log).unwrap_or_default();
        let done = output.lines().rev().find(|l| l.starts_with("Done ")).unwrap_or("no summary");
        summary.push(format!("{target}: {done}"));
        if !status.success() {
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({status}); see {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
    }
    for line in summary {
        eprintln!("{line}");
    }
    Ok(())
}

/// What `cargo xtask fuzz` was asked for.
struct Args {
    /// Each target runs at most this long.
    seconds: u64,
    /// And stops after this many executions, when given.
    runs: Option<u64>,
    targets: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut seconds = DEFAULT_SECONDS;
    let mut runs = None;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--seconds" || arg == "--runs" {
            let value = args.next().with_context(|| format!("{arg} needs a number"))?;
            let n: u64 = value.parse().with_context(|| format!("{arg}: not a number: {value}"))?;
            if n == 0 {
                bail!("{arg} must be greater than 0");
            }
            if arg == "--seconds" { seconds = n } else { runs = Some(n) }
        } else if TARGETS.contains(&arg.as_str()) {
            targets.push(arg.clone());
        } else {
            bail!("unknown fuzz argument {arg:?}; targets: {}", TARGETS.join(", "));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    Ok(Args { seconds, runs, targets })
}

/// `target/tools/bin/cargo-fuzz`, installed from crates.io when missing.
fn ensure_cargo_fuzz(root: &Path) -> Result<PathBuf> {
    let tools = root.join("target/tools");
    let bin = tools.join("bin/cargo-fuzz");
    if !bin.is_file() {
        crate::cmd::run(
            crate::cmd::cargo().args(["install", "cargo-fuzz", "--locked", "--root"]).arg(&tools),
        )?;
    }
    Ok(bin)
}

/// Seed inputs from the captured vectors.
struct Seeds {
    /// Frames the captured clients sent (JSON text).
    client_frames: Vec<Vec<u8>>,
    /// The same frames as MessagePack.
    client_msgpack: Vec<Vec<u8>>,
    /// Mesh message bodies, as published on RabbitMQ.
    mesh_bodies: Vec<Vec<u8>>,
    /// Upgrade requests with the captured clients' headers and origins.
    upgrade_heads: Vec<Vec<u8>>,
}

impl Seeds {
    fn for_target(&self, target: &str) -> &[Vec<u8>] {
        match target {
            "client_json" => &self.client_frames,
            "client_msgpack" => &self.client_msgpack,
            "upgrade" => &self.upgrade_heads,
            _ => &self.mesh_bodies,
        }
    }
}

fn seeds(root: &Path) -> Result<Seeds> {
    let transcript = fs::read_to_string(root.join("spec/vectors/ws_transcript.jsonl"))
        .context("cannot read spec/vectors/ws_transcript.jsonl")?;
    let mut client_frames = Vec::new();
    let mut client_msgpack = Vec::new();
    let mut upgrade_heads = Vec::new();
    for line in transcript.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        if entry["text"] == "connect" {
            upgrade_heads.push(upgrade_head(&entry));
        }
        if entry["dir"] != "send" {
            continue;
        }
        let Some(text) = entry["text"].as_str() else { continue };
        client_frames.push(text.as_bytes().to_vec());
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            client_msgpack.push(rmp_serde::to_vec_named(&value)?);
        }
    }
    let vectors: Value = serde_json::from_str(
        &fs::read_to_string(root.join("spec/vectors/vectors.json"))
            .context("cannot read spec/vectors/vectors.json")?,
    )?;
    let mesh_bodies = vectors["vectors"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["messages"].as_array().into_iter().flatten())
        .filter_map(|m| m["body"].as_str())
        .map(|b| b.as_bytes().to_vec())
        .collect();
    if client_frames.is_empty() || upgrade_heads.is_empty() {
        bail!("no client frames or connects in spec/vectors/ws_transcript.jsonl");
    }
    Ok(Seeds { client_frames, client_msgpack, mesh_bodies, upgrade_heads })
}

/// The upgrade request of a captured `connect`: its headers and origin, with a query token
/// and a cookie as browsers send them.
fn upgrade_head(connect: &Value) -> Vec<u8> {
    let mut head = String::from(
        "GET /ws?token=tok-query HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nCookie: theme=dark; Authorization=Bearer%20tok-cookie\r\n",
    );
    for (name, value) in connect["headers"].as_object().into_iter().flatten() {
        head.push_str(&format!("{name}: {}\r\n", value.as_str().unwrap_or_default()));
    }
    if let Some(origin) = connect["origin"].as_str() {
        head.push_str(&format!("Origin: {origin}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}
