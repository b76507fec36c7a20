//! Extractors that turn bad input into errors naming the field to fix.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// A JSON body: `Content-Type: application/json`, within the size limit,
/// every field known and of the right type.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.config.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::InvalidBody(format!("could not read the request body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses JSON, reporting the path of the offending field (`resources.vcpu: …`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::InvalidBody("the request body is empty; send a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde_json appends " at line L column C"; keep it, people find it useful.
        if path == "." || path == "?" || path.is_empty() || inner.is_syntax() || inner.is_eof() {
            ApiError::InvalidBody(format!("invalid JSON body: {msg}"))
        } else {
            ApiError::InvalidBody(format!("{path}: {msg}"))
        }
    })?;
    // One JSON value and nothing after it (whitespace aside): `{"a":1}{"b":2}` is not a body.
    de.end().map_err(|e| ApiError::InvalidBody(format!("invalid JSON body: data after the JSON value: {e}")))?;
    Ok(value)
}

/// Query parameters with rejections in the API's error format.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize(de).map(QueryParams).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.into_inner().to_string();
            if path == "." {
                ApiError::InvalidQuery(format!("invalid query: {msg}"))
            } else {
                ApiError::InvalidQuery(format!("{path}: {msg}"))
            }
        })
    }
}

/// `?limit=&cursor=` of list endpoints.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most this many items (1–1000, default 100).
    pub limit: Option<u32>,
    /// The `X-Next-Cursor` of the previous page.
    pub cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_value_and_nothing_after_it() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Org {
            slug: String,
        }
        assert!(parse_json::<Org>(br#"{"slug":"a"}"#).is_ok());
        assert!(parse_json::<Org>(b"{\"slug\":\"a\"}\n  ").is_ok());
        let err = parse_json::<Org>(br#"{"slug":"a"}{"slug":"b"} garbage"#).err().unwrap();
        assert!(err.to_string().contains("after the JSON value"), "{err}");
        assert!(parse_json::<Org>(br#"{"slug":"a"} x"#).is_err());
    }
}
