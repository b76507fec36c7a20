//! The one place where errors become HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use zeitwork_api_types::{ApiErrorBody, ValidationError};
use zeitwork_store::StoreError;

/// Everything a request can fail with. Each variant's message is shown to the caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is malformed or out of range (400, `invalid_field`).
    #[error("{0}")]
    InvalidField(ValidationError),
    /// The body is not the JSON the route takes (400, `invalid_body`).
    #[error("{0}")]
    InvalidBody(String),
    /// A query parameter is malformed (400, `invalid_query`).
    #[error("{0}")]
    InvalidQuery(String),
    /// No or bad credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The token may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// (404)
    #[error("{0}")]
    NotFound(String),
    /// (405)
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// (409)
    #[error("{0}")]
    Conflict(String),
    /// The request body stalled or arrived too slowly (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// It existed and is gone for good (410).
    #[error("{0}")]
    Gone(String),
    /// (413)
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// (413) with what was too large.
    #[error("{0}")]
    TooLarge(String),
    /// (415)
    #[error("send the body as JSON with the header Content-Type: application/json")]
    UnsupportedMediaType,
    /// The operator cannot answer this yet (503), with why.
    #[error("{0}")]
    Unavailable(String),
    /// The store cannot be reached (503); details go to the log, not the caller.
    #[error("the store is unavailable; try again shortly")]
    StoreUnavailable,
    /// (500)
    #[error("internal error; the operator's log has details")]
    Internal,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidField(_) => (StatusCode::BAD_REQUEST, "invalid_field"),
            ApiError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
            ApiError::PayloadTooLarge(_) | ApiError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// A failure of the operator itself: logged with its detail, reported without it.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "{context}");
        ApiError::Internal
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::InvalidField(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Invalid { field, message } => ApiError::InvalidField(ValidationError { field, message }),
            StoreError::Database(e) => {
                tracing::error!(error = %e, "store request failed");
                match e {
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                        ApiError::StoreUnavailable
                    }
                    _ => ApiError::Internal,
                }
            }
            other => {
                tracing::error!(error = %other, "store request failed");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body =
            zeitwork_api_types::ApiError { error: ApiErrorBody { code: code.to_owned(), message: self.to_string() } };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
