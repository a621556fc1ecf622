//! The one place where failures become HTTP: every error leaves as an OpenAI error body
//! (`{"error":{"message","type","param","code"}}`) with the status OpenAI would use.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::chat::prompt::PromptError;
use crate::engine::EngineError;
use crate::models::downloads::DownloadError;
use crate::models::hub::HubError;
use crate::models::quantize::QuantizeError;
use crate::models::registry::RegistryError;

/// An error on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or out-of-range input.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// The named model is not available (unknown, or not loaded).
    #[error("{0}")]
    ModelNotFound(String),
    /// A route or resource that does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("request body is larger than the {0} byte limit")]
    PayloadTooLarge(usize),
    /// Too many requests are waiting; the client should come back after `retry_after_secs`.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u32,
    },
    /// Any other status with its own code (Hub answers, disk space, conflicts with the
    /// current state such as deleting a loaded model).
    #[error("{message}")]
    Other {
        status: StatusCode,
        message: String,
        code: &'static str,
    },
    /// The server cannot take the work right now (memory, unloading).
    #[error("{message}")]
    Unavailable { message: String, code: &'static str },
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The `error` object of OpenAI's error responses (also sent as an SSE event mid-stream).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<String>,
    pub code: Option<&'a str>,
}

impl ApiError {
    /// A 400 about one request field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Other { status, .. } => *status,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` object for this error.
    pub fn detail(&self) -> ErrorDetail<'static> {
        let (kind, param, code) = match self {
            Self::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".to_string()),
                Some("model_not_found"),
            ),
            Self::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("request_too_large")),
            Self::RateLimited { .. } => ("rate_limit_exceeded", None, Some("rate_limit_exceeded")),
            Self::Unavailable { code, .. } => ("server_error", None, Some(*code)),
            Self::Other { status, code, .. } => (
                if status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                },
                None,
                Some(*code),
            ),
            Self::Internal(_) => ("server_error", None, Some("internal_error")),
        };
        ErrorDetail {
            message: self.to_string(),
            kind,
            param,
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let body = serde_json::to_vec(&ErrorBody {
            error: self.detail(),
        })
        .unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Self::RateLimited {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if matches!(self, Self::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextLength { .. } => Self::InvalidRequest {
                message: e.to_string(),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            },
            EngineError::InvalidParam { param, message } => Self::invalid(param, message),
            EngineError::Unloaded => Self::Unavailable {
                message: e.to_string(),
                code: "model_unloaded",
            },
            EngineError::Load(_) => Self::Unavailable {
                message: e.to_string(),
                code: "model_load_failed",
            },
            EngineError::QueueFull {
                retry_after_secs, ..
            } => Self::RateLimited {
                message: e.to_string(),
                retry_after_secs,
            },
            EngineError::Decode(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> Self {
        match e {
            PromptError::TooManyMessages { .. } => Self::invalid("messages", e.to_string()),
            PromptError::TooLong { .. } => Self::InvalidRequest {
                message: e.to_string(),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            },
            PromptError::Template(_) => Self::invalid("messages", e.to_string()),
            // Nobody reads this: the client is gone.
            PromptError::Cancelled => Self::invalid("messages", e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidId(_) => Self::invalid("model", e.to_string()),
            RegistryError::NoDefault => Self::invalid("model", e.to_string()),
            RegistryError::NotFound(_) | RegistryError::NotLoaded(_) => {
                Self::ModelNotFound(e.to_string())
            }
            RegistryError::InsufficientMemory { .. } => Self::Unavailable {
                message: e.to_string(),
                code: "insufficient_memory",
            },
            RegistryError::TooManyModels { .. } => Self::Unavailable {
                message: e.to_string(),
                code: "max_loaded_models",
            },
            RegistryError::Busy(_) => Self::Unavailable {
                message: e.to_string(),
                code: "model_busy",
            },
            RegistryError::ConfirmationRequired(_) => Self::InvalidRequest {
                message: e.to_string(),
                param: Some("confirm".into()),
                code: Some("confirmation_required"),
            },
            RegistryError::Loaded(_) => Self::Other {
                status: StatusCode::CONFLICT,
                message: e.to_string(),
                code: "model_loaded",
            },
            RegistryError::DeleteRefused(_) => Self::Other {
                status: StatusCode::CONFLICT,
                message: e.to_string(),
                code: "delete_refused",
            },
            RegistryError::Settings { param, .. } => Self::invalid(param, e.to_string()),
            RegistryError::Engine(inner) => inner.into(),
            RegistryError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<QuantizeError> for ApiError {
    fn from(e: QuantizeError) -> Self {
        let other = |status, code| Self::Other {
            status,
            message: e.to_string(),
            code,
        };
        match &e {
            QuantizeError::Invalid { param, .. } => Self::invalid(*param, e.to_string()),
            QuantizeError::NotFound(_) => Self::ModelNotFound(e.to_string()),
            QuantizeError::Exists(_) => other(StatusCode::CONFLICT, "output_exists"),
            QuantizeError::InsufficientDisk { .. } => {
                other(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            QuantizeError::NoSuchJob(_) => Self::NotFound(e.to_string()),
            QuantizeError::Ended(..) => other(StatusCode::CONFLICT, "job_finished"),
            QuantizeError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<DownloadError> for ApiError {
    fn from(e: DownloadError) -> Self {
        let other = |status, code| Self::Other {
            status,
            message: e.to_string(),
            code,
        };
        match &e {
            DownloadError::Invalid { param, .. } => Self::invalid(*param, e.to_string()),
            DownloadError::Hub(HubError::Unauthorized { .. }) => {
                other(StatusCode::FORBIDDEN, "hub_access_denied")
            }
            DownloadError::Hub(HubError::NotFound(_)) => {
                other(StatusCode::NOT_FOUND, "hub_not_found")
            }
            DownloadError::Hub(HubError::Unreachable { .. }) => {
                other(StatusCode::BAD_GATEWAY, "hub_unreachable")
            }
            DownloadError::Hub(HubError::Protocol(_)) => {
                other(StatusCode::BAD_GATEWAY, "hub_error")
            }
            DownloadError::InsufficientDisk { .. } => {
                other(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            DownloadError::NoSuchJob(_) => Self::NotFound(e.to_string()),
            DownloadError::Finished(..) => other(StatusCode::CONFLICT, "job_finished"),
            DownloadError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}
