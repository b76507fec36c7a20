//! Host names in egress allow-lists: the agent resolves each name its
//! instances' allow-lists hold (A records, asked of the host's resolver or the
//! configured `dns_resolver`), and asks again when the answer's TTL runs out
//! (at least [`MIN_REFRESH`] apart). The addresses go into the firewall's
//! egress sets with the name's port ([`crate::instances::project_networks`]);
//! addresses a new answer no longer holds leave them. Until a name has been
//! resolved it allows nothing; an upstream that fails keeps the last answer.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::sync::watch;
use zeitwork_api_types::validate::EgressEntry;

use crate::instances::Table;

/// Answers are asked again no sooner than this, whatever their TTL.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// And no later than this.
const MAX_REFRESH: Duration = Duration::from_secs(3600);
const TIMEOUT: Duration = Duration::from_secs(3);

/// The addresses of each host name in use, as last resolved.
pub type Resolved = Arc<RwLock<HashMap<String, Vec<Ipv4Addr>>>>;

/// The host names of the node's instances' allow-lists.
async fn names_in_use(table: &Table) -> HashSet<String> {
    let table = table.read().await;
    table
        .values()
        .filter_map(|l| l.assignment.network.as_ref()?.egress.as_ref())
        .flat_map(|e| e.allow.iter())
        .filter_map(|a| match EgressEntry::parse(a) {
            Ok(EgressEntry::Host { name, .. }) => Some(name),
            _ => None,
        })
        .collect()
}

/// The A records of `name` and how long they hold, asked of `server`; a
/// name that does not exist has no addresses.
pub async fn lookup(name: &str, server: SocketAddr) -> Result<(Vec<Ipv4Addr>, Duration), String> {
    let fqdn = Name::from_str(&format!("{name}.")).map_err(|e| format!("{name}: {e}"))?;
    let mut query = Message::new();
    // A connected socket hears only the server; the id need not be secret, just not fixed.
    let id = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new().build_hasher().finish() as u16
    };
    query.set_id(id).set_recursion_desired(true).add_query(Query::query(fqdn, RecordType::A));
    let packet = query.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| format!("{server}: {e}"))?;
    socket.send(&packet).await.map_err(|e| format!("{server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let answer = loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| format!("{server} did not answer within {TIMEOUT:?}"))?
            .map_err(|e| format!("{server}: {e}"))?;
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.id() == id && m.message_type() == MessageType::Response => break m,
            // Someone else's datagram, or garbage: keep waiting for ours.
            _ => continue,
        }
    };
    match answer.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Vec::new(), MIN_REFRESH)),
        code => return Err(format!("{server} answered {code:?} for {name}")),
    }
    // A CNAME chain comes with its A records; every A record of the answer counts.
    let mut addrs: Vec<Ipv4Addr> = answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    let ttl = answer.answers().iter().map(|r| r.ttl()).min().unwrap_or(0);
    Ok((addrs, Duration::from_secs(u64::from(ttl)).clamp(MIN_REFRESH, MAX_REFRESH)))
}

/// Keeps `resolved` current for the names in use until `stop`.
pub async fn run(table: Table, resolved: Resolved, server: SocketAddr, mut stop: watch::Receiver<bool>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let names = names_in_use(&table).await;
        due.retain(|n, _| names.contains(n));
        if let Ok(mut r) = resolved.write() {
            r.retain(|n, _| names.contains(n));
        }
        let now = Instant::now();
        let stale: Vec<String> = names.into_iter().filter(|n| due.get(n).is_none_or(|at| *at <= now)).collect();
        for name in stale {
            let next = match lookup(&name, server).await {
                Ok((addrs, ttl)) => {
                    tracing::debug!(%name, ?addrs, ?ttl, "egress allow-list name resolved");
                    if let Ok(mut r) = resolved.write() {
                        r.insert(name.clone(), addrs);
                    }
                    ttl
                }
                Err(e) => {
                    tracing::warn!(%name, error = %e, "cannot resolve a name of an egress allow-list; its last addresses stay");
                    MIN_REFRESH
                }
            };
            due.insert(name, Instant::now() + next);
        }
        // New names (an edited allow-list, a new instance) are noticed within a second.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The resolver asked for allow-list names: the configured one, or the
/// host's first name server.
pub fn resolver(configured: Option<SocketAddr>) -> Option<SocketAddr> {
    configured.or_else(|| crate::dns::host_upstreams().into_iter().next())
}
