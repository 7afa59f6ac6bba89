//! The `nuropb-gateway` binary. Composition root only. Implementation pending.
fn main() {}
