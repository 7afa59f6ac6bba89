//! Identifiers the adapter mints: correlation ids in nuropb's format.

/// A fresh correlation id: 32 lowercase hex, like nuropb's `uuid4().hex`. The random bytes
/// come from the thread-local generator (seeded from the OS once per thread), not from
/// `Uuid::new_v4`, which asks the OS (a `getrandom` syscall) for every id.
pub(crate) fn new_correlation_id() -> String {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_uuid_hex() {
        let id = new_correlation_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(&id[12..13], "4", "a version 4 uuid");
        assert_ne!(id, new_correlation_id());
    }
}
