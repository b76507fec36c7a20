//! `zeitwork`: one binary, a subcommand per role and the CLI verbs for people.
//! It parses arguments and config, starts what was asked, and maps errors to
//! exit codes; the logic lives in the library crates.

#![forbid(unsafe_code)]

mod build;
mod cli;
mod local;
mod ops;
mod output;
mod roles;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Zeitwork runs container images as isolated microVMs and serves them on the web.
#[derive(Debug, Parser)]
#[command(name = "zeitwork", version, propagate_version = true)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: REST API, store, scheduling.
    Operator(roles::OperatorArgs),
    /// Run the node agent of a worker machine.
    NodeAgent(roles::NodeAgentArgs),
    /// Run the L4 load balancer in front of the edge proxies.
    LoadBalancer(roles::LoadBalancerArgs),
    /// Run the edge proxy: TLS, routing, rate limits.
    EdgeProxy(roles::EdgeProxyArgs),
    /// Run every role in one process on this machine, with SQLite.
    Up(roles::UpArgs),
    /// Print the OpenAPI document of the operator API.
    Openapi,
    #[command(flatten)]
    Cli(cli::Verb),
}

/// Exit codes a script can rely on.
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const DENIED: u8 = 4;
    pub const CONFLICT: u8 = 5;
    pub const UNAVAILABLE: u8 = 6;
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Command::Operator(a) => roles::operator(a).await,
            Command::NodeAgent(a) => roles::node_agent(a).await,
            Command::LoadBalancer(a) => roles::load_balancer(a).await,
            Command::EdgeProxy(a) => roles::edge_proxy(a).await,
            Command::Up(a) => roles::up(a).await,
            Command::Openapi => {
                print!("{}", zeitwork_control_plane::api::openapi_json());
                Ok(())
            }
            Command::Cli(v) => cli::run(v).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes on one line, each said once.
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<zeitwork_client::ClientError>() {
            return match c {
                zeitwork_client::ClientError::Api { status: 404, .. } => exit::NOT_FOUND,
                zeitwork_client::ClientError::Api { status: 401 | 403, .. } => exit::DENIED,
                zeitwork_client::ClientError::Api { status: 409, .. } => exit::CONFLICT,
                zeitwork_client::ClientError::Api { status: 400 | 413 | 415 | 422, .. } => exit::USAGE,
                _ => exit::UNAVAILABLE,
            };
        }
        if let Some(b) = cause.downcast_ref::<zeitwork_control_plane::backup::BackupError>() {
            return if b.is_conflict() {
                exit::CONFLICT
            } else if b.is_not_found() {
                exit::NOT_FOUND
            } else {
                exit::FAILURE
            };
        }
        // A database URL whose TLS settings do not fit the server is a configuration error too.
        let url_error = matches!(
            cause.downcast_ref::<zeitwork_control_plane::StartError>(),
            Some(zeitwork_control_plane::StartError::Store(e)) if e.is_in_url()
        );
        if url_error
            || cause.downcast_ref::<roles::UsageError>().is_some()
            || cause.downcast_ref::<zeitwork_control_plane::ConfigError>().is_some()
        {
            return exit::USAGE;
        }
    }
    exit::FAILURE
}
