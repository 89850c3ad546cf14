//! The daemon's one error type: what an API call answers when it refuses or fails, as a status
//! and a message (`{"error": "..."}` on the wire).

use crate::store::StoreError;

/// A refusal (4xx) or a failure (5xx) with the message the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: 404, message: message.into() }
    }

    /// 409: the state does not allow it.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: 409, message: message.into() }
    }

    /// 500: the daemon failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into() }
    }

    /// 503: the daemon is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: 503, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::BadDigest(_) | StoreError::UnknownComponent(_) => 400,
            StoreError::InUse { .. } => 409,
            StoreError::Db { .. } | StoreError::File { .. } | StoreError::Damaged { .. } => 500,
        };
        let message = match &e {
            StoreError::UnknownComponent(d) => format!("no component {d}: upload it first (POST /v1/components)"),
            _ => e.to_string(),
        };
        Self { status, message }
    }
}
