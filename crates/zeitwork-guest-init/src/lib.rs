//! What the host and Zeitwork's guest init agree on: the configuration the
//! host hands the guest on a small read-only disk (never the kernel command
//! line, which any process in the guest and the host's process list can
//! read), and the markers the init writes on the serial console.
//!
//! The console carries kernel messages and the init's lines together; the
//! init's lines start with [`MARK`] so the host can tell app output, the exit
//! code and failures from everything else.

use std::net::Ipv4Addr;

/// First bytes of the configuration disk.
pub const MAGIC: &[u8] = b"ZWCFG1\n";
/// Prefix of every line the init writes for the host.
pub const MARK: &str = "zw>";
/// The app's standard output line follows.
pub const STDOUT: &str = "zw>o ";
/// The app's standard error line follows.
pub const STDERR: &str = "zw>e ";
/// The app's exit code follows (128 + signal when killed by one).
pub const EXIT: &str = "zw>x ";
/// The guest could not start the app; the reason follows.
pub const FAILED: &str = "zw>f ";
/// The app was started.
pub const STARTED: &str = "zw>s";
/// Written by a guest booted only to show that the accelerator runs it.
pub const PROBE_OK: &str = "zw>probe ok";
/// Kernel command line word that boots the guest in probe mode.
pub const PROBE_ARG: &str = "zeitwork.probe";
/// Volume label prefix of ext4 disks that are never the root: the app mounts
/// them itself (a build's context and layer store).
pub const DATA_LABEL: &str = "zwdata";
/// What the host writes on the console to stop the app: `stop <grace seconds>`.
pub const STOP: &str = "stop";

/// Everything the guest needs to run one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Entrypoint and command, already joined.
    pub args: Vec<String>,
    /// `KEY=VALUE`, the image's env with the project's on top.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// Search domains for short names (`web` for `web.internal` on a project network).
    pub search: Vec<String>,
    /// Size of the writable layer (tmpfs) over the read-only image, MiB.
    pub overlay_mib: u32,
}

/// What a value keeps as it is on the disk: printable ASCII other than `%`.
/// Spaces, control characters and non-ASCII bytes are written as `%XX`.
const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'%');

fn escape(value: &str, out: &mut String) {
    out.extend(percent_encoding::utf8_percent_encode(value, ESCAPED));
}

fn unescape(value: &str) -> Result<String, String> {
    // The decoder leaves a malformed escape as it is; the encoder never writes
    // one, so it means a damaged disk.
    for (i, _) in value.match_indices('%') {
        let hex = value.get(i + 1..i + 3).ok_or_else(|| format!("cut escape in {value:?}"))?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad escape %{hex}"));
        }
    }
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| "a value is not UTF-8".to_owned())
}

impl GuestConfig {
    /// The disk's content: [`MAGIC`], one `key value` line per field, `end`.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::from_utf8_lossy(MAGIC).into_owned();
        let mut line = |key: &str, value: &str| {
            s.push_str(key);
            s.push(' ');
            escape(value, &mut s);
            s.push('\n');
        };
        for a in &self.args {
            line("arg", a);
        }
        for e in &self.env {
            line("env", e);
        }
        line("cwd", &self.cwd);
        line("uid", &self.uid.to_string());
        line("gid", &self.gid.to_string());
        line("hostname", &self.hostname);
        line("address", &format!("{}/{}", self.address, self.prefix));
        line("gateway", &self.gateway.to_string());
        for d in &self.dns {
            line("dns", &d.to_string());
        }
        for d in &self.search {
            line("search", d);
        }
        line("overlay_mib", &self.overlay_mib.to_string());
        s.push_str("end\n");
        s.into_bytes()
    }

    /// Reads what [`encode`](Self::encode) wrote (trailing padding ignored).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let body = bytes.strip_prefix(MAGIC).ok_or("not a Zeitwork configuration disk")?;
        let text = std::str::from_utf8(body.split(|b| *b == 0).next().unwrap_or_default())
            .map_err(|_| "the configuration is not UTF-8")?;
        let mut c = GuestConfig {
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "zeitwork".into(),
            address: Ipv4Addr::UNSPECIFIED,
            prefix: 30,
            gateway: Ipv4Addr::UNSPECIFIED,
            dns: Vec::new(),
            search: Vec::new(),
            overlay_mib: 64,
        };
        let mut ended = false;
        for raw in text.lines() {
            if raw == "end" {
                ended = true;
                break;
            }
            let (key, value) = raw.split_once(' ').ok_or_else(|| format!("bad line {raw:?}"))?;
            let value = unescape(value)?;
            let num = |v: &str| v.parse::<u32>().map_err(|_| format!("{key}: {v:?} is not a number"));
            let ip = |v: &str| v.parse::<Ipv4Addr>().map_err(|_| format!("{key}: {v:?} is not an IPv4 address"));
            match key {
                "arg" => c.args.push(value),
                "env" => c.env.push(value),
                "cwd" => c.cwd = value,
                "uid" => c.uid = num(&value)?,
                "gid" => c.gid = num(&value)?,
                "hostname" => c.hostname = value,
                "address" => {
                    let (a, p) = value.split_once('/').ok_or("address: expected a.b.c.d/prefix")?;
                    c.address = ip(a)?;
                    c.prefix = p.parse().ok().filter(|p| *p <= 32).ok_or("address: bad prefix")?;
                }
                "gateway" => c.gateway = ip(&value)?,
                "dns" => c.dns.push(ip(&value)?),
                "search" => c.search.push(value),
                "overlay_mib" => c.overlay_mib = num(&value)?,
                _ => {} // newer hosts may add fields
            }
        }
        if !ended {
            return Err("the configuration is cut short".into());
        }
        if c.args.is_empty() {
            return Err("no command to run".into());
        }
        Ok(c)
    }
}

/// What a console line from the guest means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleLine<'a> {
    Stdout(&'a str),
    Stderr(&'a str),
    Started,
    Exit(i32),
    Failed(&'a str),
    ProbeOk,
    /// Anything else: kernel and firmware messages.
    Console(&'a str),
}

/// Classifies one console line (without its line ending).
pub fn parse_console_line(line: &str) -> ConsoleLine<'_> {
    let line = line.trim_end_matches(['\r', '\n']);
    // A kernel message may have been printed just before the marker on the same line.
    let Some(at) = line.find(MARK) else { return ConsoleLine::Console(line) };
    let marked = &line[at..];
    if let Some(l) = marked.strip_prefix(STDOUT) {
        ConsoleLine::Stdout(l)
    } else if let Some(l) = marked.strip_prefix(STDERR) {
        ConsoleLine::Stderr(l)
    } else if let Some(code) = marked.strip_prefix(EXIT).and_then(|c| c.trim().parse().ok()) {
        ConsoleLine::Exit(code)
    } else if let Some(reason) = marked.strip_prefix(FAILED) {
        ConsoleLine::Failed(reason)
    } else if marked == STARTED {
        ConsoleLine::Started
    } else if marked == PROBE_OK {
        ConsoleLine::ProbeOk
    } else {
        ConsoleLine::Console(line)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestConfig {
        GuestConfig {
            args: vec!["/bin/sh".into(), "-c".into(), "echo 'a b' % done\n".into()],
            env: vec!["SECRET=p@ss word=%x".into(), "EMPTY=".into()],
            cwd: "/srv/app dir".into(),
            uid: 1000,
            gid: 100,
            hostname: "inst-1".into(),
            address: "10.89.0.2".parse().unwrap(),
            prefix: 30,
            gateway: "10.89.0.1".parse().unwrap(),
            dns: vec!["10.89.0.1".parse().unwrap()],
            search: vec!["web.acme.internal".into(), "internal".into()],
            overlay_mib: 128,
        }
    }

    #[test]
    fn config_round_trips_with_any_bytes() {
        let mut disk = sample().encode();
        disk.resize(4096, 0);
        assert_eq!(GuestConfig::decode(&disk).unwrap(), sample());
    }

    #[test]
    fn cut_or_foreign_disks_are_refused() {
        let disk = sample().encode();
        assert!(GuestConfig::decode(&disk[..disk.len() - 4]).unwrap_err().contains("cut short"));
        assert!(GuestConfig::decode(b"\x53\xefext4").is_err());
        let mut bad = String::from_utf8(sample().encode()).unwrap();
        bad = bad.replace("uid 1000", "uid x");
        assert!(GuestConfig::decode(bad.as_bytes()).unwrap_err().contains("uid"));
    }

    #[test]
    fn console_lines_are_classified() {
        assert_eq!(parse_console_line("zw>o hello\r"), ConsoleLine::Stdout("hello"));
        assert_eq!(parse_console_line("zw>e oops"), ConsoleLine::Stderr("oops"));
        assert_eq!(parse_console_line("zw>x 143"), ConsoleLine::Exit(143));
        assert_eq!(parse_console_line("zw>f no such file"), ConsoleLine::Failed("no such file"));
        assert_eq!(parse_console_line("[    1.0] random: crng init donezw>s"), ConsoleLine::Started);
        assert_eq!(
            parse_console_line("Kernel panic - not syncing"),
            ConsoleLine::Console("Kernel panic - not syncing")
        );
    }
}
