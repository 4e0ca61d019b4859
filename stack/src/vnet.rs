//! The `virtio_net_hdr` that prefixes every frame on a TAP opened with `IFF_VNET_HDR`.
//!
//! # Theory of operation
//!
//! With the vnet header the kernel can hand us TCP super-frames (GSO) and frames whose
//! checksum is still to be filled in (`NEEDS_CSUM`), and it accepts the same from us.
//! The header is 10 bytes, native endian (little endian on every machine we run on; a
//! big-endian host would need `TUNSETVNETLE`, which we do not support).
//!
//! The view follows smoltcp's `wire` style: [`VnetHeader`] wraps a buffer, `mod field`
//! holds the byte ranges, [`VnetRepr`] is the parsed form.

use core::fmt;

/// Errors of [`VnetHeader::new_checked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("buffer shorter than a virtio_net_hdr")
    }
}

mod field {
    pub type Field = core::ops::Range<usize>;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Field = 2..4;
    pub const GSO_SIZE: Field = 4..6;
    pub const CSUM_START: Field = 6..8;
    pub const CSUM_OFFSET: Field = 8..10;
}

/// Length of `struct virtio_net_hdr`.
pub const HEADER_LEN: usize = field::CSUM_OFFSET.end;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is to be
/// completed over `[csum_start, end)`.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified already.
pub const FLAG_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_*` values of the `gso_type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// A plain frame.
    None,
    /// A TCP/IPv4 super-frame to be cut into `gso_size` segments.
    TcpV4,
    /// A UDP super-frame (UFO).
    Udp,
    /// A TCP/IPv6 super-frame.
    TcpV6,
    /// Any other value.
    Unknown(u8),
}

const GSO_ECN: u8 = 0x80;

impl From<u8> for GsoType {
    fn from(v: u8) -> Self {
        match v & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            3 => GsoType::Udp,
            4 => GsoType::TcpV6,
            other => GsoType::Unknown(other),
        }
    }
}

impl From<GsoType> for u8 {
    fn from(v: GsoType) -> u8 {
        match v {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::Udp => 3,
            GsoType::TcpV6 => 4,
            GsoType::Unknown(other) => other,
        }
    }
}

/// A read/write view of a vnet header.
#[derive(Debug)]
pub struct VnetHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VnetHeader<T> {
    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> VnetHeader<T> {
        VnetHeader { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    ///
    /// # Errors
    /// [`Truncated`] when the buffer is shorter than [`HEADER_LEN`].
    pub fn new_checked(buffer: T) -> Result<VnetHeader<T>, Truncated> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Truncated);
        }
        Ok(VnetHeader { buffer })
    }

    fn u16_at(&self, f: field::Field) -> u16 {
        let b = &self.buffer.as_ref()[f];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The `flags` field.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    /// The `gso_type` field.
    pub fn gso_type(&self) -> GsoType {
        GsoType::from(self.buffer.as_ref()[field::GSO_TYPE])
    }
    /// The `hdr_len` field: length of the headers to replicate per segment.
    pub fn hdr_len(&self) -> u16 {
        self.u16_at(field::HDR_LEN)
    }
    /// The `gso_size` field: payload bytes per segment.
    pub fn gso_size(&self) -> u16 {
        self.u16_at(field::GSO_SIZE)
    }
    /// The `csum_start` field, from the start of the Ethernet frame.
    pub fn csum_start(&self) -> u16 {
        self.u16_at(field::CSUM_START)
    }
    /// The `csum_offset` field, from `csum_start`.
    pub fn csum_offset(&self) -> u16 {
        self.u16_at(field::CSUM_OFFSET)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VnetHeader<T> {
    fn set_u16_at(&mut self, f: field::Field, v: u16) {
        self.buffer.as_mut()[f].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets the `flags` field.
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::FLAGS] = v;
    }
    /// Sets the `gso_type` field.
    pub fn set_gso_type(&mut self, v: GsoType) {
        self.buffer.as_mut()[field::GSO_TYPE] = v.into();
    }
    /// Sets the `hdr_len` field.
    pub fn set_hdr_len(&mut self, v: u16) {
        self.set_u16_at(field::HDR_LEN, v);
    }
    /// Sets the `gso_size` field.
    pub fn set_gso_size(&mut self, v: u16) {
        self.set_u16_at(field::GSO_SIZE, v);
    }
    /// Sets the `csum_start` field.
    pub fn set_csum_start(&mut self, v: u16) {
        self.set_u16_at(field::CSUM_START, v);
    }
    /// Sets the `csum_offset` field.
    pub fn set_csum_offset(&mut self, v: u16) {
        self.set_u16_at(field::CSUM_OFFSET, v);
    }
}

/// The parsed form of a vnet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetRepr {
    /// `VIRTIO_NET_HDR_F_*` bits.
    pub flags: u8,
    /// Segmentation requested.
    pub gso_type: GsoType,
    /// Header bytes replicated per segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed region starts.
    pub csum_start: u16,
    /// Where the checksum field sits, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetRepr {
    /// A header for a plain frame with a complete checksum.
    pub const PLAIN: VnetRepr = VnetRepr {
        flags: 0,
        gso_type: GsoType::None,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Parses a header.
    pub fn parse<T: AsRef<[u8]>>(hdr: &VnetHeader<T>) -> VnetRepr {
        VnetRepr {
            flags: hdr.flags(),
            gso_type: hdr.gso_type(),
            hdr_len: hdr.hdr_len(),
            gso_size: hdr.gso_size(),
            csum_start: hdr.csum_start(),
            csum_offset: hdr.csum_offset(),
        }
    }

    /// Length of the emitted header.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, hdr: &mut VnetHeader<T>) {
        hdr.set_flags(self.flags);
        hdr.set_gso_type(self.gso_type);
        hdr.set_hdr_len(self.hdr_len);
        hdr.set_gso_size(self.gso_size);
        hdr.set_csum_start(self.csum_start);
        hdr.set_csum_offset(self.csum_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A TCP/IPv4 super-frame header: NEEDS_CSUM, GSO_TCPV4, hdr_len 66, gso_size 1448,
    // csum_start 34 (14 Ethernet + 20 IPv4), csum_offset 16 (TCP checksum field).
    static HEADER_BYTES: [u8; 10] = [0x01, 0x01, 0x42, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00];

    const REPR: VnetRepr = VnetRepr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };

    #[test]
    fn parse_tso_header() {
        let hdr = VnetHeader::new_checked(&HEADER_BYTES[..]).unwrap();
        assert_eq!(VnetRepr::parse(&hdr), REPR);
    }

    #[test]
    fn emit_tso_header() {
        let mut bytes = [0u8; 10];
        REPR.emit(&mut VnetHeader::new_unchecked(&mut bytes[..]));
        assert_eq!(bytes, HEADER_BYTES);
    }

    #[test]
    fn new_checked_truncated_fails() {
        assert_eq!(
            VnetHeader::new_checked(&HEADER_BYTES[..9]).unwrap_err(),
            Truncated
        );
    }

    #[test]
    fn gso_type_ecn_bit_ignored() {
        assert_eq!(GsoType::from(0x81), GsoType::TcpV4);
        assert_eq!(GsoType::from(7), GsoType::Unknown(7));
    }
}
