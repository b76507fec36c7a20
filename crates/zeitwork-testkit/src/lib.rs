//! Test kit: starts real pieces for Zeitwork's tests — a throwaway PostgreSQL
//! server in a temporary directory, free loopback ports.
//!
//! It must never touch a shared database or anything outside its temp dirs.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A loopback port free for both TCP and UDP on 127.0.0.1, for a server a
/// test starts later (bound, then released).
///
/// It is chosen below the kernel's ephemeral range, so a socket another test
/// binds to port 0 in the meantime is never given it; and never twice in one
/// process. A port from port 0 would be free only until the next such bind.
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static HANDED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000.min(low / 2).max(1024);
    let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(handed.len());
        let port = floor + (h.finish() % u64::from(low.saturating_sub(floor).max(1))) as u16;
        if handed.contains(&port) {
            continue;
        }
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            handed.insert(port);
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free loopback port")
}

/// A test that cannot run here calls this before returning early: it fails,
/// naming what is missing, unless `ZEITWORK_SKIP_<WHAT>` is set, so a skip
/// is always someone's explicit choice and never a silent `ok`.
pub fn skip_unless_allowed(what: &str, why: &str) {
    let var = format!("ZEITWORK_SKIP_{what}");
    if std::env::var_os(&var).is_some_and(|v| !v.is_empty() && v != "0") {
        eprintln!("skipped ({var} is set): {why}");
    } else {
        panic!("{why}; set {var}=1 to skip this test on purpose");
    }
}

/// Where the PostgreSQL server binaries live: `ZEITWORK_PG_BIN`, `PATH`, or
/// Debian's `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ZEITWORK_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// How a test's PostgreSQL server speaks TLS.
enum ServerTls {
    Off,
    /// Also TLS, with a CA the kit makes ([`Postgres::ca_path`]).
    OwnCa,
    /// TLS only, with the test's certificate and key.
    Only {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// A PostgreSQL server of its own, in a temp dir, on a free loopback port.
/// Stopped (`pg_ctl stop -m immediate`) and deleted on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("port", &self.port).finish()
    }
}

impl Postgres {
    /// initdb + pg_ctl start. As root the server runs as `nobody`, since
    /// PostgreSQL refuses to run as root.
    pub fn start() -> Result<Self> {
        Self::start_with(ServerTls::Off)
    }

    /// Like [`Postgres::start`], serving TLS with a certificate for `localhost`
    /// and 127.0.0.1 from a CA of its own, whose root is at [`Postgres::ca_path`].
    pub fn start_tls() -> Result<Self> {
        Self::start_with(ServerTls::OwnCa)
    }

    /// A server that takes TLS connections only (`hostssl` lines in its
    /// pg_hba.conf, no `host` line), with the certificate and key (PEM files)
    /// the test made.
    pub fn start_tls_only(cert: &Path, key: &Path) -> Result<Self> {
        Self::start_with(ServerTls::Only { cert: cert.to_owned(), key: key.to_owned() })
    }

    /// The root certificate the server's TLS certificate chains to.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn write_tls(&self) -> Result<String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let (cert_path, key_path) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "Zeitwork test database CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_key = KeyPair::generate()?;
        std::fs::write(self.ca_path(), ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
        leaf.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &issuer)?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        self.tls_options()
    }

    /// The server options that serve the certificate and key in the server's
    /// dir, readable by the server's user alone.
    fn tls_options(&self) -> Result<String> {
        let (cert_path, key_path) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        use std::os::unix::fs::PermissionsExt;
        // PostgreSQL refuses a key others may read.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&key_path, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&cert_path, Some(uid), Some(gid))?;
        }
        Ok(format!(" -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'", cert_path.display(), key_path.display()))
    }

    fn start_with(tls: ServerTls) -> Result<Self> {
        let bin = postgres_bin_dir()
            .context("PostgreSQL server binaries not found: install the postgresql package or set ZEITWORK_PG_BIN")?;
        let dir = tempfile::Builder::new().prefix("zeitwork-pg-").tempdir()?;
        let run_as = if is_root() { Some(nobody_ids()) } else { None };
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        }
        let pg = Postgres { dir, bin, port: free_port(), run_as };
        pg.run(
            "initdb",
            &["-D", &pg.data_dir(), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
        )?;
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c full_page_writes=off -c max_connections=200",
            pg.port
        );
        match tls {
            ServerTls::Off => {}
            ServerTls::OwnCa => opts.push_str(&pg.write_tls()?),
            ServerTls::Only { cert, key } => {
                std::fs::copy(&cert, pg.dir.path().join("server.crt")).context("copying the server certificate")?;
                std::fs::copy(&key, pg.dir.path().join("server.key")).context("copying the server key")?;
                opts.push_str(&pg.tls_options()?);
                // Replaces initdb's `host … trust` lines: a connection without TLS matches no line.
                let hba = pg.dir.path().join("data").join("pg_hba.conf");
                std::fs::write(&hba, "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n")
                    .context("writing pg_hba.conf")?;
            }
        }
        let log = pg.dir.path().join("server.log").display().to_string();
        pg.run("pg_ctl", &["-D", &pg.data_dir(), "-l", &log, "-o", &opts, "-w", "-t", "60", "start"])?;
        pg.wait_ready()?;
        Ok(pg)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args).current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
        }
        let out = cmd.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            bail!(
                "{program} failed ({}): {}\n{}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("postgres did not accept connections on port {}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database and returns its URL, so tests sharing one
    /// server never see each other's rows.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let status = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-q", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            // psql may be missing next to the server binaries; fall back to the client on PATH.
            _ => {
                let s = Command::new("psql")
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-q", "-c"])
                    .arg(format!("CREATE DATABASE \"{name}\""))
                    .stdout(Stdio::null())
                    .status()
                    .context("running psql")?;
                if !s.success() {
                    bail!("CREATE DATABASE {name} failed");
                }
            }
        }
        Ok(format!("postgres://postgres@127.0.0.1:{}/{name}", self.port))
    }

    /// A PostgreSQL client program (`pg_dump`, `pg_restore`): next to the
    /// server binaries, else on `PATH`.
    fn client(&self, program: &str) -> Command {
        let here = self.bin.join(program);
        let mut cmd = Command::new(if here.is_file() { here } else { PathBuf::from(program) });
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"]);
        cmd
    }

    /// Writes database `name` to `file` in `pg_dump`'s custom format.
    pub fn dump(&self, name: &str, file: &Path) -> Result<()> {
        let status =
            self.client("pg_dump").args(["-Fc", "-f"]).arg(file).arg(name).status().context("running pg_dump")?;
        if !status.success() {
            bail!("pg_dump of {name} failed");
        }
        Ok(())
    }

    /// Creates database `name` from a dump [`Postgres::dump`] wrote; its URL.
    pub fn restore(&self, name: &str, file: &Path) -> Result<String> {
        let url = self.create_database(name)?;
        let status = self.client("pg_restore").args(["-d", name]).arg(file).status().context("running pg_restore")?;
        if !status.success() {
            bail!("pg_restore of {} into {name} failed", file.display());
        }
        Ok(url)
    }

    /// Gathers the planner's statistics of database `name` (a restored or
    /// bulk-written database has none until autovacuum comes round).
    pub fn analyze(&self, name: &str) -> Result<()> {
        let status = self.client("psql").args(["-q", "-d", name, "-c", "ANALYZE"]).status().context("running psql")?;
        if !status.success() {
            bail!("ANALYZE of {name} failed");
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"]);
    }
}

/// A certificate authority made with the `openssl` command, the way an
/// operator makes one for a database: a root (`ca.pem`) and server
/// certificates it signs. Its files live in `dir`.
pub struct OpensslCa {
    dir: PathBuf,
    name: String,
}

impl OpensslCa {
    /// A new root `<name>.pem` (and its key) in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let ca = OpensslCa { dir: dir.to_owned(), name: name.to_owned() };
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-subj",
                &format!("/CN=Zeitwork test {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(ca)
    }

    /// The root certificate (PEM), what `sslrootcert` names.
    pub fn root(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A server certificate and key (PEM files `<leaf>.crt`, `<leaf>.key`)
    /// signed by this CA, valid for `dns` names and `ips`.
    pub fn issue(&self, leaf: &str, dns: &[&str], ips: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let sans: Vec<String> =
            dns.iter().map(|d| format!("DNS:{d}")).chain(ips.iter().map(|i| format!("IP:{i}"))).collect();
        let ext = self.dir.join(format!("{leaf}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )?;
        let (crt, key, csr) = (format!("{leaf}.crt"), format!("{leaf}.key"), format!("{leaf}.csr"));
        let cn = format!("/CN={}", dns.first().or(ips.first()).unwrap_or(&leaf));
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &cn,
            ],
        )?;
        let (root, root_key) = (format!("{}.pem", self.name), format!("{}.key", self.name));
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &root,
                "-CAkey",
                &root_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext.display().to_string(),
            ],
        )?;
        Ok((self.dir.join(crt), self.dir.join(key)))
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl: install the openssl package")?;
    if !out.status.success() {
        bail!("openssl {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective uid of this process.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn nobody_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"nobody")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
        })
        .unwrap_or((65534, 65534))
}

/// The `pebble` ACME test CA with `pebble-challtestsrv` as its DNS (every
/// name resolves to 127.0.0.1). Validation connects to `http_port` (HTTP-01)
/// and `tls_port` (TLS-ALPN-01) on loopback.
pub struct Pebble {
    dir: tempfile::TempDir,
    children: Vec<std::process::Child>,
    pub directory_url: String,
    /// Root (PEM file) of pebble's own HTTPS endpoint, for the ACME client.
    pub api_root: PathBuf,
    /// Management endpoint, where `/roots/0` is the root that signs issued certificates.
    pub management_url: String,
}

impl std::fmt::Debug for Pebble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pebble").field("directory_url", &self.directory_url).finish()
    }
}

impl Pebble {
    pub fn available() -> bool {
        which("pebble") && which("pebble-challtestsrv")
    }

    pub fn start(http_port: u16, tls_port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("zeitwork-pebble-").tempdir()?;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let api_root = dir.path().join("pebble.pem");
        std::fs::write(&api_root, cert.cert.pem())?;
        std::fs::write(dir.path().join("pebble.key"), cert.signing_key.serialize_pem())?;
        let (dns, mgmt_dns, api, mgmt) = (free_port(), free_port(), free_port(), free_port());
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:{api}", "managementListenAddress": "127.0.0.1:{mgmt}",
                "certificate": "{d}/pebble.pem", "privateKey": "{d}/pebble.key", "httpPort": {http_port}, "tlsPort": {tls_port},
                "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("pebble.json"), config)?;
        let log = |name: &str| std::fs::File::create(dir.path().join(name));
        let mut children = Vec::new();
        children.push(
            Command::new("pebble-challtestsrv")
                .args(["-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args([
                    "-management",
                    &format!("127.0.0.1:{mgmt_dns}"),
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                ])
                .stdout(log("challtestsrv.log")?)
                .stderr(Stdio::null())
                .spawn()
                .context("starting pebble-challtestsrv")?,
        );
        children.push(
            Command::new("pebble")
                .args(["-config", &dir.path().join("pebble.json").display().to_string()])
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_VA_ALWAYS_VALID", "0")
                .stdout(log("pebble.log")?)
                .stderr(Stdio::null())
                .spawn()
                .context("starting pebble")?,
        );
        let pebble = Pebble {
            directory_url: format!("https://127.0.0.1:{api}/dir"),
            api_root,
            management_url: format!("https://127.0.0.1:{mgmt}"),
            children,
            dir,
        };
        for port in [api, mgmt] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    bail!("pebble did not start: {}", pebble.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(pebble)
    }

    /// What pebble printed (for failing tests).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A real OCI distribution registry (Debian's `docker-registry`) on a free
/// loopback port with its storage in a temp dir.
pub struct Registry {
    dir: tempfile::TempDir,
    child: std::process::Child,
    pub addr: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("addr", &self.addr).finish()
    }
}

/// Whether an OCI distribution registry answers `GET /v2/` on `port` (its
/// API version header, not just any server on the port).
fn registry_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = Vec::new();
    let _ = c.take(4096).read_to_end(&mut head);
    String::from_utf8_lossy(&head).to_ascii_lowercase().contains("docker-distribution-api-version")
}

impl Registry {
    pub fn start() -> Result<Self> {
        if !which("docker-registry") {
            bail!("docker-registry is needed (apt-get install docker-registry; .ci/run installs it)");
        }
        let dir = tempfile::Builder::new().prefix("zeitwork-registry-").tempdir()?;
        // A port found free may be taken before the registry binds it (tests
        // run side by side): then the registry exits, and it starts again on
        // another. Ready means the registry itself answers `/v2/`.
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            );
            std::fs::write(dir.path().join("config.yml"), config)?;
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("registry.log"))?)
                .spawn()
                .context("starting docker-registry")?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if registry_answers(port) {
                    return Ok(Registry { dir, child, addr: format!("127.0.0.1:{port}") });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "docker-registry did not start: {}",
                        std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        bail!(
            "docker-registry exited at start five times: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        )
    }

    /// Where the registry keeps a blob (to corrupt it in tests).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// Uploads a blob; returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Result<String> {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        let http = reqwest::Client::new();
        let res = http.post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr)).send().await?;
        let loc = res.headers().get("location").and_then(|v| v.to_str().ok()).context("upload location")?.to_owned();
        let loc = if loc.starts_with("http") { loc } else { format!("http://{}{loc}", self.addr) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let res = http
            .put(format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("blob upload: {}", res.status());
        }
        Ok(digest)
    }

    /// Pushes an image: each layer is a list of (path, contents) tar entries
    /// (gzip-compressed); returns the manifest digest.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> Result<String> {
        use sha2::Digest;
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in layers {
            diff_ids.push(format!("sha256:{}", hex::encode(sha2::Sha256::digest(tar))));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, tar)?;
            let gz = gz.finish()?;
            let d = self.push_blob(repo, &gz).await?;
            descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": gz.len()}));
        }
        // One history entry per layer, as builders write them (and as builders building on it expect).
        let history: Vec<serde_json::Value> = (0..layers.len())
            .map(|i| serde_json::json!({"created": "2026-01-01T00:00:00Z", "created_by": format!("layer {i}")}))
            .collect();
        let cfg = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history
        });
        let cfg_bytes = serde_json::to_vec(&cfg)?;
        let cfg_digest = self.push_blob(repo, &cfg_bytes).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_bytes.len()},
            "layers": descs,
        });
        let body = serde_json::to_vec(&manifest)?;
        let res = reqwest::Client::new()
            .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.addr))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(body.clone())
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("manifest upload: {} {}", res.status(), res.text().await.unwrap_or_default());
        }
        Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use zeitwork_image::archive::layer_tar;

impl Registry {
    /// Pushes a small image built from the host's static busybox whose
    /// entrypoint runs `script` with `sh -c`; serves `/www/index.html`
    /// ("hello from a container"). Returns the image reference.
    pub async fn push_busybox(&self, repo: &str, tag: &str, script: &str) -> Result<String> {
        let busybox =
            std::fs::read("/usr/bin/busybox").context("busybox-static is needed (apt-get install busybox-static)")?;
        let layers = vec![
            layer_tar(&[("bin/", b""), ("bin/busybox", &busybox), ("bin/sh", b"->busybox")]),
            layer_tar(&[("www/", b""), ("www/index.html", b"hello from a container\n"), ("tmp/", b""), ("run/", b"")]),
        ];
        let config = serde_json::json!({
            "Entrypoint": ["/bin/busybox", "sh", "-c", script],
            "Env": ["PATH=/bin", "FROM_IMAGE=1"],
            "WorkingDir": "/www",
            "ExposedPorts": {"8080/tcp": {}}
        });
        self.push_image(repo, tag, &layers, config).await?;
        Ok(format!("{}/{repo}:{tag}", self.addr))
    }
}

/// A DNS server of its own: dnsmasq on a free loopback UDP port, answering
/// only from the records it was started with (no upstream, no hosts file).
/// Killed on drop.
pub struct Dnsmasq {
    child: std::process::Child,
    port: u16,
}

/// One record a [`Dnsmasq`] serves.
#[derive(Debug, Clone)]
pub enum DnsRecord {
    Txt(String, String),
    A(String, std::net::Ipv4Addr),
    /// name → target; the target's own records come from the other entries.
    Cname(String, String),
}

impl Dnsmasq {
    /// Starts dnsmasq with `records`; fails naming the package when it is missing.
    pub fn start(records: &[DnsRecord]) -> Result<Self> {
        Self::start_on(free_udp_port(), records)
    }

    /// [`Dnsmasq::start`] on a given loopback port.
    pub fn start_on(port: u16, records: &[DnsRecord]) -> Result<Self> {
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("dnsmasq not found: install the dnsmasq-base package (scripts/test-deps)")?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            // Every other name does not exist (NXDOMAIN), as on an authoritative server.
            "--local=/#/",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--conf-file=/dev/null",
            "--log-facility=-",
            &format!("--port={port}"),
        ]);
        if is_root() {
            cmd.arg("--user=nobody");
        }
        for r in records {
            cmd.arg(match r {
                DnsRecord::Txt(name, value) => format!("--txt-record={name},{value}"),
                DnsRecord::A(name, ip) => format!("--host-record={name},{ip}"),
                DnsRecord::Cname(name, target) => format!("--cname={name},{target}"),
            });
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("cannot start dnsmasq")?;
        let mut server = Self { child, port };
        // Ready once it answers on its port (any answer will do).
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        // A query for `.` (type NS): header, root name, type, class.
        let probe = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1];
        loop {
            sock.send_to(&probe, ("127.0.0.1", port))?;
            let mut buf = [0u8; 512];
            if sock.recv(&mut buf).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!("dnsmasq exited ({status}) before answering on 127.0.0.1:{port}");
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not answer on 127.0.0.1:{port}");
            }
        }
    }

    /// Where it answers.
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("dnsmasq (pid {}) was not stopped: {e}", self.child.id());
        }
        let _ = self.child.wait();
    }
}

/// A free UDP port on 127.0.0.1, free for TCP too (servers such as dnsmasq
/// bind both): see [`free_port`].
pub fn free_udp_port() -> u16 {
    free_port()
}

/// The metric families a Prometheus rule file names with `prefix`, as an
/// exposition declares them (`# TYPE name …`): a histogram's `_bucket`,
/// `_count` and `_sum` and a counter's `_total` belong to the family without
/// the suffix.
pub fn metric_families_used(rules: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (i, _) in rules.match_indices(prefix) {
        let name: String =
            rules[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        out.insert(family);
    }
    out
}
