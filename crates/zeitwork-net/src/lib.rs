//! Networking pieces shared by the edge proxy and the load balancer: the
//! PROXY protocol v2 (the load balancer writes it, the edge reads it from
//! trusted peers only) and CIDR matching.
//!
//! Pure protocol code over async streams; it must not know about routing.

pub mod splice;
pub mod workers;
pub mod x509;

#[cfg(test)]
mod props;

pub use splice::splice_bidirectional;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every PROXY v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Upper bound of the address block plus TLVs we accept.
pub const MAX_HEADER_LEN: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// The peer is trusted to send a header but sent something else.
    #[error("expected a PROXY protocol v2 header from the load balancer")]
    BadSignature,
    #[error("unsupported PROXY protocol version or command {0:#04x}")]
    BadVersion(u8),
    #[error("unsupported PROXY protocol address family {0:#04x}")]
    BadFamily(u8),
    #[error("PROXY protocol header length {0} is out of bounds")]
    BadLength(usize),
    #[error("connection closed while reading the PROXY protocol header")]
    Truncated,
}

/// Encodes a PROXY v2 `PROXY` header for a TCP connection from `src` to `dst`.
/// Mixed families are mapped to IPv6.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    out
}

/// Reads a PROXY v2 header. Returns the original source address, or `None`
/// for a `LOCAL` header (health checks) or an unspecified family.
pub async fn read_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head).await.map_err(|_| ProxyHeaderError::Truncated)?;
    if head[..12] != SIGNATURE {
        return Err(ProxyHeaderError::BadSignature);
    }
    let ver_cmd = head[12];
    let fam = head[13];
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > MAX_HEADER_LEN {
        return Err(ProxyHeaderError::BadLength(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|_| ProxyHeaderError::Truncated)?;
    parse_body(ver_cmd, fam, &body)
}

/// Parses the part after the fixed 16 bytes.
pub fn parse_body(ver_cmd: u8, fam: u8, body: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match ver_cmd {
        0x20 => return Ok(None),
        0x21 => {}
        other => return Err(ProxyHeaderError::BadVersion(other)),
    }
    match fam {
        0x00 => Ok(None),
        0x11 | 0x12 => {
            if body.len() < 12 {
                return Err(ProxyHeaderError::BadLength(body.len()));
            }
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        0x21 | 0x22 => {
            if body.len() < 36 {
                return Err(ProxyHeaderError::BadLength(body.len()));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            let port = u16::from_be_bytes([body[32], body[33]]);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            Ok(Some(SocketAddr::new(ip, port)))
        }
        other => Err(ProxyHeaderError::BadFamily(other)),
    }
}

/// An address block such as `10.0.0.0/8` or `::1/128` (a bare address is /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: prefix must be 0 to {max}"))?
            }
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

/// The key rate limits count a client under: the IPv4 address, or the /64 of an IPv6 one.
pub fn client_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) >> 64) << 64 | (1u128 << 63),
        },
    }
}

/// Resolves once `stop` turns true (without holding the channel's lock
/// across an await of the caller).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts TCP connections (TCP_NODELAY set) and runs `serve` for each until
/// `stop` turns true; then closes the listener and gives open connections
/// `drain` to finish before aborting them. With `spread` (the workers'
/// counts and this worker's index) a worker ahead of the others leaves new
/// connections on the shared socket to them.
pub async fn accept_until_stopped<F, Fut>(
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: std::time::Duration,
    spread: Option<(std::sync::Arc<workers::Spread>, usize)>,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let may_accept = spread.as_ref().is_none_or(|(s, me)| s.may_accept(*me));
        tokio::select! {
            accepted = listener.accept(), if may_accept => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let open = spread.as_ref().map(|(s, me)| s.open(*me));
                    let conn = serve(stream, peer);
                    conns.spawn(async move {
                        let _open = open;
                        conn.await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Another worker takes the connections meanwhile; look again soon.
            _ = tokio::time::sleep(std::time::Duration::from_millis(1)), if !may_accept => {}
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(open = conns.len(), "drain timeout; closing the remaining connections");
        conns.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v2_round_trip() {
        for (src, dst) in [
            ("127.0.0.7:5555", "127.0.0.1:443"),
            ("[2001:db8::1]:5555", "[2001:db8::2]:443"),
            ("10.1.2.3:1", "[::1]:2"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let mut bytes = encode_v2(src, dst);
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut r = &bytes[..];
            assert_eq!(read_v2(&mut r).await.unwrap(), Some(src));
            assert_eq!(r, b"GET / HTTP/1.1\r\n", "the stream continues after the header");
        }
    }

    #[tokio::test]
    async fn rejects_bad_headers() {
        let mut r = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        assert_eq!(read_v2(&mut r).await, Err(ProxyHeaderError::BadSignature));
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(read_v2(&mut &h[..]).await, Err(ProxyHeaderError::BadLength(0xffff)));
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 1, 2]);
        assert_eq!(read_v2(&mut &h[..]).await, Err(ProxyHeaderError::Truncated));
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x31, 0x11, 0x00, 0x00]);
        assert_eq!(read_v2(&mut &h[..]).await, Err(ProxyHeaderError::BadVersion(0x31)));
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(read_v2(&mut &h[..]).await, Ok(None), "LOCAL carries no address");
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(c.contains("127.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a = client_key("2001:db8:1:2::1".parse().unwrap());
        let b = client_key("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = client_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(client_key("127.0.0.1".parse().unwrap()), client_key("127.0.0.2".parse().unwrap()));
    }
}
