//! The seam between the endpoint and what it reports: [`OpsSource`] answers readiness and
//! lists the current [`Metric`]s. The binary implements it over the core and the mesh
//! adapter, so this crate never depends on either.

use std::borrow::Cow;

/// What the operations endpoint reports. Called on every `/readyz` and `/metrics` request,
/// from the connection's task: implementations read current figures and return quickly
/// (no I/O, no waiting).
pub trait OpsSource: Send + Sync + 'static {
    /// `Ok` when the process should receive traffic; otherwise why not (sent in the 503
    /// body, so keep it short and free of secrets).
    fn ready(&self) -> Result<(), String>;

    /// The current value of every metric. Names must be unique and valid Prometheus names;
    /// counters end in `_total`. Invalid or repeated ones are skipped (and logged) rather
    /// than spoiling the whole scrape.
    fn metrics(&self) -> Vec<Metric>;
}

/// How Prometheus should treat a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows (until the process restarts); the name ends in `_total`.
    Counter,
    /// A current value that may go up and down.
    Gauge,
}

impl MetricKind {
    /// The word of the `# TYPE` line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        }
    }
}

/// One unlabelled sample with its metadata. Every figure the gateway reports is a single
/// process-wide number, so labels are not supported (yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`, e.g. `nuropb_gateway_requests_total`.
    pub name: Cow<'static, str>,
    /// One line of plain text for `# HELP`.
    pub help: Cow<'static, str>,
    /// Counter or gauge, written as `# TYPE`.
    pub kind: MetricKind,
    /// The sample; counters never decrease, NaN and infinities are written as Prometheus
    /// spells them.
    pub value: f64,
}

impl Metric {
    /// A counter; `name` must end in `_total`.
    pub fn counter(
        name: impl Into<Cow<'static, str>>,
        help: impl Into<Cow<'static, str>>,
        value: f64,
    ) -> Metric {
        Metric { name: name.into(), help: help.into(), kind: MetricKind::Counter, value }
    }

    /// A gauge.
    pub fn gauge(
        name: impl Into<Cow<'static, str>>,
        help: impl Into<Cow<'static, str>>,
        value: f64,
    ) -> Metric {
        Metric { name: name.into(), help: help.into(), kind: MetricKind::Gauge, value }
    }

    /// Why this metric cannot be exposed, if it cannot.
    pub fn check(&self) -> Result<(), &'static str> {
        if !is_valid_name(&self.name) {
            return Err("invalid metric name");
        }
        if self.kind == MetricKind::Counter && !self.name.ends_with("_total") {
            return Err("counter name does not end in _total");
        }
        Ok(())
    }
}

/// Prometheus metric names: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':');
    first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds_are_checked() {
        let check =
            |m: Metric, expected: Result<(), &str>| assert_eq!(m.check(), expected, "{m:?}");
        check(Metric::gauge("a_b:c9", "", 1.0), Ok(()));
        check(Metric::gauge("_x", "", 1.0), Ok(()));
        check(Metric::counter("x_total", "", 1.0), Ok(()));
        check(Metric::counter("x", "", 1.0), Err("counter name does not end in _total"));
        check(Metric::gauge("", "", 1.0), Err("invalid metric name"));
        check(Metric::gauge("9x", "", 1.0), Err("invalid metric name"));
        check(Metric::gauge("a-b", "", 1.0), Err("invalid metric name"));
        check(Metric::gauge("a b", "", 1.0), Err("invalid metric name"));
        check(Metric::gauge("é", "", 1.0), Err("invalid metric name"));
    }
}
