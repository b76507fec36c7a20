//! Email notification channels: messages through an SMTP relay (STARTTLS on
//! `smtp://`, TLS from the first byte on `smtps://`), with the relay's
//! credentials in the channel's URL (stored encrypted, never shown).

use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use zeitwork_api_types::{CreateChannel, ValidationError};

/// What an email channel stores (encrypted), after this prefix, as JSON.
pub const EMAIL: &str = "email:";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Target {
    url: String,
    to: Vec<String>,
    from: String,
}

fn mailbox(field: &str, a: &str) -> Result<Mailbox, ValidationError> {
    a.parse::<Mailbox>().map_err(|_| ValidationError::new(field, format!("{a:?} is not an email address")))
}

/// Checks an email channel; its stored target.
pub fn check(b: &CreateChannel, allow_internal: bool) -> Result<String, ValidationError> {
    let url = reqwest::Url::parse(&b.url)
        .map_err(|_| ValidationError::new("url", "give the relay as smtp://USER:PASSWORD@HOST:587 or smtps://…:465"))?;
    if !matches!(url.scheme(), "smtp" | "smtps") || url.host_str().is_none() || b.url.len() > 2000 {
        return Err(ValidationError::new("url", "give the relay as smtp://USER:PASSWORD@HOST:587 or smtps://…:465"));
    }
    if !allow_internal && zeitwork_image::registry::internal_host(url.host_str().unwrap_or_default()) {
        return Err(ValidationError::new(
            "url",
            "points at a loopback, private or link-local address (an operator may allow it with notifications_allow_internal)",
        ));
    }
    let tls: Vec<String> = url.query_pairs().filter(|(k, _)| k == "tls").map(|(_, v)| v.into_owned()).collect();
    match tls.as_slice() {
        [] => {}
        [one] if matches!(one.as_str(), "required" | "opportunistic" | "none") => {}
        [one] => return Err(ValidationError::new("url", format!("tls={one}: use required, opportunistic or none"))),
        _ => return Err(ValidationError::new("url", "give tls= once")),
    }
    if b.to.is_empty() || b.to.len() > 20 {
        return Err(ValidationError::new("to", "give 1 to 20 recipients"));
    }
    for (i, a) in b.to.iter().enumerate() {
        mailbox(&format!("to[{i}]"), a)?;
    }
    let from = b.from.clone().ok_or_else(|| ValidationError::new("from", "give the sender address"))?;
    mailbox("from", &from)?;
    if b.secret.is_some() || b.token.is_some() || b.channel.is_some() {
        return Err(ValidationError::new("secret", "email channels take url, to and from only"));
    }
    let t = Target { url: b.url.clone(), to: b.to.clone(), from };
    Ok(format!("{EMAIL}{}", serde_json::to_string(&t).unwrap_or_default()))
}

/// How an email channel is shown: the relay's host and the recipients.
pub fn shown(target: &str) -> Option<String> {
    let t: Target = serde_json::from_str(target.strip_prefix(EMAIL)?).ok()?;
    let host = reqwest::Url::parse(&t.url).ok()?.host_str()?.to_owned();
    Some(format!("smtp://{host}/… → {}", t.to.join(", ")))
}

/// Sends one notification as an email; `subject` and `text` are the message.
/// `ca` is a PEM file of a CA the relay's certificate may be signed by, besides the public roots.
pub async fn send(
    target: &str,
    delivery: i64,
    subject: &str,
    text: &str,
    ca: Option<&std::path::Path>,
) -> Result<(), String> {
    let t: Target = serde_json::from_str(target.strip_prefix(EMAIL).ok_or("not an email channel")?)
        .map_err(|e| format!("the channel is unreadable: {e}"))?;
    let url = reqwest::Url::parse(&t.url).map_err(|e| format!("the relay URL is unreadable: {e}"))?;
    let host = url.host_str().ok_or("the relay URL has no host")?.to_owned();
    let implicit = url.scheme() == "smtps";
    let port = url.port().unwrap_or(if implicit { 465 } else { 587 });
    let mut params = TlsParameters::builder(host.clone());
    if let Some(ca) = ca {
        let pem = tokio::fs::read(ca).await.map_err(|e| format!("smtp_ca {}: {e}", ca.display()))?;
        let cert = Certificate::from_pem(&pem).map_err(|e| format!("smtp_ca {}: {e}", ca.display()))?;
        params = params.add_root_certificate(cert);
    }
    let params = params.build().map_err(|e| format!("TLS: {e}"))?;
    let tls = match (implicit, url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned()).as_deref()) {
        (true, _) => Tls::Wrapper(params),
        (false, Some("none")) => Tls::None,
        (false, Some("opportunistic")) => Tls::Opportunistic(params),
        _ => Tls::Required(params),
    };
    let mut relay = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .tls(tls)
        .timeout(Some(Duration::from_secs(15)));
    if !url.username().is_empty() {
        let user = percent_decode(url.username());
        let pass = percent_decode(url.password().unwrap_or(""));
        relay = relay.credentials(Credentials::new(user, pass));
    }
    let from = t.from.parse::<Mailbox>().map_err(|e| format!("from: {e}"))?;
    let mut message = Message::builder().from(from).subject(subject);
    for to in &t.to {
        message = message.to(to.parse::<Mailbox>().map_err(|e| format!("to: {e}"))?);
    }
    // The outbox id lets receivers (and people) tell a redelivery from a new event.
    let message = message
        .message_id(Some(format!("<zeitwork-{delivery}@zeitwork>")))
        .header(ContentType::TEXT_PLAIN)
        .body(text.to_owned())
        .map_err(|e| format!("the message could not be built: {e}"))?;
    relay.build().send(message).await.map(drop).map_err(|e| format!("the relay refused or is unreachable: {e}"))
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}
