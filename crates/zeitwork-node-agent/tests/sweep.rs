//! After the agent was killed with instances running, a new agent removes
//! what they left on the host (container, VMM process, mounts, network
//! namespace, veth, tap, cgroups, directories) before it starts anything,
//! and leaves alone what is not its own. Needs root, runc, QEMU and
//! iproute2, like the other agent tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use zeitwork_node_agent::NodeAgent;
use zeitwork_runtime::container::{netns_name, ContainerRuntime};
use zeitwork_runtime::logs::LogStore;
use zeitwork_runtime::{InstanceSpec, Runtime};

const RANGE: &str = "10.251.0.0";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn has_netns(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
}

fn has_link(name: &str) -> bool {
    ok(&["ip", "link", "show", "dev", name])
}

fn mounted(point: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let point = point.to_str().unwrap();
    table.lines().any(|l| l.split(' ').nth(4) == Some(point))
}

fn alive(pid: u32) -> bool {
    // A killed child stays a zombie until reaped: count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

fn runc_knows(id: &str) -> bool {
    ok(&["runc", "state", id])
}

/// The `zeitwork/<name>` cgroups of every v1 hierarchy that has a `zeitwork` parent (or can have one).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    ["pids", "memory"].iter().map(|c| Path::new("/sys/fs/cgroup").join(c).join("zeitwork").join(name)).collect()
}

/// Undoes what the test made, also when it fails half-way: every step may
/// find its thing already gone (the sweeper's work), which is fine.
#[derive(Default)]
struct Cleanup {
    commands: Vec<Vec<String>>,
    children: Vec<std::process::Child>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    fn undo(&mut self, args: &[&str]) {
        self.commands.push(args.iter().map(|a| a.to_string()).collect());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            if child.kill().is_ok() {
                child.wait().ok();
            }
        }
        for c in self.commands.iter().rev() {
            Command::new(&c[0]).args(&c[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().ok();
        }
        for d in &self.dirs {
            std::fs::remove_dir(d).ok();
        }
    }
}

/// The name of the device of the host's end, as the drivers name it (`zwh` / `zwt` + the instance's key).
fn device(prefix: &str, id: &str) -> String {
    format!("{prefix}{}", &netns_name(id)[3..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_removes_what_a_killed_one_left_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    let instances = data.join("instances");
    let tag = std::process::id() % 100_000;
    let mut undo = Cleanup::default();

    // 1. An instance the way a killed agent leaves it: the runtime started
    //    it and never ran its teardown (not even its drop).
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).expect("busybox (static) is needed for the test");
    let logs = Arc::new(LogStore::new(&dir.path().join("old-logs")).unwrap());
    let old = ContainerRuntime::new(&instances, Path::new("runc"), RANGE.parse().unwrap(), logs).await.unwrap();
    let full = format!("sweep-full-{tag}");
    let image = zeitwork_image::ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "sleep".into(), "1000".into()],
        ..Default::default()
    };
    let spec = InstanceSpec {
        id: full.clone(),
        rootfs: rootfs.clone(),
        image,
        env: vec![],
        port: 8080,
        vcpu: 1,
        memory_mib: 64,
        disk: None,
        dns_search: None,
    };
    let full_cid = format!("zw-{full}");
    undo.undo(&["umount", "-l", instances.join(&full).join("rootfs").to_str().unwrap()]);
    undo.undo(&["ip", "netns", "del", &netns_name(&full)]);
    undo.undo(&["runc", "delete", "--force", &full_cid]);
    undo.undo(&["runc", "kill", "--all", &full_cid, "KILL"]);
    old.start(&spec).await.unwrap();
    std::mem::forget(old);
    // `runc run` records the container a moment after the runtime returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !runc_knows(&full_cid) {
        assert!(std::time::Instant::now() < deadline, "runc never reported the container");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(has_netns(&netns_name(&full)) && mounted(&instances.join(&full).join("rootfs")));

    // 2. An instance killed half-way through its start: overlay mounted,
    //    namespace and veth made, no bundle yet.
    let half = format!("sweep-half-{tag}");
    let half_dir = instances.join(&half);
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(half_dir.join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        rootfs.display(),
        half_dir.join("upper").display(),
        half_dir.join("work").display()
    );
    sh(&["mount", "-t", "overlay", "overlay", "-o", &opts, half_dir.join("rootfs").to_str().unwrap()]);
    undo.undo(&["umount", "-l", half_dir.join("rootfs").to_str().unwrap()]);
    let (half_ns, half_veth, half_peer) = (netns_name(&half), device("zwh", &half), device("zwc", &half));
    sh(&["ip", "netns", "add", &half_ns]);
    undo.undo(&["ip", "netns", "del", &half_ns]);
    undo.undo(&["ip", "link", "del", &half_veth]);
    sh(&["ip", "link", "add", &half_veth, "type", "veth", "peer", "name", &half_peer]);
    sh(&["ip", "link", "set", &half_peer, "netns", &half_ns]);
    sh(&["ip", "-n", &half_ns, "addr", "add", "10.251.200.2/30", "dev", &half_peer]);
    sh(&["ip", "addr", "add", "10.251.200.1/30", "dev", &half_veth]);

    // 3. A microVM whose VMM runs with no pid file and whose tap is
    //    recorded nowhere.
    let vm = format!("sweep-vm-{tag}");
    let vm_dir = data.join("vms").join(&vm);
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::write(vm_dir.join("config.img"), b"").unwrap();
    let qmp = vm_dir.join("qmp.sock");
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-S", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 is needed for the test");
    let qemu_pid = qemu.id();
    undo.children.push(qemu);
    let tap = device("zwt", &vm);
    sh(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"]);
    undo.undo(&["ip", "link", "del", &tap]);
    sh(&["ip", "addr", "add", "10.251.201.1/30", "dev", &tap]);

    // 4. Cgroups of a container whose runtime state is gone.
    let lost = format!("zw-sweep-lost-{tag}");
    for d in cgroup_dirs(&lost) {
        std::fs::create_dir_all(&d).unwrap();
        undo.dirs.push(d);
    }
    for d in cgroup_dirs(&full_cid) {
        undo.dirs.push(d);
    }

    // What is not this node's: another node's namespace and tap (another
    // range), a cgroup of something else, a mount and a process outside
    // the instance directories.
    let other_ns = format!("zw-other{tag}");
    sh(&["ip", "netns", "add", &other_ns]);
    undo.undo(&["ip", "netns", "del", &other_ns]);
    sh(&["ip", "-n", &other_ns, "link", "add", "o0", "type", "veth", "peer", "name", "o1"]);
    sh(&["ip", "-n", &other_ns, "addr", "add", "192.0.2.9/32", "dev", "o0"]);
    let other_tap = format!("zwto{tag}");
    sh(&["ip", "tuntap", "add", "dev", &other_tap, "mode", "tap"]);
    undo.undo(&["ip", "link", "del", &other_tap]);
    sh(&["ip", "addr", "add", "192.0.2.10/32", "dev", &other_tap]);
    let other_cgroups = cgroup_dirs(&format!("other-{tag}"));
    for d in &other_cgroups {
        std::fs::create_dir_all(d).unwrap();
        undo.dirs.push(d.clone());
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    sh(&["mount", "-t", "tmpfs", "tmpfs", elsewhere.to_str().unwrap()]);
    undo.undo(&["umount", "-l", elsewhere.to_str().unwrap()]);
    let bystander = Command::new("bash")
        .args(["-c", "exec -a \"$0\" sleep 1000"])
        .arg(elsewhere.join("not-an-instance"))
        .spawn()
        .unwrap();
    let bystander_pid = bystander.id();
    undo.children.push(bystander);

    // A new agent on the same data directory and range.
    let (op, base, admin) = common::operator(
        dir.path(),
        Default::default(),
        json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
    )
    .await;
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent = NodeAgent::start(common::agent_config(&base, token, dir.path(), "sweep", RANGE)).await.unwrap();

    let mut left = Vec::new();
    let mut check = |what: String, still: bool| {
        if still {
            left.push(what);
        }
    };
    check(format!("container {full_cid}"), runc_knows(&full_cid));
    check(format!("netns {}", netns_name(&full)), has_netns(&netns_name(&full)));
    check(format!("veth {}", device("zwh", &full)), has_link(&device("zwh", &full)));
    check(format!("mount of {full}"), mounted(&instances.join(&full).join("rootfs")));
    check(format!("directory of {full}"), instances.join(&full).exists());
    for d in cgroup_dirs(&full_cid) {
        check(format!("cgroup {}", d.display()), d.exists());
    }
    check(format!("mount of {half}"), mounted(&half_dir.join("rootfs")));
    check(format!("directory of {half}"), half_dir.exists());
    check(format!("netns {half_ns}"), has_netns(&half_ns));
    check(format!("veth {half_veth}"), has_link(&half_veth));
    check(format!("qemu {qemu_pid}"), alive(qemu_pid));
    check(format!("tap {tap}"), has_link(&tap));
    check(format!("directory of {vm}"), vm_dir.exists());
    for d in cgroup_dirs(&lost) {
        check(format!("cgroup {}", d.display()), d.exists());
    }
    let mut gone = Vec::new();
    let mut kept = |what: String, still: bool| {
        if !still {
            gone.push(what);
        }
    };
    kept(format!("netns {other_ns}"), has_netns(&other_ns));
    kept(format!("tap {other_tap}"), has_link(&other_tap));
    for d in &other_cgroups {
        kept(format!("cgroup {}", d.display()), d.exists());
    }
    kept("the tmpfs outside the instance directories".into(), mounted(&elsewhere));
    kept("a process naming a path outside the instance directories".into(), alive(bystander_pid));

    agent.shutdown().await;
    drop(op);
    // Tidy up before judging, so a failure leaves nothing behind either.
    drop(undo);
    assert!(left.is_empty(), "left behind after the new agent started: {left:?}");
    assert!(gone.is_empty(), "removed though not this node's: {gone:?}");
}

/// While the agent runs, its periodic sweep removes the leftover of an
/// instance it does not run (a directory last changed ten minutes ago with
/// its overlay mount, a network namespace and a veth of the node's range),
/// logs and counts it on `/metrics`, and leaves alone the instance it runs
/// (started while sweeps went on every second) and a directory changed lately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_sweeps_leftovers_and_keeps_its_instances() {
    const RANGE: &str = "10.204.0.0";
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let instances = dir.path().join("agent").join("instances");
    let tag = std::process::id() % 100_000;
    let mut undo = Cleanup::default();
    let (op, base, admin) = common::operator(
        dir.path(),
        Default::default(),
        json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
    )
    .await;
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent = NodeAgent::start(zeitwork_node_agent::NodeAgentConfig {
        sweep_interval_secs: 1,
        metrics_token: Some("scrape".into()),
        // The resolver runs, so the agent's firewall table exists from the start.
        dns_port: zeitwork_testkit::free_port(),
        ..common::agent_config(&base, token, dir.path(), "sweeper", RANGE)
    })
    .await
    .unwrap();

    // Before any instance runs, a sweep removes an old leftover directory but
    // never the running agent's own firewall table.
    let table = zeitwork_runtime::net::table_of(RANGE.parse().unwrap());
    let has_table = || {
        std::process::Command::new("nft")
            .args(["list", "table", "inet", &table])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(has_table(), "the agent did not install its firewall table {table}");
    let early = instances.join(format!("sweep-early-{tag}"));
    std::fs::create_dir_all(early.join("rootfs")).unwrap();
    std::fs::File::open(&early).unwrap().set_modified(std::time::SystemTime::now() - Duration::from_secs(600)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while early.exists() {
        assert!(Instant::now() < deadline, "the periodic sweep never removed {}", early.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(has_table(), "a periodic sweep removed the running agent's firewall table {table}");

    // An instance the agent runs, started while it sweeps.
    let d: serde_json::Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": image, "instances_per_region": 1}),
        )
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let live = loop {
        let listed = op.store.list_instances(&dep).await.unwrap();
        if let Some(i) = listed.into_iter().find(|i| i.status.as_str() == "ready") {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the instance never became ready: {:?}",
            op.store.list_instances(&dep).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let live_addr = live.address.clone().expect("a ready instance has an address");

    // A leftover made while the agent runs, last changed ten minutes ago.
    let old = format!("sweep-old-{tag}");
    let old_dir = instances.join(&old);
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(old_dir.join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        old_dir.join("upper").display(),
        old_dir.join("work").display()
    );
    sh(&["mount", "-t", "overlay", "overlay", "-o", &opts, old_dir.join("rootfs").to_str().unwrap()]);
    undo.undo(&["umount", "-l", old_dir.join("rootfs").to_str().unwrap()]);
    let (old_ns, old_veth, old_peer) = (netns_name(&old), device("zwh", &old), device("zwc", &old));
    sh(&["ip", "netns", "add", &old_ns]);
    undo.undo(&["ip", "netns", "del", &old_ns]);
    undo.undo(&["ip", "link", "del", &old_veth]);
    sh(&["ip", "link", "add", &old_veth, "type", "veth", "peer", "name", &old_peer]);
    sh(&["ip", "link", "set", &old_peer, "netns", &old_ns]);
    sh(&["ip", "-n", &old_ns, "addr", "add", "10.204.200.2/30", "dev", &old_peer]);
    sh(&["ip", "addr", "add", "10.204.200.1/30", "dev", &old_veth]);
    let ten_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(600);
    std::fs::File::open(&old_dir).unwrap().set_modified(ten_minutes_ago).unwrap();
    // One changed just now: within the grace, as an instance being created.
    let fresh_dir = instances.join(format!("sweep-fresh-{tag}"));
    std::fs::create_dir_all(&fresh_dir).unwrap();
    std::fs::write(fresh_dir.join("config.json"), "{}").unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<&str> = [
            ("mount", mounted(&old_dir.join("rootfs"))),
            ("directory", old_dir.exists()),
            ("netns", has_netns(&old_ns)),
            ("veth", has_link(&old_veth)),
        ]
        .into_iter()
        .filter_map(|(what, still)| still.then_some(what))
        .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the periodic sweep left the leftover's {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", agent.addr()))
        .bearer_auth("scrape")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (kind, n) in [("mount", 1), ("netns", 1), ("directory", 2)] {
        let line = format!("zeitwork_node_agent_swept_total{{kind=\"{kind}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in {metrics}");
    }

    // The instance it runs, and the directory changed lately, are still there.
    assert!(fresh_dir.exists(), "a directory changed within the grace was swept");
    assert!(instances.join(&live.id).exists(), "the live instance's directory was swept");
    assert!(has_netns(&netns_name(&live.id)), "the live instance's network namespace was swept");
    let res = reqwest::get(format!("http://{live_addr}/")).await.unwrap();
    assert_eq!(res.status(), 200, "the live instance still serves");
    assert_eq!(op.store.get_instance(&live.id).await.unwrap().status.as_str(), "ready");

    agent.shutdown().await;
    drop(op);
    drop(undo);
}
