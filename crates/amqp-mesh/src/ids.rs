//! Identifiers the adapter mints: correlation ids in nuropb's format.

/// A fresh correlation id: 32 lowercase hex, like nuropb's `uuid4().hex`.
pub(crate) fn new_correlation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_uuid_hex() {
        let id = new_correlation_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}
