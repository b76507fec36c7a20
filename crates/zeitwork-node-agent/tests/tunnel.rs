//! The tunnel that carries private project networks between nodes, with real
//! parts: two nodes, each a network namespace of its own joined to the other
//! by a veth pair (192.0.2.1 and 192.0.2.2; nothing leaves the two), each
//! with the instance firewall of its range and a userspace WireGuard device,
//! both configured by the agent's own code from the assignments the operator
//! hands out (members, tunnel peers). Stand-in instances are network
//! namespaces on instance links (`net::create`), serving with busybox.
//!
//! Node a (10.208.0.0/16) runs `web` (100.100.0.1) and `spy` (100.100.1.1, a
//! network of its own); node b (10.207.0.0/16) runs `web` (100.100.0.2). The
//! two `web`s reach each other by private address, each seeing the other's
//! private address as the source; `spy` reaches neither, not even when node
//! a's firewall wrongly lets it into the tunnel (node b refuses it on
//! arrival); peers and routes follow a member leaving and coming back, and
//! applying the same peers twice changes nothing.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zeitwork_api_types::{Assignment, InstanceStatus, NetworkMember, PrivateNetwork, Resources, TunnelPeer};
use zeitwork_node_agent::instances::{project_networks, Local};
use zeitwork_node_agent::tunnel::{peers_of, KeyPair, Tunnel};
use zeitwork_runtime::net;

/// Set, with the node's name, in the copies of this test that play a node.
const ROLE: &str = "ZEITWORK_TEST_TUNNEL_ROLE";
/// The directory the two nodes share (public keys, readiness marks).
const SHARED: &str = "ZEITWORK_TEST_TUNNEL_DIR";
const TEST: &str = "two_nodes_carry_one_private_network_and_nothing_else";

const WEB_A: Ipv4Addr = Ipv4Addr::new(100, 100, 0, 1);
const WEB_B: Ipv4Addr = Ipv4Addr::new(100, 100, 0, 2);
const SPY_A: Ipv4Addr = Ipv4Addr::new(100, 100, 1, 1);

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
    assert!(found, "this test needs `{tool}` (install {package})");
}

#[test]
fn two_nodes_carry_one_private_network_and_nothing_else() {
    if let Ok(role) = std::env::var(ROLE) {
        let dir = PathBuf::from(std::env::var(SHARED).unwrap());
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(node(&role, &dir));
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux"), ("busybox", "busybox")]
    {
        require(tool, package);
    }
    assert!(Path::new("/dev/net/tun").exists(), "this test needs /dev/net/tun (the tun module)");
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("zwtun{id}a"), format!("zwtun{id}b"));
    let cleanup = || {
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    };
    cleanup();
    sh(&format!("ip netns add {a} && ip netns add {b} && ip -n {a} link set lo up && ip -n {b} link set lo up"));
    sh(&format!("ip -n {a} link add wan type veth peer name wan netns {b}"));
    sh(&format!("ip -n {a} addr add 192.0.2.1/24 dev wan && ip -n {a} link set wan up"));
    sh(&format!("ip -n {b} addr add 192.0.2.2/24 dev wan && ip -n {b} link set wan up"));
    for ns in [&a, &b] {
        sh(&format!("nsenter --net=/run/netns/{ns} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"));
    }
    let dir = tempfile::tempdir().unwrap();
    // nsenter, not `ip netns exec`: that one mounts a new /sys.
    let spawn = |role: &str, ns: &str| {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env(ROLE, role)
            .env(SHARED, dir.path())
            .spawn()
            .unwrap()
    };
    let (mut node_a, mut node_b) = (spawn("a", &a), spawn("b", &b));
    let (sa, sb) = (node_a.wait().unwrap(), node_b.wait().unwrap());
    cleanup();
    assert!(sa.success() && sb.success(), "a node failed (output above): a {sa}, b {sb}");
}

/// An instance stand-in: a network namespace on an instance link, serving
/// `/id.txt` and `/cgi-bin/who` (the client's address) on port 8080.
struct Instance {
    link: net::Link,
    server: std::process::Child,
    _www: tempfile::TempDir,
}

impl Instance {
    async fn start(key: &str, base: Ipv4Addr, slot: u32, id: &str) -> Instance {
        let link = net::create(key, base, slot).await.unwrap();
        let www = tempfile::tempdir().unwrap();
        std::fs::write(www.path().join("id.txt"), format!("{id}\n")).unwrap();
        std::fs::write(www.path().join("big"), vec![0u8; 16 << 20]).unwrap();
        std::fs::create_dir(www.path().join("cgi-bin")).unwrap();
        let who = www.path().join("cgi-bin/who");
        std::fs::write(&who, "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho $REMOTE_ADDR\n").unwrap();
        sh(&format!("chmod 755 {}", who.display()));
        let server = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", link.netns))
            .args(["busybox", "httpd", "-f", "-p", "8080", "-h"])
            .arg(www.path())
            .spawn()
            .unwrap();
        Instance { link, server, _www: www }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.link.instance_ip, 8080))
    }

    /// What `GET http://{target}:8080{path}` answers from inside this instance
    /// (`unreachable` when nothing answers within 5 s; busybox wget has no working timeout of its own).
    fn get(&self, target: Ipv4Addr, path: &str) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.link.netns))
            .args(["timeout", "5", "busybox", "wget", "-q", "-O", "-"])
            .arg(format!("http://{target}:8080{path}"))
            .output()
            .unwrap();
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            "unreachable".into()
        }
    }

    /// Waits until `get` answers `want`.
    fn reaches(&self, target: Ipv4Addr, path: &str, want: &str, why: &str, tunnel: &Tunnel) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.get(target, path);
            if got == want {
                return start.elapsed();
            }
            let diagnose = || {
                let links = sh(&format!("ip -s link show dev {0}; ip -s link show dev wan; ip route", tunnel.name()));
                format!("tunnel: {:?}\n{links}\nfirewall:\n{}", tunnel.status(), ruleset())
            };
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{why}: {target}{path} answered {got:?}\n{}",
                diagnose()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", &self.link.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.link.netns]).output();
    }
}

fn ruleset() -> String {
    let out = Command::new("nft").args(["list", "ruleset"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Waits for `file` in the shared dir and returns its contents.
fn wait_for(dir: &Path, file: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.join(file)) {
            return s;
        }
        assert!(Instant::now() < deadline, "the other node never wrote {file}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `file` whole (the other node polls for it).
fn mark(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

/// The assignment of instance `id` in network `prefix` at `address`, as the
/// operator hands it out: its members, and the other nodes that hold some.
fn assignment(id: &str, project: &str, address: Ipv4Addr, members: &[Ipv4Addr], peers: Vec<TunnelPeer>) -> Assignment {
    let [a, b, c, _] = address.octets();
    Assignment {
        instance: id.into(),
        deployment: format!("{project}-dep"),
        org: "acme".into(),
        project: project.into(),
        image: "busybox".into(),
        port: 8080,
        resources: Resources { vcpu: 1, memory: 128 },
        env: Default::default(),
        status: InstanceStatus::Ready,
        pull_credential: None,
        release_command: None,
        network: Some(PrivateNetwork {
            prefix: format!("{a}.{b}.{c}.0/24"),
            address: address.to_string(),
            members: members
                .iter()
                .map(|m| NetworkMember { instance: format!("i-{m}"), address: m.to_string(), ready: true })
                .collect(),
            egress: None,
            tunnel_peers: peers,
        }),
        log_drains: Vec::new(),
    }
}

fn peer(node: &str, public_key: &str, endpoint: &str, members: &[Ipv4Addr]) -> TunnelPeer {
    TunnelPeer {
        node: node.into(),
        public_key: public_key.trim().into(),
        endpoint: endpoint.into(),
        allowed_ips: members.iter().map(|m| format!("{m}/32")).collect(),
    }
}

/// Applies the firewall and tunnel state of `table`, the way the agent's loop does.
async fn converge(base: Ipv4Addr, tunnel: &std::sync::Arc<Tunnel>, table: &HashMap<String, Local>) -> bool {
    net::set_project_networks(base, &project_networks(table, &HashMap::new())).await.unwrap();
    let peers = peers_of(table.values().map(|l| &l.assignment));
    let t = tunnel.clone();
    tokio::task::spawn_blocking(move || t.apply(&peers)).await.unwrap().unwrap()
}

async fn node(role: &str, dir: &Path) {
    let (base, me, other, other_endpoint) = match role {
        "a" => (Ipv4Addr::new(10, 208, 0, 0), "a", "b", "192.0.2.2:51820"),
        _ => (Ipv4Addr::new(10, 207, 0, 0), "b", "a", "192.0.2.1:51820"),
    };
    let id = std::process::id() % 100_000;
    net::apply_policy(base, None).await.unwrap();
    let key_dir = dir.join(format!("node-{me}"));
    let key = KeyPair::load_or_create(&key_dir).unwrap();
    let name = net::tunnel_interface(base);
    let tunnel = {
        let key = KeyPair::load_or_create(&key_dir).unwrap();
        std::sync::Arc::new(
            tokio::task::spawn_blocking(move || Tunnel::start(&name, 51820, &key)).await.unwrap().unwrap(),
        )
    };
    mark(dir, &format!("{me}.pub"), &key.public_key());

    let web = Instance::start(&format!("tw{me}{id}"), base, 0, &format!("{me}-web")).await;
    let spy = if me == "a" { Some(Instance::start(&format!("ts{me}{id}"), base, 1, "a-spy").await) } else { None };
    let other_key = wait_for(dir, &format!("{other}.pub"));
    let (mine, theirs) = if me == "a" { (WEB_A, WEB_B) } else { (WEB_B, WEB_A) };
    let web_peer = || vec![peer(&format!("node-{other}"), &other_key, other_endpoint, &[theirs])];
    let mut table = HashMap::new();
    table.insert(
        "web".to_owned(),
        Local::running(assignment("web", "web", mine, &[WEB_A, WEB_B], web_peer()), web.addr()),
    );
    if let Some(spy) = &spy {
        table.insert("spy".to_owned(), Local::running(assignment("spy", "spy", SPY_A, &[SPY_A], vec![]), spy.addr()));
    }
    assert!(converge(base, &tunnel, &table).await, "the first pass adds the peer and its route");
    assert!(!converge(base, &tunnel, &table).await, "the same peers again change nothing");
    let status = tunnel.status().unwrap();
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(
        (status[0].public_key.as_str(), status[0].allowed.clone()),
        (other_key.trim(), vec![format!("{theirs}/32")])
    );
    let routes = sh(&format!("ip -4 route show dev {}", tunnel.name()));
    assert_eq!(routes.split_whitespace().next(), Some(theirs.to_string().as_str()), "{routes}");
    mark(dir, &format!("{me}.ready"), "");
    wait_for(dir, &format!("{other}.ready"));

    // Across the tunnel, by private address, seen with the private source.
    let took =
        web.reaches(theirs, "/id.txt", &format!("{other}-web"), "web never reached the other node's web", &tunnel);
    println!("node {me}: first answer across the tunnel after {} ms", took.as_millis());
    // busybox httpd listens on IPv6 and shows IPv4 clients mapped: [::ffff:a.b.c.d].
    let who = web.get(theirs, "/cgi-bin/who");
    assert_eq!(
        who.trim_start_matches("[::ffff:").trim_end_matches(']'),
        mine.to_string(),
        "the far side sees the private source"
    );
    let start = Instant::now();
    let size = web.get(theirs, "/big").len();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(size, 16 << 20);
    println!(
        "node {me}: 16 MiB across the tunnel in {:.0} ms ({:.0} Mbit/s)",
        secs * 1000.0,
        16.0 * 8.0 * 1.048_576 / secs
    );

    if let Some(spy) = &spy {
        // Another network: not into the tunnel, nor to an address no member holds.
        assert_eq!(spy.get(theirs, "/id.txt"), "unreachable", "spy reached the other node's web");
        assert_eq!(web.get(Ipv4Addr::new(100, 100, 0, 9), "/id.txt"), "unreachable");
        // A node that wrongly lets it in: the far side still refuses it on arrival.
        let mut wrong = project_networks(&table, &HashMap::new());
        wrong.peers.push((spy.link.instance_ip, theirs));
        net::set_project_networks(base, &wrong).await.unwrap();
        assert_eq!(spy.get(theirs, "/id.txt"), "unreachable", "node b took the spy's packets");
        net::set_project_networks(base, &project_networks(&table, &HashMap::new())).await.unwrap();
    }
    mark(dir, &format!("{me}.probed"), "");
    wait_for(dir, &format!("{other}.probed"));

    if me == "a" {
        // The other node's member goes: its peer and route go, and it is out of reach.
        let alone = assignment("web", "web", mine, &[WEB_A], vec![]);
        table.insert("web".to_owned(), Local::running(alone, web.addr()));
        assert!(converge(base, &tunnel, &table).await);
        assert!(tunnel.status().unwrap().is_empty(), "the peer is gone");
        assert_eq!(sh(&format!("ip -4 route show dev {}", tunnel.name())).trim(), "", "the route is gone");
        assert_eq!(web.get(theirs, "/id.txt"), "unreachable");
        // And comes back.
        table.insert(
            "web".to_owned(),
            Local::running(assignment("web", "web", mine, &[WEB_A, WEB_B], web_peer()), web.addr()),
        );
        assert!(converge(base, &tunnel, &table).await);
        web.reaches(theirs, "/id.txt", "b-web", "web never reached the returning member", &tunnel);
    }
    mark(dir, &format!("{me}.done"), "");
    wait_for(dir, &format!("{other}.done"));
    drop(spy);
    drop(web);
}
