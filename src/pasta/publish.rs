//! pasta's `-t/-u` host listeners, published before ready with pasta's rules and words.
//!
//! # Theory of operation
//!
//! pasta mode's forwarded ports are the forwarder's published ports, like slirp4netns
//! mode's `-p`, but pasta treats failures its own way, and callers match its texts:
//!
//! - a port of an explicit range that cannot be bound ends start-up with `Failed to bind
//!   port P (strerror) for option '-t SPEC', exiting` (podman's tests look for the port and
//!   the system's text);
//! - exclusion-only specs (`-t ~20000-20010`, "every other port") are best effort: a port
//!   that cannot be bound (in use, privileged) is skipped, but running out of descriptors
//!   is an error (`Can't open enough sockets for port specifier: SPEC`), and so is an
//!   option none of whose ports could be bound (`Failed to bind any port for '-t SPEC',
//!   exiting`).
//!
//! [`publish`] binds every rule just before ready (pasta's ports do it first thing,
//! [`super::ports::PastaPorts`]) with the event loop's [`event_loop::publish`] and these
//! rules for failures; its errors are [`PublishError`], which pasta prints as they are.

use std::io;

use forwarder::port::PortError;
use forwarder::Forwarder;

use crate::conf::Publish;
use crate::event_loop;
use crate::host::Sockets;

/// A pasta option as given, `-t` and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastaOption {
    /// The option, `-t` or `-u`.
    pub opt: String,
    /// Its value as given.
    pub value: String,
}

/// One `-t/-u` rule: what to publish and the option it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The listeners (address-less ranges already name `0.0.0.0` and `::`).
    pub publish: Publish,
    /// The option, for pasta's messages.
    pub option: PastaOption,
    /// An exclusion-only spec's port: skipped when it cannot be bound (see the module's
    /// header); false: it must bind.
    pub best_effort: bool,
}

/// Why pasta's ports could not be published, in pasta's words.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A best-effort rule ran out of descriptors.
    #[error("Can't open enough sockets for port specifier: {value}")]
    Descriptors {
        /// The option's value.
        value: String,
    },
    /// No port of a best-effort option could be bound.
    #[error("Failed to bind any port for '{opt} {value}', exiting")]
    NoneBound {
        /// The option, `-t` or `-u`.
        opt: String,
        /// Its value.
        value: String,
    },
    /// A port of an explicit range could not be bound.
    #[error("Failed to bind port {port} ({why}) for option '{opt} {value}', exiting")]
    Bind {
        /// The host port.
        port: u16,
        /// The system's error text (strerror).
        why: String,
        /// The option, `-t` or `-u`.
        opt: String,
        /// Its value as given.
        value: String,
    },
    /// A rule was refused otherwise (the forwarder's rule limit).
    #[error("cannot forward {opt} {value}")]
    Refused {
        /// The option, `-t` or `-u`.
        opt: String,
        /// Its value as given.
        value: String,
        /// Why.
        #[source]
        source: PortError,
    },
}

/// Publishes `rules` with pasta's rules for failures (see the module's header).
///
/// # Errors
/// The first failure that ends start-up, in pasta's words.
pub fn publish(
    rules: &[Rule],
    fwd: &mut Forwarder,
    sockets: &mut Sockets,
) -> Result<(), PublishError> {
    // Best-effort options and whether one of their ports was bound.
    let mut options: Vec<(&PastaOption, bool)> = Vec::new();
    for rule in rules {
        let o = &rule.option;
        let bound = event_loop::publish(fwd, sockets, &rule.publish, false, |host, _, err| {
            let os_error = err.os_error().and_then(io::Error::raw_os_error);
            match (rule.best_effort, os_error) {
                (true, Some(libc::EMFILE | libc::ENFILE)) => Err(PublishError::Descriptors {
                    value: o.value.clone(),
                }),
                // Anything else (in use, privileged, no such address) skips it.
                (true, _) => {
                    let proto = rule.publish.proto.as_str();
                    log::debug!("{proto} {host} not forwarded: {err}");
                    Ok(())
                }
                (false, Some(code)) => Err(PublishError::Bind {
                    port: host.port(),
                    why: nix::errno::Errno::from_raw(code).desc().to_owned(),
                    opt: o.opt.clone(),
                    value: o.value.clone(),
                }),
                (false, None) => Err(PublishError::Refused {
                    opt: o.opt.clone(),
                    value: o.value.clone(),
                    source: err,
                }),
            }
        })?;
        if rule.best_effort {
            match options.iter_mut().find(|(b, _)| *b == o) {
                Some((_, any)) => *any |= bound,
                None => options.push((o, bound)),
            }
        }
    }
    if let Some((o, _)) = options.iter().find(|(_, any)| !any) {
        return Err(PublishError::NoneBound {
            opt: o.opt.clone(),
            value: o.value.clone(),
        });
    }
    Ok(())
}
