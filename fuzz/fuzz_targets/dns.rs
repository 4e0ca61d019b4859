//! The resolv.conf parser (the DNS forwarder's upstreams) on arbitrary text: never a
//! panic, at most `MAXNS` nameservers, all on port 53.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let servers = forwarder::dns::parse_resolv_conf(&text);
    assert!(servers.len() <= forwarder::dns::MAXNS);
    assert!(servers.iter().all(|s| s.port() == 53));
});
