//! System interfaces: the only place in this crate with `unsafe` code.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment naming the invariants it relies on.

#![allow(unsafe_code)]

pub mod link;
pub mod tap;
