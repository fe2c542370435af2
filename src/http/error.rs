//! How an [`ApiError`] goes on the wire, and the extractors' own errors (bad JSON, query or
//! path) turned into it.

use actix_web::{HttpRequest, HttpResponse, ResponseError};

use crate::error::{ApiError, ErrorCode};

impl ResponseError for ApiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status());
        if matches!(
            self.status(),
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE
                | actix_web::http::StatusCode::TOO_MANY_REQUESTS
        ) {
            b.insert_header(("Retry-After", "5"));
        }
        if self.code == ErrorCode::Unauthorized {
            b.insert_header(("WWW-Authenticate", "Bearer"));
        }
        b.json(self.body())
    }
}

pub(super) fn json_error(
    err: actix_web::error::JsonPayloadError,
    _: &HttpRequest,
) -> actix_web::Error {
    ApiError::bad_request(format!("body: {err}")).into()
}

pub(super) fn query_error(
    err: actix_web::error::QueryPayloadError,
    _: &HttpRequest,
) -> actix_web::Error {
    ApiError::bad_request(format!("query: {err}")).into()
}

pub(super) fn path_error(err: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("path: {err}")).into()
}

/// The body of an error answer, for the OpenAPI document.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}
