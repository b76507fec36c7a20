//! Notification channels.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

/// Adds a notification channel to a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// `webhook` (a signed JSON POST), `slack` (an incoming webhook URL, or a bot token and a
    /// channel) or `email` (an SMTP relay: `smtp://USER:PASSWORD@HOST:587` with STARTTLS,
    /// `smtps://…:465` with TLS; `?tls=opportunistic` or `?tls=none` for relays without it).
    pub kind: String,
    /// Where to deliver: the webhook's URL, or Slack's incoming-webhook URL (stored encrypted).
    /// Empty for a Slack bot (`token` and `channel`).
    #[serde(default)]
    pub url: String,
    /// `slack` with a bot: the bot token (`xoxb-…`, stored encrypted).
    #[serde(default)]
    pub token: Option<String>,
    /// `slack` with a bot: the channel to post in (`#deploys` or a channel id).
    #[serde(default)]
    pub channel: Option<String>,
    /// `email`: recipients (1 to 20 addresses).
    #[serde(default)]
    pub to: Vec<String>,
    /// `email`: the sender address.
    #[serde(default)]
    pub from: Option<String>,
    /// `webhook` only: the key of the `X-Zeitwork-Signature` HMAC (16-256 characters; stored encrypted).
    #[serde(default)]
    pub secret: Option<String>,
    /// Events to send (e.g. `deployment.activate`, `deployment.fail`); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

/// A notification channel; its URL shows only scheme and host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Channel {
    pub id: String,
    pub org: String,
    pub project: Option<String>,
    pub kind: String,
    /// Scheme and host only: the rest of a webhook URL is often its secret.
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}
