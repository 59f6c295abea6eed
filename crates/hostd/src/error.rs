//! Errors the management API answers with: a status and an `ErrorBody` that says what was
//! wrong and what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::host::{CheckReport, ErrorBody};

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: msg.into(),
                code: code.into(),
                check: None,
            },
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg)
    }

    pub fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", msg)
    }

    pub fn conflict(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", msg)
    }

    pub fn busy(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", msg)
    }

    pub fn migration_disabled(host: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "migration_disabled",
            format!(
                "live migration is off on {host}: turn it on with `ferry --host {host} host set --live-migration on`"
            ),
        )
    }

    pub fn check_failed(report: CheckReport) -> ApiError {
        let problems: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "check_failed",
            format!(
                "{} cannot move from {} to {}: {}",
                report.vm,
                report.from,
                report.to,
                problems.join("; ")
            ),
        );
        e.body.check = Some(Box::new(report));
        e
    }

    pub fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<crate::state::StateError> for ApiError {
    fn from(e: crate::state::StateError) -> ApiError {
        ApiError::internal(ferry_vmm::error_chain(&e))
    }
}

/// The API's result type.
pub type ApiResult<T> = Result<T, ApiError>;
