//! The resolver the node serves to its instances (over UDP; the firewall sends
//! every DNS query an instance makes to the host here). An instance is known
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
        let Ok(query) = Message::from_vec(&packet) else { continue };
        let (socket, table, upstreams) = (socket.clone(), table.clone(), upstreams.clone());
        // Forwarded queries wait on the upstream: each query on its own task.
        tokio::spawn(async move {
            let view = view_of(&table, from.ip()).await;
            let reply = match answer(&query, view.as_ref(), !upstreams.is_empty()) {
                Answer::Reply(m) => m.to_vec().ok(),
                Answer::Forward => match forward(&packet, &upstreams).await {
                    Some(r) => Some(r),
                    None => {
                        let mut m = Message::error_msg(query.id(), query.op_code(), ResponseCode::ServFail);
                        m.add_queries(query.queries().to_vec());
                        m.to_vec().ok()
                    }
                },
            };
            if let Some(r) = reply {
                if let Err(e) = socket.send_to(&r, from).await {
                    tracing::debug!(error = %e, "resolver: cannot answer");
                }
            }
        });
    }
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
