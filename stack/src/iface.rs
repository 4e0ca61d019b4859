//! The smoltcp interface shared by every flow.
//!
//! # Theory of operation
//!
//! One [`Interface`] serves every TCP flow; each flow keeps its own one-socket
//! `SocketSet` (smoltcp scans a whole set per packet, so a shared set would make every
//! packet cost O(flows): smoltcp#934). The interface runs with `any_ip`, so it accepts
//! segments for any destination: the destination is whatever host the guest connects to.

use smoltcp::iface::{Config, Interface};
use smoltcp::phy::{Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::device::GuestDevice;
use crate::l2::L2;
use crate::txq::TxQueue;

/// Device capabilities for the guest link: IP medium, `mtu`, software checksums.
pub fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps.max_burst_size = None;
    let mut csum = ChecksumCapabilities::default();
    csum.ipv4 = Checksum::Both;
    csum.tcp = Checksum::Both;
    csum.udp = Checksum::Both;
    caps.checksum = csum;
    caps
}

/// Builds the interface: address `gateway/prefix`, `any_ip` on.
pub fn interface(
    now: Instant,
    caps: &DeviceCapabilities,
    l2: &mut L2,
    txq: &mut TxQueue,
    gateway: Ipv4Address,
    prefix_len: u8,
    seed: u64,
) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed;
    let mut dev = GuestDevice::new(None, l2, txq, caps, None);
    let mut iface = Interface::new(config, &mut dev, now);
    iface.update_ip_addrs(|addrs| {
        // The address list has room for several entries; the first push cannot fail.
        let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(gateway, prefix_len)));
    });
    iface.set_any_ip(true);
    iface
}
