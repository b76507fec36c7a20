//! The resolver the node serves to its instances (over UDP and TCP on one
//! port, the same answers on both; the firewall sends every DNS query an
//! instance makes to the host here). An instance is known
//! by its link address and sees only its own project's private network:
//!
//! - `<project>.internal`: A records of the ready instances of its project
//!   and environment (AAAA: none, the networks are IPv4);
//! - `<instance>.<project>.internal`: that instance's address;
//! - `_http._tcp.<project>.internal`: SRV records with the project's port;
//! - any other name under `.internal` (another project's included) does not
//!   exist; every other name is forwarded to the node's upstream resolvers,
//!   and refused when it has none.
//!
//! Queries from addresses that are no instance of this node are refused, so
//! the resolver is never an open one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::instances::Table;

/// How long answers may be cached: members come and go.
const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// What the asking instance may see: its own project's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub project: String,
    pub port: u16,
    /// (instance, address, ready) of every live member.
    pub members: Vec<(String, Ipv4Addr, bool)>,
}

/// What to do with a query.
#[derive(Debug)]
pub enum Answer {
    Reply(Message),
    Forward,
}

/// Answers `query` for an instance that sees `view` (`None`: not an instance
/// of this node); `can_forward`: the node has upstream resolvers.
pub fn answer(query: &Message, view: Option<&View>, can_forward: bool) -> Answer {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(can_forward);
    reply.add_queries(query.queries().to_vec());
    let (Some(view), [q]) = (view, query.queries()) else {
        reply.set_response_code(if view.is_none() { ResponseCode::Refused } else { ResponseCode::FormErr });
        return Answer::Reply(reply);
    };
    let name = q.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.');
    let Some(inside) = name.strip_suffix(".internal") else {
        if can_forward {
            return Answer::Forward;
        }
        reply.set_response_code(ResponseCode::Refused);
        return Answer::Reply(reply);
    };
    reply.set_authoritative(true);
    let project = view.project.to_ascii_lowercase();
    let a_record = |owner: &Name, ip: Ipv4Addr| Record::from_rdata(owner.clone(), TTL, RData::A(A(ip)));
    let owner = q.name().clone();
    let ready = || view.members.iter().filter(|m| m.2);
    if inside == project {
        if q.query_type() == RecordType::A {
            reply.add_answers(ready().map(|m| a_record(&owner, m.1)));
        }
    } else if inside == format!("_http._tcp.{project}") {
        if q.query_type() == RecordType::SRV {
            for (instance, ip, _) in ready() {
                let Ok(target) = Name::from_str(&format!("{}.{project}.internal.", instance.to_ascii_lowercase()))
                else {
                    continue;
                };
                let srv = SRV::new(0, 0, view.port, target.clone());
                reply.add_answer(Record::from_rdata(owner.clone(), TTL, RData::SRV(srv)));
                reply.add_additional(a_record(&target, *ip));
            }
        }
    } else if let Some(m) = inside
        .strip_suffix(&format!(".{project}"))
        .and_then(|instance| view.members.iter().find(|m| m.0.eq_ignore_ascii_case(instance)))
    {
        if q.query_type() == RecordType::A {
            reply.add_answer(a_record(&owner, m.1));
        }
    } else {
        reply.set_response_code(ResponseCode::NXDomain);
    }
    Answer::Reply(reply)
}

/// The view of the instance at link address `ip`.
async fn view_of(table: &Table, ip: IpAddr) -> Option<View> {
    let table = table.read().await;
    let local = table.values().find(|l| l.address.is_some_and(|a| a.ip() == ip))?;
    let network = local.assignment.network.as_ref()?;
    Some(View {
        project: local.assignment.project.clone(),
        port: local.assignment.port,
        members: network
            .members
            .iter()
            .filter_map(|m| Some((m.instance.clone(), m.address.parse().ok()?, m.ready)))
            .collect(),
    })
}

/// The node's own resolvers (`/etc/resolv.conf`), which the agent asks for
/// names outside the private networks.
pub fn host_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Asks the upstreams over TCP (a query that came over TCP, usually because
/// its answer did not fit in UDP).
async fn forward_tcp(packet: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let asked = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            let mut stream = tokio::net::TcpStream::connect(*up).await?;
            write_framed(&mut stream, packet).await?;
            read_framed(&mut stream).await
        })
        .await;
        match asked {
            Ok(Ok(Some(answer))) => return Some(answer),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "resolver: upstream over TCP failed"),
            Err(_) => tracing::debug!(upstream = %up, "resolver: upstream over TCP timed out"),
        }
    }
    None
}

/// One DNS message over TCP: its length in two bytes, then the message.
async fn write_framed(stream: &mut tokio::net::TcpStream, message: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u16::try_from(message.len()).map_err(|_| std::io::Error::other("a DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// The next length-prefixed message; `None` at a clean end of the stream.
async fn read_framed(stream: &mut tokio::net::TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// The answer to `packet` from the instance at `from` (over UDP or TCP,
/// which decides how a forwarded query travels on); `None`: not a query.
async fn respond(packet: &[u8], from: IpAddr, table: &Table, upstreams: &[SocketAddr], tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    let view = view_of(table, from).await;
    match answer(&query, view.as_ref(), !upstreams.is_empty()) {
        Answer::Reply(m) => m.to_vec().ok(),
        Answer::Forward => {
            let forwarded = if tcp { forward_tcp(packet, upstreams).await } else { forward(packet, upstreams).await };
            match forwarded {
                Some(r) => Some(r),
                None => {
                    let mut m = Message::error_msg(query.id(), query.op_code(), ResponseCode::ServFail);
                    m.add_queries(query.queries().to_vec());
                    m.to_vec().ok()
                }
            }
        }
    }
}

async fn forward(packet: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr =
            if up.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (IpAddr::from([0u16; 8]), 0).into() };
        let Ok(socket) = UdpSocket::bind(bind).await else { continue };
        if socket.send_to(packet, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, from))) = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv_from(&mut buf)).await {
            if from == *up {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// Serves queries on `socket` until `stop`.
pub async fn serve(socket: UdpSocket, table: Table, upstreams: Vec<SocketAddr>, mut stop: watch::Receiver<bool>) {
    let socket = std::sync::Arc::new(socket);
    let upstreams = std::sync::Arc::new(upstreams);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "resolver: cannot receive");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let packet = buf[..n].to_vec();
        let (socket, table, upstreams) = (socket.clone(), table.clone(), upstreams.clone());
        // Forwarded queries wait on the upstream: each query on its own task.
        tokio::spawn(async move {
            if let Some(r) = respond(&packet, from.ip(), &table, &upstreams, false).await {
                if let Err(e) = socket.send_to(&r, from).await {
                    tracing::debug!(error = %e, "resolver: cannot answer");
                }
            }
        });
    }
}

/// How long a TCP connection may sit without a query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Serves queries over TCP on `listener` until `stop`: the same answers as
/// over UDP, any number of queries per connection, each with its 2-byte
/// length first (RFC 1035 4.2.2, RFC 7766).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    table: Table,
    upstreams: Vec<SocketAddr>,
    mut stop: watch::Receiver<bool>,
) {
    let upstreams = std::sync::Arc::new(upstreams);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (mut stream, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "resolver: cannot accept");
                    continue;
                }
            },
            // Ended connections are reaped as they go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (table, upstreams, mut stop) = (table.clone(), upstreams.clone(), stop.clone());
        connections.spawn(async move {
            loop {
                let next = tokio::select! {
                    r = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)) => r,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let packet = match next {
                    Ok(Ok(Some(p))) => p,
                    // The client is done, or idle too long.
                    Ok(Ok(None)) | Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %from, error = %e, "resolver: a TCP query was cut off");
                        return;
                    }
                };
                let Some(r) = respond(&packet, from.ip(), &table, &upstreams, true).await else { return };
                if let Err(e) = write_framed(&mut stream, &r).await {
                    tracing::debug!(client = %from, error = %e, "resolver: cannot answer over TCP");
                    return;
                }
            }
        });
    }
    connections.shutdown().await;
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    fn ask(name: &str, kind: RecordType, view: Option<&View>, can_forward: bool) -> Answer {
        let mut q = Message::new();
        q.set_id(7).add_query(Query::query(Name::from_str(name).unwrap(), kind));
        answer(&q, view, can_forward)
    }

    fn reply(a: Answer) -> Message {
        match a {
            Answer::Reply(m) => m,
            Answer::Forward => panic!("forwarded"),
        }
    }

    fn view() -> View {
        View {
            project: "web".into(),
            port: 8080,
            members: vec![
                ("ins_a".into(), Ipv4Addr::new(100, 96, 0, 1), true),
                ("ins_b".into(), Ipv4Addr::new(100, 96, 0, 2), true),
                ("ins_c".into(), Ipv4Addr::new(100, 96, 0, 3), false),
            ],
        }
    }

    #[test]
    fn the_project_name_lists_its_ready_instances() {
        let m = reply(ask("web.internal.", RecordType::A, Some(&view()), false));
        assert_eq!(m.response_code(), ResponseCode::NoError);
        let ips: Vec<_> = m.answers().iter().map(|r| r.data().clone()).collect();
        assert_eq!(ips, vec![RData::A(A::new(100, 96, 0, 1)), RData::A(A::new(100, 96, 0, 2))]);
        assert_eq!(m.id(), 7);
        // No IPv6 addresses, but the name exists.
        let m = reply(ask("WEB.internal.", RecordType::AAAA, Some(&view()), false));
        assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn instances_and_srv_records_resolve() {
        let m = reply(ask("ins_c.web.internal.", RecordType::A, Some(&view()), false));
        assert_eq!(m.answers()[0].data(), &RData::A(A::new(100, 96, 0, 3)));
        let m = reply(ask("_http._tcp.web.internal.", RecordType::SRV, Some(&view()), false));
        assert_eq!(m.answers().len(), 2);
        let RData::SRV(srv) = m.answers()[0].data() else { panic!("not an SRV record") };
        assert_eq!((srv.port(), srv.target().to_ascii()), (8080, "ins_a.web.internal.".to_owned()));
        assert_eq!(m.additionals().len(), 2);
    }

    #[test]
    fn other_projects_and_strangers_see_nothing() {
        let m = reply(ask("api.internal.", RecordType::A, Some(&view()), true));
        assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::NXDomain, 0));
        let m = reply(ask("ins_a.api.internal.", RecordType::A, Some(&view()), true));
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = reply(ask("web.internal.", RecordType::A, None, true));
        assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::Refused, 0));
        let m = reply(ask("example.com.", RecordType::A, None, true));
        assert_eq!(m.response_code(), ResponseCode::Refused);
    }

    #[test]
    fn outside_names_are_forwarded_or_refused() {
        assert!(matches!(ask("example.com.", RecordType::A, Some(&view()), true), Answer::Forward));
        let m = reply(ask("example.com.", RecordType::A, Some(&view()), false));
        assert_eq!(m.response_code(), ResponseCode::Refused);
    }
}

/// The resolver itself, over real sockets: TCP answers what UDP answers, with
/// hickory-proto messages behind the 2-byte length, and forwards over TCP to
/// a real upstream (dnsmasq).
#[cfg(test)]
mod tcp_tests {
    use std::sync::Arc;

    use hickory_proto::op::Query;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::instances::Local;

    /// A table with one instance at 127.0.0.1, so the test's own queries
    /// come from an instance of project `web` (two ready members).
    fn table() -> Table {
        let assignment: zeitwork_api_types::Assignment = serde_json::from_value(serde_json::json!({
            "instance": "ins_a", "deployment": "web-abc1234-acme", "org": "acme", "project": "web",
            "image": "acme/web:1", "port": 8080, "resources": {"vcpu": 1, "memory": 128}, "env": {},
            "status": "ready",
            "network": {"prefix": "100.96.0.0/24", "address": "100.96.0.1", "members": [
                {"instance": "ins_a", "address": "100.96.0.1", "ready": true},
                {"instance": "ins_b", "address": "100.96.0.2", "ready": true},
            ]},
        }))
        .unwrap();
        let mut local = Local::starting(assignment, Vec::new());
        local.address = Some(([127, 0, 0, 1], 8080).into());
        Arc::new(tokio::sync::RwLock::new([("ins_a".to_owned(), local)].into()))
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = Message::new();
        q.set_id(id).set_recursion_desired(true).add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        q.to_vec().unwrap()
    }

    async fn ask_tcp(stream: &mut TcpStream, packet: &[u8]) -> Message {
        let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(packet);
        stream.write_all(&framed).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).await.unwrap();
        Message::from_vec(&answer).unwrap()
    }

    async fn ask_udp(port: u16, packet: &[u8]) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(packet, ("127.0.0.1", port)).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.unwrap().unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    fn addresses(m: &Message) -> Vec<RData> {
        m.answers().iter().map(|r| r.data().clone()).collect()
    }

    #[tokio::test]
    async fn tcp_answers_as_udp_does_and_forwards_over_tcp() {
        let upstream = zeitwork_testkit::Dnsmasq::start(&[zeitwork_testkit::DnsRecord::A(
            "outside.test".into(),
            Ipv4Addr::new(192, 0, 2, 10),
        )])
        .unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let (table, upstreams) = (table(), vec![upstream.addr()]);
        let udp = tokio::spawn(serve(socket, table.clone(), upstreams.clone(), stop.clone()));
        let tcp = tokio::spawn(serve_tcp(listener, table, upstreams, stop));

        // Several queries on one connection, each answered as over UDP.
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let over_tcp = ask_tcp(&mut stream, &query(1, "web.internal.")).await;
        let over_udp = ask_udp(port, &query(1, "web.internal.")).await;
        assert_eq!((over_tcp.id(), over_tcp.response_code()), (1, ResponseCode::NoError));
        assert_eq!(addresses(&over_tcp), vec![RData::A(A::new(100, 96, 0, 1)), RData::A(A::new(100, 96, 0, 2))]);
        assert_eq!(addresses(&over_tcp), addresses(&over_udp));
        let other = ask_tcp(&mut stream, &query(2, "api.internal.")).await;
        assert_eq!((other.id(), other.response_code()), (2, ResponseCode::NXDomain));
        // Outside names go on to the upstream, over TCP.
        let outside = ask_tcp(&mut stream, &query(3, "outside.test.")).await;
        assert_eq!(addresses(&outside), vec![RData::A(A::new(192, 0, 2, 10))]);
        assert_eq!(addresses(&outside), addresses(&ask_udp(port, &query(3, "outside.test.")).await));

        // Both stop when told, an open connection included.
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async { (udp.await.unwrap(), tcp.await.unwrap()) })
            .await
            .expect("the resolver stops");
    }
}
