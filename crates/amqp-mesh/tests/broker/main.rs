//! Broker tests (pending).
fn main() {}
