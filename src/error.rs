//! The one error model of the hub's API: every refusal is an [`ErrorCode`] (a stable
//! snake_case code, API.md) with its HTTP status fixed here, exhaustively, plus a human message.
//! Storage failures become `internal` (500) or `unavailable` (503) with a generic message: the
//! database's own text is logged, never sent.

use actix_web::http::StatusCode;

use crate::store::StoreError;

/// Every error code the API answers with.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::EnumIter,
    serde::Serialize,
    utoipa::ToSchema,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad input; the message names the field.
    InvalidRequest,
    /// Missing or unknown API key.
    Unauthorized,
    /// The key's role may not do this.
    Forbidden,
    /// No such resource, or another merchant's.
    NotFound,
    /// No such cabinet (or another merchant's), for a session.
    CabinetNotFound,
    /// A merchant with that id exists.
    MerchantExists,
    /// A cabinet with that id is registered.
    CabinetExists,
    /// Activating a cabinet nobody registered (设备未维护).
    NotRegistered,
    /// A promotion id collided; retry.
    PromotionExists,
    /// Revoking the last active admin key would lock the platform out.
    LastAdminKey,
    /// The API key is revoked (rotating it, say).
    KeyRevoked,
    /// The cabinet is registered but not activated.
    CabinetNotActive,
    /// Another session is open on the cabinet.
    CabinetBusy,
    /// The cabinet is faulted or locked down.
    CabinetFaulted,
    /// An earlier request with this `Idempotency-Key` is still running.
    RequestInProgress,
    /// An `Idempotency-Key` used before for a different request (method, path or body).
    IdempotencyKeyReused,
    /// Too many operator feed sockets open (on this node, or of this key).
    TooManyFeeds,
    /// The request's body did not fully arrive in time (`http.body_timeout_ms`).
    RequestTimeout,
    /// The cabinet refused the unlock.
    UnlockRejected,
    /// Resolving an order that is not abnormal.
    OrderNotAbnormal,
    /// Reducing an order that is not waiting for its payment (待支付).
    OrderNotUnpaid,
    /// Closing a session that is already over.
    SessionNotOpen,
    /// The session was closed (by an operator or the session supervisor) before its door
    /// opened.
    SessionClosed,
    /// The cabinet's service time has run out.
    ServiceExpired,
    /// The shopper is on the merchant's blacklist.
    UserBlacklisted,
    /// The provider or the shopper declined pay-after-use.
    PaymentDeclined,
    /// The merchant cannot take payments through this channel yet: its sub-merchant number,
    /// authorisation or customer-service phone is missing (the message names what).
    MerchantPaymentNotReady,
    /// A product is not on the cabinet's sellable list.
    UnknownProduct,
    /// It was resolved already (a stock discrepancy).
    AlreadyResolved,
    /// The merchant's prepaid recognition quota is used up (`recognition.when_exhausted`).
    RecognitionQuotaExhausted,
    /// A basket line's quantity, the basket's total quantity or its line count is above the
    /// `[limits]`; the message names the line.
    BasketOutOfRange,
    /// A list price is above `limits.max_price_fen` (or negative).
    PriceOutOfRange,
    /// A refund would exceed what was paid (counting refunds in flight).
    RefundExceedsPaid,
    /// The provider's refund window after the payment is over (WeChat: a year).
    RefundWindowClosed,
    /// The order has as many refunds as the provider allows (WeChat: 50).
    RefundLimitReached,
    /// The cabinet is not connected.
    CabinetOffline,
    /// The cabinet did not acknowledge the unlock in time.
    UnlockTimeout,
    /// The hub restarted while the request was in flight.
    HubRestarted,
    /// The cabinet's actor did not answer.
    ActorUnavailable,
    /// The cabinet's actor restarted before the command ended.
    ActorRestarted,
    /// The node that serves the cabinet (several nodes) did not answer in time.
    NodeUnavailable,
    /// Storage is not answering (pool exhausted, database down): retry later.
    Unavailable,
    /// A fault of the hub's own; logged with its cause.
    Internal,
}

impl ErrorCode {
    /// The stable code.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The HTTP status every answer with this code carries.
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            InvalidRequest => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
            NotFound | CabinetNotFound => StatusCode::NOT_FOUND,
            MerchantExists | CabinetExists | NotRegistered | PromotionExists | CabinetNotActive
            | CabinetBusy | CabinetFaulted | RequestInProgress | UnlockRejected
            | OrderNotAbnormal | OrderNotUnpaid | LastAdminKey | KeyRevoked | SessionNotOpen
            | SessionClosed | AlreadyResolved => StatusCode::CONFLICT,
            ServiceExpired
            | UserBlacklisted
            | PaymentDeclined
            | MerchantPaymentNotReady
            | RecognitionQuotaExhausted
            | UnknownProduct
            | RefundExceedsPaid
            | RefundWindowClosed
            | RefundLimitReached
            | IdempotencyKeyReused
            | BasketOutOfRange
            | PriceOutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
            TooManyFeeds => StatusCode::TOO_MANY_REQUESTS,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            CabinetOffline | UnlockTimeout | HubRestarted | ActorUnavailable | ActorRestarted
            | NodeUnavailable | Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refusal or failure, as every endpoint answers it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind.
    pub code: ErrorCode,
    /// For people; never a database's or provider's own text.
    pub message: String,
}

/// What handlers and the session supervisor return.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error of `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request`; the message names the field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// 404 for `what` (also for another merchant's: ids do not leak).
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "missing or unknown API key")
    }

    /// 403: role checks come before any lookup, so a resource's existence is not leaked.
    pub fn forbidden() -> Self {
        Self::new(ErrorCode::Forbidden, "the key's role may not do this")
    }

    /// 500 for a fault of the hub's own: `cause` goes to the log, not to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(ErrorCode::Internal, "internal error")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The JSON body every error answer carries.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }

    /// An answer stored under an `Idempotency-Key`, read back: the stored code, or `internal`
    /// for one this version no longer knows.
    pub fn from_stored(code: &str, message: &str) -> Self {
        Self::new(code.parse().unwrap_or(ErrorCode::Internal), message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            // Waiting for a connection timed out or the database went away: try again.
            StoreError::Db(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => {
                tracing::error!(error = %e, "storage unavailable");
                Self::new(
                    ErrorCode::Unavailable,
                    "storage is unavailable; retry shortly",
                )
            }
            StoreError::KeyReused => Self::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request; use a new key",
            ),
            _ => Self::internal(e),
        }
    }
}

impl From<cabinet_actors::pricing::PricingError> for ApiError {
    fn from(e: cabinet_actors::pricing::PricingError) -> Self {
        use cabinet_actors::pricing::PricingError as P;
        let code = match &e {
            P::UnknownSku(_) => ErrorCode::UnknownProduct,
            P::BasketOutOfRange { .. } => ErrorCode::BasketOutOfRange,
            P::PriceOutOfRange { .. } => ErrorCode::PriceOutOfRange,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ring::error::Unspecified> for ApiError {
    /// The only failure of `secrets::token`: the system has no randomness to give.
    fn from(_: ring::error::Unspecified) -> Self {
        Self::internal("the system has no randomness")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::IntoEnumIterator;

    #[test]
    fn every_code_round_trips_through_its_stored_name() {
        for code in ErrorCode::iter() {
            let e = ApiError::from_stored(code.as_str(), "m");
            assert_eq!(e.code, code);
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(serde_json::json!(code.as_str())),
                "the wire name is the stored name"
            );
        }
        assert_eq!(
            ApiError::from_stored("no_such_code", "m").code,
            ErrorCode::Internal
        );
    }

    #[test]
    fn storage_failures_are_never_client_errors_and_never_leak_their_text() {
        let e = ApiError::from(StoreError::Corrupt("secret column text".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("secret"));
        let e = ApiError::from(StoreError::Db(sqlx::Error::PoolTimedOut));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn session_refusals_have_the_statuses_api_md_gives() {
        use ErrorCode::*;
        for (code, status) in [
            (CabinetNotFound, 404),
            (CabinetNotActive, 409),
            (CabinetBusy, 409),
            (CabinetFaulted, 409),
            (UnlockRejected, 409),
            (ServiceExpired, 422),
            (UserBlacklisted, 422),
            (PaymentDeclined, 422),
            (BasketOutOfRange, 422),
            (PriceOutOfRange, 422),
            (CabinetOffline, 503),
            (UnlockTimeout, 503),
        ] {
            assert_eq!(code.status().as_u16(), status, "{}", code.as_str());
        }
    }
}
