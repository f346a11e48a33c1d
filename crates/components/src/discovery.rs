//! The addresses a server gives out through its cache: what remote peers can dial.
//!
//! A server binds where it is told (`--bind`), and its cache gives out the addresses peers dial,
//! which are not the same when it binds a wildcard: `tcp://0.0.0.0:5555` is no address to dial.
//! With an advertised host, the cache names that host with the bound port; without one, a
//! wildcard bind is refused at start rather than handed to remote peers.

use crate::Error;

/// The address to give out for a socket bound at `bound`, named by `advertise` when set.
pub fn advertised(bound: &str, advertise: Option<&str>) -> Result<String, Error> {
    let Some(rest) = bound.strip_prefix("tcp://") else {
        // ipc:// and inproc:// name a path, not a host.
        return Ok(bound.to_owned());
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(Error::Address {
            address: bound.to_owned(),
            reason: "a tcp address needs a port".into(),
        });
    };
    match advertise {
        Some(advertised) if advertised.contains(':') && !advertised.starts_with('[') => {
            Ok(format!("tcp://[{advertised}]:{port}"))
        }
        Some(advertised) => Ok(format!("tcp://{advertised}:{port}")),
        None if matches!(host, "0.0.0.0" | "*" | "[::]" | "::") => Err(Error::Address {
            address: bound.to_owned(),
            reason: "a wildcard is no address to give out: say which host peers dial with \
                     `advertise` (the CLI's --advertise)"
                .into(),
        }),
        None => Ok(bound.to_owned()),
    }
}

/// A second address beside `address`, for a socket that must be reachable wherever `address`
/// is: the same tcp host on a port of the system's choice, or an ipc path next to it.
pub fn beside(address: &str) -> String {
    if let Some(rest) = address.strip_prefix("tcp://")
        && let Some((host, _)) = rest.rsplit_once(':')
    {
        return format!("tcp://{host}:0");
    }
    format!("{address}-2")
}

#[cfg(test)]
mod tests {
    use super::{advertised, beside};

    #[test]
    fn a_second_address_is_on_the_same_host() {
        assert_eq!(beside("tcp://0.0.0.0:5557"), "tcp://0.0.0.0:0");
        assert_eq!(beside("tcp://[::1]:5557"), "tcp://[::1]:0");
        assert_eq!(beside("ipc:///run/w.sock"), "ipc:///run/w.sock-2");
    }

    #[test]
    fn wildcards_need_a_host_and_the_host_replaces_what_was_bound() {
        assert!(advertised("tcp://0.0.0.0:5555", None).is_err());
        assert!(advertised("tcp://*:5555", None).is_err());
        assert!(advertised("tcp://[::]:5555", None).is_err());
        assert_eq!(
            advertised("tcp://0.0.0.0:5555", Some("10.0.0.7")).expect("advertised"),
            "tcp://10.0.0.7:5555"
        );
        assert_eq!(
            advertised("tcp://[::]:5555", Some("fd00::7")).expect("advertised"),
            "tcp://[fd00::7]:5555"
        );
        assert_eq!(
            advertised("tcp://127.0.0.1:5555", None).expect("as bound"),
            "tcp://127.0.0.1:5555"
        );
        assert_eq!(
            advertised("ipc:///tmp/s.sock", Some("host")).expect("a path"),
            "ipc:///tmp/s.sock"
        );
    }
}
