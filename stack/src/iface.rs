//! The smoltcp interface shared by every flow.
//!
//! # Theory of operation
//!
//! One [`Interface`] serves every TCP flow; each flow keeps its own one-socket
//! `SocketSet` (smoltcp scans a whole set per packet, so a shared set would make every
//! packet cost O(flows): smoltcp#934). The interface runs with `any_ip`, so it accepts
//! segments for any destination: the destination is whatever host the guest connects to.

use core::num::NonZeroUsize;

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr};

use crate::device::GuestDevice;
use crate::l2::L2;
use crate::txq::TxQueue;

/// Largest IP packet smoltcp may hand the device for segmentation: the IPv4 total
/// length field's limit.
pub const TSO_MAX: usize = 65535;

/// Device capabilities for the guest link: IP medium, `mtu`. smoltcp never handles TCP
/// checksums: the device finishes them (see [`crate::device`]) and the forwarder verifies
/// the guest's. With `offload` (the TAP has `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`),
/// smoltcp builds IPv4 TCP super-frames of up to [`TSO_MAX`] bytes for the kernel to
/// segment.
pub fn capabilities(mtu: usize, offload: bool) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps.max_burst_size = None;
    let mut csum = ChecksumCapabilities::default();
    csum.ipv4 = Checksum::Both;
    csum.tcp = Checksum::None;
    csum.udp = Checksum::Both;
    caps.checksum = csum;
    if offload {
        caps.segmentation.tcpv4 = NonZeroUsize::new(TSO_MAX);
        caps.segmentation.tcpv6 = NonZeroUsize::new(TSO_MAX);
        // smoltcp 0.14's IPv6 egress ignores `segmentation_offload_size` and drops every
        // packet above its MTU as "needs fragmentation" (its TSO was only tested on IPv4,
        // smoltcp#1148). Its MTU only bounds our own MSS, though: segments are cut at
        // min(our MSS, the guest's MSS), and the guest announces an MSS that fits its MTU.
        // So with offloads smoltcp gets the TSO limit as MTU, super-frames pass the IPv6
        // size check, and the kernel cuts them at the guest's MSS (the vnet gso_size).
        // Everything else usernet sends is bounded by the link's real MTU.
        caps.max_transmission_unit = TSO_MAX;
    }
    caps
}

/// Builds the interface: our addresses (the gateways), `any_ip` on.
pub fn interface(
    now: Instant,
    caps: &DeviceCapabilities,
    l2: &mut L2,
    txq: &mut TxQueue,
    addrs: &[IpCidr],
    seed: u64,
) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed;
    let mut dev = GuestDevice::new(None, l2, txq, caps, None, caps.max_transmission_unit);
    let mut iface = Interface::new(config, &mut dev, now);
    iface.update_ip_addrs(|list| {
        for addr in addrs {
            if list.push(*addr).is_err() {
                log::warn!("smoltcp has no room for address {addr}");
            }
        }
    });
    iface.set_any_ip(true);
    iface
}
