//! Which addresses an organisation's log drain may send to.
//!
//! A drain's destination is given by a tenant, and the operator and the node
//! agents send to it from inside the platform's network: without a check, a
//! drain at `udp://10.0.0.5:514` or `http://169.254.169.254/…` would let a
//! tenant reach the platform's own services. So a drain reaches public
//! addresses only, and the networks the operator allows
//! (`drain_allowed_networks`). The check applies to every address a host
//! name resolves to, when the drain is created and again each time lines are
//! sent (a name may resolve elsewhere later: DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use zeitwork_net::Cidr;

/// Longest a name's resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Public addresses plus the allowed networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    allowed: Vec<Cidr>,
}

/// A destination the drain may not send to; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What kind of internal address `ip` is, if it is one.
pub fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_kind(v4);
            }
            let first = v6.segments()[0];
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("cloud metadata")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else {
                None
            }
        }
    }
}

fn v4_kind(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = v4.octets();
    if v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(100, 100, 100, 200) {
        Some("cloud metadata")
    } else if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if v4.is_private() {
        Some("private")
    } else if a == 100 && (64..128).contains(&b) {
        // Shared address space (RFC 6598): the platform's private project networks live here.
        Some("shared (carrier-grade NAT)")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if v4.is_broadcast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

impl Reach {
    /// Public addresses and `allowed` (CIDR blocks such as `10.20.0.0/16`, or bare addresses).
    pub fn new(allowed: &[String]) -> Result<Reach, String> {
        let allowed = allowed.iter().map(|s| s.trim().parse::<Cidr>()).collect::<Result<_, _>>()?;
        Ok(Reach { allowed })
    }

    /// Whether a drain may send to `ip`; why not when it may not.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        match internal_kind(ip) {
            Some(kind) if !self.allowed.iter().any(|c| c.contains(ip)) => {
                Err(Refused(format!("{ip} is a {kind} address")))
            }
            _ => Ok(()),
        }
    }

    /// The addresses `host` resolves to (with `port`), every one of them
    /// checked: the first refused one fails the whole answer, so a name that
    /// also resolves to an internal address is never used.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, port)))
                .await
                .map_err(|_| ResolveError::Unresolved(format!("resolving {bare} timed out")))?
                .map_err(|e| ResolveError::Unresolved(format!("cannot resolve {bare}: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ResolveError::Unresolved(format!("{bare} has no address")));
        }
        for a in &addrs {
            self.check(a.ip()).map_err(|Refused(why)| {
                ResolveError::Refused(Refused(if bare.parse::<IpAddr>().is_ok() {
                    why
                } else {
                    format!("{bare} resolves to {why}")
                }))
            })?;
        }
        Ok(addrs)
    }
}

/// Why a drain's host gave no address to send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name does not resolve (now): lines wait for the next attempt or are dropped.
    #[error("{0}")]
    Unresolved(String),
    /// It resolves to an address the drain may not reach.
    #[error(transparent)]
    Refused(Refused),
}

/// A resolver for an HTTP drain's client that answers checked addresses only,
/// so the connection goes to the address that was checked.
#[derive(Debug)]
pub(super) struct CheckedResolver(pub Reach);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let reach = self.0.clone();
        Box::pin(async move {
            let addrs =
                reach.resolve(name.as_str(), 0).await.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                    match e {
                        ResolveError::Refused(r) => Box::new(r),
                        other => Box::new(other),
                    }
                })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal somewhere in `e`'s chain of sources, if it was one.
pub(super) fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let none = Reach::default();
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("fd12::1", "private (unique local)"),
            ("fd00:ec2::254", "cloud metadata"),
            ("100.96.0.5", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(internal_kind(ip), Some(kind), "{ip}");
            let e = none.check(ip).unwrap_err();
            assert!(e.0.contains(kind), "{ip}: {e}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2001:db8::1", "2606:4700::1111"] {
            none.check(ip.parse().unwrap()).unwrap();
        }
        let some = Reach::new(&["127.0.0.0/8".into(), "fd12::/16".into(), "10.9.8.7".into()]).unwrap();
        for ip in ["127.0.0.1", "::ffff:127.0.0.1", "fd12::1", "10.9.8.7", "8.8.8.8"] {
            some.check(ip.parse().unwrap()).unwrap();
        }
        for ip in ["10.9.8.6", "169.254.169.254", "::1"] {
            assert!(some.check(ip.parse().unwrap()).is_err(), "{ip}");
        }
        assert!(Reach::new(&["10.0.0.0/33".into()]).is_err());
        assert!(Reach::new(&["nope".into()]).is_err());
    }

    #[tokio::test]
    async fn names_are_checked_by_every_address_they_resolve_to() {
        let none = Reach::default();
        let e = none.resolve("localhost", 514).await.unwrap_err();
        assert!(matches!(&e, ResolveError::Refused(r) if r.0.starts_with("localhost resolves to ")), "{e}");
        let e = none.resolve("[::1]", 514).await.unwrap_err();
        assert_eq!(e.to_string(), "::1 is a loopback address");
        let lo = Reach::new(&["127.0.0.0/8".into(), "::1".into()]).unwrap();
        let addrs = lo.resolve("localhost", 514).await.unwrap();
        assert!(addrs.iter().all(|a| a.port() == 514 && a.ip().is_loopback()), "{addrs:?}");
    }
}
