//! Packet capture of the guest link (`--pcap FILE`, pasta's `-p/--pcap`).
//!
//! # Theory of operation
//!
//! Every frame read from or written to the TAP is appended to FILE in the classic pcap
//! format (microsecond timestamps, link type Ethernet), which tcpdump and Wireshark read.
//! The vnet header in front of each frame is left out; TCP super-frames of the offloads
//! are recorded as they cross the TAP (up to 64 KiB, as tcpdump shows them on a TAP
//! with TSO). A partial checksum the vnet header announces (checksum offload: the field
//! holds only the pseudo-header sum) is finished in the recorded copy
//! ([`stack::csum::announced`]), so the capture's readers, who never see the vnet
//! header, find correct checksums (a super-frame's are left as they are). Writes are buffered and flushed after each event-loop turn that recorded
//! something, so the file is complete whenever usernet is idle.
//!
//! Bound: the file stops growing at [`MAX_BYTES`]; later frames are counted, not
//! written, and a warning says so once. A write error stops the capture the same way:
//! the network never depends on the capture.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest capture file: 1 GiB.
pub const MAX_BYTES: u64 = 1 << 30;

/// Snapshot length written in the header: every frame is recorded whole.
const SNAPLEN: u32 = 65_535 + 14 + 4;

/// A capture being written.
#[derive(Debug)]
pub struct Pcap {
    out: BufWriter<File>,
    written: u64,
    limit: u64,
    /// Frames not written (bound reached, or a write error).
    pub dropped: u64,
    stopped: bool,
    dirty: bool,
    /// Bytes of vnet header in front of every frame.
    skip: usize,
    /// A frame whose partial checksum is finished for the record (grown once).
    copy: Vec<u8>,
}

impl Pcap {
    /// Creates (truncates) `path` and writes the pcap header. `skip` is the vnet header
    /// length of the TAP's frames.
    ///
    /// # Errors
    /// Creating or writing the file.
    pub fn create(path: &Path, skip: usize) -> io::Result<Pcap> {
        Pcap::with_limit(path, skip, MAX_BYTES)
    }

    fn with_limit(path: &Path, skip: usize, limit: u64) -> io::Result<Pcap> {
        let mut out = BufWriter::with_capacity(256 << 10, File::create(path)?);
        let mut hdr = [0u8; 24];
        hdr[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        hdr[4..6].copy_from_slice(&2u16.to_le_bytes());
        hdr[6..8].copy_from_slice(&4u16.to_le_bytes());
        hdr[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        // LINKTYPE_ETHERNET.
        hdr[20..24].copy_from_slice(&1u32.to_le_bytes());
        out.write_all(&hdr)?;
        out.flush()?;
        Ok(Pcap {
            out,
            written: 24,
            limit,
            dropped: 0,
            stopped: false,
            dirty: false,
            skip,
            copy: Vec::new(),
        })
    }

    /// Records one TAP frame (vnet header included, it is skipped).
    pub fn record(&mut self, frame: &[u8]) {
        let Some(mut eth) = frame.get(self.skip..) else {
            return;
        };
        if let Some(p) = stack::csum::announced(frame, self.skip) {
            self.copy.clear();
            self.copy.extend_from_slice(eth);
            stack::csum::finish(&mut self.copy, p);
            eth = &self.copy;
        }
        let len = eth.len() as u64 + 16;
        if self.stopped || self.written + len > self.limit {
            if !self.stopped {
                log::warn!(
                    "pcap: the capture reached {} bytes; later frames are not recorded",
                    self.limit
                );
                self.stopped = true;
            }
            self.dropped += 1;
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut rec = [0u8; 16];
        rec[0..4].copy_from_slice(&(now.as_secs() as u32).to_le_bytes());
        rec[4..8].copy_from_slice(&now.subsec_micros().to_le_bytes());
        let n = eth.len() as u32;
        rec[8..12].copy_from_slice(&n.to_le_bytes());
        rec[12..16].copy_from_slice(&n.to_le_bytes());
        if let Err(e) = self
            .out
            .write_all(&rec)
            .and_then(|()| self.out.write_all(eth))
        {
            log::warn!("pcap: write failed, capture stopped: {e}");
            self.stopped = true;
            self.dropped += 1;
            return;
        }
        self.written += len;
        self.dirty = true;
    }

    /// Flushes what was recorded since the last call.
    pub fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            if let Err(e) = self.out.flush() {
                log::warn!("pcap: write failed, capture stopped: {e}");
                self.stopped = true;
            }
        }
    }
}

impl Drop for Pcap {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_records_and_bound() {
        let dir = std::env::temp_dir().join(format!("usernet-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.pcap");
        let mut p = Pcap::with_limit(&path, 10, 24 + 16 + 60 + 16 + 60).unwrap();
        let frame = [0xaau8; 70];
        p.record(&frame);
        p.record(&frame);
        p.record(&frame);
        assert_eq!(p.dropped, 1);
        drop(p);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 24 + 2 * (16 + 60));
        assert_eq!(&data[0..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(u32::from_le_bytes(data[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(data[32..36].try_into().unwrap()), 60);
        assert!(data[40..100].iter().all(|b| *b == 0xaa));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Ones-complement sum of `data`, folded.
    fn sum(data: &[u8]) -> u16 {
        let mut s: u32 = data
            .chunks(2)
            .map(|w| u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0)))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn partial_checksums_are_recorded_finished() {
        let dir = std::env::temp_dir().join(format!("usernet-pcap-csum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.pcap");
        let mut p = Pcap::create(&path, 10).unwrap();
        // vnet NEEDS_CSUM at the UDP checksum (Ethernet 14 + IPv4 20, offset 6), then an
        // IPv4/UDP frame 10.0.2.100:1000 -> 10.0.2.2:53 with 5 bytes of data.
        let mut frame = vec![1u8, 0, 0, 0, 0, 0, 34, 0, 6, 0];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
        frame.extend_from_slice(&[0x45, 0, 0, 33, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        frame.extend_from_slice(&[10, 0, 2, 100, 10, 0, 2, 2]);
        frame.extend_from_slice(&[0x03, 0xe8, 0, 53, 0, 13, 0, 0]);
        frame.extend_from_slice(b"hello");
        // The pseudo-header sum a kernel leaves in the field.
        let pseudo = [10, 0, 2, 100, 10, 0, 2, 2, 0, 17, 0, 13];
        frame[50..52].copy_from_slice(&sum(&pseudo).to_be_bytes());
        let plain = frame.clone();
        p.record(&frame);
        // Without the flag: recorded as it is.
        let mut unflagged = plain.clone();
        unflagged[0] = 0;
        p.record(&unflagged);
        drop(p);
        let data = std::fs::read(&path).unwrap();
        let first = &data[24 + 16..24 + 16 + 47];
        let mut check = pseudo.to_vec();
        check.extend_from_slice(&first[34..]);
        assert_eq!(sum(&check), 0xffff, "the recorded UDP checksum verifies");
        assert_eq!(&first[..40], &plain[10..50]);
        let second = &data[24 + 2 * 16 + 47..];
        assert_eq!(second, &unflagged[10..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
