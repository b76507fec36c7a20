//! Why a connection to PostgreSQL failed at start, said so that the person
//! who wrote `database_url` knows what to change: TLS turned off against a
//! server that takes only TLS, a server certificate that does not name the
//! host or does not chain to `sslrootcert`, a CA file that cannot be read.
//! Everything else stays the database error it was.

use rustls::CertificateError;

use crate::StoreError;

/// The error for a failed first connection to the PostgreSQL at `url`.
pub(crate) fn explain(url: &str, e: sqlx::Error) -> StoreError {
    let mode = param(url, "sslmode").unwrap_or_else(|| "prefer".to_owned());
    let root = param(url, "sslrootcert");
    if let sqlx::Error::Database(d) = &e {
        // The server's pg_hba.conf has `hostssl` lines only: without TLS no entry matches.
        if d.code().as_deref() == Some("28000") && d.message().contains("no encryption") {
            return StoreError::TlsRequired { mode, source: e };
        }
    }
    if let sqlx::Error::Tls(inner) = &e {
        if inner.to_string().contains("does not support TLS") {
            let fix = "turn on ssl in the server's postgresql.conf, or use sslmode=disable only on a trusted network";
            return tls(format!("the server does not offer TLS and sslmode={mode} requires it"), fix, e);
        }
    }
    if let (Some(root), sqlx::Error::Io(_)) = (&root, &e) {
        if !std::path::Path::new(root).is_file() {
            return tls(
                format!("sslrootcert {root} cannot be read"),
                "point sslrootcert at the PEM file of the CA that signed the server's certificate",
                e,
            );
        }
    }
    let Some(rustls::Error::InvalidCertificate(cert)) = rustls_error(&e) else {
        return StoreError::Database(e);
    };
    let cert = cert.clone();
    match cert {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => tls(
            format!("the server's certificate is not valid for the host name {:?} (sslmode={mode})", host(url)),
            "connect by a name the certificate holds, or use sslmode=verify-ca to check the CA without the name",
            e,
        ),
        CertificateError::UnknownIssuer => {
            let problem = "the server's certificate is not signed by a CA this operator trusts".to_owned();
            match root {
                Some(root) => tls(
                    format!("{problem} ({root} is not its CA)"),
                    "set sslrootcert to the PEM file of the CA that signed the server's certificate",
                    e,
                ),
                None => tls(
                    format!("{problem} (without sslrootcert only the public web CAs are trusted)"),
                    "add sslrootcert=<the CA's PEM file> to database_url",
                    e,
                ),
            }
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            tls("the server's certificate has expired".to_owned(), "renew the certificate on the database server", e)
        }
        _ => tls(
            format!("the server's certificate was refused (sslmode={mode})"),
            "check the certificate on the database server and sslrootcert in database_url",
            e,
        ),
    }
}

fn tls(problem: String, fix: &str, source: sqlx::Error) -> StoreError {
    StoreError::Tls { problem, fix: fix.to_owned(), source }
}

/// The TLS error under `e`, if the handshake failed. rustls' errors travel
/// inside an `io::Error`, whose `source()` skips them, so it is unwrapped by hand.
fn rustls_error(e: &sqlx::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return Some(t);
            }
        }
        next = err.source();
    }
    None
}

/// The value of the query parameter `name` of `url`, if present.
fn param(url: &str, name: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// The host of a `postgres://user:password@host:port/db?…` URL.
fn host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or("");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or("").to_owned(),
        None => rest.split(':').next().unwrap_or("").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_for_the_message() {
        let url = "postgres://zw:pw@db.internal:5433/zeitwork?sslmode=verify-full&sslrootcert=/etc/ca.pem";
        assert_eq!(host(url), "db.internal");
        assert_eq!(param(url, "sslmode").as_deref(), Some("verify-full"));
        assert_eq!(param(url, "sslrootcert").as_deref(), Some("/etc/ca.pem"));
        assert_eq!(param(url, "sslcert"), None);
        assert_eq!(host("postgres://[::1]:5432/db"), "::1");
        assert_eq!(host("postgres://localhost/db"), "localhost");
    }
}
