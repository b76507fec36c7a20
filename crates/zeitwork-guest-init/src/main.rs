//! Zeitwork's guest init: PID 1 of every microVM.
//!
//! It mounts the kernel file systems, loads the modules the host packed into
//! the initramfs (in dependency order), reads its configuration from the
//! configuration disk, mounts the image's ext4 read-only under a writable
//! tmpfs overlay, configures the network, switches into the image's root and
//! runs its entrypoint. The app's output goes to the serial console line by
//! line, marked for the host; `stop <grace>` on the console becomes SIGTERM,
//! then SIGKILL after the grace period; the exit code is reported and the VM
//! powered off. It reaps every orphan the app leaves.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use zeitwork_guest_init::{
    GuestConfig, DATA_LABEL, EXIT, FAILED, MAGIC, PROBE_ARG, PROBE_OK, STARTED, STDERR, STDOUT, STOP,
};

/// The app's pid once started (0 before).
static APP: AtomicI32 = AtomicI32::new(0);

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn power_off() -> ! {
    nix::unistd::sync();
    // A reboot ends the VM: QEMU runs with -no-reboot, Firecracker exits on it.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn fail(reason: &str) -> ! {
    say(&format!("{FAILED}{reason}"));
    power_off()
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| format!("mounting {fstype} on {target}: {e}"))
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("zeitwork-guest-init runs as PID 1 inside a Zeitwork microVM; it does nothing elsewhere");
        std::process::exit(2);
    }
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let _ = mount_fs("proc", "/proc", "proc", nodev, None);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == PROBE_ARG) {
        say(PROBE_OK);
        power_off();
    }
    raw_console();
    if let Err(e) = boot() {
        fail(&e);
    }
}

/// The console without echo or line editing: input is the host's commands.
fn raw_console() {
    let stdin = std::io::stdin();
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&stdin) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
    }
}

fn boot() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    load_modules();
    let (root, config) = find_disks(Duration::from_secs(20))?;
    let config = GuestConfig::decode(&config).map_err(|e| format!("configuration disk: {e}"))?;

    mount_fs(&root, "/mnt/lower", "ext4", MsFlags::MS_RDONLY, None)?;
    let size = format!("size={}m,mode=0755", config.overlay_mib.max(8));
    mount_fs("tmpfs", "/mnt/rw", "tmpfs", MsFlags::empty(), Some(&size))?;
    for d in ["/mnt/rw/upper", "/mnt/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {d}: {e}"))?;
    }
    mount_fs(
        "overlay",
        "/mnt/root",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"),
    )?;
    mount_fs("proc", "/mnt/root/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/mnt/root/sys", "sysfs", nodev, None)?;
    mount_fs("devtmpfs", "/mnt/root/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("devpts", "/mnt/root/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0620"))?;
    mount_fs("tmpfs", "/mnt/root/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    write_etc(&config)?;
    network(&config)?;
    nix::unistd::sethostname(&config.hostname).map_err(|e| format!("setting the hostname: {e}"))?;

    // Switch into the image's root, as switch_root does: the initramfs stays
    // behind, out of sight.
    std::env::set_current_dir("/mnt/root").map_err(|e| e.to_string())?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| format!("moving the root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    run(&config)
}

/// Loads the modules listed in /lib/modules/order (the host wrote them in
/// dependency order).
fn load_modules() {
    let order = std::fs::read_to_string("/lib/modules/order").unwrap_or_default();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}");
        let loaded = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            match nix::kmod::finit_module(&f, &CString::default(), nix::kmod::ModuleInitFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        });
        if let Err(e) = loaded {
            say(&format!("zeitwork-init: module {name}: {e}"));
        }
    }
}

/// The root disk (an ext4 that is neither the configuration nor a data disk)
/// and the configuration's bytes.
fn find_disks(wait: Duration) -> Result<(String, Vec<u8>), String> {
    let deadline = Instant::now() + wait;
    loop {
        let mut root = None;
        let mut config = None;
        let mut names: Vec<String> = std::fs::read_dir("/sys/block")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        for name in names.iter().filter(|n| n.starts_with("vd")) {
            let dev = format!("/dev/{name}");
            let mut head = vec![0u8; 64 * 1024];
            let Ok(n) = File::open(&dev).and_then(|mut f| read_full(&mut f, &mut head)) else { continue };
            head.truncate(n);
            if head.starts_with(MAGIC) {
                config = Some(head);
            } else if head.len() > 1081 && head[1080] == 0x53 && head[1081] == 0xef && !data_disk(&head) {
                root = Some(dev);
            }
        }
        if let (Some(r), Some(c)) = (root.clone(), config.clone()) {
            return Ok((r, c));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "disks not found after {} s (block devices: {names:?}; root found: {}, configuration found: {})",
                wait.as_secs(),
                root.is_some(),
                config.is_some()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An ext4 whose volume label starts with [`DATA_LABEL`]: a disk the app
/// mounts itself (a build's context or layer store), never the root.
fn data_disk(head: &[u8]) -> bool {
    // The superblock starts at 1024; its volume name at 120 into it.
    head.get(1144..1144 + DATA_LABEL.len()) == Some(DATA_LABEL.as_bytes())
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn write_etc(c: &GuestConfig) -> Result<(), String> {
    let etc = "/mnt/root/etc";
    std::fs::create_dir_all(etc).map_err(|e| format!("creating /etc: {e}"))?;
    let mut resolv: String = c.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    // A value with white space in it is no domain and would break the file: skipped.
    let search: Vec<&str> =
        c.search.iter().map(String::as_str).filter(|d| !d.is_empty() && !d.contains(char::is_whitespace)).collect();
    if !search.is_empty() {
        resolv.push_str(&format!("search {}\n", search.join(" ")));
    }
    let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\t{}\n", c.address, c.hostname);
    for (name, body) in [("resolv.conf", resolv), ("hosts", hosts), ("hostname", format!("{}\n", c.hostname))] {
        let path = format!("{etc}/{name}");
        // Images often ship these as symlinks into /run: replace, never follow.
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, body).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

/// Brings up lo and eth0 with the host's address, and the default route.
fn network(c: &GuestConfig) -> Result<(), String> {
    let index = |name: &str| -> Result<i32, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")) {
                return s.trim().parse().map_err(|_| format!("bad ifindex of {name}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no network interface {name} (is virtio_net loaded?)"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let nl = netlink::Socket::open().map_err(|e| format!("netlink: {e}"))?;
    nl.link_up(index("lo")?).map_err(|e| format!("bringing lo up: {e}"))?;
    if c.address.is_unspecified() {
        return Ok(());
    }
    let eth0 = index("eth0")?;
    nl.add_address(eth0, c.address, c.prefix).map_err(|e| format!("adding {}/{}: {e}", c.address, c.prefix))?;
    nl.link_up(eth0).map_err(|e| format!("bringing eth0 up: {e}"))?;
    if !c.gateway.is_unspecified() {
        nl.default_route(c.gateway).map_err(|e| format!("default route via {}: {e}", c.gateway))?;
    }
    Ok(())
}

fn run(c: &GuestConfig) -> Result<(), String> {
    let _ = std::fs::create_dir_all(&c.cwd);
    // Stop requests: ctrl-alt-del from the VMM (SIGINT to PID 1) and `stop` on the console.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    let mut child = Command::new(&c.args[0]);
    child
        .args(&c.args[1..])
        .env_clear()
        .envs(c.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(&c.cwd)
        .uid(c.uid)
        .gid(c.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut app = child.spawn().map_err(|e| format!("cannot start {:?}: {e}", c.args[0]))?;
    let pid = app.id() as i32;
    // Blocked only now: a child inherits the mask, and the app must see its signals.
    mask.thread_block().map_err(|e| format!("blocking signals: {e}"))?;
    APP.store(pid, Ordering::SeqCst);
    say(STARTED);
    let mut readers = Vec::new();
    if let Some(out) = app.stdout.take() {
        readers.push(std::thread::spawn(move || forward(out, STDOUT)));
    }
    if let Some(err) = app.stderr.take() {
        readers.push(std::thread::spawn(move || forward(err, STDERR)));
    }
    std::thread::spawn(console_commands);
    std::thread::spawn(move || {
        if let Ok(fd) = SignalFd::new(&mask) {
            while let Ok(Some(_)) = fd.read_signal() {
                stop(Duration::from_secs(10));
            }
        }
    });
    // Reap everything; the app's end ends the VM.
    let code = loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => break code,
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => break 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => break 0,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    // Let the readers pass on the last lines (children may keep the pipes open).
    let deadline = Instant::now() + Duration::from_millis(500);
    for r in readers {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    say(&format!("{EXIT}{code}"));
    power_off()
}

/// Passes the app's lines on, marked with the stream.
fn forward(from: impl Read, mark: &str) {
    let mut r = BufReader::with_capacity(64 * 1024, from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                say(&format!("{mark}{}", text.trim_end_matches(['\n', '\r'])));
            }
        }
    }
}

/// Reads the host's commands from the console.
fn console_commands() {
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let mut words = line.split_whitespace();
        if words.next() == Some(STOP) {
            let grace = words.next().and_then(|g| g.parse().ok()).unwrap_or(10);
            stop(Duration::from_secs(grace));
        }
    }
}

/// SIGTERM to the app now, SIGKILL to everything after `grace`.
fn stop(grace: Duration) {
    let pid = APP.load(Ordering::SeqCst);
    if pid <= 0 {
        power_off();
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    });
}

/// Just enough rtnetlink to configure one point-to-point interface.
mod netlink {
    use super::*;
    use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
    use std::os::fd::OwnedFd;

    const RTM_NEWLINK: u16 = 16;
    const RTM_NEWADDR: u16 = 20;
    const RTM_NEWROUTE: u16 = 24;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const IFF_UP: u32 = 1;
    const AF_INET: u8 = 2;

    pub struct Socket(OwnedFd);

    fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
        buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(data);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
    }

    impl Socket {
        pub fn open() -> nix::Result<Self> {
            let fd = socket::socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            )?;
            socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
            Ok(Self(fd))
        }

        fn request(&self, kind: u16, flags: u16, body: &[u8]) -> Result<(), String> {
            let mut msg = Vec::with_capacity(16 + body.len());
            msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            msg.extend_from_slice(&kind.to_ne_bytes());
            msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
            msg.extend_from_slice(&1u32.to_ne_bytes());
            msg.extend_from_slice(&0u32.to_ne_bytes());
            msg.extend_from_slice(body);
            socket::sendto(self.0.as_raw_fd(), &msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())
                .map_err(|e| e.to_string())?;
            let mut reply = [0u8; 1024];
            let n = socket::recv(self.0.as_raw_fd(), &mut reply, MsgFlags::empty()).map_err(|e| e.to_string())?;
            if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
                let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
                if code != 0 {
                    return Err(nix::errno::Errno::from_raw(-code).to_string());
                }
            }
            Ok(())
        }

        pub fn link_up(&self, index: i32) -> Result<(), String> {
            let mut body = vec![0u8, 0];
            body.extend_from_slice(&0u16.to_ne_bytes());
            body.extend_from_slice(&index.to_ne_bytes());
            body.extend_from_slice(&IFF_UP.to_ne_bytes());
            body.extend_from_slice(&IFF_UP.to_ne_bytes());
            self.request(RTM_NEWLINK, 0, &body)
        }

        pub fn add_address(&self, index: i32, addr: Ipv4Addr, prefix: u8) -> Result<(), String> {
            let mut body = vec![AF_INET, prefix, 0, 0];
            body.extend_from_slice(&(index as u32).to_ne_bytes());
            attr(&mut body, 2, &addr.octets()); // IFA_LOCAL
            attr(&mut body, 1, &addr.octets()); // IFA_ADDRESS
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body)
        }

        pub fn default_route(&self, gateway: Ipv4Addr) -> Result<(), String> {
            // family, dst_len, src_len, tos, table main, protocol boot, scope universe, type unicast, flags
            let mut body = vec![AF_INET, 0, 0, 0, 254, 3, 0, 1];
            body.extend_from_slice(&0u32.to_ne_bytes());
            attr(&mut body, 5, &gateway.octets()); // RTA_GATEWAY
            self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
        }
    }
}
