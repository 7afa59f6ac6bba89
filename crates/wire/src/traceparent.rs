//! W3C Trace Context `traceparent` values (<https://www.w3.org/TR/trace-context/>), checked
//! strictly: version `00` only, exactly 55 characters
//! (`00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`), lowercase hex, neither id all
//! zeros. Anything else is refused, so nothing malformed is carried into the mesh.

/// The length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

/// Why `value` is not a valid `traceparent`, if it is not.
pub fn check_traceparent(value: &str) -> Result<(), &'static str> {
    let b = value.as_bytes();
    if b.len() != TRACEPARENT_LEN {
        return Err("must be 55 characters (version 00)");
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return Err("must be `00-<trace-id>-<parent-id>-<flags>`");
    }
    let lower_hex = |part: &[u8]| part.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace_id, parent_id, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..]);
    if !(lower_hex(version) && lower_hex(trace_id) && lower_hex(parent_id) && lower_hex(flags)) {
        return Err("must be lowercase hexadecimal");
    }
    if version != b"00" {
        return Err("version must be 00");
    }
    if trace_id.iter().all(|&c| c == b'0') {
        return Err("trace-id must not be all zeros");
    }
    if parent_id.iter().all(|&c| c == b'0') {
        return Err("parent-id must not be all zeros");
    }
    Ok(())
}

/// `traceparent` with its parent-id replaced by `parent_id` (16 lowercase hex, not all
/// zeros), or `None` when either is not valid. The gateway gives each call of a session
/// that named one `traceparent` at its upgrade a parent-id of its own, so the calls are told
/// apart (and their answers can be matched) while sharing the trace.
pub fn with_parent_id(traceparent: &str, parent_id: &str) -> Option<String> {
    check_traceparent(traceparent).ok()?;
    // `check_traceparent` proved every byte ASCII, so these are character boundaries.
    let child = format!("{}{parent_id}{}", &traceparent[..36], &traceparent[52..]);
    check_traceparent(&child).ok()?;
    Some(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_parent_id_keeps_the_trace_and_the_flags() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            with_parent_id(tp, "1111222233334444").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01")
        );
        assert_eq!(with_parent_id(tp, "0000000000000000"), None);
        assert_eq!(with_parent_id(tp, "short"), None);
        assert_eq!(with_parent_id("junk", "1111222233334444"), None);
    }

    #[test]
    fn only_strict_version_00_values_pass() {
        let check = |v: &str, expected: Result<(), &str>| {
            assert_eq!(check_traceparent(v), expected, "{v:?}");
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        check(good, Ok(()));
        check("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", Ok(()));
        check("", Err("must be 55 characters (version 00)"));
        check(&format!("{good}-extra"), Err("must be 55 characters (version 00)"));
        check(&good.to_uppercase(), Err("must be lowercase hexadecimal"));
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            Err("must be lowercase hexadecimal"),
        );
        check(
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Err("must be `00-<trace-id>-<parent-id>-<flags>`"),
        );
        check("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Err("version must be 00"));
        check("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Err("version must be 00"));
        check(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            Err("trace-id must not be all zeros"),
        );
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            Err("parent-id must not be all zeros"),
        );
        // Multi-byte characters of the right byte length are not hex either.
        check(
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            Err("must be lowercase hexadecimal"),
        );
    }
}
