//! `cargo xtask`: CI gates, integration, interop and benchmarks. Implementation pending.
fn main() {}
