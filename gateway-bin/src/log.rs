//! The log format: tracing-subscriber's text format, with every field value and message
//! escaped so that no logged string (a header, a claim, an error that quotes its input) can
//! end a line early and write a forged line after it.

use std::fmt::{self, Write as _};

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, Writer};

/// The field formatter the binary installs: `name=value` pairs separated by spaces, as the
/// default one writes them, but values pass through [`Escaped`]. Escaping here rather than
/// at each call site means a `%` field added tomorrow cannot reopen the hole.
pub(crate) fn escaping_fields() -> impl for<'w> format::FormatFields<'w> + Send + Sync + 'static {
    format::debug_fn(|w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
        if field.name() != "message" {
            write!(w, "{}=", field.name())?;
        }
        write!(Escaped(w), "{value:?}")
    })
    .delimited(" ")
}

/// A writer that spells control characters (`\n`, `\r`, ESC …) and the Unicode line and
/// paragraph separators as escapes: text written through it stays on one line and cannot
/// drive the terminal.
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                write!(self.0, "{}", c.escape_default())?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(escaping_fields())
            .with_writer(move || out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn in_json_no_logged_value_can_start_a_line() {
        let forged = "x\n{\"level\":\"forged\"}\r\u{1b}[2K";
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || out.clone())
            .with_current_span(true)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(reason = %forged, "upgrade refused");
            tracing::info_span!("conn", peer = %forged).in_scope(|| tracing::info!("in a span"));
            tracing::info!("message {forged}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in &lines {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(event["level"], "INFO", "{line}");
            assert!(!line.contains(['\r', '\u{1b}']), "{line:?}");
        }
        assert!(lines[0].contains(r#""reason":"x\n{\"level\":\"forged\"}"#), "{}", lines[0]);
    }

    #[test]
    fn no_logged_value_can_start_a_line() {
        let forged =
            "x\n2025-01-01T00:00:00Z  INFO session opened user.id=admin\r\u{1b}[2K\u{2028}";
        let text = logged(|| {
            tracing::info!(reason = %forged, "upgrade refused");
            tracing::info!(user.id = forged, "session opened");
            tracing::info!(header = ?forged, "debug field");
            tracing::info_span!("conn", peer = %forged).in_scope(|| tracing::info!("in a span"));
            tracing::info!("message {forged}");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        for line in &lines {
            assert!(line.trim_start().starts_with("INFO"), "{line:?}");
            assert!(!line.contains(['\r', '\u{1b}', '\u{2028}']), "{line:?}");
        }
        assert!(lines[0].ends_with(
            r"upgrade refused reason=x\n2025-01-01T00:00:00Z  INFO session opened user.id=admin\r\u{1b}[2K\u{2028}"
        ), "{}", lines[0]);
        // Strings recorded as such keep the default format's quotes.
        assert!(lines[1].contains(r#"user.id="x\n2025"#), "{}", lines[1]);
    }
}
