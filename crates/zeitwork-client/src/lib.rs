//! Typed client of the operator API, used by the CLI, node agents, edge
//! proxies and the tests. It owns the wire details (auth header, error
//! decoding, paging); it must not hold platform logic.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod probe;

pub use zeitwork_api_types as types;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The operator answered with an error.
    #[error("{message} ({status}, {code})")]
    Api { status: u16, code: String, message: String },
    /// The operator could not be reached.
    #[error("cannot reach the operator at {url}; is it running? ({source})")]
    Unreachable { url: String, source: reqwest::Error },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the operator: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long to wait before asking again, spread at random so that
    /// callers failing together (an operator restart) do not come back
    /// together: 3–6 s when the operator is busy (`503`: nothing was done),
    /// 1–2 s otherwise.
    pub fn retry_delay(&self) -> std::time::Duration {
        use std::hash::BuildHasher;
        let base = if self.status() == Some(503) { 3_000 } else { 1_000 };
        let jitter = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()) % base;
        std::time::Duration::from_millis(base + jitter)
    }
}

/// One page of a list and the cursor of the next.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// No overall timeout: live streams and uploads.
    long: reqwest::Client,
}

impl Client {
    /// `base` is the operator URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("zeitwork/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("a TLS backend is compiled in");
        let long = reqwest::Client::builder()
            .user_agent(concat!("zeitwork/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("a TLS backend is compiled in");
        Self { base: base.trim_end_matches('/').to_owned(), token, http, long }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; returns the status, headers and body bytes of a success.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, bytes::Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let status = res.status();
        if !status.is_success() {
            return Err(Self::error_of(res).await);
        }
        let headers = res.headers().clone();
        let bytes = res.bytes().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        Ok((status, headers, bytes))
    }

    /// Decodes an error answer of the operator.
    async fn error_of(res: reqwest::Response) -> ClientError {
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<types::ApiError>(&bytes) {
            Ok(e) => ClientError::Api { status, code: e.error.code, message: e.error.message },
            Err(_) => ClientError::Api {
                status,
                code: "http".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            },
        }
    }

    /// A GET whose answer is read as it arrives (live logs, event streams); no overall timeout.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let mut req = self.long.get(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        if !res.status().is_success() {
            return Err(Self::error_of(res).await);
        }
        Ok(res)
    }

    /// POSTs a raw body with `http`; the answer when it is a success.
    async fn post_raw(
        &self,
        http: &reqwest::Client,
        path: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req =
            http.post(format!("{}{}", self.base, path)).header(reqwest::header::CONTENT_TYPE, content_type).body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        if !res.status().is_success() {
            return Err(Self::error_of(res).await);
        }
        Ok(res)
    }

    /// POSTs a raw body (an upload) and decodes the JSON answer; no overall timeout.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> Result<T, ClientError> {
        let res = self.post_raw(&self.long, path, content_type, body).await?;
        let bytes = res.bytes().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// POSTs a raw body and ignores the answer's body (reports such as build output).
    pub async fn post_bytes(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<(), ClientError> {
        self.post_raw(&self.http, path, content_type, body.into()).await.map(drop)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let (_, _, bytes) = self.send_raw(method, path, body.as_ref()).await?;
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// A GET that also returns the answer's headers.
    pub async fn get_with_headers<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, reqwest::header::HeaderMap), ClientError> {
        let (_, headers, bytes) = self.send_raw(Method::GET, path, None).await?;
        let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((value, headers))
    }

    /// A long poll that answers `304 Not Modified` when nothing changed:
    /// `None` then, with the answer's headers.
    pub async fn get_if_changed<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(Option<T>, reqwest::header::HeaderMap), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        if res.status() == StatusCode::NOT_MODIFIED {
            return Ok((None, res.headers().clone()));
        }
        if !res.status().is_success() {
            return Err(Self::error_of(res).await);
        }
        let headers = res.headers().clone();
        let bytes = res.bytes().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((Some(value), headers))
    }

    /// A list endpoint, one page.
    pub async fn list<T: DeserializeOwned>(&self, path: &str) -> Result<Page<T>, ClientError> {
        let (_, headers, bytes) = self.send_raw(Method::GET, path, None).await?;
        let items = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let next_cursor = headers.get("x-next-cursor").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Page { items, next_cursor })
    }

    /// A list endpoint, every page.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut page = self.list::<T>(path).await?;
        loop {
            out.append(&mut page.items);
            match page.next_cursor {
                Some(c) => page = self.list(&format!("{path}{sep}cursor={}", encode(&c))).await?,
                None => return Ok(out),
            }
        }
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(to_value(body)?)).await
    }

    /// A POST whose success carries no body (204).
    pub async fn post_no_content<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        self.send_raw(Method::POST, path, Some(&to_value(body)?)).await.map(|_| ())
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::POST, path, None).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(to_value(body)?)).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.call(Method::PATCH, path, Some(to_value(body)?)).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send_raw(Method::DELETE, path, None).await.map(|_| ())
    }
}

fn to_value<B: Serialize>(b: &B) -> Result<serde_json::Value, ClientError> {
    serde_json::to_value(b).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
