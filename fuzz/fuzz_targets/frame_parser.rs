//! Guest frames into a forwarder that can reach nothing (host loopback off, no DNS
//! upstream, every IP destination rewritten to a refused address): the frame input
//! path must never panic, never hang, never open a host socket and never send the
//! guest a malformed frame. The input format is `common::replay_frames`'s: a mode byte
//! (vnet header, checksum repair, one frame or length-prefixed frames), then the
//! frame(s). A fresh forwarder per input, so that every finding reproduces.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Shared with `forwarder/tests/hostile.rs`; formatted there, not from here.
#[path = "../../forwarder/tests/common/mod.rs"]
#[allow(dead_code, unused_imports)]
#[rustfmt::skip]
mod common;

fuzz_target!(|data: &[u8]| common::replay_frames(data));
