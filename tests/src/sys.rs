//! What the benchmark reads from `/proc`: CPU time (user + system, all threads, dead ones
//! included) and resident memory of a process, and which process is the RabbitMQ broker.

use std::path::Path;
use std::process::Command;

/// Clock ticks per second of `/proc/<pid>/stat`'s `utime`/`stime` (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time of `pid` in seconds (user + system), or `None` when it is gone.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are 11 and 12 after the state (field 3).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The RabbitMQ node's Erlang VM (`beam.smp … -s rabbit boot`), if one runs on this machine.
pub fn broker_pid() -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("cmdline"))
        else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        // Cluster-test nodes use other node names; the one on 5672 is the default `rabbit@`.
        if cmdline.contains("beam.smp") && cmdline.contains("rabbit\0boot") {
            return Some(pid);
        }
    }
    None
}

/// CPU used by a set of processes between [`CpuMeter::start`] and [`CpuMeter::stop`].
pub struct CpuMeter {
    ticks: f64,
    pids: Vec<Option<u32>>,
    started: Vec<Option<f64>>,
}

impl CpuMeter {
    pub fn start(pids: &[Option<u32>]) -> CpuMeter {
        let ticks = clock_ticks_per_second();
        let started = pids.iter().map(|p| p.and_then(|p| cpu_seconds(p, ticks))).collect();
        CpuMeter { ticks, pids: pids.to_vec(), started }
    }

    /// CPU seconds each process used since the start (`None` where it could not be read).
    pub fn stop(&self) -> Vec<Option<f64>> {
        self.pids
            .iter()
            .zip(&self.started)
            .map(|(pid, start)| Some(cpu_seconds((*pid)?, self.ticks)? - (*start)?))
            .collect()
    }
}
