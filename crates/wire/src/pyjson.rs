//! The JSON dialect of Python's `json` module as nuropb uses it (spec §4): encoding with
//! `", "`/`": "` separators and `\uXXXX` escapes (`ensure_ascii`), and lenient decoding of
//! what Python may emit (`NaN`, `Infinity`, `-Infinity`, lone surrogate escapes).
//!
//! Encoding goes through serde_json with [`PythonFormatter`], so any `Serialize` value works
//! and object keys keep their insertion order (`serde_json/preserve_order`). Decoding first
//! runs a streaming pre-pass over the bytes (`sanitize`) that rewrites the few constructs
//! Python accepts but strict JSON does not, then hands the result to serde_json.
//!
//! Known differences from Python that no amount of formatting can hide (none occurs in the
//! captured vectors):
//! - integers beyond the `i64`/`u64` range are parsed as floats by serde_json (Python keeps
//!   them exact), so they come back in float notation;
//! - non-finite floats are encoded as `null` (serde_json never hands them to a formatter;
//!   Python would write `NaN`/`Infinity`, which strict peers reject anyway);
//! - a lone surrogate escape decodes to U+FFFD and so re-encodes as `\ufffd`;
//! - serde_json refuses nesting deeper than 127 levels; Python's limit is about 1000.

use std::borrow::Cow;
use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::ser::{CompactFormatter, Formatter};

/// Encoding or decoding Python-style JSON failed. The serde_json error is the source.
#[derive(Debug, thiserror::Error)]
pub enum PyJsonError {
    /// The value cannot be represented as JSON (e.g. a map with non-string keys).
    #[error("cannot encode value as python json")]
    Encode(#[source] serde_json::Error),
    /// The bytes are not JSON even after the lenient pre-pass, or do not fit the target
    /// type. Positions in the source error refer to the pre-processed text, which differs
    /// from the input only where `NaN`/`Infinity` tokens were replaced.
    #[error("cannot decode python json")]
    Decode(#[source] serde_json::Error),
}

/// Encodes `value` exactly as Python's `json.dumps(obj)` with default settings would.
pub fn to_python_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PyJsonError> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut serializer).map_err(PyJsonError::Encode)?;
    Ok(out)
}

/// Decodes JSON written by Python, tolerating what `json.dumps` may produce beyond strict
/// JSON:
/// - bare `NaN`, `Infinity` and `-Infinity` outside strings become `null`. serde_json cannot
///   represent non-finite numbers at all, `null` is what serde_json (and JavaScript's
///   `JSON.stringify`) writes for them, and failing the whole message over one number would
///   lose an otherwise good response;
/// - a `\uD800`–`\uDBFF` escape not followed by a low-surrogate escape, and a `\uDC00`–
///   `\uDFFF` escape not preceded by a high one, become `\ufffd` (U+FFFD): Python strings
///   may hold lone surrogates, Rust strings cannot.
///
/// Everything else is strict; invalid input is an error, never a panic.
///
/// Strict JSON is tried first, as it is what nearly every body is: the pre-pass runs only
/// when that fails, and the input is read again only if the pre-pass rewrote something. A
/// strict reading never differs from a lenient one: serde_json refuses the non-finite tokens
/// and lone surrogates in any string it keeps, and a lone surrogate in a member the target
/// skips is never read.
pub fn from_python_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PyJsonError> {
    // UTF-8 checked once for the whole body (nuropb's bodies are ASCII), not string by string
    // as `from_slice` checks it; the same value either way.
    let strict = match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    };
    match strict {
        Ok(value) => Ok(value),
        Err(strict) => match sanitize(bytes) {
            Cow::Borrowed(_) => Err(PyJsonError::Decode(strict)),
            Cow::Owned(cleaned) => serde_json::from_slice(&cleaned).map_err(PyJsonError::Decode),
        },
    }
}

/// A serde_json [`Formatter`] reproducing Python's `json.dumps` defaults. Public so callers
/// can write into their own buffers with `serde_json::Serializer::with_formatter`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        // Python has no f32; the shortest f32 digits are what the value was meant to be.
        let mut shortest = Vec::with_capacity(24);
        CompactFormatter.write_f32(&mut shortest, value)?;
        write_python_float(writer, &shortest)
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        let mut shortest = Vec::with_capacity(24);
        CompactFormatter.write_f64(&mut shortest, value)?;
        write_python_float(writer, &shortest)
    }

    /// serde_json already escapes `"`, `\` and the C0 controls (exactly as Python does:
    /// `\b \f \n \r \t`, otherwise `\u00XX` in lowercase) and passes everything else here.
    /// `ensure_ascii` escapes every character outside `' '..='~'`, so DEL (0x7f) too.
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        // Most strings are printable ASCII throughout: written in one piece. A fragment holds
        // no byte below 0x20 (serde_json escaped those), so ASCII without DEL is printable;
        // both checks go a word at a time, not byte by byte.
        if bytes.is_ascii() && !bytes.contains(&0x7f) {
            return writer.write_all(bytes);
        }
        let first = bytes.iter().position(|b| !(b' '..=b'~').contains(b)).unwrap_or(0);
        let mut start = 0;
        for (index, ch) in fragment.char_indices().skip_while(|(index, _)| *index < first) {
            if (' '..='~').contains(&ch) {
                continue;
            }
            writer.write_all(&bytes[start..index])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write_unicode_escape(writer, *unit)?;
            }
            start = index + ch.len_utf8();
        }
        writer.write_all(&bytes[start..])
    }
}

fn write_unicode_escape<W: ?Sized + io::Write>(writer: &mut W, unit: u16) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let nibble = |shift: u16| HEX[usize::from((unit >> shift) & 0xf)];
    writer.write_all(&[b'\\', b'u', nibble(12), nibble(8), nibble(4), nibble(0)])
}

/// Lays out a float the way Python's `float.__repr__` does. `shortest` is serde_json's
/// rendering of the value (e.g. `1059438285926254.2`, `1e16`, `-1.5e-7`): the shortest
/// digit string that reads back to the same value, ties rounded to even, exactly the digits
/// Python's `repr` picks (Rust's own `{:e}` rounds such ties up, so it is not used). Only the
/// layout differs: Python uses exponent notation when the decimal point position is `<= -4`
/// or `> 16`, writes the exponent with a sign and at least two digits (`1e+16`, `1e-05`),
/// and adds `.0` to integral values in positional notation.
fn write_python_float<W: ?Sized + io::Write>(writer: &mut W, shortest: &[u8]) -> io::Result<()> {
    let (negative, unsigned) = match shortest.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, shortest),
    };
    let (mantissa, exponent) = match unsigned.iter().position(|&b| b == b'e' || b == b'E') {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, &b"0"[..]),
    };
    let exponent: i32 = std::str::from_utf8(exponent)
        .ok()
        .and_then(|e| e.trim_start_matches('+').parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected float format"))?;
    let (int_part, frac_part) = match mantissa.iter().position(|&b| b == b'.') {
        Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
        None => (mantissa, &b""[..]),
    };
    // Normalise to value = 0.DIGITS × 10^decpt with no leading or trailing zero digits
    // (Python's `decpt`); zero is "0" with decpt 1, as Python's dtoa returns it.
    let mut digits: Vec<u8> = int_part.iter().chain(frac_part).copied().collect();
    let mut decpt = i32::try_from(int_part.len()).unwrap_or(i32::MAX).saturating_add(exponent);
    let leading = digits.iter().take_while(|&&d| d == b'0').count();
    digits.drain(..leading);
    decpt = decpt.saturating_sub(i32::try_from(leading).unwrap_or(i32::MAX));
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if digits.is_empty() {
        digits.push(b'0');
        decpt = 1;
    }

    let mut out = Vec::with_capacity(digits.len() + 8);
    if negative {
        out.push(b'-');
    }
    if decpt <= -4 || decpt > 16 {
        let (lead, rest) = digits.split_at(1);
        out.extend_from_slice(lead);
        if !rest.is_empty() {
            out.push(b'.');
            out.extend_from_slice(rest);
        }
        let exp = decpt - 1;
        out.extend_from_slice(
            format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()).as_bytes(),
        );
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', decpt.unsigned_abs() as usize));
        out.extend_from_slice(&digits);
    } else {
        let point = decpt.unsigned_abs() as usize;
        if point >= digits.len() {
            out.extend_from_slice(&digits);
            out.extend(std::iter::repeat_n(b'0', point - digits.len()));
            out.extend_from_slice(b".0");
        } else {
            let (int_digits, frac_digits) = digits.split_at(point);
            out.extend_from_slice(int_digits);
            out.push(b'.');
            out.extend_from_slice(frac_digits);
        }
    }
    writer.write_all(&out)
}

/// The lenient pre-pass of [`from_python_json`]: one forward scan that tracks whether it is
/// inside a string literal and rewrites only (a) the non-finite number tokens outside
/// strings and (b) unpaired surrogate escapes inside strings. Borrowed when nothing needs
/// rewriting (the usual case). Invalid UTF-8 and malformed escapes pass through untouched
/// for serde_json to reject.
///
/// Invariant: every index used is checked against the input length (`get`, `starts_with`),
/// so no input can make this panic.
fn sanitize(input: &[u8]) -> Cow<'_, [u8]> {
    let mut rewriter = Rewriter { input, out: None, copied: 0 };
    let mut i = 0;
    let mut in_string = false;
    while let Some(&byte) = input.get(i) {
        if in_string {
            match byte {
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                b'\\' if input.get(i + 1) == Some(&b'u') => match hex4(input, i + 2) {
                    Some(unit) if is_high_surrogate(unit) => {
                        let paired = input.get(i + 6) == Some(&b'\\')
                            && input.get(i + 7) == Some(&b'u')
                            && hex4(input, i + 8).is_some_and(is_low_surrogate);
                        if paired {
                            i += 12;
                        } else {
                            rewriter.replace(i, i + 6, b"\\ufffd");
                            i += 6;
                        }
                    }
                    Some(unit) if is_low_surrogate(unit) => {
                        rewriter.replace(i, i + 6, b"\\ufffd");
                        i += 6;
                    }
                    Some(_) => i += 6,
                    // Malformed `\u` escape: leave it for serde_json to report.
                    None => i += 2,
                },
                // Any other escape is two bytes; skipping both keeps `\"` inside the string.
                b'\\' => i += 2,
                // The bulk of a body: skip to the next quote or backslash in one pass.
                _ => i = skip_until(input, i + 1, |b| b == b'"' || b == b'\\'),
            }
        } else {
            let rest = &input[i..];
            if byte == b'"' {
                in_string = true;
                i += 1;
            } else if rest.starts_with(b"NaN") {
                rewriter.replace(i, i + 3, b"null");
                i += 3;
            } else if rest.starts_with(b"Infinity") {
                rewriter.replace(i, i + 8, b"null");
                i += 8;
            } else if rest.starts_with(b"-Infinity") {
                rewriter.replace(i, i + 9, b"null");
                i += 9;
            } else {
                // Only a quote or the first letter of a non-finite token matters here.
                i = skip_until(input, i + 1, |b| matches!(b, b'"' | b'N' | b'I' | b'-'));
            }
        }
    }
    rewriter.finish()
}

/// The index of the first byte at or after `from` that `stop` accepts, or the input's length.
fn skip_until(input: &[u8], from: usize, stop: impl Fn(u8) -> bool) -> usize {
    let rest = input.get(from..).unwrap_or_default();
    from + rest.iter().position(|&b| stop(b)).unwrap_or(rest.len())
}

struct Rewriter<'a> {
    input: &'a [u8],
    /// Allocated on the first replacement.
    out: Option<Vec<u8>>,
    /// Invariant: `input[..copied]` has been copied (or replaced) into `out`.
    copied: usize,
}

impl<'a> Rewriter<'a> {
    /// Replaces `input[start..end]` (which the caller has matched, so it is in bounds and
    /// at or after `copied`) with `with`.
    fn replace(&mut self, start: usize, end: usize, with: &[u8]) {
        let out = self.out.get_or_insert_with(|| Vec::with_capacity(self.input.len() + 16));
        out.extend_from_slice(self.input.get(self.copied..start).unwrap_or_default());
        out.extend_from_slice(with);
        self.copied = end;
    }

    fn finish(self) -> Cow<'a, [u8]> {
        match self.out {
            None => Cow::Borrowed(self.input),
            Some(mut out) => {
                out.extend_from_slice(self.input.get(self.copied..).unwrap_or_default());
                Cow::Owned(out)
            }
        }
    }
}

/// The four hex digits at `input[at..at + 4]` as a UTF-16 code unit.
fn hex4(input: &[u8], at: usize) -> Option<u16> {
    let digits = input.get(at..at.checked_add(4)?)?;
    digits.iter().try_fold(0u16, |acc, &d| {
        let nibble = (d as char).to_digit(16)?;
        Some((acc << 4) | nibble as u16)
    })
}

fn is_high_surrogate(unit: u16) -> bool {
    (0xD800..=0xDBFF).contains(&unit)
}

fn is_low_surrogate(unit: u16) -> bool {
    (0xDC00..=0xDFFF).contains(&unit)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn encode(value: &Value) -> String {
        String::from_utf8(to_python_json(value).expect("encodes")).expect("ascii output")
    }

    /// Reading strict JSON first changes no outcome: every input reads exactly as through
    /// the pre-pass, for a value tree and for a target that skips members.
    #[test]
    fn strict_first_reads_as_the_pre_pass_does() {
        fn old<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
            serde_json::from_slice(&sanitize(bytes)).ok()
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Some1 {
            a: Option<String>,
        }
        let inputs: [&[u8]; 14] = [
            br#"{"a": "\ud800"}"#,
            br#"{"a": "\udc00x"}"#,
            br#"{"a": "\ud83d\ude00"}"#,
            br#"{"b": "\ud800", "a": "ok"}"#,
            br#"{"a": NaN}"#,
            br#"{"b": [Infinity, -Infinity], "a": "x"}"#,
            br#"{"a": "NaN Infinity"}"#,
            br#"{"a": "\u0041\\"}"#,
            br#"{"a": 1"#,
            br#"{"a": "\uZZZZ"}"#,
            b"[1, 2]",
            b"NaN",
            b"{\"a\": \"\xff\"}",
            b"",
        ];
        for input in inputs {
            let shown = String::from_utf8_lossy(input);
            assert_eq!(from_python_json::<Value>(input).ok(), old::<Value>(input), "{shown}");
            assert_eq!(from_python_json::<Some1>(input).ok(), old::<Some1>(input), "{shown}");
        }
        assert!(
            serde_json::from_slice::<Value>(br#"["\ud800"]"#).is_err(),
            "serde_json refuses it"
        );
    }

    /// Expected strings are what CPython 3 `json.dumps` prints for the same value.
    #[test]
    fn encodes_like_python() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({}), "{}"),
            (json!([]), "[]"),
            (json!(null), "null"),
            (json!(true), "true"),
            (json!({"a": 1, "b": [1, 2.5, null, true]}), r#"{"a": 1, "b": [1, 2.5, null, true]}"#),
            (json!([[], {}, [1, [2, {}]]]), "[[], {}, [1, [2, {}]]]"),
            (json!({"z": 1, "a": 2, "m": 3}), r#"{"z": 1, "a": 2, "m": 3}"#),
            (json!(-42), "-42"),
            (json!(u64::MAX), "18446744073709551615"),
            (json!(i64::MIN), "-9223372036854775808"),
            (json!("h\u{e9}llo \u{2713}"), r#""h\u00e9llo \u2713""#),
            (json!("\u{1F600}"), r#""\ud83d\ude00""#),
            (json!("\u{7f}\u{80}\u{ffff}"), r#""\u007f\u0080\uffff""#),
            (json!("\n\t\u{8}\u{c}\r\u{1}\u{1f}\"\\/"), r#""\n\t\b\f\r\u0001\u001f\"\\/""#),
            (json!("plain ascii ~ !"), r#""plain ascii ~ !""#),
            (json!({"cl\u{e9}": "v"}), r#"{"cl\u00e9": "v"}"#),
            (json!(""), r#""""#),
        ];
        for (value, expected) in cases {
            assert_eq!(encode(&value), expected, "encoding {value:?}");
        }
    }

    /// Numbers are read correctly rounded, as CPython's `float()` reads them, so what a
    /// service sent is what the client gets (found by the `mesh_body` fuzz target: an
    /// integer of 53 digits decoded one ulp off, and the value changed on re-encoding).
    #[test]
    fn numbers_decode_correctly_rounded() {
        let big = format!("{}0", "7".repeat(52));
        for text in [big.as_str(), "7.777777777777777e+52", "2.2250738585072011e-308", "0.1"] {
            let value: Value = from_python_json(text.as_bytes()).expect("decodes");
            let expected: f64 = text.parse().expect("a float");
            assert_eq!(value.as_f64(), Some(expected), "{text}");
            let again: Value =
                from_python_json(&to_python_json(&value).expect("encodes")).expect("decodes again");
            assert_eq!(again, value, "{text}");
        }
    }

    /// Cross-checked once against CPython's `json.dumps` on 256k random doubles.
    #[test]
    #[allow(
        clippy::excessive_precision,
        reason = "the tie cases are exact binary values written out in full"
    )]
    fn floats_use_python_repr() {
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (-1.5, "-1.5"),
            (0.1, "0.1"),
            (0.3, "0.3"),
            (1.0 / 3.0, "0.3333333333333333"),
            (123456789.123, "123456789.123"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1e22, "1e+22"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (9007199254740993.0, "9007199254740992.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123e-7, "1.23e-05"),
            (1.5e-7, "1.5e-07"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-2.5e100, "-2.5e+100"),
            // Ties between two shortest candidates round to even, as in CPython.
            (1059438285926254.25, "1059438285926254.2"),
            (26363981746409.3125, "26363981746409.312"),
        ];
        for &(value, expected) in cases {
            assert_eq!(encode(&json!(value)), expected, "encoding {value:e}");
        }
        // Non-finite floats cannot be in a `Value`; through `Serialize` they become `null`.
        let encoded = to_python_json(&[f64::NAN, f64::INFINITY]).expect("encodes");
        assert_eq!(encoded, b"[null, null]");
        assert_eq!(to_python_json(&0.1f32).expect("encodes"), b"0.1");
        // Float map keys go through the same formatter.
        let map: std::collections::BTreeMap<u8, f64> = [(1, 1.0)].into();
        assert_eq!(to_python_json(&map).expect("encodes"), br#"{"1": 1.0}"#);
    }

    #[test]
    fn encoding_reports_unrepresentable_values() {
        let map: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let err = to_python_json(&map).expect_err("tuple keys are not JSON");
        assert!(matches!(err, PyJsonError::Encode(_)));
        assert_eq!(err.to_string(), "cannot encode value as python json");
    }

    #[derive(Debug)]
    enum Outcome {
        Value(Value),
        Error,
    }

    /// A fuzz-ish table: every input must give the stated outcome, and none may panic.
    #[test]
    fn decodes_leniently_and_never_panics() {
        use Outcome::{Error, Value as V};
        let cases: Vec<(&[u8], Outcome)> = vec![
            (br#"{"a": NaN}"#, V(json!({"a": null}))),
            (br#"[NaN, Infinity, -Infinity, 1]"#, V(json!([null, null, null, 1]))),
            (b"NaN", V(json!(null))),
            (b"-Infinity", V(json!(null))),
            (
                br#"{"NaN": "Infinity", "s": "-Infinity NaN"}"#,
                V(json!({"NaN": "Infinity", "s": "-Infinity NaN"})),
            ),
            (br#"["\"NaN\"", NaN]"#, V(json!(["\"NaN\"", null]))),
            (br#"["\\", NaN]"#, V(json!(["\\", null]))),
            (br#""\ud83d\ude00""#, V(json!("\u{1F600}"))),
            (br#""\uD83D\uDE00""#, V(json!("\u{1F600}"))),
            (br#""\ud800""#, V(json!("\u{fffd}"))),
            (br#""\udc00""#, V(json!("\u{fffd}"))),
            (br#""a\ud800b""#, V(json!("a\u{fffd}b"))),
            (br#""\ud800\u0041""#, V(json!("\u{fffd}A"))),
            (br#""\ud800\ud800\udc00""#, V(json!("\u{fffd}\u{10000}"))),
            (br#""\udc00\ud800""#, V(json!("\u{fffd}\u{fffd}"))),
            (br#""\ud800\""#, Error),
            (br#""\ud800"#, Error),
            (br#""\ud8"#, Error),
            (br#""\u""#, Error),
            (br#""\uzzzz""#, Error),
            (br#""\"#, Error),
            (b"\\", Error),
            (b"\"", Error),
            (b"", Error),
            (b"   ", Error),
            (b"Na", Error),
            (b"NaNaN", Error),
            (b"nan", Error),
            (b"-NaN", Error),
            (b"+Infinity", Error),
            (b"Infinit", Error),
            (b"-", Error),
            (b"{", Error),
            (b"[1, 2", Error),
            (b"{\"a\" NaN}", Error),
            (b"\xff\xfe", Error),
            (b"\"\xff\"", Error),
            (b"\"\xe9\"", Error),
            (b"[\"\xc3\xa9\", NaN]", V(json!(["\u{e9}", null]))),
            (b"\x00", Error),
            (b"not json at all", Error),
            (b"{\"tag\": \"x\"} trailing", Error),
            (br#"{"a": 1, "a": 2}"#, V(json!({"a": 2}))),
            (b" [1, 2, 3] ", V(json!([1, 2, 3]))),
        ];
        for (input, expected) in cases {
            let shown = String::from_utf8_lossy(input);
            let got = from_python_json::<Value>(input);
            match (&expected, got) {
                (V(want), Ok(value)) => assert_eq!(&value, want, "decoding {shown}"),
                (Error, Err(err)) => {
                    assert!(matches!(err, PyJsonError::Decode(_)), "decoding {shown}");
                    assert_eq!(err.to_string(), "cannot decode python json");
                }
                (_, got) => panic!("decoding {shown}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    /// Every prefix of some tricky inputs, and a deterministic pseudo-random byte soup over a
    /// JSON-ish alphabet: decoding may fail but must not panic, and the pre-pass must leave
    /// inputs it has nothing to rewrite untouched.
    #[test]
    fn pre_pass_survives_truncation_and_noise() {
        let seeds: &[&[u8]] = &[
            br#"{"a": [NaN, "\ud800\udc00", "\ud800", -Infinity], "b\"": "\\u0041"}"#,
            b"[\"\\uDBFF\\uDFFF\", Infinity, \"\xc3\xa9\"]",
        ];
        for seed in seeds {
            for end in 0..=seed.len() {
                let _ = from_python_json::<Value>(&seed[..end]);
            }
        }
        let alphabet = b"\"\\u0d8cDfF{}[],:NaInfity-1 \xc3\xa9";
        let mut state: u32 = 0x1234_5678;
        for _ in 0..2_000 {
            let len = (state % 40) as usize;
            let mut input = Vec::with_capacity(len);
            for _ in 0..len {
                // xorshift32: deterministic, no dependency.
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                input.push(alphabet[state as usize % alphabet.len()]);
            }
            let _ = from_python_json::<Value>(&input);
        }
        let clean = br#"{"a": [1, 2.5, "x\u00e9"]}"#;
        assert!(matches!(sanitize(clean), Cow::Borrowed(_)));
    }

    #[test]
    fn decodes_into_typed_values() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Reading {
            value: Option<f64>,
        }
        let got: Reading = from_python_json(br#"{"value": NaN}"#).expect("decodes");
        assert_eq!(got, Reading { value: None });
        let err = from_python_json::<Reading>(br#"{"value": "x"}"#).expect_err("wrong type");
        assert!(matches!(err, PyJsonError::Decode(_)));
    }

    #[test]
    fn round_trips_python_output() {
        let cases: &[&str] = &[
            r#"{"tag": "request", "params": {"text": "h\u00e9llo \u2713", "emoji": "\ud83d\ude00"}, "n": [1, 2.5, null, true, false, -0.0, 1e-05, 1e+16]}"#,
            r#"{"s": "line\nbreak \"quoted\" back\\slash \u0001 \u007f"}"#,
            r#"[]"#,
        ];
        for case in cases {
            let value: Value = from_python_json(case.as_bytes()).expect("decodes");
            assert_eq!(encode(&value), *case);
        }
    }
}
