//! The node's end of the tunnel that carries private project networks to the
//! other nodes: a userspace WireGuard (boringtun) on a TUN device named after
//! the instance range ([`zeitwork_runtime::net::tunnel_interface`]), with the
//! node's key pair kept in its data dir, and peers and routes that follow the
//! assignments.
//!
//! The device is configured over the WireGuard UAPI, on one end of a socket
//! pair that only this process holds: no control socket on the filesystem, so
//! nothing else on the host can read the tunnel's state or change its peers.
//! The private key goes nowhere but the key file (0600) and that socket.
//!
//! What may cross the tunnel is decided twice on each side: WireGuard accepts
//! from a peer only the addresses in its `AllowedIPs` (the private addresses
//! of its members), and the node's firewall passes only pairs of members of
//! one network (`tunnel_peers`, see `zeitwork_runtime::net::policy_rules`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use boringtun::device::{DeviceConfig, DeviceHandle};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The name of the key file in the agent's data dir.
pub const KEY_FILE: &str = "wireguard.key";

/// The tunnel's UDP port unless the `tunnel_port` setting says otherwise.
pub const DEFAULT_PORT: u16 = 51820;

/// Keepalives keep a NAT or stateful firewall between nodes open.
const KEEPALIVE_SECS: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the tunnel key {path} cannot be used: {message}")]
    Key { path: PathBuf, message: String },
    #[error("cannot read or write the tunnel key {path}")]
    KeyIo { path: PathBuf, source: std::io::Error },
    #[error("cannot create the tunnel device {name} (is /dev/net/tun there, and may the agent use it?): {message}")]
    Device { name: String, message: String },
    #[error("the tunnel device {name} refused its configuration (errno {errno})")]
    Refused { name: String, errno: i32 },
    #[error("cannot talk to the tunnel device {name}")]
    Control { name: String, source: std::io::Error },
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
}

/// The node's WireGuard key pair. The secret is never printed: `Debug` shows
/// the public key only.
pub struct KeyPair {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("public", &self.public_key()).finish_non_exhaustive()
    }
}

impl KeyPair {
    fn from_secret(secret: [u8; 32]) -> KeyPair {
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        KeyPair { secret, public }
    }

    /// The public key as `wg` prints it (base64).
    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public)
    }

    /// The key pair in `dir`'s key file, made (0600) at the first start.
    pub fn load_or_create(dir: &Path) -> Result<KeyPair, TunnelError> {
        let path = dir.join(KEY_FILE);
        let io = |source| TunnelError::KeyIo { path: path.clone(), source };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mode = std::fs::metadata(&path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    // Someone widened it; a private key is for the agent's user only.
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
                    tracing::warn!(path = %path.display(), "the tunnel key was readable by others; made it 0600");
                }
                let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).ok();
                let secret: [u8; 32] = bytes.and_then(|b| b.try_into().ok()).ok_or_else(|| TunnelError::Key {
                    path: path.clone(),
                    message: "it is not base64 of 32 bytes; remove it and the agent makes a new one".into(),
                })?;
                Ok(KeyPair::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io)?;
                let mut secret = [0u8; 32];
                std::fs::File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut secret)).map_err(io)?;
                // Written whole under another name, then renamed: a crash leaves no half key.
                let tmp = dir.join(format!("{KEY_FILE}.tmp"));
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|source| TunnelError::KeyIo { path: tmp.clone(), source })?;
                let text = base64::engine::general_purpose::STANDARD.encode(secret);
                f.write_all(text.as_bytes())
                    .and_then(|()| f.write_all(b"\n"))
                    .and_then(|()| f.sync_all())
                    .map_err(|source| TunnelError::KeyIo { path: tmp.clone(), source })?;
                std::fs::rename(&tmp, &path).map_err(io)?;
                let pair = KeyPair::from_secret(secret);
                tracing::info!(public_key = %pair.public_key(), "made this node's tunnel key pair");
                Ok(pair)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// Another node's end, as this node needs it: where to send, and which
/// private addresses live behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub endpoint: SocketAddrV4,
    pub allowed: BTreeSet<Ipv4Addr>,
}

/// Peers by public key (base64).
pub type Peers = BTreeMap<String, Peer>;

/// The peers a node needs for the networks of `assignments`: every other node
/// that holds members of them, with those members' addresses. What does not
/// parse is left out (the operator checks it at registration).
pub fn peers_of<'a>(assignments: impl IntoIterator<Item = &'a zeitwork_api_types::Assignment>) -> Peers {
    let mut peers = Peers::new();
    for net in assignments.into_iter().filter_map(|a| a.network.as_ref()) {
        for p in &net.tunnel_peers {
            let (Ok(()), Ok(endpoint)) = (
                zeitwork_api_types::validate::wireguard_key("public_key", &p.public_key),
                p.endpoint.parse::<SocketAddrV4>(),
            ) else {
                continue;
            };
            let peer = peers.entry(p.public_key.clone()).or_insert(Peer { endpoint, allowed: BTreeSet::new() });
            peer.endpoint = endpoint;
            peer.allowed.extend(p.allowed_ips.iter().filter_map(|a| host_address(a)));
        }
    }
    peers
}

/// `a.b.c.d/32` or `a.b.c.d`: the only shapes a member's address has.
pub fn host_address(a: &str) -> Option<Ipv4Addr> {
    a.strip_suffix("/32").unwrap_or(a).parse().ok()
}

/// What one peer of a running tunnel reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed: Vec<String>,
    /// Seconds since the epoch of the last completed handshake (0: none yet).
    pub last_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The running tunnel device.
pub struct Tunnel {
    name: String,
    // Dropped first (or taken by `close`): the device stops before its control socket closes.
    device: Mutex<Option<DeviceHandle>>,
    control: Mutex<UnixStream>,
    applied: Mutex<Peers>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Creates device `name` in the calling thread's network namespace,
    /// listening on UDP `port` with `key`, and brings it up without peers.
    /// Blocking: call it off the async threads.
    pub fn start(name: &str, port: u16, key: &KeyPair) -> Result<Tunnel, TunnelError> {
        let control = |source| TunnelError::Control { name: name.to_owned(), source };
        let (ours, theirs) = UnixStream::pair().map_err(control)?;
        let config = DeviceConfig {
            n_threads: 2,
            use_connected_socket: true,
            use_multi_queue: false,
            uapi_fd: theirs.into_raw_fd(),
        };
        let device = DeviceHandle::new(name, config)
            .map_err(|e| TunnelError::Device { name: name.to_owned(), message: format!("{e:?}") })?;
        ours.set_read_timeout(Some(Duration::from_secs(5))).map_err(control)?;
        let tunnel = Tunnel {
            name: name.to_owned(),
            device: Mutex::new(Some(device)),
            control: Mutex::new(ours),
            applied: Mutex::new(Peers::new()),
        };
        tunnel.set(&format!("private_key={}\nlisten_port={port}\n", hex::encode(key.secret)))?;
        // WireGuard's 80 bytes of overhead on a 1500-byte path.
        ip(&["link", "set", "dev", name, "mtu", "1420", "up"])?;
        tracing::info!(device = name, port, "tunnel to other nodes up");
        Ok(tunnel)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the device: it leaves the host with its routes, even while
    /// something still holds this tunnel (its calls fail from then on).
    /// Blocking.
    pub fn close(&self) {
        let Some(device) = self.device.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        drop(device);
        // The device's threads let go of it a moment later; the link goes now.
        match ip(&["link", "del", "dev", &self.name]) {
            Ok(()) => tracing::info!(device = %self.name, "tunnel to other nodes closed"),
            Err(e) => tracing::debug!(device = %self.name, error = %e, "the tunnel device was gone already"),
        }
    }

    /// One `set` exchange over the UAPI.
    fn set(&self, body: &str) -> Result<(), TunnelError> {
        let reply = self.exchange(&format!("set=1\n{body}\n"))?;
        let errno = reply
            .lines()
            .find_map(|l| l.strip_prefix("errno="))
            .and_then(|n| n.trim().parse::<i32>().ok())
            .unwrap_or(-1);
        if errno != 0 {
            return Err(TunnelError::Refused { name: self.name.clone(), errno });
        }
        Ok(())
    }

    /// Sends `request` and reads the answer up to its blank line.
    fn exchange(&self, request: &str) -> Result<String, TunnelError> {
        let control = |source| TunnelError::Control { name: self.name.clone(), source };
        let stream = self.control.lock().unwrap_or_else(|p| p.into_inner());
        (&*stream).write_all(request.as_bytes()).map_err(control)?;
        let mut reader = BufReader::new(&*stream);
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(control)? == 0 || line == "\n" {
                return Ok(reply);
            }
            reply.push_str(&line);
        }
    }

    /// The peers as the device reports them.
    pub fn status(&self) -> Result<Vec<PeerStatus>, TunnelError> {
        let reply = self.exchange("get=1\n")?;
        let mut peers: Vec<PeerStatus> = Vec::new();
        for line in reply.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            if k == "public_key" {
                let key = hex::decode(v).unwrap_or_default();
                peers.push(PeerStatus {
                    public_key: base64::engine::general_purpose::STANDARD.encode(key),
                    ..Default::default()
                });
                continue;
            }
            let Some(p) = peers.last_mut() else { continue };
            match k {
                "endpoint" => p.endpoint = Some(v.to_owned()),
                "allowed_ip" => p.allowed.push(v.to_owned()),
                "last_handshake_time_sec" => p.last_handshake = v.parse().unwrap_or(0),
                "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(peers)
    }

    /// Makes the device's peers and the routes into it exactly `want`: only
    /// what differs from the last call changes (a peer whose endpoint or
    /// addresses changed is replaced; the others keep their sessions).
    /// Returns whether anything changed. Blocking.
    pub fn apply(&self, want: &Peers) -> Result<bool, TunnelError> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for (key, _) in applied.clone().iter().filter(|(k, old)| want.get(*k) != Some(*old)) {
            self.set(&format!("public_key={}\nremove=true\n", key_hex(key)?))?;
            applied.remove(key);
            changed = true;
        }
        let new: Vec<_> = want.iter().filter(|(k, _)| !applied.contains_key(*k)).collect();
        for (key, peer) in new {
            let mut body = format!(
                "public_key={}\nremove=false\nendpoint={}\npersistent_keepalive_interval={KEEPALIVE_SECS}\nreplace_allowed_ips=true\n",
                key_hex(key)?,
                peer.endpoint
            );
            for a in &peer.allowed {
                body.push_str(&format!("allowed_ip={a}/32\n"));
            }
            self.set(&body)?;
            applied.insert(key.clone(), peer.clone());
            changed = true;
        }
        let routes: BTreeSet<Ipv4Addr> = want.values().flat_map(|p| p.allowed.iter().copied()).collect();
        changed |= self.route(&routes)?;
        Ok(changed)
    }

    /// Routes exactly `want` (private addresses on other nodes) into the device.
    fn route(&self, want: &BTreeSet<Ipv4Addr>) -> Result<bool, TunnelError> {
        let out = std::process::Command::new("ip")
            .args(["-4", "route", "show", "dev", &self.name])
            .output()
            .map_err(|e| TunnelError::Command { what: "ip route show".into(), message: e.to_string() })?;
        let have: BTreeSet<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(host_address)
            .collect();
        for gone in have.difference(want) {
            ip(&["route", "del", &format!("{gone}/32"), "dev", &self.name])?;
        }
        for new in want.difference(&have) {
            ip(&["route", "replace", &format!("{new}/32"), "dev", &self.name])?;
        }
        Ok(have != *want)
    }
}

fn key_hex(key: &str) -> Result<String, TunnelError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(key).ok().filter(|b| b.len() == 32);
    bytes.map(hex::encode).ok_or_else(|| TunnelError::Command {
        what: "a tunnel peer".into(),
        message: format!("{key:?} is not a WireGuard key"),
    })
}

fn ip(args: &[&str]) -> Result<(), TunnelError> {
    let what = format!("ip {}", args.join(" "));
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunnelError::Command { what: what.clone(), message: e.to_string() })?;
    if !out.status.success() {
        return Err(TunnelError::Command { what, message: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_kept_0600_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyPair::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = KeyPair::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public_key(), again.public_key(), "the same key at the next start");
        zeitwork_api_types::validate::wireguard_key("k", &first.public_key()).unwrap();
        let secret = std::fs::read_to_string(&path).unwrap();
        assert!(!format!("{first:?}").contains(secret.trim()), "Debug shows no secret");
        // Widened by someone: narrowed again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        KeyPair::load_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(KeyPair::load_or_create(dir.path()), Err(TunnelError::Key { .. })));
    }

    #[test]
    fn a_known_secret_gives_its_known_public_key() {
        // `echo <secret> | wg pubkey`, from WireGuard's documentation.
        let secret = base64::engine::general_purpose::STANDARD.decode("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=");
        let pair = KeyPair::from_secret(secret.unwrap().try_into().unwrap());
        assert_eq!(pair.public_key(), "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
    }
}
