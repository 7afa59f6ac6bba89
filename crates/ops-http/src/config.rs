//! `OpsConfig`: every limit of the operations endpoint, with its default, checked once by
//! [`OpsConfig::validate`] before anything is served.

use std::time::Duration;

use crate::error::OpsError;

/// Limits of the operations endpoint. Each connection lives at most
/// `read_timeout + write_timeout + linger_timeout`, which also bounds how long a connection
/// waits for a slot when `max_connections` are busy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    /// Most concurrent connections (default 64). Beyond it new connections are not accepted
    /// but wait in the listen backlog until a slot frees: probes and scrapes are few, and
    /// anything holding a slot is bounded by the timeouts below.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes (default 8 KiB, also the
    /// least hyper accepts as its `max_buf_size`); a larger head is answered with 431.
    pub max_head_bytes: usize,
    /// Time allowed to receive the whole request head, counted from accept (default 5 s).
    /// A client still sending by then is disconnected without an answer (slowloris): the
    /// deadline is for the whole head, not per read, so trickling bytes does not extend it.
    pub read_timeout: Duration,
    /// Time allowed, after `read_timeout`, to answer and write the response (default 5 s):
    /// the whole exchange is cut off at `read_timeout + write_timeout`, so a client that
    /// does not read is disconnected.
    pub write_timeout: Duration,
    /// After the response, how long unread request bytes are drained before the socket is
    /// closed (default 1 s). Closing with unread data makes the kernel send a reset, which
    /// can destroy the response before the client reads it (the 400 and 431 cases).
    pub linger_timeout: Duration,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            max_connections: 64,
            max_head_bytes: 8 << 10,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            linger_timeout: Duration::from_secs(1),
        }
    }
}

/// The smallest head limit accepted: hyper's `max_buf_size` panics below 8 KiB.
const MIN_HEAD_BYTES: usize = 8 << 10;

impl OpsConfig {
    /// Checks the limits; the error names the field.
    pub fn validate(&self) -> Result<(), OpsError> {
        let invalid =
            |field: &'static str, rule: &'static str| Err(OpsError::Config { field, rule });
        if self.max_connections == 0 {
            return invalid("max_connections", "must be greater than 0");
        }
        if self.max_head_bytes < MIN_HEAD_BYTES {
            return invalid("max_head_bytes", "must be at least 8192");
        }
        if self.read_timeout.is_zero() {
            return invalid("read_timeout", "must be greater than 0");
        }
        if self.write_timeout.is_zero() {
            return invalid("write_timeout", "must be greater than 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_each_bad_field_is_named() {
        assert!(OpsConfig::default().validate().is_ok());
        let check = |c: OpsConfig, field: &str| match c.validate() {
            Err(OpsError::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        };
        check(OpsConfig { max_connections: 0, ..OpsConfig::default() }, "max_connections");
        check(OpsConfig { max_head_bytes: 10, ..OpsConfig::default() }, "max_head_bytes");
        check(OpsConfig { read_timeout: Duration::ZERO, ..OpsConfig::default() }, "read_timeout");
        check(OpsConfig { write_timeout: Duration::ZERO, ..OpsConfig::default() }, "write_timeout");
    }
}
