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
pub async fn create_tap(name: &str, host_ip: Ipv4Addr) -> Result<(), RuntimeError> {
    // A leftover of a crashed attempt goes first; usually there is none.
    let _ = destroy_tap(name).await;
    run(&["tuntap", "add", "dev", name, "mode", "tap"]).await?;
    let result = async {
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
pub fn policy_rules(table: &str, base: Ipv4Addr, resolvers: &[Ipv4Addr]) -> String {
    let range = format!("{base}/16");
    let mut dns = String::new();
    for r in resolvers {
        dns.push_str(&format!(
            "        iifname {{ \"zwh*\", \"zwt*\" }} ip daddr {r} udp dport 53 accept\n        \
             iifname {{ \"zwh*\", \"zwt*\" }} ip daddr {r} tcp dport 53 accept\n"
        ));
    }
    format!(
        "table inet {table} {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname {{ \"zwh*\", \"zwt*\" }} ct state established,related accept
{dns}        iifname {{ \"zwh*\", \"zwt*\" }} counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname {{ \"zwh*\", \"zwt*\" }} ct state established,related accept
        iifname {{ \"zwh*\", \"zwt*\" }} oifname {{ \"zwh*\", \"zwt*\" }} counter drop
{dns}        iifname {{ \"zwh*\", \"zwt*\" }} ip daddr {CLOSED_V4} counter drop
        iifname {{ \"zwh*\", \"zwt*\" }} meta nfproto ipv6 counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {range} oifname != {{ \"zwh*\", \"zwt*\" }} masquerade
    }}
}}
"
    )
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

/// Installs (or replaces) the default-deny rules of the instance range `base`.
pub async fn apply_policy(base: Ipv4Addr) -> Result<(), RuntimeError> {
    let [a, b, ..] = base.octets();
    let table = format!("zeitwork_{a}_{b}");
    // Replace atomically: one transaction creates, empties and refills the table.
    let script =
        format!("add table inet {table}\ndelete table inet {table}\n{}", policy_rules(&table, base, &host_resolvers()));
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
        return Err(RuntimeError::failed(
            "installing the instance firewall (nft)",
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    tracing::info!(%table, range = %format!("{base}/16"), "instance firewall installed: default deny towards the host, other instances and private ranges");
    Ok(())
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
        let r = policy_rules("zeitwork_10_88", "10.88.0.0".parse().unwrap(), &["10.255.255.53".parse().unwrap()]);
        assert!(r.contains("ct state established,related accept"));
        assert!(r.contains("ip daddr 10.255.255.53 udp dport 53 accept"));
        // DNS is allowed before the private ranges are closed.
        assert!(r.find("udp dport 53").unwrap() < r.find("169.254.0.0/16").unwrap());
        assert!(r.contains("ip saddr 10.88.0.0/16"));
        assert!(r.contains("masquerade"));
    }
}
