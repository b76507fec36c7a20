//! Uptime probes: one HTTP request judged against a check's expectations.
//! Operators run them from their own region and node agents from theirs.

use std::time::{Duration, Instant};

use zeitwork_api_types::{ProbeRequest, ProbeResult};

/// A client for probes: no redirects followed, Zeitwork's user agent.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("zeitwork-uptime/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// Runs one probe.
pub async fn run(http: &reqwest::Client, p: &ProbeRequest) -> ProbeResult {
    let method = if p.method == "HEAD" { reqwest::Method::HEAD } else { reqwest::Method::GET };
    let req = match &p.via {
        Some(via) => {
            let rest = p.url.split_once("://").map_or(p.url.as_str(), |(_, r)| r);
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            http.request(method, format!("http://{via}{path}")).header(reqwest::header::HOST, host)
        }
        None => http.request(method, &p.url),
    };
    let started = Instant::now();
    let answer = req.timeout(Duration::from_secs(u64::from(p.timeout_secs))).send().await;
    let (status, error) = match answer {
        Ok(res) => {
            let status = res.status().as_u16();
            let body = match &p.body_contains {
                Some(_) => res.text().await.ok(),
                None => None,
            };
            let error = if status != p.expected_status {
                Some(format!("answered {status}, expected {}", p.expected_status))
            } else {
                match (&p.body_contains, body) {
                    (Some(want), Some(b)) if !b.contains(want.as_str()) => {
                        Some(format!("the body does not contain {want:?}"))
                    }
                    (Some(_), None) => Some("the body could not be read".to_owned()),
                    _ => None,
                }
            };
            (Some(status), error)
        }
        Err(e) if e.is_timeout() => (None, Some(format!("no answer within {} s", p.timeout_secs))),
        Err(e) => (None, Some(format!("unreachable: {e}"))),
    };
    ProbeResult { status, latency_ms: started.elapsed().as_millis() as u64, error }
}
