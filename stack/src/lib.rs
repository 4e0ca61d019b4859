//! # usernet stack: the guest-facing side
//!
//! Layering, from the wire up:
//!
//! 1. [`vnet`]: the `virtio_net_hdr` that prefixes every frame when the TAP runs with
//!    `IFF_VNET_HDR`.
//!    [`csum`] finishes the partial checksums it announces that usernet would pass on
//!    unfinished (tunnelled traffic).
//! 2. [`l2`]: a thin Ethernet + ARP layer that answers only for usernet's virtual
//!    addresses and remembers the guest's MAC address.
//! 3. [`txq`]: a preallocated queue of outgoing frames; everything the guest receives is
//!    built in place there.
//! 4. [`device`]: the smoltcp [`smoltcp::phy::Device`] (medium IP) over one received
//!    frame and the transmit queue; [`iface`] builds the smoltcp `Interface`.
//!
//! The TAP device and the link's configuration (system calls) are the binary's, in its
//! `sys/`: this crate makes no system call and has no `unsafe` code.
//!
//! Invariants: nothing here allocates per frame; malformed input is dropped and counted
//! by the caller, never a panic.

#![forbid(unsafe_code)]

pub mod csum;
pub mod device;
pub mod iface;
pub mod l2;
pub mod txq;
pub mod vnet;
