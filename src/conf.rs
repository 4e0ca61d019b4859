//! Command line: slirp4netns's, plus `usernet run` for people.
//!
//! # Theory of operation
//!
//! podman and RootlessKit run `slirp4netns` with its exact flags and detect features by
//! grepping `--help`, so the attach mode takes the same flags, spelled the same way,
//! with the same defaults and the same validation (`--mtu` 1..65521, `--cidr` prefix
//! 1..25 and a network address). Parsing is clap's; a bad flag is a usage message on
//! stderr and exit status 2. Every slirp4netns flag is implemented; usernet's own
//! additions (`-p`, limits, `--log-level`, the `run`, `ports` and `stats` subcommands)
//! come on top.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use forwarder::nat::{Network, Network6};
use forwarder::port::Proto;

/// usernet: rootless user-space networking for containers (a slirp4netns drop-in).
#[derive(Debug, Parser)]
#[command(
    name = "usernet",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "usernet [OPTIONS] PID|PATH|FD [TAPNAME]\n       usernet run [OPTIONS] -- COMMAND [ARG]...",
    after_help = "Attach mode (slirp4netns-compatible): join the network namespace of PID (or the \
namespace file PATH, or use the open TAP file descriptor FD), create or attach TAPNAME \
(default tap0) and serve it: outbound NAT for TCP, UDP and ICMP echo, gateway net+2 \
(the host's 127.0.0.1), DNS forwarder net+3, DHCP.\n\nRun mode: `usernet run -- CMD` runs \
CMD in new user, network and mount namespaces connected this way."
)]
pub struct Cli {
    #[command(flatten)]
    pub version: VersionFlag,

    #[command(flatten)]
    pub attach: AttachArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses `args` (the program name first); exits with clap's usage message and
    /// status 2 on a bad command line (see [`exit_on_parse_error`]).
    ///
    /// Attach mode's command line, the one podman and RootlessKit start usernet with, is
    /// parsed by a command made of attach mode's options alone ([`AttachCli`]): building
    /// every subcommand's options as well took 0.2-0.3 ms of a 4 ms start. A command
    /// line that names a subcommand, or that the attach-only command does not take (help,
    /// an error), goes to the whole command, which gives its usual answer.
    pub fn parse_args(args: Vec<OsString>) -> Cli {
        if !names_subcommand(&args) {
            if let Ok(a) = AttachCli::try_parse_from(&args) {
                return Cli {
                    version: a.version,
                    attach: a.attach,
                    command: None,
                };
            }
        }
        match Cli::try_parse_whole(args) {
            Ok(cli) => cli,
            Err(e) => exit_on_parse_error(e),
        }
    }

    /// [`Cli::try_parse_from`], but an error of the values taken together (an egress
    /// policy over its limit: [`EgressPolicy`](crate::egress::EgressPolicy)) shows the
    /// usage of the subcommand given, as an error of one value does; clap's derive would
    /// show the top-level usage, the only command it knows at that point.
    fn try_parse_whole(args: Vec<OsString>) -> Result<Cli, clap::Error> {
        let mut cmd = Cli::command();
        let mut matches = cmd.try_get_matches_from_mut(args)?;
        // The subcommands given, outermost first (taking the values takes them away).
        let mut given = Vec::new();
        let mut m = &matches;
        while let Some((name, sub)) = m.subcommand() {
            given.push(name.to_owned());
            m = sub;
        }
        Cli::from_arg_matches_mut(&mut matches).map_err(|e| {
            // Only on this error path: a copy of the subcommand, built (its usage names
            // its parents) by the parse above.
            let mut sub = given
                .iter()
                .try_fold(&cmd, |c, name| c.find_subcommand(name))
                .unwrap_or(&cmd)
                .clone();
            e.format(&mut sub)
        })
    }

    /// Attach mode: the inherited descriptors the command line names (`-e`, `-r`, a
    /// `tapfd` target); every other one above 2 is closed at start-up. `None` for the
    /// subcommands: `run` passes the caller's descriptors on to its command, as `env`
    /// or `unshare` would.
    pub fn inherited_fds(&self) -> Option<Vec<i32>> {
        if self.command.is_some() {
            return None;
        }
        let a = &self.attach;
        let mut fds: Vec<i32> = a.exit_fd.into_iter().chain(a.ready_fd).collect();
        if a.netns_type == Some(NetnsType::Tapfd) {
            fds.extend(a.target.as_deref().and_then(|t| t.parse::<i32>().ok()));
        }
        Some(fds)
    }
}

/// Whether `args` (the program name first) name a subcommand before any `--`: one of
/// [`Command`]'s, or clap's own `help`.
fn names_subcommand(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .filter_map(|a| a.to_str())
        .any(|a| a == "help" || Command::has_subcommand(a))
}

/// [`Cli`] without the subcommands: attach mode's options and `--version`, parsed the
/// same way (see [`Cli::parse_args`]).
#[derive(Debug, Parser)]
#[command(name = "usernet")]
struct AttachCli {
    #[command(flatten)]
    version: VersionFlag,

    #[command(flatten)]
    attach: AttachArgs,
}

/// slirp4netns's `-v/--version` in place of clap's `-V/--version`: one definition for
/// [`Cli`] and [`AttachCli`], which flatten it (and so also turn clap's flag off).
#[derive(Debug, Clone, Copy, Args)]
#[command(disable_version_flag = true)]
pub struct VersionFlag {
    /// Print version information and exit.
    #[arg(id = "version", short = 'v', long = "version", action = clap::ArgAction::SetTrue)]
    pub asked: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run COMMAND in new user + network + mount namespaces with a network.
    Run(Box<RunArgs>),
    /// Publish, list or unpublish ports of a running usernet through its API socket.
    Ports(PortsArgs),
    /// List or change the egress policy of a running usernet through its API socket.
    Egress(EgressArgs),
    /// Show the counters, flows and limits of a running usernet (its API socket).
    Stats(StatsArgs),
    /// Manage networks: many namespaces on one user-space switch.
    Network(NetworkArgs),
    /// List the usernet runs that are running (their API sockets), with their ports.
    Ps(PsArgs),
    /// Take pasta's command line (as when invoked under a name containing "pasta"); see
    /// `usernet pasta --help`.
    #[command(disable_help_flag = true)]
    Pasta(PastaArgs),
    /// Print the man page usernet(1), or write every page (one per subcommand) to a
    /// directory.
    Man(ManArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

/// `usernet man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write usernet.1 and one page per subcommand (usernet-run.1, ...) into DIR
    /// instead of printing usernet.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `usernet completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// bash: source the script, or put it in /usr/local/share/bash-completion/completions/usernet.
    Bash,
    /// zsh: put it as _usernet in a directory of $fpath.
    Zsh,
    /// fish: put it in ~/.config/fish/completions/usernet.fish.
    Fish,
}

impl CompletionShell {
    /// clap_complete's name for it.
    pub fn shell(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// `usernet egress`.
#[derive(Debug, Args)]
pub struct EgressArgs {
    /// The usernet to ask.
    #[command(flatten)]
    pub target: ApiTarget,

    /// With --network: the member (name, alias or IPv4 address) whose own policy to
    /// list or change (default: the network's).
    #[arg(long, value_name = "MEMBER")]
    pub member: Option<String>,

    /// What to do (required unless -v/--version).
    #[command(subcommand)]
    pub action: Option<EgressAction>,
}

/// What `usernet egress` does.
#[derive(Debug, Subcommand)]
pub enum EgressAction {
    /// List the rules with their ids and hits, and the default.
    List,
    /// Add a rule: `deny 10.0.0.0/8 tcp:22`, `allow 192.0.2.7`, `deny-private`,
    /// `allow-domain example.com` (the words of a policy file's line).
    Add {
        /// The rule's words.
        #[arg(required = true, num_args = 1.., value_name = "RULE")]
        rule: Vec<String>,
        /// Before the rule at this position (0: first; default: last).
        #[arg(long, value_name = "N")]
        position: Option<usize>,
        /// Also reset the open flows the new rule denies.
        #[arg(long)]
        reset: bool,
    },
    /// Remove a rule by the id `add` or `list` showed.
    Remove {
        /// The rule's id.
        id: u32,
        /// Also reset the open flows the policy now denies.
        #[arg(long)]
        reset: bool,
    },
    /// Set what happens to flows no rule matches: allow or deny.
    Default {
        /// allow or deny.
        #[arg(value_parser = ["allow", "deny"])]
        action: String,
        /// Also reset the open flows the policy now denies.
        #[arg(long)]
        reset: bool,
    },
}

/// `usernet ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print usernet's version and exit.
    #[arg(short = 'v', long = "version")]
    pub version: bool,
}

/// `usernet network`.
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: NetworkAction,
}

/// What `usernet network` does.
#[derive(Debug, Subcommand)]
pub enum NetworkAction {
    /// Define a network (kept in the user's configuration directory).
    Create {
        /// The network's name.
        name: String,
        /// IPv4 subnet, at most a /24 (default: a free 10.89.N.0/24); gateway net+2,
        /// DNS net+3, members from net+100.
        #[arg(long, value_name = "A.B.C.D/N", value_parser = parse_cidr)]
        subnet: Option<Network>,
        /// The gateway's address in the subnet instead of net+2 (it also reaches the
        /// host's loopback).
        #[arg(long, value_name = "A.B.C.D")]
        gateway: Option<std::net::Ipv4Addr>,
        /// IPv6 too, in fd89:N::/64.
        #[arg(long)]
        ipv6: bool,
        /// IPv6 too, in this /64.
        #[arg(long, value_name = "PREFIX/64", value_parser = parse_cidr6, conflicts_with = "ipv6")]
        subnet6: Option<Network6>,
        /// No way out: no outbound NAT, no host loopback; members and names only.
        #[arg(long)]
        internal: bool,
        /// The members' MTU (1280..65520).
        #[arg(long = "mtu", value_name = "N", default_value_t = 65520, value_parser = clap::value_parser!(u32).range(1280..=65520))]
        network_mtu: u32,
        /// The gateway does not reach the host's 127.0.0.1.
        #[arg(long = "disable-host-loopback")]
        no_loopback: bool,
        /// Most flows (TCP, UDP, ICMP) one member address may have open at once; more
        /// are refused as when the network's tables are full.
        #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_member_flows: u32,
        /// The network's egress policy, for every member's flows (a policy file: see
        /// --egress-policy of attach mode); members may add their own at run/connect.
        #[arg(long = "egress-policy", value_name = "FILE", value_parser = crate::egress::parse_policy_file)]
        egress_policy: Option<crate::egress::Ordered<forwarder::egress::Spec>>,
    },
    /// List the networks.
    Ls,
    /// Show a network as JSON: subnets, gateway, members (names, addresses, MAC,
    /// namespace, published ports, port counters).
    Inspect {
        /// The network's name.
        name: String,
    },
    /// Remove a network's definition; refused while it has members unless forced.
    Rm {
        /// The network's name.
        name: String,
        /// Remove it even with members (they lose their network).
        #[arg(long)]
        force: bool,
    },
    /// Attach a running namespace (a PID or a network namespace file) to a network.
    Connect {
        /// The network's name.
        name: String,
        /// PID or network namespace path of the member.
        target: String,
        /// The member's name in the network's DNS.
        #[arg(long = "name", value_name = "NAME")]
        member_name: Option<String>,
        /// More names for it (repeatable).
        #[arg(long = "alias", value_name = "NAME")]
        aliases: Vec<String>,
        /// Its IPv4 address (default: the next free one).
        #[arg(long = "ip", value_name = "ADDR")]
        ip: Option<std::net::Ipv4Addr>,
        /// Its IPv6 address.
        #[arg(long = "ip6", value_name = "ADDR")]
        ip6: Option<std::net::Ipv6Addr>,
        /// Its MAC address.
        #[arg(long = "mac", value_name = "MAC", value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
        /// Its interface name in the namespace (default: the first free ethN).
        #[arg(long = "interface", value_name = "NAME")]
        interface: Option<String>,
        /// The member's own egress policy, on top of the network's.
        #[command(flatten)]
        egress: crate::egress::EgressPolicy,
    },
    /// Detach a member (by name or IPv4 address) from a network.
    Disconnect {
        /// The network's name.
        name: String,
        /// The member's name or IPv4 address.
        member: String,
    },
    /// Serve a network (started on demand by run --network and connect).
    Serve {
        /// The network's name.
        name: String,
    },
}

/// `usernet pasta`: everything after it is pasta's command line.
#[derive(Debug, Args)]
pub struct PastaArgs {
    /// pasta's options and target or command.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PASTA_ARGS"
    )]
    pub args: Vec<OsString>,
}

/// Which running usernet a client subcommand (`ports`, `stats`) talks to.
#[derive(Debug, Args)]
pub struct ApiTarget {
    /// Print usernet's version and exit.
    #[arg(short = 'v', long = "version")]
    pub version: bool,

    /// The API socket of the running usernet (its --api-socket); default: the run named
    /// by --name, else the only usernet run running.
    #[arg(short = 'a', long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The usernet run of this --name.
    #[arg(long, value_name = "NAME", value_parser = crate::runs::parse_name, conflicts_with = "api_socket")]
    pub name: Option<String>,

    /// The usernet network of this name (`usernet network create`), through its serving
    /// process's socket (`ports add` then publishes to one of its members: --member).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["api_socket", "name"])]
    pub network: Option<String>,
}

/// `usernet stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The usernet to ask.
    #[command(flatten)]
    pub target: ApiTarget,

    /// Print the raw JSON reply.
    #[arg(long)]
    pub json: bool,

    /// Follow each figure with what it counts (every drop reason says why frames or
    /// flows were dropped).
    #[arg(long, conflicts_with = "json")]
    pub explain: bool,
}

/// `usernet ports`.
#[derive(Debug, Args)]
pub struct PortsArgs {
    /// The usernet to ask.
    #[command(flatten)]
    pub target: ApiTarget,

    /// What to do (required unless -v/--version).
    #[command(subcommand)]
    pub action: Option<PortsAction>,
}

/// What `usernet ports` does.
#[derive(Debug, Subcommand)]
pub enum PortsAction {
    /// Publish ports: [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp].
    Add {
        /// The ports to publish.
        #[arg(value_parser = parse_publish)]
        spec: Publish,
        /// With --network: the member (name, alias or IPv4 address) the ports go to.
        #[arg(long, value_name = "MEMBER")]
        member: Option<String>,
    },
    /// List the published ports.
    List,
    /// Unpublish a port by id.
    Remove {
        /// The id `add` or `list` showed.
        id: u32,
    },
}

/// A `-p` specification: a range of host ports to a range of container ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// TCP or UDP.
    pub proto: Proto,
    /// Host address to listen on; `None`: every address, `0.0.0.0` and also `[::]`
    /// where IPv6 is on (as Docker does).
    pub host_ip: Option<IpAddr>,
    /// First host port.
    pub host_port: u16,
    /// First container port.
    pub guest_port: u16,
    /// Number of ports.
    pub count: u16,
    /// The host interface the listeners are bound to (`SO_BINDTODEVICE`, pasta's
    /// `ADDR%IF/` and `%IF/`); `None`: any.
    pub device: Option<String>,
}

impl Publish {
    /// The host addresses to listen on: the one given, else `0.0.0.0`, and `::` too
    /// when `ipv6`.
    pub fn host_addrs(&self, ipv6: bool) -> Vec<IpAddr> {
        match self.host_ip {
            Some(ip) => vec![ip],
            None if ipv6 => vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            ],
            None => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
        }
    }

    /// (host port, container port) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (0..self.count).map(|i| (self.host_port + i, self.guest_port + i))
    }
}

/// `FIRST[-LAST]`, 1..=65535, FIRST <= LAST.
pub(crate) fn parse_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => {
            let p = s.parse().ok()?;
            (p, p)
        }
    };
    (a != 0 && a <= b).then_some((a, b))
}

/// Parses `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]` (IPv6 in brackets).
pub fn parse_publish(s: &str) -> Result<Publish, String> {
    let bad = || {
        format!("bad port specification {s:?}: want [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]")
    };
    let (rest, proto) = match s.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Proto::Tcp),
        Some((rest, "udp")) => (rest, Proto::Udp),
        Some(_) => return Err(bad()),
        None => (s, Proto::Tcp),
    };
    let (host_ip, ports) = if let Some(v6) = rest.strip_prefix('[') {
        let (ip, ports) = v6.split_once("]:").ok_or_else(bad)?;
        (Some(IpAddr::V6(ip.parse().map_err(|_| bad())?)), ports)
    } else {
        match rest.matches(':').count() {
            1 => (None, rest),
            2 => {
                let (ip, ports) = rest.split_once(':').ok_or_else(bad)?;
                (Some(IpAddr::V4(ip.parse().map_err(|_| bad())?)), ports)
            }
            _ => return Err(bad()),
        }
    };
    let (host, guest) = ports.split_once(':').ok_or_else(bad)?;
    let (h0, h1) = parse_range(host).ok_or_else(bad)?;
    let (g0, g1) = parse_range(guest).ok_or_else(bad)?;
    let count = h1 - h0 + 1;
    if g1 != g0 && g1 - g0 + 1 != count {
        return Err(format!(
            "bad port specification {s:?}: the ranges differ in length"
        ));
    }
    if u32::from(g0) + u32::from(count) - 1 > u32::from(u16::MAX) {
        return Err(bad());
    }
    Ok(Publish {
        proto,
        host_ip,
        host_port: h0,
        guest_port: g0,
        count,
        device: None,
    })
}

/// How to read the positional target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetnsType {
    /// A process id: join /proc/PID/ns/{user,net}.
    Pid,
    /// A network namespace file, e.g. /run/netns/NAME.
    Path,
    /// An open TAP file descriptor.
    Tapfd,
}

/// Network options shared by both modes.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// MTU of the TAP (1..65521).
    #[arg(short = 'm', long, default_value_t = 1500, value_parser = parse_mtu)]
    pub mtu: u32,

    /// Guest network: guest net+100, gateway net+2, DNS net+3.
    #[arg(long, value_name = "A.B.C.D/N", default_value = "10.0.2.0/24", value_parser = parse_cidr)]
    pub cidr: Network,

    /// The gateway no longer reaches the host's 127.0.0.1.
    #[arg(long, alias = "no-host-loopback")]
    pub disable_host_loopback: bool,

    /// No DNS forwarder at net+3.
    #[arg(long)]
    pub disable_dns: bool,

    /// Bind outbound IPv4 host sockets to this address (or this interface's address).
    #[arg(long, value_name = "ADDR|IFNAME")]
    pub outbound_addr: Option<String>,

    /// Bind outbound IPv6 host sockets to this address (or this interface's address).
    #[arg(long, value_name = "ADDR|IFNAME")]
    pub outbound_addr6: Option<String>,

    /// Guest IPv6 network (a /64): guest ::100, gateway ::2, DNS ::3.
    #[arg(long, value_name = "PREFIX/64", default_value = "fd00::/64", value_parser = parse_cidr6)]
    pub cidr6: Network6,

    /// Enable IPv6: fd00::/64 by router advertisements (SLAAC), gateway fd00::2 (the
    /// host's ::1), DNS fd00::3; with --configure also fd00::100 and a default route.
    /// On by default in `usernet run`.
    #[arg(short = '6', long)]
    pub enable_ipv6: bool,

    /// JSON API socket (slirp4netns's add_hostfwd, list_hostfwd, remove_hostfwd).
    #[arg(short = 'a', long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Publish ports: [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]
    /// (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = parse_publish)]
    pub publish: Vec<Publish>,

    /// After start-up: private mount namespace, a read-only empty root holding only
    /// resolv.conf, every capability dropped but CAP_NET_BIND_SERVICE, no_new_privs.
    /// On by default in `usernet run`.
    #[arg(long)]
    pub enable_sandbox: bool,

    /// After start-up: a seccomp allow list of the syscalls the event loop needs; any
    /// other kills the process. On by default in `usernet run`.
    #[arg(long)]
    pub enable_seccomp: bool,

    /// Most TCP flows at once; more are refused with a RST.
    #[arg(long, value_name = "N", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tcp_flows: u32,

    /// Most TCP flows whose host connection is still pending (a SYN flood's reach).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_half_open: u32,

    /// Most UDP flows at once; datagrams of new ones are dropped beyond.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_udp_flows: u32,

    /// Most ICMP echo flows at once.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_icmp_flows: u32,

    /// Most published ports (rules) at once.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub max_published_ports: u32,

    /// Most API clients served at once; a new one beyond that closes the one that has
    /// waited longest without sending a complete request.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_api_clients: u32,

    /// Bytes buffered per TCP flow and direction (memory is committed as data flows).
    #[arg(long, value_name = "BYTES", default_value_t = 2_097_152, value_parser = clap::value_parser!(u32).range(4096..=16_777_216))]
    pub tcp_buffer: u32,

    /// Microseconds the event loop may poll before it sleeps while traffic is
    /// interactive (lower latency for a busier CPU); 0 always sleeps at once.
    #[arg(long, value_name = "USEC", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub busy_poll: u32,

    /// Write every frame of the TAP, both ways, to FILE in pcap format (tcpdump,
    /// Wireshark); the file stops growing at 1 GiB.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace (default: $RUST_LOG, else warn).
    #[arg(long, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace", "off"])]
    pub log_level: Option<String>,

    #[command(flatten)]
    pub egress: crate::egress::EgressPolicy,
}

/// Attach mode (slirp4netns's command line).
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// In the namespace: bring up lo and the TAP, set MTU, address net+100 and the
    /// default route via net+2.
    #[arg(short = 'c', long)]
    pub configure: bool,

    /// Exit when this file descriptor (a pipe's read end) reaches end of file.
    #[arg(short = 'e', long, value_name = "FD")]
    pub exit_fd: Option<i32>,

    /// Write "1" to this file descriptor and close it once ready.
    #[arg(short = 'r', long, value_name = "FD")]
    pub ready_fd: Option<i32>,

    /// How to read the target: pid, path or tapfd (default: pid if numeric, else path).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub netns_type: Option<NetnsType>,

    /// User namespace to join (default with a PID: /proc/PID/ns/user).
    #[arg(long, value_name = "PATH")]
    pub userns_path: Option<PathBuf>,

    /// MAC address of the TAP (with --configure).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub macaddress: Option<[u8; 6]>,

    #[command(flatten)]
    pub net: NetArgs,

    /// PID, namespace PATH, or TAP FD (required unless -v/--version).
    #[arg(value_name = "PID|PATH|FD", required_unless_present = "version")]
    pub target: Option<String>,

    /// TAP device name.
    #[arg(value_name = "TAPNAME", default_value = "tap0")]
    pub tap_name: String,
}

/// `usernet run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub net: NetArgs,

    /// MAC address of the guest's TAP.
    #[arg(long, visible_alias = "mac", value_name = "MAC", value_parser = parse_mac)]
    pub macaddress: Option<[u8; 6]>,

    /// Attach the command to this network (see `usernet network`) instead of a private
    /// one: its own address on the network's subnet, names, shared NAT. `none`: only
    /// `lo`; `host`: usernet's own network namespace; `container:PID`: PID's.
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,

    /// Name of this run: its API socket is $XDG_RUNTIME_DIR/usernet/NAME.sock (as root
    /// without XDG_RUNTIME_DIR: /run/usernet/NAME.sock) unless -a is given; `usernet
    /// ports`, `stats` and `ps` find it by this name. Default: usernet's PID. With
    /// --network also the command's name in the network's DNS.
    #[arg(long = "name", value_name = "NAME", value_parser = crate::runs::parse_name)]
    pub member_name: Option<String>,

    /// With --network: more names for it (repeatable).
    #[arg(long = "alias", value_name = "NAME", requires = "network")]
    pub aliases: Vec<String>,

    /// With --network: its IPv4 address (default: the next free one).
    #[arg(long = "ip", value_name = "ADDR", requires = "network")]
    pub ip: Option<std::net::Ipv4Addr>,

    /// With --network: its IPv6 address (default: derived from the IPv4 one).
    #[arg(long = "ip6", value_name = "ADDR", requires = "network")]
    pub ip6: Option<std::net::Ipv6Addr>,

    /// No IPv6 for the command (it is on by default in run mode).
    #[arg(long, conflicts_with = "enable_ipv6")]
    pub disable_ipv6: bool,

    /// Do not sandbox usernet (the sandbox is on by default in run mode).
    #[arg(long, conflicts_with = "enable_sandbox")]
    pub no_sandbox: bool,

    /// No seccomp filter (it is on by default in run mode).
    #[arg(long, conflicts_with = "enable_seccomp")]
    pub no_seccomp: bool,

    /// Seconds the command gets to end after usernet passed it SIGTERM, SIGINT, SIGHUP or
    /// SIGQUIT; then it and every process of its PID namespace are killed.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub stop_timeout: u32,

    /// Print usernet's version and exit.
    #[arg(short = 'v', long = "version")]
    pub version: bool,

    /// The command and its arguments.
    #[arg(
        required_unless_present = "version",
        trailing_var_arg = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

/// slirp4netns's message for a bad `--mtu`, kept word for word (callers match it).
const MTU_ERROR: &str = "MTU must be a positive integer (< 65522)";

fn parse_mtu(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(mtu) if (1..65522).contains(&mtu) => Ok(mtu),
        _ => Err(MTU_ERROR.into()),
    }
}

/// `A.B.C.D/N` with 1-3 digits per octet and 1-2 prefix digits: slirp4netns's regex.
fn cidr_shape(s: &str) -> Option<(&str, &str)> {
    let (addr, prefix) = s.split_once('/')?;
    let digits =
        |p: &str, max: usize| (1..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    let octets: Vec<&str> = addr.split('.').collect();
    (octets.len() == 4 && octets.iter().all(|o| digits(o, 3)) && digits(prefix, 2))
        .then_some((addr, prefix))
}

/// Parses `A.B.C.D/N` as slirp4netns does: prefix 1..25, a network address. The error's
/// first line is slirp4netns's own message (callers match it, e.g. `invalid CIDR: 24`);
/// usernet's explanation follows on the next line.
pub fn parse_cidr(s: &str) -> Result<Network, String> {
    let (addr, prefix) = cidr_shape(s)
        .ok_or_else(|| format!("invalid CIDR: {s}\nthe guest network looks like 10.0.2.0/24"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| {
        format!("invalid network address: {addr}\nin --cidr {s}: not an IPv4 address")
    })?;
    let prefix_len: u8 = prefix
        .parse()
        .map_err(|_| format!("invalid prefix length: {prefix}"))?;
    if !(1..=25).contains(&prefix_len) {
        return Err(format!(
            "prefix length needs to be 1-25\nin --cidr {s}: the guest address is net+100"
        ));
    }
    let net = Network::slirp(addr, prefix_len);
    if u32::from(addr) & !u32::from(net.netmask()) != 0 {
        return Err(format!(
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24\n\
             in --cidr {s}: host bits are set"
        ));
    }
    Ok(net)
}

/// Options whose validation errors keep slirp4netns's wording and exit status 1.
const SLIRP4NETNS_VALIDATED: [&str; 2] = ["--cidr", "--mtu"];

/// Exits on a command-line error. A bad value of one of slirp4netns's validated options
/// prints slirp4netns's message (the value parser's text) on stderr and exits 1, as
/// slirp4netns does; every other error is clap's (usage on stderr, exit 2; help and
/// version on stdout, exit 0).
pub fn exit_on_parse_error(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::ValueValidation {
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => arg.split([' ', '=']).next().unwrap_or(""),
            _ => "",
        };
        if SLIRP4NETNS_VALIDATED.contains(&arg) {
            if let Some(why) = std::error::Error::source(&e) {
                eprintln!("{why}");
                std::process::exit(1);
            }
        }
    }
    e.exit()
}

/// Parses an IPv6 /64 network prefix (SLAAC needs exactly 64 bits).
pub fn parse_cidr6(s: &str) -> Result<Network6, String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("IPv6 network must look like PREFIX::/64, not {s:?}"))?;
    let addr: std::net::Ipv6Addr = addr
        .parse()
        .map_err(|_| format!("bad IPv6 address in {s:?}"))?;
    if prefix != "64" {
        return Err(format!("IPv6 network {s:?} must be a /64 (SLAAC needs it)"));
    }
    if u128::from(addr) & u128::from(u64::MAX) != 0 {
        return Err(format!(
            "{s:?} is not a network prefix (interface bits set)"
        ));
    }
    if addr.segments()[0] & 0xffc0 == 0xfe80
        || addr.is_multicast()
        || addr.is_loopback()
        || addr.is_unspecified()
    {
        return Err(format!("{s:?} cannot be a guest network"));
    }
    Ok(Network6::slirp(addr))
}

pub(crate) fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .ok_or_else(|| format!("bad MAC address {s:?}"))?;
        if part.len() != 2 {
            return Err(format!("bad MAC address {s:?}"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("bad MAC address {s:?}"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s:?} is a multicast address"));
    }
    Ok(mac)
}

/// The slirp4netns release whose command line and API usernet implements.
pub const SLIRP4NETNS_COMPAT: &str = "1.2.0";

/// libslirp's `SLIRP_CONFIG_VERSION_MAX` that usernet's options correspond to. Scripts
/// parse it to decide which options exist: 2 brings `--outbound-addr`/`--outbound-addr6`,
/// 3 `--disable-dns`, 4 (libslirp 4.7) only adds a switch that slirp4netns does not
/// expose (turning the DHCP server off). usernet has them all; slirp4netns 1.2.0 with
/// libslirp 4.7 prints 4 too.
pub const SLIRP_CONFIG_VERSION_MAX: u32 = 4;

/// smoltcp and seccompiler versions, named in the version text (a unit test keeps them
/// equal to Cargo.lock's).
const SMOLTCP_VERSION: &str = "0.14.0";
const SECCOMPILER_VERSION: &str = "0.5.0";

/// The git commit `build.rs` found, or `unknown` (a tarball).
fn commit() -> &'static str {
    option_env!("USERNET_COMMIT").unwrap_or("unknown")
}

/// `usernet -v`: slirp4netns's five lines (`slirp4netns version`, `commit`, `libslirp`,
/// `SLIRP_CONFIG_VERSION_MAX`, `libseccomp`), with values true for usernet. The first
/// token after `slirp4netns version` is a semantic version (the slirp4netns release
/// implemented, usernet's own as build metadata) so that version parsers keep working;
/// the rest of the line says that this is usernet.
pub fn version_text() -> String {
    let v = env!("CARGO_PKG_VERSION");
    format!(
        "slirp4netns version {SLIRP4NETNS_COMPAT}+usernet.{v} (usernet {v}, a slirp4netns drop-in)\n\
         commit: {}\n\
         libslirp: none (usernet {v} on smoltcp {SMOLTCP_VERSION})\n\
         SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n\
         libseccomp: none (seccompiler {SECCOMPILER_VERSION})\n",
        commit(),
    )
}

/// `usernet run|ports|stats --version`: usernet's own version.
pub fn usernet_version_text() -> String {
    format!(
        "usernet version {}\ncommit: {}\nsmoltcp: {SMOLTCP_VERSION}\nslirp4netns-compatible: {SLIRP4NETNS_COMPAT}\n",
        env!("CARGO_PKG_VERSION"),
        commit(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn version_text_names_the_locked_versions() {
        let lock = include_str!("../Cargo.lock");
        for (name, v) in [
            ("smoltcp", SMOLTCP_VERSION),
            ("seccompiler", SECCOMPILER_VERSION),
        ] {
            let entry = format!("name = \"{name}\"\nversion = \"{v}\"\n");
            assert!(lock.contains(&entry), "Cargo.lock has no {entry:?}");
        }
        let text = version_text();
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(keys.len(), 5, "{text}");
        assert!(keys[0].starts_with("slirp4netns version "), "{text}");
        assert_eq!(
            keys[1..],
            [
                "commit",
                "libslirp",
                "SLIRP_CONFIG_VERSION_MAX",
                "libseccomp"
            ]
        );
    }

    #[test]
    fn cidr_validation_matches_slirp4netns() {
        assert!(parse_cidr("10.0.2.0/24").is_ok());
        assert!(parse_cidr("10.10.0.0/16").is_ok());
        assert!(parse_cidr("10.0.2.1/24").is_err());
        assert!(parse_cidr("10.0.2.0/26").is_err());
        assert!(parse_cidr("10.0.2.0/0").is_err());
        assert!(parse_cidr("10.0.2.0").is_err());
        let first_line = |s: &str| parse_cidr(s).unwrap_err().lines().next().map(str::to_owned);
        assert_eq!(first_line("24").as_deref(), Some("invalid CIDR: 24"));
        assert_eq!(
            first_line("10.0.2.0/123").as_deref(),
            Some("invalid CIDR: 10.0.2.0/123")
        );
        assert_eq!(
            first_line("300.0.2.0/24").as_deref(),
            Some("invalid network address: 300.0.2.0")
        );
        assert_eq!(
            first_line("10.0.2.0/33").as_deref(),
            Some("prefix length needs to be 1-25")
        );
    }

    #[test]
    fn cidr6_validation() {
        assert_eq!(parse_cidr6("fd00::/64"), Ok(Network6::DEFAULT));
        assert!(parse_cidr6("fd00:1:2:3::/64").is_ok());
        for bad in [
            "fd00::/48",
            "fd00::1/64",
            "fe80::/64",
            "ff02::/64",
            "fd00::",
            "x::/64",
        ] {
            assert!(parse_cidr6(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mtu_bounds() {
        assert!(parse_mtu("0").is_err());
        assert_eq!(parse_mtu("65522").unwrap_err(), MTU_ERROR);
        assert_eq!(parse_mtu("abc").unwrap_err(), MTU_ERROR);
        assert_eq!(parse_mtu("65521"), Ok(65521));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:cc"),
            Ok([2, 0, 0, 0xaa, 0xbb, 0xcc])
        );
        assert!(parse_mac("01:00:00:aa:bb:cc").is_err());
        assert!(parse_mac("02:00:00:aa:bb").is_err());
        assert!(parse_mac("02:00:00:aa:bb:cc:dd").is_err());
    }

    /// The attach-only fast path of [`Cli::parse_args`] gives what the whole command gives,
    /// and leaves every subcommand to the whole command.
    #[test]
    fn parse_args_fast_path_matches_the_whole_command() {
        let lines: [&[&str]; 7] = [
            &[
                "usernet",
                "--configure",
                "--mtu=65520",
                "-r",
                "3",
                "123",
                "tap0",
            ],
            &[
                "usernet",
                "--disable-host-loopback",
                "--mtu=65520",
                "--enable-sandbox",
                "--enable-seccomp",
                "--enable-ipv6",
                "-c",
                "-e",
                "3",
                "-r",
                "4",
                "--netns-type=path",
                "/run/user/1000/netns/x",
                "tap0",
            ],
            &["usernet", "--version"],
            &["usernet", "-v", "42"],
            &[
                "usernet",
                "-c",
                "--deny",
                "192.0.2.0/24",
                "-p",
                "8080:80",
                "42",
            ],
            &["usernet", "run", "--", "true"],
            &["usernet", "ps"],
        ];
        for line in lines {
            let args = || line.iter().map(OsString::from).collect::<Vec<_>>();
            let whole = Cli::try_parse_from(args()).unwrap();
            assert_eq!(
                format!("{:?}", Cli::parse_args(args())),
                format!("{whole:?}"),
                "{line:?}"
            );
            assert_eq!(
                whole.command.is_some(),
                names_subcommand(&args()),
                "{line:?}"
            );
        }
        // clap's `help` subcommand is the whole command's too (the attach-only command
        // would take it for a target).
        let help: Vec<OsString> = ["usernet", "help"].map(OsString::from).into();
        assert!(names_subcommand(&help));
        assert!(AttachCli::try_parse_from(&help).is_ok());
        // Both take slirp4netns's -v/--version ([`VersionFlag`]), neither clap's -V.
        for (name, cmd) in [("Cli", Cli::command()), ("AttachCli", AttachCli::command())] {
            let e = cmd.try_get_matches_from(["usernet", "-V"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{name}");
        }
    }

    #[test]
    fn attach_podman_command_line_parses() {
        let cli = Cli::try_parse_from([
            "usernet",
            "--disable-host-loopback",
            "--mtu=65520",
            "-c",
            "-r",
            "3",
            "-e",
            "4",
            "--netns-type=path",
            "/run/user/1000/netns/netns-x",
            "tap0",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.attach.net.mtu, 65520);
        assert_eq!(cli.attach.ready_fd, Some(3));
        assert_eq!(
            cli.attach.target.as_deref(),
            Some("/run/user/1000/netns/netns-x")
        );
    }

    #[test]
    fn publish_specs() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.proto, p.host_ip, p.host_port, p.guest_port, p.count),
            (Proto::Tcp, None, 8080, 80, 1)
        );
        assert_eq!(p.host_addrs(false), ["0.0.0.0".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            p.host_addrs(true),
            ["0.0.0.0".parse::<IpAddr>().unwrap(), "::".parse().unwrap()]
        );
        let p = parse_publish("0.0.0.0:8080:80").unwrap();
        assert_eq!(p.host_addrs(true), ["0.0.0.0".parse::<IpAddr>().unwrap()]);
        let p = parse_publish("127.0.0.1:5300-5302:53/udp").unwrap();
        assert_eq!(
            p.pairs().collect::<Vec<_>>(),
            [(5300, 53), (5301, 54), (5302, 55)]
        );
        assert_eq!(p.proto, Proto::Udp);
        let p = parse_publish("[::1]:8080-8081:80-81").unwrap();
        assert_eq!(p.host_ip, Some("::1".parse::<IpAddr>().unwrap()));
        assert_eq!(p.host_addrs(true), ["::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.count, 2);
        for bad in [
            "80",
            "0:80",
            "8080:80/sctp",
            "1.2.3:80:80",
            "8080-8081:80-82",
            "[::1:80:80",
            "9-8:80",
            "65534-65535:65535",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_takes_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "usernet", "run", "--mtu", "9000", "--", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let Some(Command::Run(run)) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.net.mtu, 9000);
        assert_eq!(run.command, ["sh", "-c", "exit 3"]);
    }
}
