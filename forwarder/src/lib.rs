//! # usernet forwarder: the host-facing side
#![deny(unsafe_code)]

pub mod dhcp;
