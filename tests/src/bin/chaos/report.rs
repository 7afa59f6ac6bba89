//! One markdown table per scenario: the request ledger's figures, the recovery time, the
//! gateway's RSS before and after, and each assertion with its bound and what was measured.

use std::time::Duration;

use super::client::Counts;

/// One checked claim: what it says (with its bound), what was measured, whether it held.
pub struct Check {
    pub claim: String,
    pub measured: String,
    pub ok: bool,
}

/// A scenario's result.
pub struct Table {
    pub name: &'static str,
    /// What ran, in one sentence (sessions, rates, durations).
    pub setup: String,
    pub counts: Counts,
    pub recovery: Option<Duration>,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub checks: Vec<Check>,
    /// Further figures worth a line (name, value).
    pub notes: Vec<(String, String)>,
}

impl Table {
    pub fn new(name: &'static str, setup: String) -> Table {
        Table {
            name,
            setup,
            counts: Counts::default(),
            recovery: None,
            rss_before: None,
            rss_after: None,
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records a claim; `ok` is whether it held.
    pub fn check(&mut self, claim: impl Into<String>, measured: impl Into<String>, ok: bool) {
        self.checks.push(Check { claim: claim.into(), measured: measured.into(), ok });
    }

    pub fn note(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.notes.push((name.into(), value.into()));
    }

    /// The standard claims on a ledger: exactly one answer each, nothing hung or lost.
    pub fn check_answers(&mut self, untraced: u64, unknown: u64) {
        let c = self.counts;
        self.check("every request answered (lost = 0)", c.lost.to_string(), c.lost == 0);
        self.check("none hung past deadline + margin", c.hung.to_string(), c.hung == 0);
        self.check("no second answer", c.duplicates.to_string(), c.duplicates == 0);
        self.check(
            "no error frame without its trace_id, no answer to an unsent trace_id",
            format!("{untraced} untraced, {unknown} unknown"),
            untraced == 0 && unknown == 0,
        );
        self.check("load was offered", c.offered.to_string(), c.offered > 0);
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn print(&self) {
        println!();
        println!("### {}", self.name);
        println!();
        println!("{}", self.setup);
        println!();
        println!(
            "| offered | answered | errored | hung | lost | recovery time | RSS before | RSS after |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let c = self.counts;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.offered,
            c.answered,
            c.errored,
            c.hung,
            c.lost,
            self.recovery.map_or("–".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
            mib(self.rss_before),
            mib(self.rss_after),
        );
        println!();
        println!("| asserts | measured | |");
        println!("|---|---|---|");
        for k in &self.checks {
            println!("| {} | {} | {} |", k.claim, k.measured, if k.ok { "ok" } else { "FAILED" });
        }
        for (name, value) in &self.notes {
            println!("| {name} | {value} | – |");
        }
    }
}

pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("–".to_owned(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

pub fn secs(d: Option<Duration>) -> String {
    d.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
}
