//! pasta's ports: `-t/-u` published, `-t/-u auto` and `-T/-U` (namespace loopback to host
//! loopback).
//!
//! # Theory of operation
//!
//! **`-t/-u`**: first thing before ready, the rules are published with pasta's rules for
//! failures ([`super::publish`]); a failure ends start-up.
//!
//! **`-t/-u auto`**: once before ready and then every [`SCAN_INTERVAL`], the
//! [`Agent`] lists the sockets listening in the namespace; every port bound there to a
//! non-loopback address (and not excluded with `~`, nor already forwarded explicitly) gets
//! a published-port rule on the host (`0.0.0.0` and, unless `-4`, `::`), and a rule whose
//! listener went away is removed. A host port that cannot be bound (in use) is skipped
//! until the next scan. This is how pasta follows a container's servers.
//!
//! **`-T/-U`**: the agent binds sockets on the namespace's loopback (`127.0.0.1` and, if
//! the namespace has IPv6, `::1`), which become listeners of the forwarder's flow table
//! ([`forwarder::Forwarder::add_splice_listener`]); their connections and datagrams are
//! relayed to the same (or the translated) port on the host's loopback, not through the
//! TAP. With `auto`, the ports are those the host listens on (loopback or wildcard, read
//! from this process's own `/proc/net`), rescanned like `-t auto`, minus the ports
//! usernet itself publishes; this subsystem keeps only the listeners' ids.
//!
//! **Loopback clients of `-t` and `-u` ports** (pasta's "splice" path): a connection to
//! a forwarded TCP port from the host's loopback does not cross the TAP
//! ([`forwarder::Config::loopback_handoff`]): the agent opens a socket inside the
//! namespace connecting to the namespace's own address (with `--host-lo-to-ns-lo`: its
//! loopback address) at the target port ([`Splicer`], installed in the host's sockets
//! as their [`NsOpener`]). As in pasta, the namespace's server sees a local client (its
//! own address, or `127.0.0.1`/`::1`), and a server bound only to the namespace's
//! loopback is reached only with `--host-lo-to-ns-lo`. Other clients keep the TAP path
//! and their real addresses. Datagrams of a loopback client of a `-u` port go the same
//! way: the agent makes a UDP socket in the namespace bound to the client's port (as
//! pasta keeps it; any port if it is taken) and connected to the target.
//!
//! The relayed connections and associations are spliced flows of the forwarder's one
//! flow table, with their limit, idle time and counters (`forwarder::splice`); the bytes
//! of a connection move by `splice(2)` (`crate::splice`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forwarder::port::Proto;

use super::agent::{parse_proc_net, Agent, Listening};
use super::opts::{PastaOpts, PortSpec};
use super::publish::{self, Rule};
use super::PastaRunError;
use crate::api::Control;
use crate::host::NsOpener;
use crate::netns::Target;
use crate::subsystem::{Cx, Next, StartError, Subsystem};

/// How often `auto` rescans.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// The `auto` state of `-t` or `-u`: forwarded port -> its rule ids.
#[derive(Default)]
struct AutoHost {
    spec: PortSpec,
    rules: BTreeMap<u16, Vec<u32>>,
}

/// pasta's ports as a part of the event loop ([`Subsystem`]).
pub struct PastaPorts {
    agent: Rc<Agent>,
    /// The `-t/-u` rules, published before ready.
    rules: Vec<Rule>,
    v4_only: bool,
    v6_only: bool,
    ns_ipv6: bool,
    /// `-t/-u auto`.
    auto_tcp: Option<AutoHost>,
    auto_udp: Option<AutoHost>,
    /// Explicit host ports of `-t/-u`, never taken over by `auto`.
    explicit: BTreeSet<(Proto, u16)>,
    /// `-T/-U auto` specs (exclusions).
    auto_tcp_ns: Option<PortSpec>,
    auto_udp_ns: Option<PortSpec>,
    /// Explicit `-T/-U` ranges, bound at the first tick.
    ns_static: Vec<(Proto, super::opts::PortRange)>,
    /// The forwarder's ids of the `-T/-U` listeners, by (proto, namespace port).
    listeners: BTreeMap<(Proto, u16), Vec<usize>>,
    next: Option<Instant>,
    first: bool,
    /// Where loopback clients of `-t/-u` ports go in the namespace.
    splicer: Splicer,
}

/// A spec that is `auto` (given so, or not given at all: pasta's default).
fn is_auto(spec: &PortSpec) -> bool {
    spec.auto || !spec.given
}

impl PastaPorts {
    /// The service for `opts` and its `-t/-u` `rules` in a namespace with addresses
    /// `ns_v4` and `ns_v6`, or `None` when there is nothing to do (no port forwarded
    /// either way, nothing dynamic).
    ///
    /// # Errors
    /// The agent cannot be started in `target`'s namespaces.
    pub fn new(
        opts: &PastaOpts,
        target: &Target,
        ns_v4: Option<Ipv4Addr>,
        ns_v6: Option<Ipv6Addr>,
        rules: Vec<Rule>,
    ) -> Result<Option<PastaPorts>, PastaRunError> {
        let ns_ipv6 = ns_v6.is_some();
        let auto = |s: &PortSpec| {
            is_auto(s).then(|| AutoHost {
                spec: s.clone(),
                rules: BTreeMap::new(),
            })
        };
        let mut ns_static = Vec::new();
        for (spec, proto) in [(&opts.tcp_ns, Proto::Tcp), (&opts.udp_ns, Proto::Udp)] {
            ns_static.extend(spec.ranges.iter().map(|r| (proto, r.clone())));
        }
        let mut explicit = BTreeSet::new();
        for (spec, proto) in [(&opts.tcp, Proto::Tcp), (&opts.udp, Proto::Udp)] {
            for r in &spec.ranges {
                explicit.extend((r.first..=r.last).map(|p| (proto, p)));
            }
        }
        let auto_tcp = auto(&opts.tcp);
        let auto_udp = auto(&opts.udp);
        let auto_tcp_ns = is_auto(&opts.tcp_ns).then(|| opts.tcp_ns.clone());
        let auto_udp_ns = is_auto(&opts.udp_ns).then(|| opts.udp_ns.clone());
        let dynamic = auto_tcp.is_some()
            || auto_udp.is_some()
            || auto_tcp_ns.is_some()
            || auto_udp_ns.is_some()
            || !ns_static.is_empty();
        // Loopback clients of forwarded ports are relayed here. The `-t/-u` rules are
        // made from these ranges and exclusions: without them there are none.
        let forwarded = [&opts.tcp, &opts.udp]
            .iter()
            .any(|s| !s.ranges.is_empty() || !s.all_but.is_empty());
        if !dynamic && !forwarded {
            return Ok(None);
        }
        let agent = Rc::new(Agent::spawn(target, opts.userns.as_deref())?);
        Ok(Some(PastaPorts {
            rules,
            v4_only: opts.v4_only,
            v6_only: opts.v6_only,
            ns_ipv6,
            auto_tcp,
            auto_udp,
            explicit,
            auto_tcp_ns,
            auto_udp_ns,
            ns_static,
            listeners: BTreeMap::new(),
            next: Some(Instant::now()),
            first: true,
            splicer: Splicer {
                agent: agent.clone(),
                to: if opts.host_lo_to_ns_lo {
                    (
                        ns_v4.map(|_| Ipv4Addr::LOCALHOST),
                        ns_v6.map(|_| Ipv6Addr::LOCALHOST),
                    )
                } else {
                    (ns_v4, ns_v6)
                },
            },
            agent,
        }))
    }

    /// Binds `-T/-U` listeners for namespace port `port` -> host loopback `to_port`.
    fn bind_ns(
        &mut self,
        proto: Proto,
        addr: Option<IpAddr>,
        port: u16,
        to_port: u16,
        cx: &mut Cx<'_>,
    ) -> io::Result<()> {
        let addrs: Vec<IpAddr> = match addr {
            Some(a) => vec![a],
            None if self.ns_ipv6 => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
            None => vec![Ipv4Addr::LOCALHOST.into()],
        };
        let mut io = cx.sockets.io(cx.taps.sink());
        for a in addrs {
            let host_ip: IpAddr = if a.is_ipv6() {
                Ipv6Addr::LOCALHOST.into()
            } else {
                Ipv4Addr::LOCALHOST.into()
            };
            let to = SocketAddr::new(host_ip, to_port);
            let id = cx
                .fwd
                .add_splice_listener(proto, SocketAddr::new(a, port), to, &mut io)?;
            self.listeners.entry((proto, port)).or_default().push(id);
        }
        Ok(())
    }

    /// Closes the `-T/-U` listeners of namespace port `port`.
    fn unbind_ns(&mut self, proto: Proto, port: u16, cx: &mut Cx<'_>) {
        let mut io = cx.sockets.io(cx.taps.sink());
        for id in self.listeners.remove(&(proto, port)).unwrap_or_default() {
            cx.fwd.remove_splice_listener(id, &mut io);
        }
    }

    fn scan_ns(&mut self, ctl: &mut dyn Control) -> io::Result<()> {
        if self.auto_tcp.is_none() && self.auto_udp.is_none() {
            return Ok(());
        }
        let found = self.agent.scan()?;
        let (v4_only, v6_only) = (self.v4_only, self.v6_only);
        for (proto, auto) in [
            (Proto::Tcp, &mut self.auto_tcp),
            (Proto::Udp, &mut self.auto_udp),
        ] {
            let Some(auto) = auto else { continue };
            let want: BTreeSet<u16> = found
                .iter()
                .filter(|l: &&Listening| l.proto == proto && !l.loopback)
                .map(|l| l.port)
                .filter(|p| !auto.spec.excludes(*p) && !self.explicit.contains(&(proto, *p)))
                .collect();
            let gone: Vec<u16> = auto
                .rules
                .keys()
                .filter(|p| !want.contains(p))
                .copied()
                .collect();
            for port in gone {
                for id in auto.rules.remove(&port).unwrap_or_default() {
                    let _ = ctl.remove(id);
                }
            }
            for port in want {
                if auto.rules.contains_key(&port) {
                    continue;
                }
                let mut ids = Vec::new();
                let mut hosts: Vec<IpAddr> = Vec::new();
                if !v6_only {
                    hosts.push(Ipv4Addr::UNSPECIFIED.into());
                }
                if !v4_only {
                    hosts.push(Ipv6Addr::UNSPECIFIED.into());
                }
                for host in hosts {
                    match ctl.add(proto, SocketAddr::new(host, port), None, port) {
                        Ok(rule) => ids.push(rule.id),
                        Err(e) => log::debug!("auto {} port {port}: {e}", proto.as_str()),
                    }
                }
                if !ids.is_empty() {
                    log::info!("auto: forwarding {} port {port}", proto.as_str());
                    auto.rules.insert(port, ids);
                }
            }
        }
        Ok(())
    }

    fn scan_host(&mut self, cx: &mut Cx<'_>) {
        let ours: BTreeSet<(Proto, u16)> = cx
            .fwd
            .port_rules()
            .iter()
            .map(|r| (r.proto, r.host.port()))
            .collect();
        for (proto, files) in [
            (Proto::Tcp, ["/proc/self/net/tcp", "/proc/self/net/tcp6"]),
            (Proto::Udp, ["/proc/self/net/udp", "/proc/self/net/udp6"]),
        ] {
            let spec = match proto {
                Proto::Tcp => self.auto_tcp_ns.clone(),
                Proto::Udp => self.auto_udp_ns.clone(),
            };
            let Some(spec) = spec else { continue };
            let mut want = BTreeSet::new();
            for f in files {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                for l in parse_proc_net(&text, proto) {
                    want.insert(l.port);
                }
            }
            want.retain(|p| !spec.excludes(*p) && !ours.contains(&(proto, *p)));
            let have: Vec<u16> = self
                .listeners
                .keys()
                .filter(|(p, _)| *p == proto)
                .map(|(_, port)| *port)
                .collect();
            for port in have.iter().filter(|p| !want.contains(p)) {
                self.unbind_ns(proto, *port, cx);
            }
            for port in want {
                if !self.listeners.contains_key(&(proto, port)) {
                    if let Err(e) = self.bind_ns(proto, None, port, port, cx) {
                        log::debug!("auto -T/-U port {port}: {e}");
                    }
                }
            }
        }
    }
}

impl PastaPorts {
    /// The periodic work (and once before ready): `-T/-U` listeners, the `auto` scans of
    /// both sides.
    fn tick(&mut self, now: Instant, cx: &mut Cx<'_>) -> io::Result<()> {
        if self.first {
            self.first = false;
            for (proto, r) in std::mem::take(&mut self.ns_static) {
                for port in r.first..=r.last {
                    let to = r.to + (port - r.first);
                    self.bind_ns(proto, r.addr, port, to, cx).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "cannot bind {} port {port} in the namespace: {e}",
                                proto.as_str()
                            ),
                        )
                    })?;
                }
            }
        }
        {
            let mut io = cx.sockets.io(cx.taps.sink());
            let mut ctl = crate::api::FwdControl {
                fwd: cx.fwd,
                io: &mut io,
            };
            self.scan_ns(&mut ctl)?;
        }
        self.scan_host(cx);
        let dynamic = self.auto_tcp.is_some()
            || self.auto_udp.is_some()
            || self.auto_tcp_ns.is_some()
            || self.auto_udp_ns.is_some();
        self.next = dynamic.then(|| now + SCAN_INTERVAL);
        Ok(())
    }
}

impl Subsystem for PastaPorts {
    fn start(&mut self, _base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        cx.sockets.set_opener(Box::new(self.splicer.clone()));
        Ok(())
    }

    fn before_ready(&mut self, cx: &mut Cx<'_>) -> Result<(), StartError> {
        publish::publish(&std::mem::take(&mut self.rules), cx.fwd, cx.sockets)?;
        self.tick(Instant::now(), cx)
            .map_err(|e| Box::new(crate::event_loop::LoopError::Setup(e)).into())
    }

    fn handle(&mut self, _local: usize, _cx: &mut Cx<'_>) -> Next {
        // No sources of its own: its listeners are the forwarder's.
        Next::Continue
    }

    fn poll_timeout(&mut self, _cx: &mut Cx<'_>) -> Option<Instant> {
        self.next
    }

    fn turn(&mut self, cx: &mut Cx<'_>) -> Next {
        let now = Instant::now();
        if self.next.is_some_and(|at| at <= now) {
            if let Err(e) = self.tick(now, cx) {
                log::warn!("{e}");
            }
        }
        Next::Continue
    }
}

/// Where loopback clients of `-t/-u` ports go: the namespace's side, opened by the agent.
#[derive(Clone)]
struct Splicer {
    agent: Rc<Agent>,
    /// The namespace's address per family: its own, or its loopback address with
    /// `--host-lo-to-ns-lo`.
    to: (Option<Ipv4Addr>, Option<Ipv6Addr>),
}

impl Splicer {
    /// Where `client`'s traffic to `guest_port` goes in the namespace: the client's
    /// family first; a namespace without it is reached by the other.
    fn to(&self, client: SocketAddr, guest_port: u16) -> Option<SocketAddr> {
        let (v4, v6) = self.to;
        let to_v4 = v4.map(|a| SocketAddr::new(a.into(), guest_port));
        let to_v6 = v6.map(|a| SocketAddr::new(a.into(), guest_port));
        if client.is_ipv6() {
            to_v6.or(to_v4)
        } else {
            to_v4.or(to_v6)
        }
    }
}

impl NsOpener for Splicer {
    fn tcp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd> {
        let to = self
            .to(client, guest_port)
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        self.agent.connect(to)
    }

    fn udp_connect(&self, client: SocketAddr, guest_port: u16) -> io::Result<OwnedFd> {
        let to = self
            .to(client, guest_port)
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        // The client's port, as pasta keeps it (any port if it is taken).
        self.agent.udp_connect(to, client.port())
    }

    fn bind(&self, proto: Proto, addr: SocketAddr) -> io::Result<OwnedFd> {
        self.agent.bind(proto, addr)
    }
}
