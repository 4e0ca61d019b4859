//! usernet binary (being written).
fn main() {}
