//! API keys after their creation: listing (never the secret), revocation at once, rotation,
//! and the single-use tickets with which a browser opens its feed socket without putting its
//! key in a URL.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::access::TicketHolder;
use super::auth::{new_key, Caller, Role};
use super::merchants::IssuedKey;
use super::state::AppState;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::secrets::sha256_hex;
use crate::sessions::Audited;
use crate::store::{ApiKeyRecord, Revocation};
use crate::views::{rfc3339, List};

/// An API key as listed: never the key itself.
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    /// Public id (`k_…`, the visible prefix of the key).
    id: String,
    /// Scope; absent for a platform key.
    merchant_id: Option<String>,
    /// Role.
    role: String,
    /// RFC 3339.
    created_at: Option<String>,
    /// RFC 3339: the last request made with it (this node's memory, or as last written).
    last_used_at: Option<String>,
    /// RFC 3339; absent while the key works.
    revoked_at: Option<String>,
    /// The key that replaced it by rotation.
    replaced_by: Option<String>,
}

impl KeyView {
    fn new(k: ApiKeyRecord, state: &AppState) -> Self {
        let last_used = match (k.last_used_at, state.access.last_used(&k.id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Self {
            created_at: rfc3339(k.created_at),
            last_used_at: last_used.and_then(rfc3339),
            revoked_at: k.revoked_at.and_then(rfc3339),
            id: k.id,
            merchant_id: k.merchant_id,
            role: k.role,
            replaced_by: k.replaced_by,
        }
    }
}

/// `GET /api/v1/api-keys` filters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct KeyQuery {
    /// Only this merchant's keys (a merchant_admin key sees only its own merchant's anyway).
    merchant_id: Option<String>,
}

/// The key with this id if the caller may see it: a scoped key sees its merchant's keys only,
/// and another merchant's key, or a platform key, is a 404 like any resource of theirs.
async fn visible_key(state: &AppState, caller: &Caller, id: &str) -> ApiResult<ApiKeyRecord> {
    match state.store.api_key(id).await? {
        Some(k) if caller.merchant.is_none() || k.merchant_id == caller.merchant => Ok(k),
        _ => Err(ApiError::not_found("api key")),
    }
}

/// Lists API keys: the platform's for an admin key (`?merchant_id=` narrows), the merchant's
/// own for a merchant_admin key.
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "merchants", params(KeyQuery),
    security(("bearer" = [])), responses((status = 200, body = List<KeyView>),
    (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
    (status = 404, body = super::ErrorBody, description = "another merchant named")))]
pub async fn list_keys(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<KeyQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let merchant = match (&caller.merchant, q.into_inner().merchant_id) {
        (None, None) => None,
        (_, named) => Some(caller.acting_for(named.as_deref())?),
    };
    let keys = state.store.api_keys(merchant.as_deref()).await?;
    let items: Vec<KeyView> = keys.into_iter().map(|k| KeyView::new(k, &state)).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// Revokes an API key at once: the next request with it is a 401 and the feed sockets it
/// opened close (4401 "key revoked"). The last active admin key cannot be revoked.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "merchants",
    params(("id" = String, Path, description = "key id (k_…)")), security(("bearer" = [])),
    responses((status = 204, description = "revoked (or already revoked)"),
    (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
    (status = 404, body = super::ErrorBody),
    (status = 409, body = super::ErrorBody, description = "last_admin_key")))]
pub async fn revoke_key(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let key = visible_key(&state, &caller, &path).await?;
    match state.store.revoke_api_key(&key.id, state.now()).await? {
        Revocation::Revoked => {
            state.access.revoked(&key.id);
            tracing::info!(key_id = %key.id, by = %caller.key_id, "API key revoked");
            state
                .sessions
                .audit(
                    super::sessions::actor(&caller),
                    Audited {
                        action: "api_key.revoke",
                        merchant_id: key.merchant_id.as_deref(),
                        subject: &key.id,
                        order_id: None,
                        reason: None,
                        detail: serde_json::json!({"role": key.role}),
                    },
                )
                .await;
            Ok(HttpResponse::NoContent().finish())
        }
        Revocation::AlreadyRevoked => Ok(HttpResponse::NoContent().finish()),
        Revocation::LastAdmin => Err(ApiError::new(
            ErrorCode::LastAdminKey,
            "this is the last active admin key: create (or rotate to) another admin key before revoking it",
        )),
        Revocation::NotFound => Err(ApiError::not_found("api key")),
    }
}

/// Replaces an API key by a new one of the same role and scope; the old one is revoked at once.
#[utoipa::path(post, path = "/api/v1/api-keys/{id}/rotate", tag = "merchants",
    params(("id" = String, Path, description = "key id (k_…)")), security(("bearer" = [])),
    responses((status = 201, body = IssuedKey),
    (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
    (status = 404, body = super::ErrorBody),
    (status = 409, body = super::ErrorBody, description = "key_revoked")))]
pub async fn rotate_key(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let old = visible_key(&state, &caller, &path).await?;
    let role: Role = old
        .role
        .parse()
        .map_err(|_| ApiError::internal(format!("key {} has role {:?}", old.id, old.role)))?;
    // A scoped key sees no platform key (404 above); this holds should that ever change.
    if role > caller.role {
        return Err(ApiError::forbidden());
    }
    if old.revoked_at.is_some() {
        return Err(key_revoked(&old.id));
    }
    let (id, key) = new_key()?;
    let Some(new) = state
        .store
        .rotate_api_key(&old.id, &id, &sha256_hex(&key), state.now())
        .await?
    else {
        return Err(key_revoked(&old.id));
    };
    state.access.revoked(&old.id);
    tracing::info!(key_id = %old.id, new_key_id = %id, by = %caller.key_id, "API key rotated");
    state
        .sessions
        .audit(
            super::sessions::actor(&caller),
            Audited {
                action: "api_key.rotate",
                merchant_id: new.merchant_id.as_deref(),
                subject: &old.id,
                order_id: None,
                reason: None,
                detail: serde_json::json!({"role": old.role, "new_key_id": id}),
            },
        )
        .await;
    Ok(HttpResponse::Created().json(IssuedKey::new(id, key, role, new.merchant_id)))
}

fn key_revoked(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::KeyRevoked,
        format!("key {id} is revoked; create a new key instead"),
    )
}

/// A feed ticket.
#[derive(Serialize, ToSchema)]
pub struct FeedTicket {
    /// `ft_…`: open `GET /ws?ticket=…` with it, once, within `expires_in_s`.
    ticket: String,
    /// Seconds it stays valid.
    expires_in_s: u64,
}

/// A single-use, short-lived ticket for `GET /ws?ticket=`, bound to the calling key (its role
/// and scope): browsers cannot set `Authorization` on a WebSocket, and a key in the URL would
/// land in logs.
#[utoipa::path(post, path = "/api/v1/feed-tickets", tag = "feed", security(("bearer" = [])),
    responses((status = 201, body = FeedTicket), (status = 401, body = super::ErrorBody),
    (status = 403, body = super::ErrorBody)))]
pub async fn feed_ticket(state: web::Data<AppState>, caller: Caller) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let ticket = state.access.issue_ticket(TicketHolder {
        key_id: caller.key_id,
        role: caller.role,
        merchant: caller.merchant,
    })?;
    let ttl = state.access.ticket_ttl();
    Ok(HttpResponse::Created().json(FeedTicket {
        ticket,
        expires_in_s: ttl.as_millis().div_ceil(1000) as u64,
    }))
}
