//! Safer releases: the per-project settings of automatic rollback and canary
//! rollouts, the traffic figures edges report per deployment, and the
//! latency histogram those figures share (fixed log-scale buckets, so two
//! edges' histograms merge by adding).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::ValidationError;

// ---------------------------------------------------------------- settings

/// Rolling back on its own when a new deployment does worse than the one it
/// replaced. Every field may be left out (its default is used).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AutoRollback {
    /// On by default.
    pub enabled: bool,
    /// A share of 5xx answers above this (0.05 = 5 %) and above twice the
    /// previous deployment's share is a regression (0.001–1).
    pub error_rate: f64,
    /// A p95 latency above this many times the previous deployment's is a regression (1.1–100).
    pub latency_factor: f64,
    /// The sliding window the figures are taken over, in seconds (5–3600).
    pub window_secs: u32,
    /// Fewer requests in the window decide nothing (1–1000000).
    pub min_requests: u32,
    /// How long after the switch the deployment is watched, in seconds (10–86400).
    pub watch_secs: u32,
}

impl Default for AutoRollback {
    fn default() -> Self {
        Self {
            enabled: true,
            error_rate: 0.05,
            latency_factor: 2.0,
            window_secs: 30,
            min_requests: 50,
            watch_secs: 600,
        }
    }
}

/// A canary rollout: the new deployment gets `steps[i]` percent of its
/// environment's traffic for `step_secs` each, while the analysis of
/// automatic rollback holds; 100 is the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Percentages, strictly increasing, 1–100, ending at 100, e.g. `[1, 10, 50, 100]`.
    pub steps: Vec<u32>,
    /// Seconds per step (1–86400).
    pub step_secs: u32,
}

/// Shadow traffic: before any real traffic moves, a share of live requests
/// is copied to the new deployment, its answers are thrown away, and its
/// status and latency are judged as automatic rollback judges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// Percent of requests copied (1–100).
    pub share: u32,
    /// How long the copies run before the switch, in seconds (1–86400).
    pub secs: u32,
    /// Copy every method, not only GET, HEAD and OPTIONS: the copies may then
    /// have side effects (writes happen twice). Off by default.
    #[serde(default)]
    pub all_methods: bool,
}

pub fn shadow(field: &str, s: &Shadow) -> Result<(), ValidationError> {
    if !(1..=100).contains(&s.share) {
        return Err(ValidationError::new(
            format!("{field}.share"),
            format!("{} is out of range; use 1 to 100 (percent of requests)", s.share),
        ));
    }
    if !(1..=86_400).contains(&s.secs) {
        return Err(ValidationError::new(
            format!("{field}.secs"),
            format!("{} is out of range; use 1 to 86400", s.secs),
        ));
    }
    Ok(())
}

pub fn auto_rollback(field: &str, a: &AutoRollback) -> Result<(), ValidationError> {
    let bad = |f: &str, m: String| Err(ValidationError::new(format!("{field}.{f}"), m));
    if !(a.error_rate.is_finite() && (0.001..=1.0).contains(&a.error_rate)) {
        return bad(
            "error_rate",
            format!("{} is out of range; give a share from 0.001 to 1 (0.05 = 5 %)", a.error_rate),
        );
    }
    if !(a.latency_factor.is_finite() && (1.1..=100.0).contains(&a.latency_factor)) {
        return bad("latency_factor", format!("{} is out of range; use 1.1 to 100", a.latency_factor));
    }
    if !(5..=3600).contains(&a.window_secs) {
        return bad("window_secs", format!("{} is out of range; use 5 to 3600", a.window_secs));
    }
    if !(1..=1_000_000).contains(&a.min_requests) {
        return bad("min_requests", format!("{} is out of range; use 1 to 1000000", a.min_requests));
    }
    if !(10..=86_400).contains(&a.watch_secs) {
        return bad("watch_secs", format!("{} is out of range; use 10 to 86400", a.watch_secs));
    }
    Ok(())
}

pub fn rollout(field: &str, r: &Rollout) -> Result<(), ValidationError> {
    let steps = format!("{field}.steps");
    if r.steps.is_empty() || r.steps.len() > 20 {
        return Err(ValidationError::new(steps, "give 1 to 20 percentages, e.g. [1, 10, 50, 100]"));
    }
    for (i, s) in r.steps.iter().enumerate() {
        if !(1..=100).contains(s) {
            return Err(ValidationError::new(format!("{steps}[{i}]"), format!("{s} is out of range; use 1 to 100")));
        }
        if i > 0 && r.steps[i - 1] >= *s {
            return Err(ValidationError::new(
                format!("{steps}[{i}]"),
                format!("{s} does not follow {}: steps must be strictly increasing", r.steps[i - 1]),
            ));
        }
    }
    if r.steps.last() != Some(&100) {
        return Err(ValidationError::new(steps, "the last step must be 100 (the whole environment)"));
    }
    if !(1..=86_400).contains(&r.step_secs) {
        return Err(ValidationError::new(
            format!("{field}.step_secs"),
            format!("{} is out of range; use 1 to 86400", r.step_secs),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- rollouts

/// Where a release stands after its deployment became ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Copies of live requests go to the deployment; no client sees its answers.
    Shadow,
    /// The deployment gets `weight` percent of its environment's traffic.
    Canary,
    /// It serves the whole environment and is watched for regressions until `watch_until`.
    Watching,
    /// The watch ended without a regression.
    Done,
    /// A regression (or a person) sent the traffic back to the previous deployment.
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Shadow => "shadow",
            RolloutState::Canary => "canary",
            RolloutState::Watching => "watching",
            RolloutState::Done => "done",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RolloutState::Shadow,
            RolloutState::Canary,
            RolloutState::Watching,
            RolloutState::Done,
            RolloutState::RolledBack,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// A deployment's release: its canary steps and the watch after the switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutStatus {
    pub deployment: String,
    pub environment: crate::Environment,
    /// The deployment that served the environment before (the rollback target).
    pub baseline: Option<String>,
    pub state: RolloutState,
    /// The canary's percentages; empty for a switch at once.
    pub steps: Vec<u32>,
    pub step_secs: u32,
    /// Index of the current step in `steps`.
    pub step: u32,
    /// The share of the environment's traffic the deployment gets now (0–100).
    pub weight: u32,
    pub started_at: DateTime<Utc>,
    pub step_started_at: DateTime<Utc>,
    /// When it took the whole environment.
    pub activated_at: Option<DateTime<Utc>>,
    /// The end of the watch for regressions.
    pub watch_until: Option<DateTime<Utc>>,
    /// Why it was rolled back, for people.
    pub reason: Option<String>,
    /// The figures of the last analysis.
    pub analysis: Option<Analysis>,
    /// Every request the deployment answered since its rollout began, from
    /// every edge (complete once the edges' reports of the last second are in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<Served>,
}

/// Requests a deployment answered, and how many of them with a 5xx status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Served {
    pub requests: u64,
    pub errors: u64,
}

/// The figures one analysis looked at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Analysis {
    pub requests: u64,
    pub errors: u64,
    pub p95_ms: Option<f64>,
    pub baseline_requests: u64,
    pub baseline_errors: u64,
    pub baseline_p95_ms: Option<f64>,
    /// `healthy`, `insufficient` (too few requests to decide), `slower` (a p95
    /// regression not yet held for a whole window) or `regressed`.
    pub verdict: String,
    /// Since when the p95 regression holds (`slower`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slower_since: Option<DateTime<Utc>>,
}

// ---------------------------------------------------------------- traffic

/// What one edge saw in one short period, per deployment (edge proxies, every second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficReport {
    /// The edge's name: a report from the same edge for the same period replaces the earlier one.
    pub edge: String,
    /// Unix ms when the period began (per edge, strictly increasing).
    pub period: i64,
    pub deployments: BTreeMap<String, DeploymentTraffic>,
}

/// Requests one deployment answered, through one edge, in one period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentTraffic {
    pub requests: u64,
    /// Answers with a 5xx status (the app's, or the edge's when the app could not be reached).
    pub errors: u64,
    /// Requests per latency bucket (see [`latency_bucket`]); trailing empty buckets left out.
    pub latency: Vec<u64>,
}

impl DeploymentTraffic {
    /// Adds `other` (another edge's or another period's figures).
    pub fn merge(&mut self, other: &DeploymentTraffic) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    pub fn observe(&mut self, status: u16, took: Duration) {
        self.requests += 1;
        if status >= 500 {
            self.errors += 1;
        }
        let b = latency_bucket(took);
        if self.latency.len() <= b {
            self.latency.resize(b + 1, 0);
        }
        self.latency[b] += 1;
    }

    /// Roughly how many ms the requests took together: each counted at its
    /// latency bucket's midpoint (within about 10 % of the true sum). Over a
    /// period, `busy_ms / period_ms` is the average number of requests in
    /// flight (Little's law).
    pub fn busy_ms(&self) -> f64 {
        self.latency
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let upper = latency_bucket_bound_ms(i);
                let lower = if i == 0 { 0.0 } else { latency_bucket_bound_ms(i - 1) };
                *n as f64 * (lower + upper) / 2.0
            })
            .sum()
    }

    /// The share of 5xx answers (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The 95th percentile latency in ms (the upper bound of its bucket).
    pub fn p95_ms(&self) -> Option<f64> {
        latency_quantile(&self.latency, 0.95)
    }
}

/// Latency buckets: bucket `i` holds latencies up to `2^(i/4)` ms (each
/// about 19 % wider than the one before); the last holds everything slower.
pub const LATENCY_BUCKETS: usize = 64;

/// The bucket of a latency.
pub fn latency_bucket(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1000.0;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.log2() * 4.0).ceil() as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of bucket `i`, in ms.
pub fn latency_bucket_bound_ms(i: usize) -> f64 {
    2f64.powf(i as f64 / 4.0)
}

/// The `q` quantile (0–1) of a bucketed latency, as its bucket's upper bound; none without samples.
pub fn latency_quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(latency_bucket_bound_ms(i));
        }
    }
    Some(latency_bucket_bound_ms(buckets.len().saturating_sub(1)))
}

/// A share of an environment's traffic that goes to a candidate deployment (a canary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RouteCanary {
    pub deployment: String,
    /// Percent of clients (0–100), chosen by a hash of the client address and the deployment,
    /// so a client stays on one side for the step and on the canary as the weight grows.
    pub weight: u32,
    pub instances: Vec<crate::RouteInstance>,
}

/// Copies of a share of an environment's requests go to a candidate
/// deployment; their answers are discarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RouteShadow {
    pub deployment: String,
    /// Percent of requests copied (1–100), chosen by a hash of the request id.
    pub share: u32,
    /// Copy every method, not only GET, HEAD and OPTIONS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_methods: bool,
    pub instances: Vec<crate::RouteInstance>,
}

/// Whether a request of `method` may be copied: GET, HEAD and OPTIONS
/// always, every other method only when the project opted in.
pub fn shadow_method(method: &str, all_methods: bool) -> bool {
    all_methods || matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// Whether a client falls in a canary of `weight` percent for `deployment`:
/// every edge decides the same for the same client.
pub fn in_canary(client_key: &[u8], deployment: &str, weight: u32) -> bool {
    // FNV-1a: stable across processes and builds, unlike the std hasher's keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_key.iter().chain([0u8].iter()).chain(deployment.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Mix the high bits in: FNV's low bits alone spread poorly.
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    (h % 100) < u64::from(weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_adds_up_latencies_closely() {
        let mut t = DeploymentTraffic::default();
        assert_eq!(t.busy_ms(), 0.0);
        // 10 requests of 1 s and 100 of 5 ms: 10.5 s of work.
        for _ in 0..10 {
            t.observe(200, Duration::from_secs(1));
        }
        for _ in 0..100 {
            t.observe(200, Duration::from_millis(5));
        }
        let busy = t.busy_ms();
        assert!((busy - 10_500.0).abs() < 10_500.0 * 0.1, "{busy}");
    }

    #[test]
    fn histograms_merge_by_adding_and_give_p95() {
        let mut a = DeploymentTraffic::default();
        for _ in 0..95 {
            a.observe(200, Duration::from_millis(3));
        }
        for _ in 0..5 {
            a.observe(503, Duration::from_millis(800));
        }
        let p = a.p95_ms().unwrap();
        assert!((3.0..=3.6).contains(&p), "{p}");
        let mut b = DeploymentTraffic::default();
        b.observe(500, Duration::from_millis(800));
        a.merge(&b);
        assert_eq!((a.requests, a.errors), (101, 6));
        assert!(a.p95_ms().unwrap() > 700.0, "6 of 101 slow moves p95 into the slow bucket");
        assert!(latency_bucket(Duration::from_secs(3600)) == LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(Duration::from_micros(10)), 0);
        for ms in [2u64, 10, 100, 1000] {
            let b = latency_bucket(Duration::from_millis(ms));
            assert!(latency_bucket_bound_ms(b) >= ms as f64 && latency_bucket_bound_ms(b) < ms as f64 * 1.2);
        }
    }

    #[test]
    fn canary_membership_is_stable_and_monotone() {
        let clients: Vec<String> = (0..2000).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        let share = |w| clients.iter().filter(|c| in_canary(c.as_bytes(), "web-abc1234-acme", w)).count();
        let ten = share(10);
        assert!((120..=280).contains(&ten), "about 10 % of 2000: {ten}");
        assert_eq!(share(0), 0);
        assert_eq!(share(100), 2000);
        for c in &clients {
            if in_canary(c.as_bytes(), "web-abc1234-acme", 10) {
                assert!(in_canary(c.as_bytes(), "web-abc1234-acme", 50), "a canary client stays as the weight grows");
            }
        }
    }

    #[test]
    fn settings_are_checked_field_by_field() {
        assert!(auto_rollback("auto_rollback", &AutoRollback::default()).is_ok());
        let e = auto_rollback("auto_rollback", &AutoRollback { error_rate: 5.0, ..Default::default() }).unwrap_err();
        assert_eq!(e.field, "auto_rollback.error_rate");
        let e = auto_rollback("auto_rollback", &AutoRollback { window_secs: 0, ..Default::default() }).unwrap_err();
        assert_eq!(e.field, "auto_rollback.window_secs");
        let ok = Rollout { steps: vec![1, 10, 50, 100], step_secs: 60 };
        assert!(rollout("rollout", &ok).is_ok());
        let e = rollout("rollout", &Rollout { steps: vec![10, 5, 100], step_secs: 60 }).unwrap_err();
        assert_eq!(e.field, "rollout.steps[1]");
        let e = rollout("rollout", &Rollout { steps: vec![10, 50], step_secs: 60 }).unwrap_err();
        assert_eq!(e.field, "rollout.steps");
        let e = rollout("rollout", &Rollout { steps: vec![0, 100], step_secs: 60 }).unwrap_err();
        assert_eq!(e.field, "rollout.steps[0]");
        let e = rollout("rollout", &Rollout { steps: vec![100], step_secs: 0 }).unwrap_err();
        assert_eq!(e.field, "rollout.step_secs");
    }

    #[test]
    fn shadow_settings_name_the_field() {
        assert!(shadow("shadow", &Shadow { share: 10, secs: 60, all_methods: false }).is_ok());
        let e = shadow("shadow", &Shadow { share: 0, secs: 60, all_methods: false }).unwrap_err();
        assert_eq!(e.field, "shadow.share");
        let e = shadow("shadow", &Shadow { share: 101, secs: 60, all_methods: false }).unwrap_err();
        assert_eq!(e.field, "shadow.share");
        let e = shadow("shadow", &Shadow { share: 5, secs: 0, all_methods: false }).unwrap_err();
        assert_eq!(e.field, "shadow.secs");
        let parsed: Shadow = serde_json::from_str(r#"{"share": 5, "secs": 30}"#).unwrap();
        assert!(!parsed.all_methods, "only idempotent methods unless opted in");
        assert!(serde_json::from_str::<Shadow>(r#"{"share": 5, "secs": 30, "bogus": 1}"#).is_err());
        assert!(shadow_method("GET", false) && shadow_method("HEAD", false) && shadow_method("OPTIONS", false));
        assert!(!shadow_method("POST", false) && !shadow_method("DELETE", false));
        assert!(shadow_method("POST", true));
    }
}
