//! The host's DNS resolvers, read from resolv.conf.
//!
//! # Theory of operation
//!
//! Goals: the DNS forwarder at `net+3` relays the guest's queries to the nameservers the host
//! itself uses, in the order the host uses them, loopback ones included (`127.0.0.53` of
//! systemd-resolved, `127.0.0.1` of a local dnsmasq or unbound): the forwarder runs in the
//! host's network namespace, where those addresses work. This module finds them.
//!
//! [`parse_resolv_conf`] follows glibc's `res_init` (resolv/res_init.c) so that the guest
//! sees what host programs see: a `nameserver` keyword at the very start of a line, followed
//! by a space or tab; the address is the next word and the rest of the line is ignored; lines
//! starting with `#` or `;` are comments; at most [`MAXNS`] servers are kept, counting only
//! the valid ones; IPv6 addresses may carry a `%scope` (an interface name, resolved with
//! `if_nametoindex(3)`, or a decimal index). All servers use port 53.
//!
//! Limits: IPv4 addresses must be dotted quads (glibc also accepts `inet_aton` shorthands such
//! as `127.1`, which nobody writes in resolv.conf); a scope that names no interface leaves that
//! server out, where glibc would keep it unscoped; `search`, `domain` and `options` lines are
//! not read. The binary re-reads the file when it changes (NetworkManager, VPNs: see its
//! `resolv_watch` module) and hands the new list to the forwarder. A file without any server yields an empty list; glibc would then use
//! `127.0.0.1:53`, and that choice is left to the caller.
//!
//! Security: resolv.conf belongs to the host, not to the guest; still, reading stops after
//! [`MAX_RESOLV_CONF_LEN`] bytes, bytes that are not UTF-8 are replaced rather than rejected,
//! and no line can make parsing fail.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;

/// How many nameservers are kept, like glibc's and musl's `MAXNS`.
pub const MAXNS: usize = 3;

/// How much of resolv.conf is read. Real files are well under a kilobyte.
pub const MAX_RESOLV_CONF_LEN: u64 = 64 * 1024;

/// The DNS port.
const DNS_PORT: u16 = 53;

/// Parses resolv.conf text into the addresses of at most [`MAXNS`] nameservers, in order, on
/// port 53.
///
/// `nameserver` lines hold an IPv4 or IPv6 address; an IPv6 address may end in `%scope`, an
/// interface name or index, which goes into the scope id. Invalid addresses and unknown
/// interfaces are skipped, as are comments (`#` or `;` at the start of a line) and other
/// keywords. See the module documentation for the details and how they compare to glibc.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(nameserver_word)
        .filter_map(parse_nameserver)
        .take(MAXNS)
        .collect()
}

/// Reads and parses a resolv.conf file (normally `/etc/resolv.conf`) with
/// [`parse_resolv_conf`]. Only the first [`MAX_RESOLV_CONF_LEN`] bytes are read.
///
/// # Errors
///
/// When the file cannot be opened or read.
pub fn read_resolv_conf(path: &Path) -> io::Result<Vec<SocketAddr>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_RESOLV_CONF_LEN)
        .read_to_end(&mut bytes)?;
    Ok(parse_resolv_conf(&String::from_utf8_lossy(&bytes)))
}

/// The address word of a `nameserver` line, or `None` for any other line.
fn nameserver_word(line: &str) -> Option<&str> {
    // glibc's MATCH(): the keyword at the start of the line, then a blank. Comment lines
    // start with `#` or `;` and never match.
    let rest = line.strip_prefix("nameserver")?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    rest.split_ascii_whitespace().next()
}

/// Parses the address word of a `nameserver` line.
fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DNS_PORT));
    }
    let (addr, scope) = word.split_once('%')?;
    let ip = addr.parse::<Ipv6Addr>().ok()?;
    let scope_id = scope_id(scope)?;
    Some(SocketAddr::V6(SocketAddrV6::new(ip, DNS_PORT, 0, scope_id)))
}

/// Resolves an IPv6 scope: an interface name, else a decimal interface index (glibc's
/// `__inet6_scopeid_pton` order). `None` when it is neither.
fn scope_id(scope: &str) -> Option<u32> {
    if let Some(index) = if_nametoindex(scope) {
        return Some(index);
    }
    if !scope.is_empty() && scope.bytes().all(|b| b.is_ascii_digit()) {
        return scope.parse().ok();
    }
    None
}

/// The index of the interface named `name`, if there is one.
fn if_nametoindex(name: &str) -> Option<u32> {
    // Longer names cannot exist (IFNAMSIZ counts the NUL).
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    nix::net::if_::if_nametoindex(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn v4(a: u8, b: u8, c: u8, d: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), 53))
    }

    fn v6(ip: &str, scope: u32) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(ip.parse().unwrap(), 53, 0, scope))
    }

    /// The index of the loopback interface, present in every network namespace.
    fn lo_index() -> u32 {
        if_nametoindex("lo").expect("every namespace has lo")
    }

    #[test]
    fn parse_systemd_resolved_stub() {
        let text =
            "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n\
                    # Do not edit.\n\
                    \n\
                    nameserver 127.0.0.53\n\
                    options edns0 trust-ad\n\
                    search .\n";
        assert_eq!(parse_resolv_conf(text), [v4(127, 0, 0, 53)]);
    }

    #[test]
    fn parse_comments_and_blank_lines_skipped() {
        let text = "\n# nameserver 1.1.1.1\n; nameserver 2.2.2.2\n\n   \nnameserver 8.8.8.8\n";
        assert_eq!(parse_resolv_conf(text), [v4(8, 8, 8, 8)]);
    }

    #[test]
    fn parse_trailing_words_and_tabs() {
        let text = "nameserver\t9.9.9.9   # quad9\nnameserver 1.0.0.1 ; cloudflare\r\n";
        assert_eq!(parse_resolv_conf(text), [v4(9, 9, 9, 9), v4(1, 0, 0, 1)]);
    }

    #[test]
    fn parse_ipv6_plain() {
        let text = "nameserver 2001:4860:4860::8888\nnameserver ::1\n";
        assert_eq!(
            parse_resolv_conf(text),
            [v6("2001:4860:4860::8888", 0), v6("::1", 0)]
        );
    }

    #[test]
    fn parse_ipv6_scope_name_resolved() {
        let text = "nameserver fe80::1%lo\n";
        assert_eq!(parse_resolv_conf(text), [v6("fe80::1", lo_index())]);
    }

    #[test]
    fn parse_ipv6_scope_index_kept() {
        let text = "nameserver fe80::1%7\n";
        assert_eq!(parse_resolv_conf(text), [v6("fe80::1", 7)]);
    }

    #[test]
    fn parse_ipv6_scope_unknown_skipped() {
        let text = "nameserver fe80::1%nosuchif0\n\
                    nameserver fe80::2%\n\
                    nameserver fe80::3%averyveryverylonginterfacename\n\
                    nameserver fe80::4%12x\n\
                    nameserver fe80::5%99999999999\n\
                    nameserver 10.0.0.1\n";
        assert_eq!(parse_resolv_conf(text), [v4(10, 0, 0, 1)]);
    }

    #[test]
    fn parse_bad_addresses_skipped() {
        let text = "nameserver\n\
                    nameserver \n\
                    nameserver 300.1.1.1\n\
                    nameserver dns.example.com\n\
                    nameserver 1.2.3.4%lo\n\
                    nameserver 1.2.3.4:53\n\
                    nameserver [::1]\n\
                    nameservers 5.5.5.5\n\
                    nameserver5.5.5.5\n\
                    \x20nameserver 6.6.6.6\n\
                    NAMESERVER 7.7.7.7\n\
                    nameserver 4.4.4.4\n";
        assert_eq!(parse_resolv_conf(text), [v4(4, 4, 4, 4)]);
    }

    #[test]
    fn parse_more_than_three_first_three_kept() {
        let text = "nameserver 1.1.1.1\nnameserver ::1\nnameserver 3.3.3.3\nnameserver 4.4.4.4\n";
        assert_eq!(
            parse_resolv_conf(text),
            [v4(1, 1, 1, 1), v6("::1", 0), v4(3, 3, 3, 3)]
        );
    }

    #[test]
    fn parse_invalid_lines_do_not_count_toward_three() {
        let text = "nameserver x\nnameserver 1.1.1.1\nnameserver y\nnameserver 2.2.2.2\n\
                    nameserver z\nnameserver 3.3.3.3\nnameserver 4.4.4.4\n";
        assert_eq!(
            parse_resolv_conf(text),
            [v4(1, 1, 1, 1), v4(2, 2, 2, 2), v4(3, 3, 3, 3)]
        );
    }

    #[test]
    fn parse_empty_and_no_nameserver_empty() {
        assert!(parse_resolv_conf("").is_empty());
        assert!(parse_resolv_conf("search example.com\noptions ndots:2\n").is_empty());
    }

    #[test]
    fn parse_duplicates_kept_in_order() {
        let text = "nameserver 1.1.1.1\nnameserver 1.1.1.1\n";
        assert_eq!(parse_resolv_conf(text), [v4(1, 1, 1, 1), v4(1, 1, 1, 1)]);
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("usernet-dns-{}-{name}", std::process::id()))
    }

    #[test]
    fn read_file_parsed() {
        let path = temp_path("ok");
        let mut file = std::fs::File::create(&path).unwrap();
        // Not UTF-8 in a comment: replaced, not an error.
        file.write_all(b"# caf\xe9\nnameserver 127.0.0.53\nnameserver fe80::1%lo\n")
            .unwrap();
        drop(file);
        let servers = read_resolv_conf(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            servers.unwrap(),
            [v4(127, 0, 0, 53), v6("fe80::1", lo_index())]
        );
    }

    #[test]
    fn read_missing_file_error() {
        let err = read_resolv_conf(&temp_path("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn read_directory_error() {
        assert!(read_resolv_conf(&std::env::temp_dir()).is_err());
    }

    #[test]
    fn read_host_resolv_conf_no_panic() {
        // Whatever the machine has, reading it either works or fails cleanly.
        if let Ok(servers) = read_resolv_conf(Path::new("/etc/resolv.conf")) {
            assert!(servers.len() <= MAXNS);
        }
    }
}
