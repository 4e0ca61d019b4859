//! # usernet stack: the guest-facing side
//!
//! Layering, from the wire up:
//!
//! 1. [`sys::tap`]: the TAP file descriptor (create, attach, vnet header, offloads).
//!    [`sys::link`] configures a link inside a namespace with a few ioctls.
//! 2. [`vnet`]: the `virtio_net_hdr` that prefixes every frame when the TAP runs with
//!    `IFF_VNET_HDR`.
//!    [`csum`] finishes the partial checksums it announces that usernet would pass on
//!    unfinished (tunnelled traffic).
//! 3. [`l2`]: a thin Ethernet + ARP layer that answers only for usernet's virtual
//!    addresses and remembers the guest's MAC address.
//! 4. [`txq`]: a preallocated queue of outgoing frames; everything the guest receives is
//!    built in place there.
//! 5. [`device`]: the smoltcp [`smoltcp::phy::Device`] (medium IP) over one received
//!    frame and the transmit queue; [`iface`] builds the smoltcp `Interface`.
//!
//! Invariants: nothing here allocates per frame; malformed input is dropped and counted
//! by the caller, never a panic; only `sys/` holds `unsafe` code.

#![deny(unsafe_code)]

pub mod csum;
pub mod device;
pub mod iface;
pub mod l2;
pub mod sys;
pub mod txq;
pub mod vnet;
