//! Instance networking: a network namespace per instance, joined to the host
//! by a veth pair on a /30 of the node's instance range (host .1, instance .2).

use std::net::Ipv4Addr;

use tokio::process::Command;

use crate::RuntimeError;

/// One instance's point-to-point link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub netns: String,
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    pub instance_ip: Ipv4Addr,
}

/// The /30 with index `slot` inside `base` (a /16).
pub fn slot_addresses(base: Ipv4Addr, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let net = u32::from(base) & 0xffff_0000 | (slot << 2);
    (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2))
}

async fn run(args: &[&str]) -> Result<(), RuntimeError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| RuntimeError::Unavailable("ip (iproute2)", e.to_string()))?;
    if !out.status.success() {
        return Err(RuntimeError::failed(
            format!("ip {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(())
}

/// A free /30 of `base`: not `used` by this runtime's instances, and with its
/// host address on no interface of the host (another runtime or a leftover).
pub async fn free_slot(base: Ipv4Addr, used: impl Fn(u32) -> bool) -> Result<u32, RuntimeError> {
    let taken = host_addresses().await;
    (0..16_000)
        .find(|s| !used(*s) && !taken.contains(&slot_addresses(base, *s).0))
        .ok_or_else(|| RuntimeError::failed("networking", "no free address in the instance range"))
}

/// IPv4 addresses configured on host interfaces.
pub async fn host_addresses() -> Vec<Ipv4Addr> {
    let Ok(out) = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().await else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// Creates the namespace and link of instance `key` (short, unique) on `slot`.
pub async fn create(key: &str, base: Ipv4Addr, slot: u32) -> Result<Link, RuntimeError> {
    let (host_ip, instance_ip) = slot_addresses(base, slot);
    let link = Link { netns: format!("zw-{key}"), host_if: format!("zwh{key}"), host_ip, instance_ip };
    let peer = format!("zwc{key}");
    let ns = link.netns.as_str();
    // Leftovers of a crashed attempt go first; usually there are none, so
    // the error is expected.
    let _ = destroy(&link).await;
    run(&["netns", "add", ns]).await?;
    let result = async {
        run(&["link", "add", &link.host_if, "type", "veth", "peer", "name", &peer]).await?;
        run(&["link", "set", &peer, "netns", ns]).await?;
        run(&["-n", ns, "link", "set", &peer, "name", "eth0"]).await?;
        run(&["-n", ns, "addr", "add", &format!("{instance_ip}/30"), "dev", "eth0"]).await?;
        run(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        run(&["-n", ns, "link", "set", "lo", "up"]).await?;
        run(&["-n", ns, "route", "add", "default", "via", &host_ip.to_string()]).await?;
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", &link.host_if]).await?;
        run(&["link", "set", &link.host_if, "up"]).await
    }
    .await;
    if let Err(e) = result {
        if let Err(why) = destroy(&link).await {
            tracing::warn!(netns = ns, veth = %link.host_if, error = %why, "a half-made instance network may be left behind");
        }
        return Err(e);
    }
    Ok(link)
}

/// Creates tap device `name` for a VM, with the host's end of the /30 on it.
/// With an `owner` (uid, gid), that unprivileged user may attach to it (the
/// VMM runs as that user); otherwise only root may.
pub async fn create_tap(name: &str, host_ip: Ipv4Addr, owner: Option<(u32, u32)>) -> Result<(), RuntimeError> {
    // A leftover of a crashed attempt goes first; usually there is none.
    let _ = destroy_tap(name).await;
    match owner {
        Some((uid, gid)) => {
            let (uid, gid) = (uid.to_string(), gid.to_string());
            run(&["tuntap", "add", "dev", name, "mode", "tap", "user", &uid, "group", &gid]).await?
        }
        None => run(&["tuntap", "add", "dev", name, "mode", "tap"]).await?,
    }
    let result = async {
        run(&["link", "set", "dev", name, "address", &tap_mac(host_ip)]).await?;
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", name]).await?;
        run(&["link", "set", name, "up"]).await
    }
    .await;
    if result.is_err() {
        if let Err(why) = destroy_tap(name).await {
            tracing::warn!(tap = name, error = %why, "a half-made tap device may be left behind");
        }
    }
    result
}

/// The host end's MAC address, fixed by its address: a VM restored from a
/// snapshot on the same slot still has it in its ARP cache.
pub fn tap_mac(host_ip: Ipv4Addr) -> String {
    let [_, b, c, d] = host_ip.octets();
    format!("02:5a:48:{b:02x}:{c:02x}:{d:02x}")
}

/// Removes a VM's tap device.
pub async fn destroy_tap(name: &str) -> Result<(), RuntimeError> {
    run(&["link", "del", name]).await
}

/// Removes the namespace (its veth end, and so the pair, goes with it).
pub async fn destroy(link: &Link) -> Result<(), RuntimeError> {
    // The veth usually goes with the namespace below; deleting it first
    // only matters when the namespace is already gone.
    if let Err(e) = run(&["link", "del", &link.host_if]).await {
        tracing::debug!(veth = %link.host_if, error = %e, "no host end of the veth to delete");
    }
    run(&["netns", "del", &link.netns]).await
}

/// Destinations an instance never reaches through the host: private,
/// shared, link-local (metadata services), loopback, multicast and
/// reserved ranges. The host's own addresses are closed by the input rule.
const CLOSED_V4: &str = "{ 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, \
    192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3 }";

/// The nftables rules that fence this node's instances in (default deny):
/// an instance reaches no service of the host (on any of its addresses,
/// IPv4 or IPv6), no other instance, nothing private, link-local or
/// loopback, only the host's DNS resolvers and the internet through NAT
/// (when the host forwards). Connections the host opens to an instance
/// (health checks, forwarding) and their answers are untouched.
///
/// A packet whose source address does not route back through the instance
/// interface it came in on is dropped (strict reverse-path filtering), so no
/// instance speaks with another's address: the rules below trust them.
///
/// Every rule but two is scoped to this range (`ip saddr <range>` on an
/// instance interface, or the range's own tunnel device), so several agents,
/// each with a range, a tunnel and a table of its own, never drop each
/// other's traffic: the reverse-path rule makes the source address say which
/// range a packet's interface belongs to. The two
/// guards left unscoped drop only what no instance of any range may send
/// (a source that does not route back through its interface or is the
/// host's own, and IPv6).
///
/// Private project networks open holes in that fence, all of them kept in
/// the table's maps and sets ([`set_project_networks`]): a private address
/// is translated to its instance's link address (`private_to_link`), a pair
/// of link addresses in `peers` may talk (the source then shows as its
/// private address), and an instance in `egress_limited` reaches outside
/// its network only what `egress_nets` and `egress_ports` allow. With a
/// `resolver` port, DNS queries an instance sends to any address of the
/// host go to the node agent's resolver on that port.
///
/// The tunnel to other nodes ([`tunnel_interface`]) carries only private
/// networks: a packet from a local instance enters it only towards a member
/// of the instance's network on another node (a `peers` pair of link and
/// private address); one that arrives reaches a local instance only when its
/// source is a member of that instance's network (`tunnel_peers`, pairs of
/// remote private and local link address), and nothing of the host. These
/// rules live in the range's table, so they go with it (at the agent's
/// shutdown or its range's sweep), as the device goes with the agent.
pub fn policy_rules(table: &str, base: Ipv4Addr, resolvers: &[Ipv4Addr], resolver: Option<u16>) -> String {
    let range = format!("{base}/16");
    let ifs = "iifname { \"zwh*\", \"zwt*\" }";
    // Sent by an instance of this range (the antispoof chain vouches for the source).
    let mine = format!("{ifs} ip saddr {range}");
    // This range's own end of the tunnel: no other agent's traffic comes in or goes out by it.
    let wg = format!("iifname \"{}\"", tunnel_interface(base));
    let to_wg = format!("oifname \"{}\"", tunnel_interface(base));
    let mut dns = String::new();
    for r in resolvers {
        dns.push_str(&format!(
            "        {mine} ip daddr {r} udp dport 53 accept\n        {mine} ip daddr {r} tcp dport 53 accept\n"
        ));
    }
    let (mut redirect, mut own_dns) = (String::new(), String::new());
    if let Some(port) = resolver {
        for proto in ["udp", "tcp"] {
            redirect.push_str(&format!("        {mine} fib daddr type local {proto} dport 53 redirect to :{port}\n"));
            own_dns.push_str(&format!("        {mine} {proto} dport {port} accept\n"));
        }
    }
    format!(
        "table inet {table} {{
    map private_to_link {{ type ipv4_addr : ipv4_addr; }}
    map link_to_private {{ type ipv4_addr : ipv4_addr; }}
    set peers {{ type ipv4_addr . ipv4_addr; }}
    set tunnel_peers {{ type ipv4_addr . ipv4_addr; }}
    set egress_limited {{ type ipv4_addr; }}
    set egress_nets {{ type ipv4_addr . ipv4_addr; flags interval; }}
    set egress_ports {{ type ipv4_addr . ipv4_addr . inet_service; flags interval; }}
    chain antispoof {{
        type filter hook prerouting priority raw; policy accept;
        {ifs} fib saddr . iif oif missing counter drop
        {ifs} fib saddr type local counter drop
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{redirect}        {mine} dnat ip to ip daddr map @private_to_link
        {wg} dnat ip to ip daddr map @private_to_link
    }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        {ifs} meta nfproto ipv6 counter drop
        {mine} ct state established,related accept
{own_dns}{dns}        {mine} counter drop
        {wg} counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        {ifs} meta nfproto ipv6 counter drop
        {mine} ct state established,related accept
        {mine} ip saddr . ip daddr @peers accept
        {mine} oifname {{ \"zwh*\", \"zwt*\" }} counter drop
        {mine} {to_wg} counter drop
        {wg} ct state established,related accept
        {wg} ip saddr . ip daddr @tunnel_peers accept
        {wg} counter drop
{dns}        {mine} ip saddr @egress_limited ip saddr . ip daddr @egress_nets accept
        {mine} ip saddr @egress_limited ip saddr . ip daddr . tcp dport @egress_ports accept
        {mine} ip saddr @egress_limited ip saddr . ip daddr . udp dport @egress_ports accept
        {mine} ip saddr @egress_limited counter drop
        {mine} ip daddr {CLOSED_V4} counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr . ip daddr @peers snat ip to ip saddr map @link_to_private
        ip saddr {range} oifname != {{ \"zwh*\", \"zwt*\" }} masquerade
    }}
}}
"
    )
}

/// An allowed destination outside an instance's private network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressAllow {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub port: Option<u16>,
}

/// The private networks of this node's instances, by their link addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectNetworks {
    /// (link address, private address) of each local instance in a network.
    pub addresses: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Pairs of link addresses that may talk (both directions are listed),
    /// and (local link, private address on another node) pairs that may
    /// enter the tunnel.
    pub peers: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// (private address on another node, local link address) pairs that may
    /// come in through the tunnel.
    pub tunnel: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Instances with an egress allow-list, and what it allows.
    pub egress: Vec<(Ipv4Addr, Vec<EgressAllow>)>,
}

/// The node's end of the tunnel to other nodes for the instance range `base`
/// (`zwg-10-208` for `10.208.0.0`), so agents of several ranges never share one.
pub fn tunnel_interface(base: Ipv4Addr) -> String {
    let [a, b, ..] = base.octets();
    format!("zwg-{a}-{b}")
}

/// The name of the nftables table (family `inet`) of the instance range `base`.
pub fn table_of(base: Ipv4Addr) -> String {
    let [a, b, ..] = base.octets();
    format!("zeitwork_{a}_{b}")
}

/// The nft script that replaces the contents of the network maps and sets.
pub fn project_network_script(table: &str, n: &ProjectNetworks) -> String {
    let mut s = String::new();
    for (kind, name) in [
        ("map", "private_to_link"),
        ("map", "link_to_private"),
        ("set", "peers"),
        ("set", "tunnel_peers"),
        ("set", "egress_limited"),
        ("set", "egress_nets"),
        ("set", "egress_ports"),
    ] {
        s.push_str(&format!("flush {kind} inet {table} {name}\n"));
    }
    let mut add = |set: &str, elements: Vec<String>| {
        if !elements.is_empty() {
            s.push_str(&format!("add element inet {table} {set} {{ {} }}\n", elements.join(", ")));
        }
    };
    add("private_to_link", n.addresses.iter().map(|(link, private)| format!("{private} : {link}")).collect());
    add("link_to_private", n.addresses.iter().map(|(link, private)| format!("{link} : {private}")).collect());
    add("peers", n.peers.iter().map(|(a, b)| format!("{a} . {b}")).collect());
    add("tunnel_peers", n.tunnel.iter().map(|(a, b)| format!("{a} . {b}")).collect());
    add("egress_limited", n.egress.iter().map(|(link, _)| link.to_string()).collect());
    let nets = |with_port: bool| {
        n.egress
            .iter()
            .flat_map(|(link, allow)| allow.iter().map(move |a| (link, a)))
            .filter(move |(_, a)| a.port.is_some() == with_port)
            .map(|(link, a)| match a.port {
                Some(p) => format!("{link} . {}/{} . {p}", a.addr, a.prefix_len),
                None => format!("{link} . {}/{}", a.addr, a.prefix_len),
            })
            .collect::<Vec<_>>()
    };
    add("egress_nets", nets(false));
    add("egress_ports", nets(true));
    s
}

async fn nft(script: &str, what: &str) -> Result<(), RuntimeError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::Unavailable("nft (nftables, for the instances' firewall)", e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(script.as_bytes()).await.map_err(|e| RuntimeError::failed("nft", e))?;
    }
    let out = child.wait_with_output().await.map_err(|e| RuntimeError::failed("nft", e))?;
    if !out.status.success() {
        return Err(RuntimeError::failed(what.to_owned(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Replaces, in one transaction, who may talk to whom on the private networks
/// of the instance range `base` (its firewall must be installed).
pub async fn set_project_networks(base: Ipv4Addr, n: &ProjectNetworks) -> Result<(), RuntimeError> {
    nft(&project_network_script(&table_of(base), n), "updating the private project networks (nft)").await
}

/// IPv4 name servers of the host (`/etc/resolv.conf`) that instances may ask.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Installs (or replaces) the default-deny rules of the instance range `base`;
/// with `resolver`, instances' DNS queries go to that port of the host.
pub async fn apply_policy(base: Ipv4Addr, resolver: Option<u16>) -> Result<(), RuntimeError> {
    let table = table_of(base);
    // Replace atomically: one transaction creates, empties and refills the table.
    let script = format!(
        "add table inet {table}\ndelete table inet {table}\n{}",
        policy_rules(&table, base, &host_resolvers(), resolver)
    );
    nft(&script, "installing the instance firewall (nft)").await?;
    tracing::info!(%table, range = %format!("{base}/16"), "instance firewall installed: default deny towards the host, other instances and private ranges");
    Ok(())
}

/// Whether the instance range `base` has its firewall table on this host.
pub async fn has_policy(base: Ipv4Addr) -> Result<bool, RuntimeError> {
    let out = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .await
        .map_err(|e| RuntimeError::Unavailable("nft (nftables, for the instances' firewall)", e.to_string()))?;
    if !out.status.success() {
        return Err(RuntimeError::failed(
            "listing the firewall tables (nft)",
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    let table = table_of(base);
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == format!("table inet {table}")))
}

/// Removes the firewall of the instance range `base` (its agent stopped, or a
/// stopped one left it behind); `Ok(false)` when there was none. Only that
/// range's table goes: other agents' tables on the host stay.
pub async fn remove_policy(base: Ipv4Addr) -> Result<bool, RuntimeError> {
    if !has_policy(base).await? {
        return Ok(false);
    }
    let table = table_of(base);
    nft(&format!("delete table inet {table}\n"), "removing the instance firewall (nft)").await?;
    tracing::info!(%table, "instance firewall removed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_disjoint_30s() {
        let base = "10.88.0.0".parse().unwrap();
        assert_eq!(super::slot_addresses(base, 0), ("10.88.0.1".parse().unwrap(), "10.88.0.2".parse().unwrap()));
        assert_eq!(super::slot_addresses(base, 1), ("10.88.0.5".parse().unwrap(), "10.88.0.6".parse().unwrap()));
        assert_eq!(super::slot_addresses(base, 64), ("10.88.1.1".parse().unwrap(), "10.88.1.2".parse().unwrap()));
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn rules_close_the_host_and_private_ranges_and_keep_dns() {
        let r = policy_rules("zeitwork_10_88", "10.88.0.0".parse().unwrap(), &["10.255.255.53".parse().unwrap()], None);
        assert!(r.contains("ct state established,related accept"));
        assert!(r.contains("ip daddr 10.255.255.53 udp dport 53 accept"));
        // DNS is allowed before the private ranges are closed.
        assert!(r.find("udp dport 53").unwrap() < r.find("169.254.0.0/16").unwrap());
        assert!(r.contains("ip saddr 10.88.0.0/16"));
        assert!(r.contains("masquerade"));
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[test]
    fn peers_come_before_the_fence_between_instances() {
        let r = policy_rules("t", "10.88.0.0".parse().unwrap(), &[], Some(5300));
        assert!(r.find("@peers accept").unwrap() < r.find("oifname { \"zwh*\", \"zwt*\" } counter drop").unwrap());
        assert!(r.find("@egress_limited counter drop").unwrap() < r.find("169.254.0.0/16").unwrap());
        assert!(r.contains("udp dport 53 redirect to :5300"));
        assert!(r.contains("udp dport 5300 accept"));
        assert!(!policy_rules("t", "10.88.0.0".parse().unwrap(), &[], None).contains("redirect"));
    }

    #[test]
    fn every_drop_but_the_guards_is_scoped_to_the_range() {
        let r = policy_rules("t", "10.211.0.0".parse().unwrap(), &["192.0.2.53".parse().unwrap()], Some(5300));
        for line in r.lines().filter(|l| l.contains("iifname")) {
            let guard = line.contains("fib saddr") || line.contains("nfproto ipv6");
            // The tunnel device is this range's own: what comes in by it is this range's.
            let own_tunnel = line.trim_start().starts_with("iifname \"zwg-10-211\" ");
            assert!(guard || own_tunnel || line.contains("ip saddr 10.211.0.0/16"), "not scoped to the range: {line}");
        }
        assert!(r.contains("oifname { \"zwh*\", \"zwt*\" } counter drop"));
        assert_eq!(r.matches("zwg-").count(), r.matches("zwg-10-211\"").count(), "another range's tunnel: {r}");
    }

    #[test]
    fn the_tunnel_carries_only_network_pairs() {
        let r = policy_rules("t", "10.88.0.0".parse().unwrap(), &[], Some(5300));
        let wg = "iifname \"zwg-10-88\"";
        // Arrivals are translated like local traffic, checked by pair, and never reach the host.
        assert!(r.contains(&format!("{wg} dnat ip to ip daddr map @private_to_link")));
        let forward = &r[r.find("chain forward").unwrap()..];
        let pairs = forward.find(&format!("{wg} ip saddr . ip daddr @tunnel_peers accept")).unwrap();
        assert!(pairs < forward.find(&format!("{wg} counter drop")).unwrap());
        assert!(r.contains(&format!("{wg} counter drop\n    }}\n    chain forward")), "the host is closed: {r}");
        // Instances of this range enter it only by a peers pair.
        assert!(
            r.find("@peers accept").unwrap()
                < r.find("ip saddr 10.88.0.0/16 oifname \"zwg-10-88\" counter drop").unwrap()
        );
    }

    #[test]
    fn network_script_replaces_every_set() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let n = ProjectNetworks {
            addresses: vec![(ip("10.88.0.2"), ip("100.96.0.1"))],
            peers: vec![(ip("10.88.0.2"), ip("10.88.0.6"))],
            tunnel: vec![(ip("100.96.1.7"), ip("10.88.0.2"))],
            egress: vec![(
                ip("10.88.0.2"),
                vec![
                    EgressAllow { addr: ip("203.0.113.0"), prefix_len: 24, port: None },
                    EgressAllow { addr: ip("198.51.100.7"), prefix_len: 32, port: Some(443) },
                ],
            )],
        };
        let s = project_network_script("t", &n);
        assert_eq!(s.matches("flush ").count(), 7);
        assert!(s.contains("tunnel_peers { 100.96.1.7 . 10.88.0.2 }"));
        assert!(s.contains("private_to_link { 100.96.0.1 : 10.88.0.2 }"));
        assert!(s.contains("egress_nets { 10.88.0.2 . 203.0.113.0/24 }"));
        assert!(s.contains("egress_ports { 10.88.0.2 . 198.51.100.7/32 . 443 }"));
        assert!(!project_network_script("t", &ProjectNetworks::default()).contains("add element"));
    }
}
