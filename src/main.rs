//! # usernet
//!
//! Rootless user-space networking for containers: a slirp4netns drop-in built on smoltcp.
//!
//! Start-up, in this order (joining a user namespace needs a single-threaded process, and
//! usernet never starts a thread):
//! 1. parse and validate the command line ([`conf`]);
//! 2. get the TAP: fork a helper that joins the target's namespaces, creates and configures
//!    the TAP and passes its fd back ([`netns::open_tap`]); or, in run mode, fork the
//!    command's process in new namespaces ([`netns::spawn_run`]);
//! 3. build the [`forwarder::Forwarder`], [start](event_loop::start) the [`event_loop`]
//!    (API socket, published ports, sandbox), release run mode's command, and run.

#![deny(unsafe_code)]

mod api;
mod busy_poll;
mod cli_docs;
mod conf;
mod egress;
mod event_loop;
mod host;
mod isolation;
mod netns;
mod network;
mod pasta;
mod pcap;
mod pidns;
mod requests;
mod resolv_watch;
mod runs;
mod splice;
mod subsystem;
mod sys;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use forwarder::nat::{NatConfig, Network, Network6};
use forwarder::{Config, Forwarder, Limits, Topology};

use crate::conf::{
    AttachArgs, Cli, Command, NetArgs, NetnsType, NetworkAction, NetworkArgs, PortsAction,
    PortsArgs, RunArgs,
};
use crate::event_loop::Extras;
use crate::netns::{AttachSpec, RunSpec, Target, TargetWatch};
use crate::sys::link::{Ipv6Link, LinkConfig};
use crate::sys::tap::Tap;

/// Everything that stops usernet at start-up; printed as one line.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Tap(#[from] crate::sys::tap::TapError),
    #[error(transparent)]
    Loop(#[from] event_loop::LoopError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    Runs(#[from] runs::RunsError),
    /// `what` failed; the OS error follows once, from the source chain.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn main() -> ExitCode {
    sys::alloc::lazy_large_allocations();
    // pasta's command line: under a name containing "pasta", or `usernet pasta ARGS`.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.first().is_some_and(pasta::invoked_as_pasta) {
        return pasta::main(&args[1..]);
    }
    let cli = Cli::parse_args(args);
    if let Some(Command::Pasta(p)) = &cli.command {
        return pasta::main(&p.args);
    }
    if cli.version.asked {
        print!("{}", conf::version_text());
        return ExitCode::SUCCESS;
    }
    let sub_version = match &cli.command {
        Some(Command::Run(a)) => a.version,
        Some(Command::Ports(a)) => a.target.version,
        Some(Command::Egress(a)) => a.target.version,
        Some(Command::Stats(a)) => a.target.version,
        Some(Command::Ps(a)) => a.version,
        Some(Command::Man(_) | Command::Completions(_)) => false,
        Some(Command::Network(_)) | Some(Command::Pasta(_)) | None => false,
    };
    if sub_version {
        print!("{}", conf::usernet_version_text());
        return ExitCode::SUCCESS;
    }
    // Before anything opens a descriptor: keep only what the command line names.
    if let Some(keep) = cli.inherited_fds() {
        if let Err(e) = sys::fd::close_inherited(&keep) {
            eprintln!("usernet: cannot close inherited descriptors: {e}");
            return ExitCode::from(1);
        }
    }
    let level = match &cli.command {
        Some(Command::Run(r)) => r.net.log_level.clone(),
        None => cli.attach.net.log_level.clone(),
        _ => None,
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = level {
        logger.parse_filters(&level);
    }
    logger.format_target(false).init();
    let result = match cli.command {
        Some(Command::Run(args)) => run_mode(*args),
        Some(Command::Ports(args)) => ports_client(args),
        Some(Command::Egress(args)) => api_socket_of(&args.target)
            .and_then(|socket| egress_client(args, |req| api_call(&socket, req))),
        Some(Command::Stats(args)) => stats_client(args),
        Some(Command::Network(args)) => network_command(args),
        Some(Command::Ps(_)) => ps_client(),
        Some(Command::Pasta(p)) => return pasta::main(&p.args),
        Some(Command::Man(args)) => cli_docs::man(args.dir.as_deref(), &mut io::stdout())
            .map(|()| 0)
            .map_err(|source| MainError::Io {
                what: "cannot write the man page".into(),
                source,
            }),
        Some(Command::Completions(args)) => {
            cli_docs::completions(args.shell.shell(), &mut io::stdout());
            Ok(0)
        }
        None => attach_mode(cli.attach),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("usernet: {msg}");
            if let Some(hint) = hint_for(&msg) {
                eprintln!("usernet: {hint}");
            }
            ExitCode::from(1)
        }
    }
}

/// What to do about an error, where usernet can tell: today a `/dev/net/tun` that an
/// unprivileged user may not open (mode 0600 on some distributions).
fn hint_for(msg: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let denied = msg.contains("Permission denied") || msg.contains("Operation not permitted");
    if !msg.contains("/dev/net/tun") || !denied {
        return None;
    }
    let mode = std::fs::metadata("/dev/net/tun").ok()?.permissions().mode() & 0o777;
    (mode & 0o006 != 0o006).then(|| {
        format!(
            "/dev/net/tun is mode {mode:04o}, so only its owner may open it; as root, \
             `chmod 0666 /dev/net/tun` lets every user create TAP devices in their own \
             namespaces (the default on Debian and Fedora; a udev rule \
             `KERNEL==\"tun\", MODE=\"0666\"` keeps it across reboots)"
        )
    })
}

fn link_config(
    net: &Network,
    net6: Network6,
    mtu: u32,
    tap_name: &str,
    mac: Option<[u8; 6]>,
    ipv6: bool,
) -> LinkConfig {
    LinkConfig {
        name: tap_name.to_owned(),
        mtu,
        addr: net.guest(),
        prefix_len: net.prefix_len,
        gateway: net.gateway(),
        mac,
        // IPv6 needs an MTU of at least 1280.
        ipv6: (ipv6 && mtu >= 1280).then(|| Ipv6Link {
            addr: net6.guest(),
            prefix_len: net6.prefix_len,
            gateway: net6.gateway(),
        }),
        routes: Vec::new(),
    }
}

/// What start-up decided that the forwarder needs to know.
struct Setup {
    /// IPv6 on the guest link.
    ipv6: bool,
    /// The guest's addresses are known (`--configure`, run mode).
    configured: bool,
}

fn attach_mode(args: AttachArgs) -> Result<i32, MainError> {
    let target = args.target.clone().unwrap_or_default();
    if args.macaddress.is_some() && !args.configure {
        return Err(MainError::Usage("--macaddress needs --configure".into()));
    }
    let kind = args.netns_type.unwrap_or(if target.parse::<i32>().is_ok() {
        NetnsType::Pid
    } else {
        NetnsType::Path
    });
    let ipv6 = args.net.enable_ipv6;
    let configure = args.configure.then(|| {
        link_config(
            &args.net.cidr,
            args.net.cidr6,
            args.net.mtu,
            &args.tap_name,
            args.macaddress,
            ipv6,
        )
    });
    let (tap, target, helper) = match kind {
        NetnsType::Tapfd => {
            let fd = parse_fd(&target, "TAP file descriptor")?;
            let fd = sys::fd::adopt(fd).map_err(|source| MainError::Io {
                what: format!("bad TAP file descriptor {target}"),
                source,
            })?;
            (Tap::from_fd(fd)?, None, None)
        }
        NetnsType::Pid | NetnsType::Path => {
            let target = if kind == NetnsType::Pid {
                Target::Pid(parse_fd(&target, "PID")?)
            } else {
                Target::Path(PathBuf::from(&target))
            };
            let spec = AttachSpec {
                target: target.clone(),
                userns: args.userns_path.clone(),
                tap_name: args.tap_name.clone(),
                vnet_hdr: true,
                configure,
            };
            let (tap, helper) = netns::open_tap(&spec)?;
            (tap, Some(target), Some(helper))
        }
    };
    let watch = match &target {
        Some(t) => match TargetWatch::new(t) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("cannot watch {t:?}, usernet will not notice when it goes away: {e}");
                None
            }
        },
        None => None,
    };
    let adopt = |fd: Option<i32>, what: &str| {
        fd.map(|fd| {
            sys::fd::adopt(fd).map_err(|source| MainError::Io {
                what: format!("bad {what} {fd}"),
                source,
            })
        })
        .transpose()
    };
    let extras = Extras {
        exit_fd: adopt(args.exit_fd, "exit fd")?,
        ready_fd: adopt(args.ready_fd, "ready fd")?,
        watch,
        child: None,
        isolation: isolation_of(&args.net),
        api_socket: args.net.api_socket.clone(),
        info: serde_json::json!({"mode": "attach", "pid": std::process::id(), "ipv6": ipv6}),
        publish: args.net.publish.clone(),
        publish_ipv6: ipv6,
        max_api_clients: args.net.max_api_clients as usize,
        busy_poll: std::time::Duration::from_micros(args.net.busy_poll.into()),
        resolv: resolv_watch(&args.net),
        before_ready: None,
        services: Vec::new(),
        pcap: open_pcap(&args.net, &tap)?,
        helper,
    };
    let setup = Setup {
        ipv6,
        configured: args.configure,
    };
    let fwd = forwarder(&args.net, &tap, &setup)?;
    let signals = event_loop::signal_fd(false)?;
    Ok(event_loop::run(tap, fwd, signals, extras)?)
}

fn run_mode(args: RunArgs) -> Result<i32, MainError> {
    let special = args
        .network
        .as_deref()
        .is_some_and(|n| n == "none" || n == "host" || n.starts_with("container:"));
    let member_opts = args.member_name.is_some()
        || !args.aliases.is_empty()
        || args.ip.is_some()
        || args.ip6.is_some()
        || args.macaddress.is_some()
        || !args.net.publish.is_empty();
    if special && member_opts {
        return Err(MainError::Usage(
            "--name, --alias, --ip, --ip6, --mac and -p need a usernet network, not --network none|host|container:PID".into(),
        ));
    }
    match args.network.as_deref() {
        None => {}
        Some("none") => return run_without_network(args),
        Some("host") => return run_in_place(&args.command, None),
        Some(spec) if spec.starts_with("container:") => {
            let who = &spec["container:".len()..];
            let pid = parse_fd(who, "container PID")?;
            return run_in_place(&args.command, Some(&Target::Pid(pid)));
        }
        Some(name) => {
            let name = name.to_owned();
            return run_network(args, &name);
        }
    }
    let net = &args.net.cidr;
    let ipv6 = !args.disable_ipv6 && args.net.mtu >= 1280;
    let resolv_conf = if args.net.disable_dns {
        // Keep the host's resolvers out of reach as asked; the command gets none.
        String::new()
    } else {
        let v6 = args.net.cidr6.dns().filter(|_| ipv6).map(IpAddr::V6);
        [net.dns().map(IpAddr::V4), v6]
            .into_iter()
            .flatten()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect()
    };
    // Validate everything that can fail before the command is started.
    let nameservers = nameservers(&args.net);
    let outbound = outbound_addrs(&args.net)?;
    let spec = RunSpec {
        cmd: args.command.clone(),
        tap_name: "tap0".into(),
        vnet_hdr: true,
        link: link_config(
            net,
            args.net.cidr6,
            args.net.mtu,
            "tap0",
            args.macaddress,
            ipv6,
        ),
        resolv_conf,
        hostname: None,
    };
    // The API socket, there without asking: refuse a name in use before anything starts.
    let name = args
        .member_name
        .clone()
        .unwrap_or_else(|| std::process::id().to_string());
    let api_socket = match &args.net.api_socket {
        Some(path) => path.clone(),
        None => runs::claim(&runs::prepare_dir()?, &name)?,
    };
    let info = serde_json::json!({
        "mode": "run",
        "ipv6": ipv6,
        "name": name,
        "pid": std::process::id(),
        "command": args.command.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
    });
    // Blocked before the fork: the command's namespace holder inherits the mask and
    // relays these signals instead of dying of them.
    let signals = event_loop::signal_fd(true)?;
    let netns::RunChild { pid, tap, mut hold } = netns::spawn_run(&spec)?;
    let setup = Setup {
        ipv6,
        configured: true,
    };
    let fwd = forwarder_with(&args.net, &tap, nameservers, outbound, &setup);
    let extras = Extras {
        exit_fd: None,
        ready_fd: None,
        watch: None,
        child: Some(pidns::Supervisor::new(
            pid,
            std::time::Duration::from_secs(args.stop_timeout.into()),
        )),
        isolation: isolation::Isolation {
            sandbox: !args.no_sandbox,
            seccomp: !args.no_seccomp,
            ..isolation_of(&args.net)
        },
        api_socket: Some(api_socket),
        info,
        publish: args.net.publish.clone(),
        publish_ipv6: ipv6,
        max_api_clients: args.net.max_api_clients as usize,
        busy_poll: std::time::Duration::from_micros(args.net.busy_poll.into()),
        resolv: resolv_watch(&args.net),
        before_ready: None,
        services: Vec::new(),
        pcap: open_pcap(&args.net, &tap)?,
        helper: None,
    };
    // Every set-up step first: if one fails, `hold` is dropped unreleased and the child
    // exits without running the command.
    let running = event_loop::start(tap, fwd, signals, extras)?;
    hold.release()?;
    Ok(running.run()?)
}

/// `usernet egress`: one API request through `ask`, human-readable output.
///
/// # Errors
/// What the API says is wrong, or a missing action.
fn egress_client(
    args: conf::EgressArgs,
    ask: impl Fn(&serde_json::Value) -> Result<serde_json::Value, MainError>,
) -> Result<i32, MainError> {
    use conf::EgressAction;
    let Some(action) = args.action else {
        return Err(MainError::Usage(
            "egress needs an action: list, add, remove or default (see usernet egress --help)"
                .into(),
        ));
    };
    let member = args.member.as_ref().map(|m| serde_json::json!(m));
    let with = |execute: &str, mut arguments: serde_json::Value| {
        if let Some(m) = &member {
            arguments["member"] = m.clone();
        }
        serde_json::json!({"execute": execute, "arguments": arguments})
    };
    let reset_line = |reply: &serde_json::Value| {
        if let Some(n) = reply
            .pointer("/return/reset")
            .and_then(serde_json::Value::as_u64)
        {
            if n > 0 {
                println!("reset {n} open flows");
            }
        }
    };
    match action {
        EgressAction::List => {
            let reply = ask(&with("list_egress", serde_json::json!({})))?;
            let p = &reply["return"];
            println!("ID HITS RULE");
            for r in p["rules"].as_array().into_iter().flatten() {
                println!(
                    "{} {} {}",
                    r["id"],
                    r["hits"],
                    r["rule"].as_str().unwrap_or("?")
                );
            }
            let hits = p["default_hits"].as_u64().unwrap_or(0);
            println!(
                "- {hits} default {}",
                p["default"].as_str().unwrap_or("allow")
            );
        }
        EgressAction::Add {
            rule,
            position,
            reset,
        } => {
            let mut a = serde_json::json!({"rule": rule.join(" "), "reset": reset});
            if let Some(n) = position {
                a["position"] = serde_json::json!(n);
            }
            let reply = ask(&with("add_egress_rule", a))?;
            println!(
                "{}",
                reply
                    .pointer("/return/id")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null)
            );
            reset_line(&reply);
        }
        EgressAction::Remove { id, reset } => {
            let reply = ask(&with(
                "remove_egress_rule",
                serde_json::json!({"id": id, "reset": reset}),
            ))?;
            reset_line(&reply);
        }
        EgressAction::Default { action, reset } => {
            let reply = ask(&with(
                "set_egress_default",
                serde_json::json!({"default": action, "reset": reset}),
            ))?;
            reset_line(&reply);
        }
    }
    Ok(0)
}

/// One API request from a client subcommand: the reply, or its error's text.
fn api_call(socket: &Path, req: &serde_json::Value) -> Result<serde_json::Value, MainError> {
    let reply = api::request(socket, req).map_err(|source| MainError::Io {
        what: format!("API socket {}", socket.display()),
        source,
    })?;
    match reply
        .pointer("/error/desc")
        .and_then(serde_json::Value::as_str)
    {
        Some(desc) => Err(MainError::Usage(desc.to_owned())),
        None => Ok(reply),
    }
}

/// `usernet stats`: the `get_stats` reply, one `section.name value` line each.
fn stats_client(args: conf::StatsArgs) -> Result<i32, MainError> {
    use serde_json::json;
    let socket = api_socket_of(&args.target)?;
    let reply = api_call(&socket, &json!({"execute": "get_stats"}))?;
    if args.json {
        println!("{reply}");
        return Ok(0);
    }
    let empty = serde_json::Map::new();
    let line = |key: String, value: &serde_json::Value, why: Option<&str>| match why {
        Some(why) if args.explain => println!("{:<40} {why}", format!("{key} {value}")),
        _ => println!("{key} {value}"),
    };
    for (section, body) in reply["return"].as_object().unwrap_or(&empty) {
        if section == "egress" {
            egress::stats_lines(body)
                .iter()
                .for_each(|l| println!("{l}"));
            continue;
        }
        for (name, value) in body.as_object().unwrap_or(&empty) {
            line(
                format!("{section}.{name}"),
                value,
                explain_stat(section, name),
            );
        }
        // A network's members: their ports' counters.
        for member in body.as_array().into_iter().flatten() {
            let who = member["name"].as_str().unwrap_or("?");
            for (name, value) in member["port_counters"].as_object().unwrap_or(&empty) {
                let why = forwarder::switch::PortCounters::explain(name);
                line(format!("{section}.{who}.{name}"), value, why);
            }
        }
    }
    Ok(0)
}

/// What the `get_stats` figure `section.name` counts, for `usernet stats --explain`. The
/// counters explain themselves (their doc comments); flows and limits are explained here.
fn explain_stat(section: &str, name: &str) -> Option<&'static str> {
    match (section, name) {
        ("counters", _) => forwarder::Counters::explain(name),
        ("flows", "tcp_half_open") => Some("TCP flows whose host connection is still pending"),
        ("flows", "published_ports") => Some("published port rules"),
        ("flows", _) => Some("flows of this protocol open now"),
        ("limits", _) => {
            Some("the most flows of this kind at once: beyond it new ones are refused and counted")
        }
        ("loop", "sleeps") => Some("waits of the event loop that slept in epoll_wait"),
        ("loop", "spin_polls") => Some("non-blocking polls while busy polling (--busy-poll)"),
        ("loop", "spun_wakeups") => {
            Some("waits an event ended while busy polling (a wake-up saved)")
        }
        ("loop", "spin_us") => Some("microseconds spent busy polling"),
        _ => None,
    }
}

/// `usernet ps`: the live runs (stale sockets are removed on the way), one line each.
fn ps_client() -> Result<i32, MainError> {
    use serde_json::json;
    let (_, list) = runs::live_runs()?;
    println!("NAME PID PORTS COMMAND");
    for run in list {
        // A run that ends meanwhile is left out.
        let Ok(info) = api_call(&run.socket, &json!({"execute": "get_info"})) else {
            continue;
        };
        let ports = api_call(&run.socket, &json!({"execute": "list_hostfwd"}))
            .map(|l| {
                l["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(api::describe_short)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let command = info
            .pointer("/return/command")
            .and_then(serde_json::Value::as_array)
            .map(|c| {
                c.iter()
                    .filter_map(serde_json::Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let pid = info
            .pointer("/return/pid")
            .map(ToString::to_string)
            .unwrap_or_default();
        println!(
            "{} {pid} {} {command}",
            run.name,
            if ports.is_empty() { "-" } else { &ports }
        );
    }
    Ok(0)
}

/// The API socket a client subcommand talks to: a network's, the one given, or a run's.
fn api_socket_of(target: &conf::ApiTarget) -> Result<PathBuf, MainError> {
    Ok(match &target.network {
        Some(net) => {
            network::load(net)?;
            network::socket_path(net)
        }
        None => runs::find_socket(target.api_socket.as_deref(), target.name.as_deref())?,
    })
}

/// `usernet ports`: one API request per rule, human-readable output.
fn ports_client(args: PortsArgs) -> Result<i32, MainError> {
    use serde_json::{json, Value};
    let socket = api_socket_of(&args.target)?;
    let ask = |req: Value| api_call(&socket, &req);
    // A run answers list_hostfwd as slirp4netns does (no "return"); a network wraps it.
    let entries = |list: &Value| {
        list.get("return").unwrap_or(list)["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let Some(action) = args.action else {
        return Err(MainError::Usage(
            "ports needs an action: add, list or remove (see usernet ports --help)".into(),
        ));
    };
    match action {
        PortsAction::Add { spec, member } => {
            if member.is_some() != args.target.network.is_some() {
                return Err(MainError::Usage(
                    "ports add: --network and --member go together (a network's ports go to one of its members)".into(),
                ));
            }
            // Without an address, both families where the run has IPv6 (as `-p`); a
            // slirp4netns answers get_info with an error: IPv4 only then.
            let ipv6 = ask(json!({"execute": "get_info"}))
                .ok()
                .and_then(|i| i.pointer("/return/ipv6").and_then(Value::as_bool))
                .unwrap_or(false);
            for ip in spec.host_addrs(ipv6) {
                for (host_port, guest_port) in spec.pairs() {
                    let mut req = json!({"execute": "add_hostfwd", "arguments": {
                        "proto": spec.proto.as_str(), "host_addr": ip.to_string(),
                        "host_port": host_port, "guest_port": guest_port }});
                    if let Some(m) = &member {
                        req["arguments"]["member"] = json!(m);
                    }
                    let reply = ask(req)?;
                    let id = reply.pointer("/return/id").cloned().unwrap_or(Value::Null);
                    let list = ask(json!({"execute": "list_hostfwd"}))?;
                    let entry = entries(&list).into_iter().find(|e| e["id"] == id);
                    match entry {
                        Some(e) => println!("{}", api::describe(&e)),
                        None => println!("{id}"),
                    }
                }
            }
        }
        PortsAction::List => {
            let list = ask(json!({"execute": "list_hostfwd"}))?;
            println!("ID PROTO HOST GUEST");
            for e in entries(&list) {
                println!("{}", api::describe(&e));
            }
        }
        PortsAction::Remove { id } => {
            let reply = ask(json!({"execute": "remove_hostfwd", "arguments": {"id": id}}));
            if reply.is_err() {
                // slirp4netns's reply only says "bad arguments.id": say what is wrong.
                let list = ask(json!({"execute": "list_hostfwd"}))?;
                let ids: Vec<String> = entries(&list).iter().map(|e| e["id"].to_string()).collect();
                if !ids.contains(&id.to_string()) {
                    return Err(MainError::Usage(if ids.is_empty() {
                        format!("no published port with id {id}: no ports are published")
                    } else {
                        format!(
                            "no published port with id {id} (the ids are {}; `usernet ports list` shows them)",
                            ids.join(", ")
                        )
                    }));
                }
            }
            reply?;
            println!("removed {id}");
        }
    }
    Ok(0)
}

/// The isolation stages asked for: `--enable-sandbox`, `--enable-seccomp`. usernet
/// still reads resolv.conf when sandboxed (the DNS forwarder's upstreams).
fn isolation_of(net: &NetArgs) -> isolation::Isolation {
    isolation::Isolation {
        sandbox: net.enable_sandbox,
        seccomp: net.enable_seccomp,
        keep: vec![PathBuf::from("/etc/resolv.conf")],
        keep_trees: vec![PathBuf::from("/etc"), PathBuf::from("/run")],
    }
}

/// `--pcap FILE`, created now (before any isolation stage).
fn open_pcap(net: &NetArgs, tap: &Tap) -> Result<Option<pcap::Pcap>, MainError> {
    net.pcap
        .as_ref()
        .map(|path| {
            pcap::Pcap::create(path, tap.vnet_hdr_len()).map_err(|source| MainError::Io {
                what: format!("cannot create {}", path.display()),
                source,
            })
        })
        .transpose()
}

fn parse_fd(s: &str, what: &str) -> Result<i32, MainError> {
    s.parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| MainError::Usage(format!("bad {what}: {s:?}")))
}

/// The watch that keeps the DNS forwarder's nameservers in step with resolv.conf; none
/// with `--disable-dns`, or (logged) where inotify is not available.
fn resolv_watch(net: &NetArgs) -> Option<resolv_watch::ResolvWatch> {
    if net.disable_dns {
        return None;
    }
    match resolv_watch::ResolvWatch::new(Path::new("/etc/resolv.conf"), nameservers(net)) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("cannot watch /etc/resolv.conf ({e}): its changes will not be followed");
            None
        }
    }
}

fn nameservers(net: &NetArgs) -> Vec<std::net::SocketAddr> {
    if net.disable_dns {
        return Vec::new();
    }
    match forwarder::dns::read_resolv_conf(Path::new("/etc/resolv.conf")) {
        Ok(list) if !list.is_empty() => list,
        Ok(_) => {
            log::warn!("/etc/resolv.conf names no nameserver: the DNS forwarder will not answer");
            Vec::new()
        }
        Err(e) => {
            log::warn!("cannot read /etc/resolv.conf ({e}): the DNS forwarder will not answer");
            Vec::new()
        }
    }
}

/// `--outbound-addr` and `--outbound-addr6`.
fn outbound_addrs(net: &NetArgs) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), MainError> {
    let v4 = match &net.outbound_addr {
        None => None,
        Some(spec) => match outbound_addr(spec, "--outbound-addr", false)? {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        },
    };
    let v6 = match &net.outbound_addr6 {
        None => None,
        Some(spec) => match outbound_addr(spec, "--outbound-addr6", true)? {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        },
    };
    Ok((v4, v6))
}

/// An address of the wanted family, or the first such address of an interface (for
/// IPv6, not a link-local one).
fn outbound_addr(spec: &str, flag: &str, v6: bool) -> Result<IpAddr, MainError> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    if let Ok(ip) = spec.parse::<IpAddr>() {
        if ip.is_ipv6() != v6 {
            return Err(MainError::Usage(format!(
                "{flag} takes an {family} address, not {spec}"
            )));
        }
        return Ok(ip);
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| MainError::Io {
        what: "cannot list interfaces".into(),
        source: e.into(),
    })?;
    for ifa in addrs.filter(|ifa| ifa.interface_name == spec) {
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        if let (false, Some(sin)) = (v6, addr.as_sockaddr_in()) {
            return Ok(IpAddr::V4(sin.ip()));
        }
        if let (true, Some(sin6)) = (v6, addr.as_sockaddr_in6()) {
            let ip = sin6.ip();
            if ip.segments()[0] & 0xffc0 != 0xfe80 {
                return Ok(IpAddr::V6(ip));
            }
        }
    }
    Err(MainError::Usage(format!(
        "{flag} {spec}: no such {family} address or interface with one"
    )))
}

fn forwarder(net: &NetArgs, tap: &Tap, setup: &Setup) -> Result<Forwarder, MainError> {
    let outbound = outbound_addrs(net)?;
    Ok(forwarder_with(net, tap, nameservers(net), outbound, setup))
}

fn forwarder_with(
    net: &NetArgs,
    tap: &Tap,
    nameservers: Vec<std::net::SocketAddr>,
    outbound: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    setup: &Setup,
) -> Forwarder {
    let net6 = setup.ipv6.then_some(net.cidr6);
    let cfg = Config {
        nat: NatConfig {
            net: net.cidr,
            net6,
            host_loopback: !net.disable_host_loopback,
            aliases: Vec::new(),
        },
        services: forwarder::Services::default(),
        dns_enabled: !net.disable_dns,
        nameservers,
        mtu: net.mtu as usize,
        vnet_hdr_len: tap.vnet_hdr_len(),
        offload: enable_offloads(tap),
        outbound_v4: outbound.0,
        outbound_v6: outbound.1,
        guest_v4: setup.configured.then(|| net.cidr.guest()),
        guest_v6: net6.filter(|_| setup.configured).map(|n| n.guest()),
        tcp_buffer: net.tcp_buffer as usize,
        limits: Limits {
            tcp_flows: net.max_tcp_flows as usize,
            tcp_half_open: net.max_half_open as usize,
            udp_flows: net.max_udp_flows as usize,
            icmp_flows: net.max_icmp_flows as usize,
            ports: net.max_published_ports as usize,
            ..Limits::default()
        },
        seed: random_seed(),
        ..Config::default()
    };
    let mut fwd = Forwarder::new(
        cfg,
        Topology::Single,
        smoltcp::time::Instant::from_micros(0),
    );
    fwd.set_host_addrs(egress::host_addrs());
    fwd.set_egress(&[], net.egress.spec.as_ref());
    fwd
}

/// Turns on checksum and TCP segmentation offloads on a TAP with a vnet header: the
/// guest's kernel then sends and takes 64 KiB TCP super-frames even at MTU 1500.
/// `USERNET_NO_OFFLOAD=1` keeps them off (a fallback while TSO in smoltcp is young).
pub(crate) fn enable_offloads(tap: &Tap) -> bool {
    use crate::sys::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
    if tap.vnet_hdr_len() == 0 || std::env::var_os("USERNET_NO_OFFLOAD").is_some_and(|v| v == "1") {
        return false;
    }
    match tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("offloads unavailable, running without: {e}");
            false
        }
    }
}

pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// The link of a network member: static addresses, the network's gateway and MTU.
fn member_link(def: &network::Def, lease: &network::Lease, name: &str) -> LinkConfig {
    LinkConfig {
        name: name.to_owned(),
        mtu: def.mtu,
        addr: lease.ip,
        prefix_len: def.subnet.prefix_len,
        gateway: def.subnet.gateway(),
        mac: Some(lease.mac),
        ipv6: def.subnet6.zip(lease.ip6).map(|(n, addr)| Ipv6Link {
            addr,
            prefix_len: Network6::PREFIX_LEN,
            gateway: n.gateway(),
        }),
        routes: Vec::new(),
    }
}

/// `usernet network ...`.
fn network_command(args: NetworkArgs) -> Result<i32, MainError> {
    match args.action {
        NetworkAction::Create {
            name,
            subnet,
            gateway,
            ipv6,
            subnet6,
            internal,
            network_mtu,
            no_loopback,
            max_member_flows,
            egress_policy,
        } => {
            let def = network::create(&network::CreateSpec {
                name,
                subnet,
                gateway,
                ipv6,
                subnet6,
                internal,
                mtu: network_mtu,
                disable_host_loopback: no_loopback,
                member_flows: max_member_flows,
                egress: egress_policy.map(|o| o.value),
            })?;
            println!("{}", def.name);
        }
        NetworkAction::Ls => {
            for line in network::list()? {
                println!("{line}");
            }
        }
        NetworkAction::Inspect { name } => println!("{:#}", network::inspect(&name)?),
        NetworkAction::Rm { name, force } => {
            network::remove(&name, force)?;
            println!("{name}");
        }
        NetworkAction::Connect {
            name,
            target,
            member_name,
            aliases,
            ip,
            ip6,
            mac,
            interface,
            egress,
        } => {
            let spec = network::JoinSpec {
                name: member_name,
                aliases,
                ip,
                ip6,
                mac,
                publish: Vec::new(),
                egress: egress.spec,
                namespace: target.clone(),
            };
            return network_connect(&name, &target, &spec, interface);
        }
        NetworkAction::Disconnect { name, member } => {
            network::load(&name)?;
            network::request(
                &name,
                &serde_json::json!({"execute": "disconnect", "arguments": {"member": member}}),
                None,
            )?;
        }
        NetworkAction::Serve { name } => return network_serve(&name),
    }
    Ok(0)
}

/// `usernet network connect`: a TAP in the target's namespace, handed to the network.
fn network_connect(
    name: &str,
    target: &str,
    spec: &network::JoinSpec,
    interface: Option<String>,
) -> Result<i32, MainError> {
    let def = network::load(name)?;
    let target = match target.parse::<i32>() {
        Ok(pid) if pid > 0 => Target::Pid(pid),
        _ => Target::Path(PathBuf::from(target)),
    };
    let lease = network::reserve(name, spec)?;
    // The first free ethN, unless a name is given.
    let names: Vec<String> = match interface {
        Some(n) => vec![n],
        None => (0..8).map(network::tap_name).collect(),
    };
    let mut last = None;
    for ifname in names {
        let attach = AttachSpec {
            target: target.clone(),
            userns: None,
            tap_name: ifname.clone(),
            vnet_hdr: true,
            configure: Some(member_link(&def, &lease, &ifname)),
        };
        match netns::open_tap(&attach) {
            Ok((tap, _helper)) => {
                network::attach(name, &lease, spec, &tap, &target)?;
                println!(
                    "{} {} {}",
                    ifname,
                    lease.ip,
                    lease.ip6.map_or(String::new(), |a| a.to_string())
                );
                return Ok(0);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || MainError::Usage("no interface name to try".into()),
        MainError::from,
    ))
}

/// `usernet run --network NAME`: the command's namespace joins the network, whose
/// serving process does the networking; this process only supervises the command.
fn run_network(args: RunArgs, name: &str) -> Result<i32, MainError> {
    if args.net.api_socket.is_some() {
        return Err(MainError::Usage(
            "--api-socket with --network: the network's API socket is its serving process's (see usernet network inspect)".into(),
        ));
    }
    let def = network::load(name)?;
    let mut spec = network::JoinSpec {
        name: args.member_name.clone(),
        aliases: args.aliases.clone(),
        ip: args.ip,
        ip6: args.ip6,
        mac: args.macaddress,
        publish: args.net.publish.clone(),
        egress: args.net.egress.spec.clone(),
        namespace: "run".into(),
    };
    let lease = network::reserve(name, &spec)?;
    let mut resolv_conf: String = def
        .subnet
        .dns()
        .map(|d| format!("nameserver {d}\n"))
        .unwrap_or_default();
    if let (Some(n), Some(_)) = (def.subnet6, lease.ip6) {
        if let Some(d) = n.dns() {
            resolv_conf.push_str(&format!("nameserver {d}\n"));
        }
    }
    let run = RunSpec {
        cmd: args.command.clone(),
        tap_name: "eth0".into(),
        vnet_hdr: true,
        link: member_link(&def, &lease, "eth0"),
        resolv_conf,
        hostname: Some(lease.name.clone()),
    };
    let signals = event_loop::signal_fd(true)?;
    let netns::RunChild { pid, tap, mut hold } = netns::spawn_run(&run)?;
    spec.namespace = format!("pid {pid}");
    network::attach(name, &lease, &spec, &tap, &Target::Pid(pid.as_raw()))?;
    // The network's process holds the TAP now: it goes away with the namespace.
    drop(tap);
    hold.release()?;
    supervise(&signals, pid, args.stop_timeout)
}

/// Passes signals on to the command and waits for it; its exit status.
fn supervise(
    signals: &nix::sys::signalfd::SignalFd,
    pid: nix::unistd::Pid,
    stop_timeout: u32,
) -> Result<i32, MainError> {
    let mut child =
        pidns::Supervisor::new(pid, std::time::Duration::from_secs(stop_timeout.into()));
    loop {
        let timeout = child
            .poll_timeout()
            .map(|at| at.saturating_duration_since(std::time::Instant::now()));
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(signals),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::NONE),
        );
        if let Some(code) = subsystem::handle_signals(signals, Some(&mut child)) {
            return Ok(code);
        }
        child.handle_timeout(std::time::Instant::now());
    }
}

/// `usernet network serve NAME`: the network's serving process, in a child of its own
/// (not a descendant of the member that started it, which may end first).
fn network_serve(name: &str) -> Result<i32, MainError> {
    let def = network::load(name)?;
    sys::fork_child(&[], || match serve_network(def) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usernet: {e}");
            1
        }
    })
    .map_err(|e| MainError::Io {
        what: "cannot fork the network's serving process".into(),
        source: e.into(),
    })?;
    Ok(0)
}

fn serve_network(def: network::Def) -> Result<i32, MainError> {
    let name = def.name.clone();
    let Some(server) = network::Server::bind(def.clone())? else {
        log::info!("network {name} is served already");
        return Ok(0);
    };
    let nameservers = if def.internal {
        Vec::new()
    } else {
        forwarder::dns::read_resolv_conf(Path::new("/etc/resolv.conf")).unwrap_or_default()
    };
    let cfg = Config {
        nat: NatConfig {
            net: def.subnet,
            net6: def.subnet6,
            host_loopback: def.host_loopback(),
            aliases: Vec::new(),
        },
        nameservers,
        mtu: def.mtu as usize,
        vnet_hdr_len: stack::vnet::HEADER_LEN,
        offload: true,
        seed: random_seed(),
        ..Config::default()
    };
    let topology = Topology::Network {
        member_flows: def.member_flows as usize,
        internal: def.internal,
    };
    let mut fwd = Forwarder::new(cfg, topology, smoltcp::time::Instant::from_micros(0));
    fwd.set_host_addrs(egress::host_addrs());
    fwd.set_egress(&[], def.egress.as_ref());
    let signals = event_loop::signal_fd(false)?;
    Ok(event_loop::start_network(server, fwd, signals)?.run()?)
}

/// `usernet run --network none`: the command's own namespaces with only `lo` (its TAP is
/// closed, so the device goes, before the command starts).
fn run_without_network(args: RunArgs) -> Result<i32, MainError> {
    let spec = RunSpec {
        cmd: args.command.clone(),
        tap_name: "tap0".into(),
        vnet_hdr: false,
        link: link_config(
            &args.net.cidr,
            args.net.cidr6,
            args.net.mtu,
            "tap0",
            None,
            false,
        ),
        resolv_conf: String::new(),
        hostname: None,
    };
    let signals = event_loop::signal_fd(true)?;
    let netns::RunChild { pid, tap, mut hold } = netns::spawn_run(&spec)?;
    drop(tap);
    hold.release()?;
    supervise(&signals, pid, args.stop_timeout)
}

/// `usernet run --network host|container:PID`: the command runs in usernet's place, in
/// usernet's own network namespace (`host`) or in the process `PID`'s (joined first).
fn run_in_place(cmd: &[std::ffi::OsString], target: Option<&Target>) -> Result<i32, MainError> {
    use std::os::unix::process::CommandExt;
    let Some((prog, rest)) = cmd.split_first() else {
        return Err(MainError::Usage("no command to run".into()));
    };
    if let Some(target) = target {
        netns::join(target)?;
    }
    let err = std::process::Command::new(prog).args(rest).exec();
    Err(MainError::Io {
        what: format!("cannot run {}", prog.to_string_lossy()),
        source: err,
    })
}
