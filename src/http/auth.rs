//! Who is calling: API keys, their roles and their merchant scope.

use std::future::Future;
use std::pin::Pin;

use actix_web::{web, FromRequest, HttpRequest};

use cabinet_actors::ids::MerchantId;

use super::state::AppState;
use crate::error::{ApiError, ApiResult};
use crate::secrets::{sha256_hex, token};

/// Key roles, weakest first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    strum::EnumString,
    strum::IntoStaticStr,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Restocks.
    Restocker,
    /// Runs cabinets.
    Operator,
    /// Administers one merchant.
    MerchantAdmin,
    /// The platform.
    Admin,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Caller {
    /// Key id (audit).
    pub key_id: String,
    /// Role.
    pub role: Role,
    /// Scope; `None` for admin.
    pub merchant: Option<String>,
}

impl Caller {
    /// 403 unless the key's role is at least `min`.
    pub fn require(&self, min: Role) -> ApiResult<()> {
        if self.role >= min {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }

    /// Whether the key may see `merchant_id`'s resources.
    pub fn sees(&self, merchant_id: &str) -> bool {
        self.merchant.as_deref().is_none_or(|m| m == merchant_id)
    }

    /// Whose rows a listing shows: a scoped key's own merchant's, or the one a platform key
    /// names (`None`: every merchant's). Naming another merchant is a 404.
    pub fn listing(&self, named: Option<&str>) -> ApiResult<Option<String>> {
        match (&self.merchant, named) {
            (Some(own), Some(n)) if own != n => Err(ApiError::not_found("merchant")),
            (Some(own), _) => Ok(Some(own.clone())),
            (None, n) => Ok(n.map(str::to_owned)),
        }
    }

    /// The merchant a request acts for: a scoped key's own, or the one a platform key names.
    /// Naming another merchant is a 404, as for any resource of theirs.
    pub fn acting_for(&self, named: Option<&str>) -> ApiResult<String> {
        match (&self.merchant, named) {
            (Some(own), None) => Ok(own.clone()),
            (Some(own), Some(n)) if n == own => Ok(n.to_owned()),
            (Some(_), Some(_)) => Err(ApiError::not_found("merchant")),
            (None, Some(n)) => Ok(n.to_owned()),
            (None, None) => Err(ApiError::bad_request(
                "merchant_id is required for a platform key",
            )),
        }
    }

    /// [`Caller::acting_for`], and the merchant must exist.
    pub async fn acting_for_existing(
        &self,
        state: &AppState,
        named: Option<&MerchantId>,
    ) -> ApiResult<String> {
        let m = self.acting_for(named.map(MerchantId::as_str))?;
        if state.store.merchant(&m).await?.is_none() {
            return Err(ApiError::not_found("merchant"));
        }
        Ok(m)
    }
}

/// The key in `Authorization: Bearer`, the only place a key is taken from: a URL ends up in
/// access logs, proxies' logs and browser history (browsers' feed sockets use a ticket).
fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|s| s.trim().to_owned())
}

impl Caller {
    /// The caller a request's `Authorization: Bearer` key names; 401 without a live one.
    pub async fn from_header(state: &AppState, req: &HttpRequest) -> ApiResult<Self> {
        let key = bearer(req).ok_or_else(ApiError::unauthorized)?;
        Self::from_key(state, &key).await
    }

    /// The caller `key` names. Served from memory for a few seconds at most, and never after a
    /// revocation on this node answered (see `store::cache`); its last use is noted in memory
    /// and written at most once a minute.
    pub async fn from_key(state: &AppState, key: &str) -> ApiResult<Self> {
        let row = state.store.api_key_by_hash(&sha256_hex(key)).await?;
        let row = row.ok_or_else(ApiError::unauthorized)?;
        let role: Role = row.role.parse().map_err(|_| ApiError::unauthorized())?;
        let now = state.now();
        if state.access.used(&row.id, now) {
            let store = state.store.clone();
            let id = row.id.clone();
            actix_web::rt::spawn(async move {
                if let Err(e) = store.touch_api_key(&id, now).await {
                    tracing::warn!(key_id = %id, error = %e, "could not record the key's last use");
                }
            });
        }
        Ok(Caller {
            key_id: row.id,
            role,
            merchant: row.merchant_id,
        })
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = req
                .app_data::<web::Data<AppState>>()
                .cloned()
                .ok_or_else(ApiError::unauthorized)?;
            Caller::from_header(&state, &req).await
        })
    }
}

/// A new key and its id: `chk_<idpart>_<secret>` and `k_<idpart>`, the id being the key's
/// visible prefix.
pub fn new_key() -> ApiResult<(String, String)> {
    let part = token(12)?;
    Ok((format!("k_{part}"), format!("chk_{part}_{}", token(40)?)))
}

/// Creates a key; shared by the API and first start. Answers `(id, key)`.
pub async fn issue_key(
    state: &AppState,
    merchant: Option<&str>,
    role: Role,
) -> ApiResult<(String, String)> {
    let (id, key) = new_key()?;
    state
        .store
        .create_api_key(&id, &sha256_hex(&key), merchant, role.as_str(), state.now())
        .await?;
    Ok((id, key))
}
