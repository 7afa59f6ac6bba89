//! Measures what the issue's 1 MiB frames cost once decoded (VmRSS and VmHWM of this
//! process, Linux only), through serde_json's own `Value` (the old path) and through
//! `decode_client_message` with the default limits. One case per run, so the high-water
//! marks do not mix: `cargo run --release -p nuropb-wire --example decoded_rss -- <case>`
//! with case `json-old`, `json-new`, `msgpack-old` or `msgpack-new`.

#![allow(clippy::print_stdout, reason = "an example that reports numbers")]

use nuropb_wire::client::{ClientLimits, Encoding, decode_client_message};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let case = std::env::args().nth(1).unwrap_or_else(|| "json-new".to_owned());
    let frame: Vec<u8> = if case == "objects" {
        // Ordinary small objects, to compare the estimate with what the tree really holds.
        let one = r#"{"id":12345,"name":"abcdefgh"},"#;
        let items = one.repeat((1 << 20) / one.len());
        format!(r#"{{"type":"ping","payload":{{"a":[{}0]}}}}"#, items).into_bytes()
    } else if case.starts_with("json") {
        let n = (1 << 20) / 2;
        format!("{{\"a\":[{}0]}}", "0,".repeat(n - 1)).into_bytes()
    } else {
        let mut mp = vec![0x81, 0xa1, b'a', 0xdd];
        mp.extend_from_slice(&(1u32 << 20).to_be_bytes());
        mp.resize(mp.len() + (1 << 20), 0x00);
        mp
    };
    let (rss0, hwm0) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let outcome = match case.as_str() {
        "json-old" => serde_json::from_slice::<serde_json::Value>(&frame)
            .map(|v| Box::new(v) as Box<dyn std::any::Any>)
            .map_err(|e| e.to_string()),
        "msgpack-old" => rmp_serde::from_slice::<serde_json::Value>(&frame)
            .map(|v| Box::new(v) as Box<dyn std::any::Any>)
            .map_err(|e| e.to_string()),
        "objects" => {
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap_or_default();
            println!("estimated_size: {} KiB", nuropb_wire::client::estimated_size(&v) / 1024);
            Ok(Box::new(v) as Box<dyn std::any::Any>)
        }
        _ => {
            let encoding =
                if case.starts_with("json") { Encoding::Json } else { Encoding::MessagePack };
            decode_client_message(&frame, encoding, &ClientLimits::default())
                .map(|m| Box::new(m) as Box<dyn std::any::Any>)
                .map_err(|e| e.to_string())
        }
    };
    let (rss1, hwm1) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    println!(
        "{case}: frame {} KiB; held +{} KiB, peak +{} KiB; {}",
        frame.len() / 1024,
        rss1.saturating_sub(rss0),
        hwm1.saturating_sub(hwm0.max(rss0)),
        match &outcome {
            Ok(_) => "decoded".to_owned(),
            Err(e) => format!("refused: {e}"),
        }
    );
    drop(outcome);
}
