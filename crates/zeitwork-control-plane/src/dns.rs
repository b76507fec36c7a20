//! Asking a DNS server about a custom domain: the TXT records that prove
//! ownership and where the name points (A/AAAA, and the CNAMEs on the way).
//! One query per record type over UDP to one resolver, the configured
//! `dns_resolver` or the first `nameserver` of `/etc/resolv.conf`.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Why a DNS question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The name cannot be asked about.
    #[error("{0:?} is not a DNS name")]
    BadName(String),
    /// No resolver is configured and `/etc/resolv.conf` names none.
    #[error("no DNS resolver: set dns_resolver in the operator's config")]
    NoResolver,
    /// The resolver did not answer in time.
    #[error("the DNS resolver {0} did not answer")]
    Timeout(SocketAddr),
    /// Sending, receiving or decoding failed.
    #[error("asking the DNS resolver {server} failed: {message}")]
    Exchange { server: SocketAddr, message: String },
}

/// What a resolver says about one name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answers {
    pub txt: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// CNAME targets met on the way, without the trailing dot.
    pub cnames: Vec<String>,
}

/// The resolver to ask: the configured one, else the system's first nameserver.
pub fn resolver(configured: Option<SocketAddr>) -> Result<SocketAddr, DnsError> {
    if let Some(r) = configured {
        return Ok(r);
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| IpAddr::from_str(ip.trim()).ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or(DnsError::NoResolver)
}

/// The answers for `name` of each record type in `types`.
pub async fn lookup(server: SocketAddr, name: &str, types: &[RecordType]) -> Result<Answers, DnsError> {
    let fqdn =
        Name::from_str(&format!("{}.", name.trim_end_matches('.'))).map_err(|_| DnsError::BadName(name.to_owned()))?;
    let mut out = Answers::default();
    for &rtype in types {
        let reply = exchange(server, &fqdn, rtype).await?;
        for record in reply.answers() {
            match record.data() {
                RData::TXT(txt) => out.txt.push(
                    txt.txt_data().iter().map(|part| String::from_utf8_lossy(part).into_owned()).collect::<String>(),
                ),
                RData::A(a) => out.addresses.push(IpAddr::V4(a.0)),
                RData::AAAA(a) => out.addresses.push(IpAddr::V6(a.0)),
                RData::CNAME(c) => out.cnames.push(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
    }
    out.cnames.dedup();
    Ok(out)
}

async fn exchange(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, DnsError> {
    let failed = |e: &dyn std::fmt::Display| DnsError::Exchange { server, message: e.to_string() };
    let id: u16 = rand::random();
    let mut query = Message::new();
    query.set_id(id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    query.add_query(Query::query(name.clone(), rtype));
    let bytes = query.to_vec().map_err(|e| failed(&e))?;
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| failed(&e))?;
    socket.connect(server).await.map_err(|e| failed(&e))?;
    // Two tries: UDP may drop one.
    for _ in 0..2 {
        socket.send(&bytes).await.map_err(|e| failed(&e))?;
        let mut buf = vec![0u8; 4096];
        let Ok(got) = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await else { continue };
        let n = got.map_err(|e| failed(&e))?;
        let reply = Message::from_vec(&buf[..n]).map_err(|e| failed(&e))?;
        if reply.id() != id {
            continue;
        }
        return match reply.response_code() {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(reply),
            code => Err(failed(&format!("it answered {code}"))),
        };
    }
    Err(DnsError::Timeout(server))
}
