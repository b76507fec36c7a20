//! Verbs that run the platform: `regions`, `nodes`, `orgs`, `tokens` and `events`.

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use zeitwork_api_types::*;
use zeitwork_client::encode;

use super::{query, read_sse, Conn};
use crate::output::{ago, json, table};
use crate::roles::UsageError;

#[derive(Debug, Subcommand)]
pub enum RegionCmd {
    List,
    Create {
        code: String,
        #[arg(long)]
        name: Option<String>,
        /// ISO 3166-1 alpha-2 code, e.g. US.
        #[arg(long)]
        country: String,
    },
    Show {
        code: String,
    },
    Delete {
        code: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    List,
    Show {
        id: String,
    },
    Drain {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Let a node waiting for approval take placements (platform admin).
    Approve {
        id: String,
    },
    /// Refuse a node waiting for approval; its credential is revoked.
    Reject {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    List,
    Create {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        /// First Owner (e-mail or user name).
        #[arg(long)]
        owner: Option<String>,
    },
    Show {
        slug: String,
    },
    /// List members.
    Members {
        org: String,
    },
    /// Add a member or change their role.
    AddMember {
        org: String,
        user: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    RemoveMember {
        org: String,
        user: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Guest,
    Developer,
    Admin,
    Owner,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Guest => Role::Guest,
            RoleArg::Developer => Role::Developer,
            RoleArg::Admin => Role::Admin,
            RoleArg::Owner => Role::Owner,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Create a token: --admin, --cluster ROLE, or --org ORG --role ROLE.
    Create {
        name: String,
        #[arg(long, conflicts_with_all = ["cluster", "org"])]
        admin: bool,
        #[arg(long, value_parser = ["node-agent", "edge-proxy", "load-balancer"])]
        cluster: Option<String>,
        #[arg(long, requires = "role")]
        org: Option<String>,
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventCmd {
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Follow live changes of deployments, instances and nodes.
    Watch {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
    },
}

fn region_rows(rs: &[Region]) {
    table(
        &["code", "name", "country", "created"],
        rs.iter().map(|r| vec![r.code.clone(), r.name.clone(), r.country.clone(), ago(&r.created_at)]).collect(),
    );
}

pub(super) async fn regions(conn: Conn, cmd: RegionCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        RegionCmd::List => {
            let rs: Vec<Region> = c.list_all("/api/v1/regions").await?;
            if conn.json {
                json(&rs)
            } else {
                region_rows(&rs)
            }
        }
        RegionCmd::Create { code, name, country } => {
            let body = CreateRegion { name: name.unwrap_or_else(|| code.clone()), code, country };
            let r: Region = c.post("/api/v1/regions", &body).await?;
            if conn.json {
                json(&r)
            } else {
                println!("Created region {}.", r.code)
            }
        }
        RegionCmd::Show { code } => {
            let r: Region = c.get(&format!("/api/v1/regions/{}", encode(&code))).await?;
            if conn.json {
                json(&r)
            } else {
                region_rows(&[r])
            }
        }
        RegionCmd::Delete { code } => {
            c.delete(&format!("/api/v1/regions/{}", encode(&code))).await?;
            if !conn.json {
                println!("Deleted region {code}.")
            }
        }
    }
    Ok(())
}

pub(super) fn node_rows(ns: &[Node]) {
    table(
        &["id", "hostname", "region", "status", "instances", "vcpu used/schedulable", "cores", "memory", "heartbeat"],
        ns.iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.hostname.clone(),
                    n.region.clone(),
                    n.status.as_str().into(),
                    n.instances.to_string(),
                    format!("{}/{}", n.allocated.vcpu, n.capacity.vcpu),
                    n.physical.map(|p| p.vcpu.to_string()).unwrap_or_else(|| "-".into()),
                    format!("{}/{} MiB", n.allocated.memory, n.capacity.memory),
                    n.last_heartbeat.as_ref().map(ago).unwrap_or_else(|| "never".into()),
                ]
            })
            .collect(),
    );
}

pub(super) async fn nodes(conn: Conn, cmd: NodeCmd) -> Result<()> {
    let c = conn.client()?;
    let one = |id: &str| format!("/api/v1/nodes/{}", encode(id));
    match cmd {
        NodeCmd::List => {
            let ns: Vec<Node> = c.list_all("/api/v1/nodes").await?;
            if conn.json {
                json(&ns)
            } else {
                node_rows(&ns)
            }
        }
        NodeCmd::Show { id } => {
            let n: Node = c.get(&one(&id)).await?;
            if conn.json {
                json(&n)
            } else {
                let why = n.runtime_detail.clone();
                node_rows(&[n]);
                if let Some(why) = why {
                    println!("Runtime: {why}");
                }
            }
        }
        NodeCmd::Drain { id } => {
            let n: Node = c.post_empty(&format!("{}/drain", one(&id))).await?;
            if conn.json {
                json(&n)
            } else {
                println!("Node {} is {}.", n.hostname, n.status.as_str())
            }
        }
        NodeCmd::Approve { ref id } | NodeCmd::Reject { ref id } => {
            let verb = if matches!(cmd, NodeCmd::Approve { .. }) { "approve" } else { "reject" };
            let n: Node = c.post_empty(&format!("/api/admin/nodes/{}/{verb}", encode(id))).await?;
            if conn.json {
                json(&n)
            } else {
                println!("Node {} ({}) is {}.", n.hostname, n.id, n.status.as_str())
            }
        }
        NodeCmd::Delete { id } => {
            c.delete(&one(&id)).await?;
            if !conn.json {
                println!("Deleted node {id}.")
            }
        }
    }
    Ok(())
}

pub(super) async fn orgs(conn: Conn, cmd: OrgCmd) -> Result<()> {
    let c = conn.client()?;
    let org_rows = |os: &[Org]| {
        table(
            &["slug", "name", "created"],
            os.iter().map(|o| vec![o.slug.clone(), o.name.clone(), ago(&o.created_at)]).collect(),
        )
    };
    let members_path = |org: &str| format!("/api/v1/orgs/{}/members", encode(org));
    match cmd {
        OrgCmd::List => {
            let os: Vec<Org> = c.list_all("/api/v1/orgs").await?;
            if conn.json {
                json(&os)
            } else {
                org_rows(&os)
            }
        }
        OrgCmd::Create { slug, name, owner } => {
            let o: Org = c.post("/api/v1/orgs", &CreateOrg { slug, name, owner }).await?;
            if conn.json {
                json(&o)
            } else {
                println!("Created organisation {}.", o.slug)
            }
        }
        OrgCmd::Show { slug } => {
            let o: Org = c.get(&format!("/api/v1/orgs/{}", encode(&slug))).await?;
            if conn.json {
                json(&o)
            } else {
                org_rows(&[o])
            }
        }
        OrgCmd::Members { org } => {
            let ms: Vec<Member> = c.get(&members_path(&org)).await?;
            if conn.json {
                json(&ms)
            } else {
                table(
                    &["user", "role", "since"],
                    ms.iter().map(|m| vec![m.user.clone(), m.role.as_str().into(), ago(&m.created_at)]).collect(),
                )
            }
        }
        OrgCmd::AddMember { org, user, role } => {
            let m: Member = c.post(&members_path(&org), &AddMember { user, role: role.into() }).await?;
            if conn.json {
                json(&m)
            } else {
                println!("{} is {} of {}.", m.user, m.role.as_str(), m.org)
            }
        }
        OrgCmd::RemoveMember { org, user } => {
            c.delete(&format!("{}?user={}", members_path(&org), encode(&user))).await?;
            if !conn.json {
                println!("Removed {user} from {org}.")
            }
        }
    }
    Ok(())
}

fn scope_text(s: &TokenScope) -> String {
    match s {
        TokenScope::Admin => "admin".into(),
        TokenScope::Org { org, role } => format!("{org}:{}", role.as_str()),
        TokenScope::Cluster { role } => format!("cluster:{}", role.as_str()),
    }
}

pub(super) async fn tokens(conn: Conn, cmd: TokenCmd) -> Result<()> {
    let c = conn.client()?;
    match cmd {
        TokenCmd::List { org } => {
            let ts: Vec<Token> = c.list_all(&format!("/api/v1/tokens{}", query(&[("org", org)]))).await?;
            if conn.json {
                json(&ts)
            } else {
                table(
                    &["id", "name", "scope", "read-only", "created", "expires"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.name.clone(),
                                scope_text(&t.scope),
                                t.read_only.to_string(),
                                ago(&t.created_at),
                                t.expires_at.map(|e| e.to_rfc3339()).unwrap_or_else(|| "never".into()),
                            ]
                        })
                        .collect(),
                )
            }
        }
        TokenCmd::Create { name, admin, cluster, org, role, read_only, expires_in_days } => {
            let scope = match (admin, cluster, org, role) {
                (true, None, None, _) => TokenScope::Admin,
                (false, Some(c), None, _) => {
                    TokenScope::Cluster { role: ClusterRole::parse(&c).context("unknown cluster role")? }
                }
                (false, None, Some(org), Some(role)) => TokenScope::Org { org, role: role.into() },
                _ => {
                    return Err(UsageError(
                        "choose one scope: --admin, --cluster ROLE, or --org ORG --role ROLE".into(),
                    )
                    .into())
                }
            };
            let t: CreatedToken =
                c.post("/api/v1/tokens", &CreateToken { name, scope, read_only, expires_in_days }).await?;
            if conn.json {
                json(&t)
            } else {
                println!(
                    "Created token {} ({}). Its secret is shown once:\n\n    {}\n",
                    t.token.id,
                    scope_text(&t.token.scope),
                    t.secret
                );
            }
        }
        TokenCmd::Delete { id } => {
            c.delete(&format!("/api/v1/tokens/{}", encode(&id))).await?;
            if !conn.json {
                println!("Revoked {id}.")
            }
        }
    }
    Ok(())
}

pub(super) async fn events(conn: Conn, cmd: EventCmd) -> Result<()> {
    let c = conn.client()?;
    let (org, project, action, limit) = match cmd {
        EventCmd::List { org, project, action, limit } => (org, project, action, limit),
        EventCmd::Watch { org, project, deployment } => {
            let path = format!(
                "/api/v1/events/stream{}",
                query(&[("org", org), ("project", project), ("deployment", deployment)])
            );
            let res = c.stream(&path).await?;
            if !conn.json {
                eprintln!("following changes; Ctrl-C to stop");
            }
            return read_sse(res, |_, ch| {
                if conn.json {
                    println!("{}", serde_json::to_string(&ch).unwrap_or_default());
                } else {
                    let from = ch.previous.as_deref().map(|p| format!("{p} → ")).unwrap_or_default();
                    let reason = ch.reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default();
                    println!("{} {:<10} {:<28} {from}{}{reason}", ch.at.format("%H:%M:%S"), ch.kind, ch.id, ch.status);
                }
                true
            })
            .await;
        }
    };
    let path = format!(
        "/api/v1/events{}",
        query(&[("org", org), ("project", project), ("action", action), ("limit", Some(limit.to_string()))])
    );
    let es: Vec<Event> = c.list(&path).await?.items;
    if conn.json {
        json(&es)
    } else {
        table(
            &["when", "actor", "action", "target", "result"],
            es.iter()
                .map(|e| vec![ago(&e.at), e.actor.clone(), e.action.clone(), e.target.clone(), e.result.clone()])
                .collect(),
        )
    }
    Ok(())
}
