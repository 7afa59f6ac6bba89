//! The rows: one attack each, returning what the client saw and whether it is what
//! docs/PROTOCOL.md promises. Shared helpers (tokens, frames, answers) first, then the
//! attacks in table order, then [`ROWS`].

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use e2e_tests::{Client, SECRET};

use crate::limits;
use crate::net::{self, bearer, upgrade};
use crate::{Attack, Ctx, Outcome, Row, SERVICE};

// --- Tokens -------------------------------------------------------------------------------

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A valid token for `user`: HS256, `iat` now, ten minutes of lifetime.
pub fn token(user: &str) -> String {
    e2e_tests::token_with(
        json!({"sub": user, "username": format!("{user}@example.com"), "iat": now(), "exp": now() + 600}),
        SECRET,
    )
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A token with this raw header JSON and claims and a made-up signature (`""`: none).
fn forged_token(header: &str, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64url(header.as_bytes()), b64url(claims.to_string().as_bytes()))
}

// --- Frames and answers ---------------------------------------------------------------------

/// A JSON request with `params` as raw JSON text (so it may hold what serde_json cannot).
fn request_text(method: &str, params: &str, trace: &str) -> String {
    format!(
        r#"{{"type":"request","payload":{{"trace_id":"{trace}","service":"{SERVICE}","method":"{method}","params":{params}}}}}"#
    )
}

/// A MessagePack string (shorter than 32 bytes).
fn mp_str(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut v = vec![0xa0 | s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// A MessagePack request `{"type":"request","payload":{"trace_id","service","method":"echo",
/// "params":{"a": <value>}}}` with `value` as raw bytes.
fn mp_request(trace: &str, value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x82];
    v.extend(mp_str("type"));
    v.extend(mp_str("request"));
    v.extend(mp_str("payload"));
    v.push(0x84);
    for (k, s) in [("trace_id", trace), ("service", SERVICE), ("method", "echo")] {
        v.extend(mp_str(k));
        v.extend(mp_str(s));
    }
    v.extend(mp_str("params"));
    v.push(0x81);
    v.extend(mp_str("a"));
    v.extend_from_slice(value);
    v
}

/// An answer as the client sees it: a `response` with an error, or a top-level error
/// frame.
#[derive(Debug)]
struct Refusal {
    /// `response` or `error frame`.
    kind: &'static str,
    trace: Option<String>,
    error: String,
    description: String,
}

impl Refusal {
    fn of(v: &Value) -> Option<Refusal> {
        let (kind, trace, e) = if v["type"] == "response" {
            ("response", v["payload"]["trace_id"].as_str(), &v["payload"]["error"])
        } else {
            ("error frame", v["trace_id"].as_str(), v)
        };
        Some(Refusal {
            kind,
            trace: trace.map(str::to_owned),
            error: e["error"].as_str()?.to_owned(),
            description: e["description"].as_str().unwrap_or_default().to_owned(),
        })
    }

    fn text(&self) -> String {
        format!(
            "{} {} (trace {}): {}",
            self.kind,
            self.error,
            self.trace.as_deref().unwrap_or("none"),
            self.description
        )
    }
}

/// Checks `v` is the refusal `error` carrying `trace`, its description containing
/// `needle`: a `response` when it has a trace id (PROTOCOL.md: "a bad frame that carried a
/// usable trace_id is answered with a response"), a top-level error frame otherwise, and
/// for `RateLimited` (the dropped frame's trace id rides in the error frame).
fn refused(v: &Value, error: &str, trace: Option<&str>, needle: &str) -> (bool, String) {
    let kind = if trace.is_some() && error != "RateLimited" { "response" } else { "error frame" };
    match Refusal::of(v) {
        None => (false, format!("not an error: {}", short(v))),
        Some(r) => {
            let ok = r.kind == kind
                && r.error == error
                && r.trace.as_deref() == trace
                && r.description.contains(needle);
            (ok, r.text())
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 200 { format!("{}…", &s[..200]) } else { s }
}

/// A session of `user` from the row's `k`-th address.
async fn session(ctx: &Ctx, k: u8, user: &str) -> Client {
    net::session_from(ctx.ip(k), &ctx.url, ctx.addr, &token(user)).await.expect("session")
}

/// The connection still serves a well-formed call (one request reaches the mesh).
async fn still_serves(c: &mut Client, trace: &str) -> bool {
    c.request(SERVICE, "echo", json!({"after": trace}), trace).await;
    let v = c.recv_json().await;
    v["payload"]["trace_id"] == trace && v["payload"]["result"] == json!({"after": trace})
}

/// One refusal frame for `frame` on a fresh session, then a follow-up call on the same
/// connection (the connection stays open): reaches the mesh once.
async fn one_refusal(
    ctx: &Ctx,
    frame: Message,
    error: &str,
    trace: Option<&str>,
    needle: &str,
) -> Outcome {
    let mut c = session(ctx, 0, "attacker").await;
    let binary = matches!(frame, Message::Binary(_));
    c.ws.send(frame).await.expect("send");
    let v = if binary { c.recv_msgpack().await } else { c.recv_json().await };
    let (ok, text) = refused(&v, error, trace, needle);
    let alive = still_serves(&mut c, "after-1").await;
    Outcome::new(ok && alive, format!("{text}{}", if alive { "; still open" } else { "; dead" }))
        .to_mesh(1..=1)
}

/// The HTTP status of an upgrade with `extra` headers from the row's `k`-th address.
async fn upgrade_status(ctx: &Ctx, k: u8, request: &str) -> (Option<u16>, String) {
    let (_stream, head) = net::http(ctx.ip(k), ctx.addr, request.as_bytes()).await;
    (net::status(&head), head)
}

// --- Frames ---------------------------------------------------------------------------------

fn oversized_frame(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let pad = "x".repeat(limits::MAX_MESSAGE_BYTES + 1024);
        c.send_text(&request_text("echo", &format!(r#"{{"pad":"{pad}"}}"#), "big-1")).await;
        let close = c.recv_close().await.map(|f| u16::from(f.code));
        Outcome::new(close == Some(1009), format!("close {close:?}"))
    })
}

fn json_nesting_bomb(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let mut ok = true;
        let mut observed = Vec::new();
        // Over the 64-level limit but within what the parser takes (127): decoded, then
        // refused with the frame's trace id. Far deeper: refused by a scan before parsing,
        // where no trace id can be read.
        for (depth, trace, expect_trace) in [(100, "nest-1", true), (30_000, "nest-2", false)] {
            let params = format!(r#"{{"a":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
            c.send_text(&request_text("echo", &params, trace)).await;
            let v = c.recv_json().await;
            let want = expect_trace.then_some(trace);
            let (case_ok, text) =
                refused(&v, "LimitExceeded", want, "nested deeper than 64 levels");
            ok &= case_ok;
            observed.push(format!("{depth} levels: {text}"));
        }
        let alive = still_serves(&mut c, "after-nest").await;
        Outcome::new(ok && alive, format!("{}; still open: {alive}", observed.join("; ")))
            .to_mesh(1..=1)
    })
}

fn msgpack_allocation_bomb(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let mut zeros = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
        zeros.extend(std::iter::repeat_n(0u8, 60_000));
        // Headers claiming 2^32 - 1 elements (array, map) or bytes (str, bin) with a few
        // bytes behind them: not MessagePack, nothing allocated for the claim, no trace id
        // (the bytes are not a frame). The array claim with 60 000 real elements behind it
        // meets the decoded-cost bound first: LimitExceeded, still without a trace id, as
        // the frame (2^32 - 1 elements claimed, 60 000 there) cannot be scanned for one.
        let cases: [(&str, Vec<u8>, &str, bool, &str); 5] = [
            (
                "array32",
                vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0, 0, 0],
                "DecodeError",
                false,
                "not valid MessagePack",
            ),
            (
                "map32",
                vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'k', 0],
                "DecodeError",
                false,
                "not valid MessagePack",
            ),
            (
                "str32",
                vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'x'],
                "DecodeError",
                false,
                "not valid MessagePack",
            ),
            (
                "bin32",
                vec![0xc6, 0xff, 0xff, 0xff, 0xff, 1],
                "DecodeError",
                false,
                "not valid MessagePack",
            ),
            ("array32 + 60 000 zeros", zeros, "LimitExceeded", false, "frame decodes to more than"),
        ];
        let mut ok = true;
        let mut observed = Vec::new();
        for (i, (name, value, error, with_trace, needle)) in cases.iter().enumerate() {
            let trace = format!("alloc-{i}");
            c.send_binary(mp_request(&trace, value)).await;
            let v = c.recv_msgpack().await;
            let want = with_trace.then_some(trace.as_str());
            let (case_ok, text) = refused(&v, error, want, needle);
            ok &= case_ok;
            observed.push(format!("{name}: {text}"));
        }
        let alive = still_serves(&mut c, "after-alloc").await;
        Outcome::new(ok && alive, format!("{}; still open: {alive}", observed.join("; ")))
            .to_mesh(1..=1)
    })
}

fn decoded_cost_bomb_json(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // ~30 000 zeros in 60 KiB: within the frame limit, far over the decoded bytes.
        let zeros = vec!["0"; 30_000].join(",");
        let frame = request_text("echo", &format!(r#"{{"a":[{zeros}]}}"#), "cost-1");
        assert!(frame.len() < limits::MAX_MESSAGE_BYTES);
        let needle = "frame decodes to more than";
        one_refusal(&ctx, Message::Text(frame.into()), "LimitExceeded", Some("cost-1"), needle)
            .await
    })
}

fn decoded_cost_bomb_msgpack(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // array16 of 60 000 one-byte zeros.
        let mut value = vec![0xdc];
        value.extend_from_slice(&60_000u16.to_be_bytes());
        value.extend(std::iter::repeat_n(0u8, 60_000));
        let frame = mp_request("cost-2", &value);
        assert!(frame.len() < limits::MAX_MESSAGE_BYTES);
        let needle = "frame decodes to more than";
        one_refusal(&ctx, Message::Binary(frame.into()), "LimitExceeded", Some("cost-2"), needle)
            .await
    })
}

fn big_integer_json(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let frame = request_text("echo", r#"{"n":18446744073709551616}"#, "int-1");
        let needle = "`payload.params.n` is an integer beyond 64 bits";
        one_refusal(
            &ctx,
            Message::Text(frame.into()),
            "NuropbValidationError",
            Some("int-1"),
            needle,
        )
        .await
    })
}

fn big_integer_msgpack(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // MessagePack has no integer beyond 64 bits: the largest, 2^64 - 1, passes as is.
        let mut value = vec![0xcf];
        value.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut c = session(&ctx, 0, "attacker").await;
        c.send_binary(mp_request("int-2", &value)).await;
        let v = c.recv_msgpack().await;
        let ok =
            v["payload"]["trace_id"] == "int-2" && v["payload"]["result"]["a"] == json!(u64::MAX);
        Outcome::new(ok, format!("response {}", short(&v["payload"]))).to_mesh(1..=1)
    })
}

fn nan_json(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut observed = Vec::new();
        let mut ok = true;
        for (i, literal) in ["NaN", "Infinity", "-Infinity"].iter().enumerate() {
            let trace = format!("nan-j{i}");
            let frame = request_text("echo", &format!(r#"{{"x":{literal}}}"#), &trace);
            let mut c = session(&ctx, 0, "attacker").await;
            c.send_text(&frame).await;
            let v = c.recv_json().await;
            // JSON text cannot carry them: not JSON at all, so no trace id can be read.
            let (case_ok, text) = refused(&v, "DecodeError", None, "");
            ok &= case_ok;
            observed.push(format!("{literal}: {text}"));
        }
        Outcome::new(ok, observed.join("; "))
    })
}

fn nan_msgpack(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut observed = Vec::new();
        let mut ok = true;
        for (i, x) in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY].iter().enumerate() {
            let trace = format!("nan-m{i}");
            let mut value = vec![0xcb];
            value.extend_from_slice(&x.to_be_bytes());
            let mut c = session(&ctx, 0, "attacker").await;
            c.send_binary(mp_request(&trace, &value)).await;
            let v = c.recv_msgpack().await;
            let needle = "`payload.params.a` is not a finite number";
            let (case_ok, text) = refused(&v, "NuropbValidationError", Some(&trace), needle);
            ok &= case_ok;
            observed.push(format!("{x}: {text}"));
        }
        Outcome::new(ok, observed.join("; "))
    })
}

fn unknown_frames(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let cases: [(&str, &str, Option<&str>, &str); 4] = [
            (
                r#"{"type":"query","payload":{"trace_id":"unk-1"}}"#,
                "NuropbValidationError",
                Some("unk-1"),
                "unknown `type`",
            ),
            (
                &format!(
                    r#"{{"type":"request","payload":{{"trace_id":"unk-2","service":"{SERVICE}","params":{{}}}}}}"#
                ),
                "NuropbValidationError",
                Some("unk-2"),
                "payload.method",
            ),
            (r#"{"payload":{}}"#, "NuropbValidationError", None, "missing `type`"),
            (
                &format!(
                    r#"{{"type":"command","payload":{{"trace_id":"unk-4","service":"{SERVICE}","method":"echo","params":[1]}}}}"#
                ),
                "NuropbValidationError",
                Some("unk-4"),
                "must be an object",
            ),
        ];
        let mut ok = true;
        let mut observed = Vec::new();
        for (frame, error, trace, needle) in cases {
            c.send_text(frame).await;
            let (case_ok, text) = refused(&c.recv_json().await, error, trace, needle);
            ok &= case_ok;
            observed.push(text);
        }
        let alive = still_serves(&mut c, "after-unk").await;
        Outcome::new(ok && alive, observed.join("; ")).to_mesh(1..=1)
    })
}

// --- The WebSocket protocol -----------------------------------------------------------------

/// Upgrades raw from the row's address, writes `bytes`, returns the close code.
async fn raw_close_code(ctx: &Ctx, k: u8, bytes: &[u8]) -> Option<u16> {
    let (mut stream, head) =
        net::http(ctx.ip(k), ctx.addr, upgrade(&bearer(&token("attacker"))).as_bytes()).await;
    if net::status(&head) != Some(101) {
        return None;
    }
    stream.write_all(bytes).await.expect("write");
    net::close_code(&mut stream).await
}

fn invalid_utf8(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let code = raw_close_code(&ctx, 0, &net::masked_frame(0x81, b"\xff\xfe{}")).await;
        Outcome::new(code == Some(1007), format!("close {code:?}"))
    })
}

fn protocol_violation(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let unmasked = raw_close_code(&ctx, 0, &[0x81, 0x02, b'{', b'}']).await;
        let opcode = raw_close_code(&ctx, 1, &net::masked_frame(0x83, b"{}")).await;
        let reserved = raw_close_code(&ctx, 2, &net::masked_frame(0xc1, b"{}")).await;
        let ok = [unmasked, opcode, reserved].iter().all(|c| *c == Some(1002));
        Outcome::new(
            ok,
            format!(
                "unmasked: close {unmasked:?}; opcode 3: close {opcode:?}; RSV1: close {reserved:?}"
            ),
        )
    })
}

fn malformed_handshakes(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let auth = bearer(&token("attacker"));
        let valid = upgrade(&auth);
        let no_key: String = valid
            .lines()
            .filter(|l| !l.starts_with("Sec-WebSocket-Key"))
            .map(|l| format!("{l}\r\n"))
            .collect();
        let cases = [
            ("no key", no_key, 400),
            (
                "version 8",
                valid.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            ("head of 20 KiB", upgrade(&format!("{auth}X-Big: {}\r\n", "a".repeat(20 << 10))), 431),
            ("POST", valid.replacen("GET", "POST", 1), 400),
        ];
        let mut ok = true;
        let mut observed = Vec::new();
        for (i, (name, request, expected)) in cases.iter().enumerate() {
            // Two cases per address: the connect burst is the next row's business.
            let (status, head) = upgrade_status(&ctx, (i / 2) as u8, request).await;
            let mut case_ok = status == Some(*expected);
            if *expected == 426 {
                case_ok &= head.contains("\r\nSec-WebSocket-Version: 13\r\n");
            }
            ok &= case_ok;
            observed.push(format!("{name}: {}", status.map_or("none".into(), |s| s.to_string())));
        }
        Outcome::new(ok, observed.join("; "))
    })
}

fn bad_origin(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let auth = bearer(&token("attacker"));
        let cases = [
            (r"https://evil.com\@example.com", 403),
            ("https://evil-example.com", 403),
            ("null", 403),
            // The allow-list does allow its own subdomains.
            ("https://app.example.com", 101),
        ];
        let mut ok = true;
        let mut observed = Vec::new();
        for (i, (origin, expected)) in cases.iter().enumerate() {
            let request = upgrade(&format!("{auth}Origin: {origin}\r\n"));
            let (status, _) = upgrade_status(&ctx, (i / 2) as u8, &request).await;
            ok &= status == Some(*expected);
            observed.push(format!("{origin}: {}", status.map_or("none".into(), |s| s.to_string())));
        }
        Outcome::new(ok, observed.join("; "))
    })
}

// --- Tokens ---------------------------------------------------------------------------------

/// An upgrade with `token` must get 401; the log must not grow more than a few lines, none
/// of them starting with `FORGED`.
async fn refused_token(ctx: &Ctx, token: &str) -> Outcome {
    let (_, before) = ctx.gateway.stderr_lines();
    let (status, _) = upgrade_status(ctx, 0, &upgrade(&bearer(token))).await;
    // The refusal is logged as it is answered; give the pipe a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (lines, after) = ctx.gateway.stderr_lines();
    let new = lines.get(before..).unwrap_or_default();
    let forged = new.iter().filter(|l| l.trim_start().starts_with("FORGED")).count();
    let ok = status == Some(401) && forged == 0 && after - before <= 4;
    Outcome::new(
        ok,
        format!(
            "{}; {} new log line(s), {forged} forged",
            status.map_or("no answer".into(), |s| s.to_string()),
            after - before
        ),
    )
}

fn claims(user: &str, iat: u64, exp: u64) -> Value {
    json!({"sub": user, "iat": iat, "exp": exp})
}

fn jwt_alg_none(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let t =
            forged_token(r#"{"alg":"none","typ":"JWT"}"#, &claims("root", now(), now() + 60), "");
        refused_token(&ctx, &t).await
    })
}

fn jwt_wrong_key(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let t = e2e_tests::token_with(claims("root", now(), now() + 60), "not-the-gateways-secret");
        refused_token(&ctx, &t).await
    })
}

fn jwt_expired(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // Beyond the 30 s leeway.
        let t = e2e_tests::token_with(claims("root", now() - 600, now() - 120), SECRET);
        refused_token(&ctx, &t).await
    })
}

fn jwt_iat_in_future(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let t = e2e_tests::token_with(claims("root", now() + 600, now() + 1200), SECRET);
        refused_token(&ctx, &t).await
    })
}

fn jwt_lifetime_over_max(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let exp = now() + 2 * limits::JWT_MAX_LIFETIME_SECS;
        let t = e2e_tests::token_with(claims("root", now(), exp), SECRET);
        refused_token(&ctx, &t).await
    })
}

fn jwt_no_iat_with_max_lifetime(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let t = e2e_tests::token_with(json!({"sub": "root", "exp": now() + 60}), SECRET);
        refused_token(&ctx, &t).await
    })
}

fn jwt_newline_in_alg(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let header =
            r#"{"alg":"HS256\nFORGED 2026-01-01T00:00:00Z INFO user root logged in","typ":"JWT"}"#;
        let t = forged_token(header, &claims("root", now(), now() + 60), "c2ln");
        refused_token(&ctx, &t).await
    })
}

/// The log lines of the gateway written since `before`, how many, and how many of them a
/// client forged (a line starting with `FORGED`, or holding a raw escape character).
fn new_log_lines(ctx: &Ctx, before: usize) -> (Vec<String>, usize) {
    let (lines, _) = ctx.gateway.stderr_lines();
    let new: Vec<String> = lines.get(before..).unwrap_or_default().to_vec();
    let forged =
        new.iter().filter(|l| l.trim_start().starts_with("FORGED") || l.contains('\u{1b}')).count();
    (new, forged)
}

fn log_injection(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // A validly signed token whose `sub` and `username` carry a line break and an ANSI
        // escape: the session opens (any string is a user id), and its log line must keep
        // them escaped.
        let sub = "mallory\nFORGED 2026-01-01T00:00:00Z INFO session opened user.id=root";
        let t = e2e_tests::token_with(
            json!({"sub": sub, "username": "x\u{1b}[2Jy", "iat": now(), "exp": now() + 600}),
            SECRET,
        );
        let (_, before) = ctx.gateway.stderr_lines();
        let opened = match net::session_from(ctx.ip(0), &ctx.url, ctx.addr, &t).await {
            // `session_from` read the hello frame.
            Ok(mut c) => c.ws.close(None).await.is_ok(),
            Err(e) => {
                return Outcome::new(false, format!("refused: {e}"));
            }
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (new, forged) = new_log_lines(&ctx, before);
        let escaped = new.iter().any(|l| l.contains(r"mallory\nFORGED"));
        Outcome::new(
            opened && forged == 0 && escaped,
            format!(
                "session opened: {opened}; {} new log line(s), {forged} forged, the user id logged escaped: {escaped}",
                new.len()
            ),
        )
    })
}

// --- Connections ----------------------------------------------------------------------------

fn slowloris(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // As many sockets as the address may hold, each sending its head a byte at a time.
        let n = limits::MAX_CONNECTIONS_PER_IP;
        let mut slow = Vec::new();
        for _ in 0..n {
            let stream = net::tcp_from(ctx.ip(0), ctx.addr, None).await;
            slow.push(tokio::spawn(trickle(stream)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One more from the same address: 429. A newcomer from elsewhere: served.
        let (more, _) = upgrade_status(&ctx, 0, &upgrade(&bearer(&token("attacker")))).await;
        let newcomer =
            match net::session_from(net::loopback(1), &ctx.url, ctx.addr, &token("newcomer")).await
            {
                Ok(mut c) => still_serves(&mut c, "slow-newcomer").await,
                Err(_) => false,
            };
        // The handshake deadline (10 s from the accept) ends every slow socket.
        let mut closed_after = Vec::new();
        for task in slow {
            closed_after.push(task.await.expect("trickle task"));
        }
        let all_closed =
            closed_after.iter().all(|d| d.is_some_and(|d| d <= Duration::from_secs(12)));
        let latest = closed_after.iter().flatten().max().copied().unwrap_or_default();
        let ok = more == Some(429) && newcomer && all_closed;
        Outcome::new(
            ok,
            format!(
                "{n} trickling sockets; one more from the address: {more:?}; a newcomer from 127.0.0.1 served: {newcomer}; slow sockets dropped: {}/{n}, the last after {:.1} s",
                closed_after.iter().flatten().count(),
                latest.as_secs_f64()
            ),
        )
        .to_mesh(1..=1)
    })
}

/// Sends a valid head one byte every 300 ms, never finishing it; returns how long until
/// the server closed the socket (`None`: not within 13 s).
async fn trickle(stream: tokio::net::TcpStream) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let head = format!("GET /ws HTTP/1.1\r\nHost: gw\r\nX-Slow: {}", "a".repeat(100));
    let writer = async {
        for byte in head.as_bytes() {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        std::future::pending::<()>().await;
    };
    let mut buf = [0u8; 256];
    let closed = async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(13), async {
        tokio::select! {
            // Cancel-safe: either branch is dropped whole when the other ends.
            () = writer => unreachable!("the writer never ends"),
            elapsed = closed => elapsed,
        }
    })
    .await
    .ok()
}

fn idle_socket_flood(ctx: Ctx) -> Attack {
    Box::pin(async move {
        // Fill the whole handshake budget with silent sockets, from two addresses.
        let n = limits::MAX_HANDSHAKES_IN_FLIGHT;
        let mut idle = Vec::new();
        for i in 0..n {
            idle.push(net::tcp_from(ctx.ip((i % 2) as u8), ctx.addr, None).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let request = upgrade(&bearer(&token("newcomer")));
        let (full, _) = upgrade_status(&ctx, 2, &request).await;
        drop(idle);
        // Their slots come back as the gateway sees them close.
        let mut after = None;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = upgrade_status(&ctx, 2, &request).await.0;
            if after == Some(101) {
                break;
            }
        }
        Outcome::new(
            full == Some(503) && after == Some(101),
            format!("{n} idle sockets; a newcomer: {full:?}; once they left: {after:?}"),
        )
    })
}

fn connections_per_ip(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let n = limits::MAX_CONNECTIONS_PER_IP;
        let mut held = Vec::new();
        for i in 0..n {
            held.push(session(&ctx, 0, &format!("per-ip-{i}")).await);
        }
        let (more, _) = upgrade_status(&ctx, 0, &upgrade(&bearer(&token("per-ip-x")))).await;
        let (other, _) = upgrade_status(&ctx, 1, &upgrade(&bearer(&token("per-ip-y")))).await;
        Outcome::new(
            more == Some(429) && other == Some(101),
            format!(
                "{n} sessions held; one more from the address: {more:?}; from another: {other:?}"
            ),
        )
    })
}

fn sessions_per_user(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let n = limits::MAX_SESSIONS_PER_USER;
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(session(&ctx, 0, "mallory").await);
        }
        // From another address: the limit is the user's, not the address's.
        let (more, _) = upgrade_status(&ctx, 1, &upgrade(&bearer(&token("mallory")))).await;
        let (other, _) = upgrade_status(&ctx, 1, &upgrade(&bearer(&token("mallory-2")))).await;
        Outcome::new(
            more == Some(429) && other == Some(101),
            format!("{n} sessions of mallory; a fifth: {more:?}; another user: {other:?}"),
        )
    })
}

fn connect_rate(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let started = Instant::now();
        let attempts = limits::CONNECT_BURST_PER_IP as usize + 6;
        let mut upgraded = 0;
        let mut refused = 0;
        let mut other = Vec::new();
        let request = upgrade(&bearer(&token("rate")));
        for _ in 0..attempts {
            // Each connection is dropped at once: the live count never nears its limit.
            match upgrade_status(&ctx, 0, &request).await.0 {
                Some(101) => upgraded += 1,
                Some(429) => refused += 1,
                s => other.push(s),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let allowed =
            limits::CONNECT_BURST_PER_IP as f64 + f64::from(limits::CONNECT_RATE_PER_IP) * secs;
        let ok = other.is_empty()
            && upgraded >= limits::CONNECT_BURST_PER_IP as usize
            && upgraded as f64 <= allowed + 1.0
            && refused >= 1;
        Outcome::new(
            ok,
            format!(
                "{attempts} attempts in {secs:.2} s: {upgraded} × 101, {refused} × 429{}",
                if other.is_empty() { String::new() } else { format!(", other {other:?}") }
            ),
        )
    })
}

// --- Rates and slow readers -----------------------------------------------------------------

fn pipelined_burst(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let n = 2 * limits::RATE_BURST as usize;
        for i in 0..n {
            let frame = json!({"type": "request", "payload": {"service": SERVICE, "method": "echo", "params": {"i": i}, "trace_id": format!("burst-{i}")}});
            c.ws.feed(Message::Text(frame.to_string().into())).await.expect("feed");
        }
        c.ws.flush().await.expect("flush");
        let mut answers = vec![0usize; n];
        let (mut served, mut limited, mut wrong) = (0, 0, 0);
        for _ in 0..n {
            let v = c.recv_json().await;
            let trace = v["payload"]["trace_id"].as_str().or(v["trace_id"].as_str()).unwrap_or("");
            let Some(i) = trace
                .strip_prefix("burst-")
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < n)
            else {
                wrong += 1;
                continue;
            };
            answers[i] += 1;
            if v["error"] == "RateLimited" {
                limited += 1;
            } else if v["payload"]["result"] == json!({"i": i}) {
                served += 1;
            } else {
                wrong += 1;
            }
        }
        c.expect_silence(Duration::from_millis(200)).await;
        let each_once = answers.iter().all(|a| *a == 1);
        let burst = limits::RATE_BURST as usize;
        let ok = each_once && wrong == 0 && served >= burst && limited >= n - burst - 5;
        Outcome::new(
            ok,
            format!("{n} pipelined: {served} served, {limited} RateLimited with their trace_id, {wrong} wrong, each answered once: {each_once}"),
        )
        .to_mesh(served..=served)
    })
}

fn ping_flood(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let pings = 5 * limits::RATE_BURST as usize;
        for _ in 0..pings {
            c.ws.feed(Message::Ping(Vec::new().into())).await.expect("feed");
        }
        let frame = json!({"type": "request", "payload": {"service": SERVICE, "method": "echo", "params": {}, "trace_id": "after-pings"}});
        c.ws.feed(Message::Text(frame.to_string().into())).await.expect("feed");
        c.ws.flush().await.expect("flush");
        // tungstenite answers the pings; the request then finds no token left.
        let mut pongs = 0;
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
                Ok(Some(Ok(Message::Ping(_)))) => {}
                Ok(Some(Ok(Message::Text(t)))) => break serde_json::from_str::<Value>(&t).ok(),
                other => break other.map(|_| Value::Null).ok(),
            }
        };
        let answer = answer.unwrap_or(Value::Null);
        let (ok, text) = refused(&answer, "RateLimited", Some("after-pings"), "frames per second");
        Outcome::new(ok, format!("{pings} pings ({pongs} pongs), then a request: {text}"))
    })
}

/// `nuropb_gateway_frames_dropped_total` from the gateway's ops endpoint.
async fn frames_dropped(ops: std::net::SocketAddr) -> Option<f64> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(ops).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut body)).await.ok()?.ok()?;
    let body = String::from_utf8_lossy(&body);
    let line = body.lines().find(|l| l.starts_with("nuropb_gateway_frames_dropped_total "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn never_reads(ctx: Ctx) -> Attack {
    Box::pin(async move {
        use lapin::BasicProperties;
        use lapin::options::BasicPublishOptions;

        let before = frames_dropped(ctx.ops).await.expect("metrics");
        // Connected, then not read from while events for this user pile up: first the
        // kernel's socket buffers fill, then the outbound queue (256 KiB).
        let mut c = net::ws_from(ctx.ip(0), &ctx.url, ctx.addr, &token("slowpoke"), None)
            .await
            .expect("upgrade");
        let connection = nuropb_testkit::broker::connect(&ctx.amqp_url).await;
        let channel = connection.create_channel().await.expect("channel");
        let pad = "e".repeat(100 << 10);
        let started = Instant::now();
        let (mut published, mut tripped) = (0usize, false);
        // Bounded: 300 × 100 KiB is far more than the kernel buffers and the queue hold, and
        // takes at most about 4 s.
        for i in 0..300 {
            let body = json!({
                "tag": "event", "topic": "hostile.flood", "event": {"i": i, "pad": pad},
                "context": {}, "trace_id": null, "correlation_id": null, "target": ["slowpoke"],
            });
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(nuropb_testkit::broker::nuropb_headers("event", None, false));
            channel
                .basic_publish(
                    "nuropb-events-exchange".into(),
                    "hostile.flood".into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            published += 1;
            // A steady stream (10 MB/s), not a burst: the broker and the gateway keep up,
            // so the bystander's calls are not queued behind megabytes of events.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if i % 4 == 3 && frames_dropped(ctx.ops).await.is_some_and(|d| d > before) {
                tripped = true;
                break;
            }
        }
        let trip_ms = started.elapsed().as_millis();
        // The 1013 is decided; the queued frames and the close frame get 1 s. Read them.
        let mut frames = 0;
        let (close, end) = loop {
            match tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => {
                    break (f.map(|f| u16::from(f.code)), "close frame".to_owned());
                }
                Ok(Some(Ok(_))) => frames += 1,
                Ok(Some(Err(e))) => break (None, format!("error: {e}")),
                Ok(None) => break (None, "end of stream".to_owned()),
                Err(_) => break (None, "nothing for 5 s".to_owned()),
            }
        };
        // Best effort: the broker connection is the row's own.
        let _ = connection.close(200, "OK".into()).await;
        Outcome::new(
            tripped && close == Some(1013),
            format!(
                "{published} × 100 KiB events for an unread session; frames dropped: {tripped} after {trip_ms} ms; then read {frames} frames (hello included), then {end} {close:?}"
            ),
        )
    })
}

/// The decoded-byte budgets of calls in flight. Each call's params hold 11 000 zeros, which
/// the gateway estimates (`nuropb_wire::client::estimated_object_size`, the rule it charges
/// by) at about 1.5 MiB, under the 2 MiB one frame may decode to. From the estimate and the
/// limits: connection A sends one call more than its 4 MiB hold, further connections fill
/// the gateway's 16 MiB, and a last one sends one more call. Each service call takes 1.5 s,
/// so all are in flight together.
fn in_flight_bytes(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let zeros = vec!["0"; 11_000].join(",");
        let params = format!(r#"{{"ms":1500,"zeros":[{zeros}]}}"#);
        let parsed: Value = serde_json::from_str(&params).expect("params");
        let cost = nuropb_wire::client::estimated_object_size(parsed.as_object().expect("object"));
        let per_connection = limits::MAX_IN_FLIGHT_BYTES / cost;
        let in_total = limits::MAX_IN_FLIGHT_BYTES_TOTAL / cost;
        // The bystander's call in flight must not be what tips the total.
        assert!(per_connection >= 1 && in_total > per_connection);
        assert!(limits::MAX_IN_FLIGHT_BYTES_TOTAL - in_total * cost > 64 << 10);
        let mut plan = vec![per_connection + 1];
        let mut left = in_total - per_connection;
        while left > 0 {
            plan.push(left.min(per_connection));
            left -= left.min(per_connection);
        }
        plan.push(1);
        let expected = [format!("fl-0-{per_connection}"), format!("fl-{}-0", plan.len() - 1)];
        assert!(plan.len() <= 2 * limits::MAX_CONNECTIONS_PER_IP, "two addresses");
        let mut clients = Vec::new();
        let started = Instant::now();
        for (k, calls) in plan.iter().enumerate() {
            let from = (k / limits::MAX_CONNECTIONS_PER_IP) as u8;
            let mut c = session(&ctx, from, &format!("in-flight-{k}")).await;
            for n in 0..*calls {
                c.send_text(&request_text("slow", &params, &format!("fl-{k}-{n}"))).await;
                // In order: the budgets are taken as frames arrive.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            clients.push((c, *calls));
        }
        let sent_ms = started.elapsed().as_millis();
        let mut refused = Vec::new();
        let mut reasons = Vec::new();
        let mut served = 0;
        let mut other = Vec::new();
        for (c, calls) in &mut clients {
            for _ in 0..*calls {
                let v = c.recv_json().await;
                let trace = v["payload"]["trace_id"].as_str().unwrap_or_default().to_owned();
                if v["payload"]["error"]["error"] == "NuropbOverloadedError" {
                    let why = v["payload"]["error"]["description"].as_str().unwrap_or_default();
                    reasons.push(format!("{trace}: {why}"));
                    refused.push(trace);
                } else if v["payload"]["result"]["ms"] == 1500 {
                    served += 1;
                } else {
                    other.push(short(&v));
                }
            }
        }
        refused.sort();
        let ok = refused == expected && served == in_total && other.is_empty();
        Outcome::new(
            ok,
            format!(
                "params cost {cost} B: {per_connection} per connection, {in_total} in total; {} calls sent within {sent_ms} ms: {served} served; NuropbOverloadedError for {reasons:?}{}",
                plan.iter().sum::<usize>(),
                if other.is_empty() { String::new() } else { format!("; other: {other:?}") }
            ),
        )
        .to_mesh(served..=served)
    })
}

// --- What may be called ---------------------------------------------------------------------

fn callable_allow_list(ctx: Ctx) -> Attack {
    Box::pin(async move {
        let mut c = session(&ctx, 0, "attacker").await;
        let cases = [
            ("request", "fail", "call-1", "hostile-echo.fail may not be called by clients"),
            ("command", "note", "call-2", "hostile-echo.note may not be called by clients"),
            ("request", "nuropb_describe", "call-3", ""),
        ];
        let mut ok = true;
        let mut observed = Vec::new();
        for (kind, method, trace, needle) in cases {
            let frame = json!({"type": kind, "payload": {"service": SERVICE, "method": method, "params": {}, "trace_id": trace}});
            c.send_json(&frame).await;
            let (case_ok, text) =
                refused(&c.recv_json().await, "NuropbAuthorizationError", Some(trace), needle);
            ok &= case_ok;
            observed.push(format!("{method}: {text}"));
        }
        let alive = still_serves(&mut c, "call-echo").await;
        Outcome::new(ok && alive, format!("{}; echo allowed: {alive}", observed.join("; ")))
            .to_mesh(1..=1)
    })
}

pub const ROWS: &[Row] = &[
    Row { name: "oversized frame", expected: "close 1009", attack: oversized_frame },
    Row {
        name: "JSON nesting bomb (100 and 30 000 levels)",
        expected: "LimitExceeded: a response with trace_id at 100 levels; an error frame at 30 000 (refused before parsing); still open",
        attack: json_nesting_bomb,
    },
    Row {
        name: "MessagePack allocation bomb (headers claiming 2^32-1)",
        expected: "DecodeError error frames; LimitExceeded when 60 000 elements follow the claim; still open, RSS flat",
        attack: msgpack_allocation_bomb,
    },
    Row {
        name: "decoded-cost bomb, JSON (30 000 zeros)",
        expected: "LimitExceeded `frame decodes to more than`, trace_id",
        attack: decoded_cost_bomb_json,
    },
    Row {
        name: "decoded-cost bomb, MessagePack (60 000 zeros)",
        expected: "LimitExceeded `frame decodes to more than`, trace_id",
        attack: decoded_cost_bomb_msgpack,
    },
    Row {
        name: "integer beyond 64 bits, JSON",
        expected: "NuropbValidationError naming payload.params.n",
        attack: big_integer_json,
    },
    Row { name: "2^64-1, MessagePack", expected: "passes unchanged", attack: big_integer_msgpack },
    Row { name: "NaN/±Infinity, JSON", expected: "DecodeError", attack: nan_json },
    Row {
        name: "NaN/±Infinity, MessagePack",
        expected: "NuropbValidationError `not a finite number`, trace_id",
        attack: nan_msgpack,
    },
    Row {
        name: "unknown type, missing fields",
        expected: "NuropbValidationError, with trace_id when readable",
        attack: unknown_frames,
    },
    Row { name: "text frame not UTF-8", expected: "close 1007", attack: invalid_utf8 },
    Row {
        name: "protocol violations",
        expected: "close 1002 (unmasked, opcode 3, RSV1)",
        attack: protocol_violation,
    },
    Row {
        name: "malformed handshakes",
        expected: "400 no key, 426 version 8, 431 head, 400 POST",
        attack: malformed_handshakes,
    },
    Row {
        name: "bad Origin (allow-list example.com)",
        expected: "403, 403, 403; 101 for a subdomain",
        attack: bad_origin,
    },
    Row { name: "JWT alg none", expected: "401", attack: jwt_alg_none },
    Row { name: "JWT wrong key", expected: "401", attack: jwt_wrong_key },
    Row { name: "JWT expired", expected: "401", attack: jwt_expired },
    Row { name: "JWT iat in the future", expected: "401", attack: jwt_iat_in_future },
    Row { name: "JWT lifetime over max", expected: "401", attack: jwt_lifetime_over_max },
    Row {
        name: "JWT without iat (max lifetime set)",
        expected: "401",
        attack: jwt_no_iat_with_max_lifetime,
    },
    Row {
        name: "JWT newline in alg",
        expected: "401, no forged log line",
        attack: jwt_newline_in_alg,
    },
    Row {
        name: "line break and ESC in a token's sub (log injection)",
        expected: "101, logged escaped, no forged line",
        attack: log_injection,
    },
    Row {
        name: "slowloris handshake",
        expected: "429 past the address limit, newcomer served, all dropped ≤ 12 s",
        attack: slowloris,
    },
    Row {
        name: "idle-socket flood",
        expected: "503 while the budget is full, 101 after",
        attack: idle_socket_flood,
    },
    Row {
        name: "connections per address",
        expected: "429 for the 9th, 101 from another",
        attack: connections_per_ip,
    },
    Row {
        name: "sessions per user",
        expected: "429 for the 5th, 101 for another user",
        attack: sessions_per_user,
    },
    Row {
        name: "connect rate per address",
        expected: "burst of 101, then 429",
        attack: connect_rate,
    },
    Row {
        name: "pipelined burst past the rate",
        expected: "each answered once; RateLimited with trace_id past the burst",
        attack: pipelined_burst,
    },
    Row {
        name: "ping flood",
        expected: "the next request RateLimited with its trace_id",
        attack: ping_flood,
    },
    Row {
        name: "reader that never reads (targeted events)",
        expected: "frames dropped, close 1013",
        attack: never_reads,
    },
    Row {
        name: "decoded bytes in flight, per connection and in total",
        expected: "NuropbOverloadedError for the call over each budget",
        attack: in_flight_bytes,
    },
    Row {
        name: "--callable allow-list, --client-describe false",
        expected: "NuropbAuthorizationError before the mesh",
        attack: callable_allow_list,
    },
];
