//! Property tests of the PROXY v2 reader and the X.509 expiry reader: both
//! read bytes from other machines, so neither may panic on anything; what
//! the load balancer writes the edge reads back, however the bytes arrive.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

/// Hands out its bytes `step` at a time, as a slow peer would.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn read(data: &[u8], step: usize) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(read_v2(&mut Trickle { data, step }))
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        // IPv4-mapped IPv6, which reads back as IPv4.
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()), port)),
    ]
}

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// A header that starts right and then goes anywhere.
fn header_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0x20u8, 0x21, 0x22, 0x11, 0x00]),
        prop::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31, 0xff]),
        prop_oneof![0u16..64, any::<u16>()],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(ver_cmd, fam, len, body)| {
            let mut h = SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&body);
            h
        })
}

/// One DER element.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A certificate's outline with `time` as its `notAfter`.
fn certificate(time_tag: u8, time: &[u8], version: bool) -> Vec<u8> {
    let validity = [der(0x17, b"200101000000Z"), der(time_tag, time)].concat();
    let mut tbs = Vec::new();
    if version {
        tbs.extend(der(0xa0, &der(0x02, &[2])));
    }
    tbs.extend(der(0x02, &[1, 2, 3]));
    tbs.extend(der(0x30, &der(0x06, &[0x2a, 0x86, 0x48])));
    tbs.extend(der(0x30, &der(0x31, b"issuer")));
    tbs.extend(der(0x30, &validity));
    tbs.extend(der(0x30, &der(0x31, b"subject")));
    der(0x30, &[der(0x30, &tbs), der(0x30, b"sigalg"), der(0x03, b"signature")].concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn reading_a_proxy_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let _ = read(&bytes, usize::MAX);
    }

    #[test]
    fn reading_a_header_like_one_never_panics(bytes in header_like(), cut in any::<prop::sample::Index>()) {
        let _ = read(&bytes, usize::MAX);
        let _ = read(&bytes[..cut.index(bytes.len() + 1)], usize::MAX);
        if bytes.len() >= 16 {
            let _ = parse_body(bytes[12], bytes[13], &bytes[16..]);
        }
    }

    #[test]
    fn what_the_balancer_writes_the_edge_reads(src in addr(), dst in addr(), step in 1usize..20, after in any::<Vec<u8>>()) {
        let mut header = encode_v2(src, dst);
        let len = header.len();
        header.extend_from_slice(&after);
        prop_assert_eq!(read(&header, usize::MAX), Ok(Some(unmapped(src))));
        prop_assert_eq!(read(&header, step), Ok(Some(unmapped(src))));
        // Cut anywhere, it is truncated rather than misread.
        for cut in 0..len {
            prop_assert_eq!(read(&header[..cut], step), Err(ProxyHeaderError::Truncated));
        }
    }

    #[test]
    fn trickled_bytes_read_as_whole_ones(bytes in header_like(), step in 1usize..8) {
        prop_assert_eq!(read(&bytes, step), read(&bytes, usize::MAX));
    }

    #[test]
    fn cidr_parsing_never_panics(s in "[0-9a-f.:/]{0,48}", ip in any::<[u8; 16]>()) {
        if let Ok(c) = s.parse::<Cidr>() {
            let _ = c.contains(IpAddr::from(ip));
        }
    }

    #[test]
    fn reading_an_expiry_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = x509::not_after(&bytes);
    }

    #[test]
    fn reading_any_expiry_text_never_panics(
        tag in prop::sample::select(vec![0x17u8, 0x18, 0x13]),
        time in prop_oneof![
            "[0-9]{12,14}Z",
            any::<String>().prop_map(|s| format!("{s}Z")),
            ".{11}Z",
            ".{13}Z",
        ],
        version in any::<bool>(),
    ) {
        let _ = x509::not_after(&certificate(tag, time.as_bytes(), version));
    }

    #[test]
    fn expiries_read_back(at in 0i64..253_402_300_799, generalized in any::<bool>(), version in any::<bool>()) {
        let t = chrono::DateTime::from_timestamp(at, 0).unwrap();
        let utc_time = (1950..2050).contains(&chrono::Datelike::year(&t));
        let (tag, text) = if generalized || !utc_time {
            (0x18, t.format("%Y%m%d%H%M%SZ").to_string())
        } else {
            (0x17, t.format("%y%m%d%H%M%SZ").to_string())
        };
        prop_assert_eq!(x509::not_after(&certificate(tag, text.as_bytes(), version)), Some(at));
    }

    #[test]
    fn pem_blocks_read_back(blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..3),
                            junk in "[ -~\n]{0,40}") {
        use base64::Engine;
        // Boundaries stand on lines of their own (RFC 7468): text around them ends its line.
        let junk = format!("{junk}\n");
        let mut pem = junk.clone();
        for b in &blocks {
            let text = base64::engine::general_purpose::STANDARD.encode(b);
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in text.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).unwrap());
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            pem.push_str(&junk);
        }
        prop_assume!(!junk.contains("-----"));
        prop_assert_eq!(x509::pem_blocks(&pem, "CERTIFICATE"), blocks);
    }

    #[test]
    fn pem_reading_never_panics(s in any::<String>(), b64 in "[A-Za-z0-9+/=\n-]{0,80}") {
        let _ = x509::pem_blocks(&s, "CERTIFICATE");
        let _ = x509::pem_blocks(&format!("-----BEGIN CERTIFICATE-----{b64}-----END CERTIFICATE-----"), "CERTIFICATE");
    }
}
