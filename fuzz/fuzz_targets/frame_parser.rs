//! Guest frames, as they are, into a forwarder open to everything over the in-memory
//! host (every flow opens, in memory; nothing leaves the process), which then runs on
//! its fake clock until its datagram flows expire: the frame input path must never
//! panic, never hang, never send the guest a malformed frame, never exceed a table
//! limit, and its flows and host sockets must agree. The input format is
//! `common::replay_frames`'s: a mode byte (vnet header, checksum repair, one frame or
//! length-prefixed frames, what the host does), then the frame(s). A fresh forwarder
//! per input, so that every finding reproduces.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Shared with `forwarder/tests/hostile.rs`; formatted there, not from here.
#[path = "../../forwarder/tests/common/mod.rs"]
#[allow(dead_code, unused_imports)]
#[rustfmt::skip]
mod common;

fuzz_target!(|data: &[u8]| common::replay_frames(data));
