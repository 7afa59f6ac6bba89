//! The Prometheus text exposition format, version 0.0.4: for each metric a `# HELP` line,
//! a `# TYPE` line and one `name value` sample line.

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::source::Metric;

/// The `Content-Type` of [`encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `metrics` in the text format. Invalid metrics and repeated names are skipped
/// with a warning: one bad entry must not make Prometheus reject the whole scrape.
pub fn encode(metrics: &[Metric]) -> String {
    let mut out = String::with_capacity(metrics.len() * 128);
    let mut seen = HashSet::with_capacity(metrics.len());
    for m in metrics {
        if let Err(why) = m.check() {
            tracing::warn!(metric = %m.name, why, "metric skipped");
            continue;
        }
        if !seen.insert(m.name.as_ref()) {
            tracing::warn!(metric = %m.name, "metric skipped: name repeated");
            continue;
        }
        // Writing to a `String` cannot fail.
        if m.help.is_empty() {
            let _ = writeln!(out, "# HELP {}", m.name);
        } else {
            let _ = writeln!(out, "# HELP {} {}", m.name, escape_help(&m.help));
        }
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind.as_str());
        let _ = writeln!(out, "{} {}", m.name, format_value(m.value));
    }
    out
}

/// `# HELP` text: backslash and line feed are the only escapes (0.0.4).
fn escape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as Go's `ParseFloat` reads it: `NaN`, `+Inf`, `-Inf`, or a decimal.
/// Rust's `Display` never uses an exponent and drops a zero fraction (`3`, `0.25`).
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_help_type_and_sample() {
        let text = encode(&[
            Metric::counter("a_total", "Things done.", 3.0),
            Metric::gauge("b", "Back\\slash\nnewline.", 0.25),
        ]);
        assert_eq!(
            text,
            "# HELP a_total Things done.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Back\\\\slash\\nnewline.\n# TYPE b gauge\nb 0.25\n"
        );
    }

    #[test]
    fn skips_invalid_and_repeated_metrics() {
        let text = encode(&[
            Metric::gauge("ok", "", 1.0),
            Metric::gauge("bad name", "", 1.0),
            Metric::counter("no_suffix", "", 1.0),
            Metric::gauge("ok", "", 2.0),
        ]);
        assert_eq!(text, "# HELP ok\n# TYPE ok gauge\nok 1\n");
    }

    #[test]
    fn formats_special_and_large_values() {
        let check = |v: f64, s: &str| assert_eq!(format_value(v), s);
        check(0.0, "0");
        check(-1.5, "-1.5");
        check(f64::NAN, "NaN");
        check(f64::INFINITY, "+Inf");
        check(f64::NEG_INFINITY, "-Inf");
        check(u64::MAX as f64, "18446744073709552000");
    }
}
