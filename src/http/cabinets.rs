//! Cabinets: registration, activation, live state, configuration, service time, client
//! certificates and commands.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use cabinet_actors::ids::{CabinetId, MerchantId};
use cabinet_actors::machine::CabinetSnapshot;
use cabinet_actors::protocol::{CabinetConfig, CommandBody, LightSchedule, SessionMode};
use cabinet_actors::CommandError;

use super::auth::{Caller, Role};
use super::route;
use super::sessions::{idempotency, start_answer};
use super::state::AppState;
use super::ErrorBody;
use crate::config::valid_hhmm;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::mqtt::auth::DirectoryEntry;
use crate::secrets::{sha256_hex, token};
use crate::sessions::StartSession;
use crate::store::{CabinetRow, StoreError};
use crate::views::{rfc3339, CabinetView, SessionView};

/// Loads a cabinet the caller may see, or 404.
pub(super) async fn visible_cabinet(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<(CabinetId, CabinetRow)> {
    let cid = CabinetId::parse(id).map_err(|_| ApiError::not_found("cabinet"))?;
    match state.store.cabinet(cid.as_str()).await? {
        Some(r) if caller.sees(&r.merchant_id) => Ok((cid, r)),
        _ => Err(ApiError::not_found("cabinet")),
    }
}

/// The live state of a cabinet with an actor on this node; `None` without one.
pub(super) async fn snapshot_of(
    state: &AppState,
    id: &CabinetId,
) -> ApiResult<Option<CabinetSnapshot>> {
    // An actor left behind by a cabinet that moved to another node is not its live state.
    match state
        .registry
        .get(id)
        .filter(|_| state.cluster.serves(id.as_str()))
    {
        Some(cabinet) => cabinet
            .snapshot()
            .await
            .map(Some)
            .map_err(|e| ApiError::new(ErrorCode::ActorUnavailable, e.to_string())),
        None => Ok(None),
    }
}

/// A cabinet's view as JSON, with its live state from wherever its actor is: this node's
/// actor, or the last `cabinet` event another node published for it (`feed::remote_cabinet`),
/// laid over the stored row field by field as a screen merges a delta.
pub(super) fn live_json(
    state: &AppState,
    row: &CabinetRow,
    live: Option<&CabinetSnapshot>,
) -> ApiResult<serde_json::Value> {
    let mut v = serde_json::to_value(view(row, live)?).map_err(ApiError::internal)?;
    if live.is_none() {
        if let Some(remote) = state.feed.remote_cabinet(&row.id) {
            if let (Some(into), Ok(serde_json::Value::Object(from))) = (
                v.as_object_mut(),
                serde_json::from_str::<serde_json::Value>(&remote),
            ) {
                for (k, val) in from {
                    into.insert(k, val);
                }
            }
        }
    }
    Ok(v)
}

/// Tells the other nodes that a cabinet's credentials changed here: their brokers read them
/// again before the cabinet's next connect there (an old secret or a revoked certificate stops
/// working on every node, not only this one).
fn directory_changed(state: &AppState, cid: &CabinetId) {
    state.feed.publish_internal(
        "directory",
        &serde_json::json!({"cabinet_id": cid.as_str()}),
    );
}

/// The view of a stored cabinet; a row whose id no longer parses is a fault of the hub.
pub(super) fn view(row: &CabinetRow, live: Option<&CabinetSnapshot>) -> ApiResult<CabinetView> {
    CabinetView::new(row, live)
        .ok_or_else(|| ApiError::internal(format!("stored cabinet id {:?} is invalid", row.id)))
}

/// `POST /api/v1/cabinets`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCabinet {
    /// Cabinet id (also its MQTT client id).
    #[schema(value_type = String)]
    id: CabinetId,
    /// Owner.
    #[schema(value_type = String)]
    merchant_id: MerchantId,
    /// Model, at most 64 characters.
    #[serde(default)]
    model: String,
    /// Placement (点位), at most 200 characters.
    #[serde(default)]
    point: String,
}

/// Registers a cabinet; the answer carries its MQTT secret, once.
#[utoipa::path(post, path = "/api/v1/cabinets", tag = "cabinets", request_body = NewCabinet,
    security(("bearer" = [])), responses((status = 201, body = CabinetView), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "cabinet_exists")))]
pub async fn register_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewCabinet>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let b = body.into_inner();
    caller
        .acting_for_existing(&state, Some(&b.merchant_id))
        .await?;
    if b.model.len() > 64 || b.point.len() > 200 {
        return Err(ApiError::bad_request(
            "model (≤64) or point (≤200) too long",
        ));
    }
    let secret = token(32)?;
    let row = CabinetRow {
        id: b.id.to_string(),
        merchant_id: b.merchant_id.to_string(),
        model: b.model,
        point: b.point,
        secret_hash: sha256_hex(&secret),
        active: false,
        service_expires_at: None,
        created_at: state.now(),
        activated_at: None,
        keeps_stock: false,
    };
    match state
        .store
        .register_cabinet(
            &row,
            &state.settings.initial_cabinet_config(),
            &caller.key_id,
        )
        .await
    {
        Ok(()) => {}
        Err(StoreError::Conflict) => {
            return Err(ApiError::new(
                ErrorCode::CabinetExists,
                format!("cabinet {} is already registered", row.id),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    state.directory.put(
        b.id.clone(),
        DirectoryEntry {
            merchant: b.merchant_id,
            secret_hash: row.secret_hash.clone(),
            active: false,
        },
    );
    directory_changed(&state, &b.id);
    let mut v = view(&row, None)?;
    v.secret = Some(secret);
    Ok(HttpResponse::Created().json(v))
}

/// Activates a registered cabinet; its service time starts.
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/activate", tag = "cabinets",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = CabinetView), (status = 409, body = ErrorBody, description = "not_registered (设备未维护)")))]
pub async fn activate_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let (cid, row) = match visible_cabinet(&state, &caller, &path).await {
        Ok(found) => found,
        Err(e) if e.code == ErrorCode::NotFound => {
            return Err(ApiError::new(
                ErrorCode::NotRegistered,
                "device not maintained (设备未维护): register the cabinet before activating it",
            ))
        }
        Err(e) => return Err(e),
    };
    let now = state.now();
    let expires = now + i64::from(state.settings.cabinet.initial_service_days) * 86_400_000;
    state
        .store
        .activate_cabinet(cid.as_str(), now, expires)
        .await?;
    let row = state.store.cabinet(cid.as_str()).await?.unwrap_or(row);
    if let Ok(m) = MerchantId::parse(&row.merchant_id) {
        state.directory.put(
            cid.clone(),
            DirectoryEntry {
                merchant: m,
                secret_hash: row.secret_hash.clone(),
                active: true,
            },
        );
    }
    directory_changed(&state, &cid);
    let live = snapshot_of(&state, &cid).await?;
    Ok(HttpResponse::Ok().json(view(&row, live.as_ref())?))
}

/// Every visible cabinet with its live state.
#[derive(Serialize, ToSchema)]
pub struct CabinetList {
    /// The cabinets.
    #[schema(value_type = Vec<CabinetView>)]
    items: Vec<serde_json::Value>,
    /// How many.
    count: usize,
    /// How many are online.
    online: usize,
}

/// `GET /api/v1/cabinets` filters.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CabinetListQuery {
    /// Only activated cabinets whose service ends within this many days (0 to 3650), expired
    /// ones included: the ones to renew (设备使用时长).
    expiring_within_days: Option<u32>,
}

/// Lists the caller's cabinets with their live state.
#[utoipa::path(get, path = "/api/v1/cabinets", tag = "cabinets", params(CabinetListQuery), security(("bearer" = [])),
    responses((status = 200, body = CabinetList), (status = 400, body = ErrorBody)))]
pub async fn list_cabinets(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<CabinetListQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let mut rows = state.store.cabinets(caller.merchant.as_deref()).await?;
    if let Some(days) = q.expiring_within_days {
        if days > 3650 {
            return Err(ApiError::bad_request(
                "expiring_within_days must be between 0 and 3650",
            ));
        }
        let until = state.now() + i64::from(days) * 86_400_000;
        rows.retain(|r| r.active && r.service_expires_at.is_some_and(|e| e < until));
    }
    let snapshots = futures_util::future::join_all(rows.iter().map(|r| {
        let state = state.clone();
        async move {
            match CabinetId::parse(&r.id) {
                Ok(id) => snapshot_of(&state, &id).await.ok().flatten(),
                Err(_) => None,
            }
        }
    }))
    .await;
    let items = rows
        .iter()
        .zip(snapshots.iter())
        .filter_map(|(r, s)| live_json(&state, r, s.as_ref()).ok())
        .collect::<Vec<_>>();
    let online = items
        .iter()
        .filter(|v| v["online"].as_bool() == Some(true))
        .count();
    Ok(HttpResponse::Ok().json(CabinetList {
        count: items.len(),
        items,
        online,
    }))
}

/// One cabinet with its live state.
#[utoipa::path(get, path = "/api/v1/cabinets/{id}", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = CabinetView), (status = 404, body = ErrorBody)))]
pub async fn get_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let live = snapshot_of(&state, &cid).await?;
    Ok(HttpResponse::Ok().json(live_json(&state, &row, live.as_ref())?))
}

/// `PATCH /api/v1/cabinets/{id}/config`: only the settings given change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// -30 to 60.
    temp_target_c: Option<f64>,
    /// `[low, high]`.
    temp_range_c: Option<[f64; 2]>,
    /// Light schedule, `HH:MM`.
    #[schema(value_type = Option<Object>)]
    light: Option<LightSchedule>,
    /// 5 to 600.
    heartbeat_s: Option<u32>,
    /// Lock down when a foreign object is seen.
    foreign_object_lock: Option<bool>,
}

/// A configuration version and whether it went to the cabinet now.
#[derive(Serialize, ToSchema)]
pub struct ConfigPushed {
    /// The new version.
    #[schema(value_type = Object)]
    config: CabinetConfig,
    /// The cabinet is online and was sent it; otherwise it gets it when it connects.
    pushed: bool,
}

/// The desired configuration.
#[derive(Serialize, ToSchema)]
pub struct ConfigAnswer {
    /// The latest version.
    #[schema(value_type = Option<Object>)]
    config: Option<CabinetConfig>,
}

/// Changes the desired configuration: a new version, pushed to the cabinet.
#[utoipa::path(patch, path = "/api/v1/cabinets/{id}/config", tag = "cabinets", params(("id" = String, Path)),
    request_body = ConfigPatch, security(("bearer" = [])),
    responses((status = 200, body = ConfigPushed), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn patch_config(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ConfigPatch>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let p = body.into_inner();
    if p.temp_target_c
        .is_some_and(|t| !(-30.0..=60.0).contains(&t))
    {
        return Err(ApiError::bad_request(
            "temp_target_c must be between -30 and 60",
        ));
    }
    if let Some([lo, hi]) = p.temp_range_c {
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(ApiError::bad_request(
                "temp_range_c must be [low, high] with low < high",
            ));
        }
    }
    if let Some(l) = &p.light {
        if !valid_hhmm(&l.on) || !valid_hhmm(&l.off) {
            return Err(ApiError::bad_request(
                "light.on and light.off must be HH:MM",
            ));
        }
    }
    if p.heartbeat_s.is_some_and(|h| !(5..=600).contains(&h)) {
        return Err(ApiError::bad_request(
            "heartbeat_s must be between 5 and 600",
        ));
    }
    let config = state
        .store
        .new_config_version(cid.as_str(), state.now(), &caller.key_id, |c| {
            let mut n = c.clone();
            if let Some(v) = p.temp_target_c {
                n.temp_target_c = v;
            }
            if let Some(v) = p.temp_range_c {
                n.temp_range_c = v;
            }
            if let Some(v) = &p.light {
                n.light = v.clone();
            }
            if let Some(v) = p.heartbeat_s {
                n.heartbeat_s = v;
            }
            if let Some(v) = p.foreign_object_lock {
                n.foreign_object_lock = v;
            }
            n
        })
        .await?;
    let mut pushed = false;
    if let Some(cabinet) = state
        .registry
        .get(&cid)
        .filter(|_| state.cluster.serves(cid.as_str()))
    {
        pushed = cabinet.snapshot().await.map(|s| s.online).unwrap_or(false);
        cabinet.set_desired(config.clone());
    } else if let Ok(Some(node)) = route::owner_elsewhere(&state, &cid).await {
        // Stored already: the owner pushes it now; an actor started later reads it anyway.
        let call = route::Call::Config {
            cabinet_id: cid.to_string(),
            config: config.clone(),
        };
        if let Ok((reply, _)) = route::carry_reply(&state, &node, &call).await {
            pushed = serde_json::from_str::<serde_json::Value>(&reply.body)
                .is_ok_and(|v| v["pushed"] == true);
        }
    }
    Ok(HttpResponse::Ok().json(ConfigPushed { config, pushed }))
}

/// The desired configuration.
#[utoipa::path(get, path = "/api/v1/cabinets/{id}/config", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = ConfigAnswer), (status = 404, body = ErrorBody)))]
pub async fn get_config(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let config = state.store.latest_config(cid.as_str()).await?;
    Ok(HttpResponse::Ok().json(ConfigAnswer { config }))
}

/// `POST /api/v1/cabinets/{id}/service`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceExtension {
    /// 1 to 10.
    years: u32,
}

/// The new end of a cabinet's service time.
#[derive(Serialize, ToSchema)]
pub struct ServiceExtended {
    /// Cabinet.
    #[schema(value_type = String)]
    id: CabinetId,
    /// RFC 3339.
    service_expires_at: Option<String>,
}

/// Extends a cabinet's service time.
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/service", tag = "cabinets", params(("id" = String, Path)),
    request_body = ServiceExtension, security(("bearer" = [])),
    responses((status = 200, body = ServiceExtended), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn extend_service(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ServiceExtension>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    if !(1..=10).contains(&body.years) {
        return Err(ApiError::bad_request(
            "years must be a whole number from 1 to 10",
        ));
    }
    let base = row.service_expires_at.unwrap_or(0).max(state.now());
    let expires = base + i64::from(body.years) * 365 * 86_400_000;
    state
        .store
        .set_service_expiry(cid.as_str(), expires)
        .await?;
    Ok(HttpResponse::Ok().json(ServiceExtended {
        id: cid,
        service_expires_at: rfc3339(expires),
    }))
}

/// A client certificate for certificate mode: the private key is shown once.
#[derive(Serialize, ToSchema)]
pub struct IssuedCertificate {
    /// Cabinet.
    #[schema(value_type = String)]
    cabinet_id: CabinetId,
    /// Serial (hex).
    serial: String,
    /// Certificate, PEM.
    cert_pem: String,
    /// Private key, PEM.
    key_pem: String,
    /// The hub's device CA, PEM.
    ca_pem: String,
    /// RFC 3339.
    not_after: Option<String>,
    /// Where certificate-mode cabinets connect.
    mqtt_tls_listen: Option<String>,
}

/// Issues a client certificate for the cabinet.
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/certificate", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 201, body = IssuedCertificate), (status = 404, body = ErrorBody)))]
pub async fn issue_certificate(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let issued = state.ca.issue_client(&cid, 825)?;
    let _one_at_a_time = CERTIFICATE_CHANGES.lock().await;
    state
        .store
        .record_certificate(
            &issued.serial,
            cid.as_str(),
            state.now(),
            issued.not_after_ms,
        )
        .await?;
    // The new certificate is the only valid one from now on: a lost or leaked earlier one
    // cannot connect again.
    sync_certificates(&state, &cid).await?;
    Ok(HttpResponse::Created().json(IssuedCertificate {
        cabinet_id: cid,
        serial: issued.serial,
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: issued.ca_pem,
        not_after: rfc3339(issued.not_after_ms),
        mqtt_tls_listen: state.settings.mqtt.tls_listen.map(|a| a.to_string()),
    }))
}

/// Certificate issues and revocations one at a time, so that the broker's list is written in
/// the order the database was (two overlapping requests could otherwise leave it trusting a
/// serial the database has revoked). Rare operations: one lock for the node is enough.
static CERTIFICATE_CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Hands the broker the cabinet's valid serials as the database now has them.
async fn sync_certificates(state: &AppState, cid: &CabinetId) -> ApiResult<()> {
    let serials = state.store.valid_certificates_of(cid.as_str()).await?;
    let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
    state.directory.set_certificates(cid.clone(), &serials);
    directory_changed(state, cid);
    Ok(())
}

/// A new MQTT secret for the cabinet, shown once: the old one stops working at the next
/// connect (a cabinet connected with it keeps its connection until it ends).
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/secret", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = CabinetView, description = "with `secret`, shown once"), (status = 404, body = ErrorBody)))]
pub async fn rotate_secret(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let secret = token(32)?;
    let hash = sha256_hex(&secret);
    if !state.store.set_cabinet_secret(cid.as_str(), &hash).await? {
        return Err(ApiError::not_found("cabinet"));
    }
    if let Some(mut entry) = state.directory.get(&cid) {
        entry.secret_hash = hash.clone();
        state.directory.put(cid.clone(), entry);
    }
    directory_changed(&state, &cid);
    let row = CabinetRow {
        secret_hash: hash,
        ..row
    };
    let live = snapshot_of(&state, &cid).await?;
    let mut v = view(&row, live.as_ref())?;
    v.secret = Some(secret);
    Ok(HttpResponse::Ok().json(v))
}

/// Revokes the cabinet's client certificate: it cannot connect again (a connection already
/// open keeps running until it ends; lock the cabinet down to stop it at once).
#[utoipa::path(delete, path = "/api/v1/cabinets/{id}/certificate", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody, description = "no such cabinet, or no valid certificate")))]
pub async fn revoke_certificate(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let _one_at_a_time = CERTIFICATE_CHANGES.lock().await;
    let revoked = state
        .store
        .revoke_certificates(cid.as_str(), state.now())
        .await?;
    sync_certificates(&state, &cid).await?;
    if revoked == 0 {
        return Err(ApiError::not_found("certificate"));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/v1/cabinets/{id}/commands`.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandRequest {
    /// Unlock for restocking (purchases go through sessions): a restock session started as
    /// `POST /api/v1/sessions` starts one, with the same checks, answered the same way.
    Unlock {
        /// Must be `restock`.
        #[schema(value_type = String)]
        mode: SessionMode,
        /// Not accepted: the hub names the session, and the answer carries it.
        #[serde(default)]
        session_id: Option<String>,
    },
    /// Lock the cabinet down, or lift it.
    Lockdown {
        /// On or off.
        on: bool,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
    /// Reboot.
    Reboot,
}

/// How a command ended.
#[derive(Serialize, ToSchema)]
pub struct CommandAnswer {
    /// Cabinet.
    #[schema(value_type = String)]
    cabinet_id: CabinetId,
    /// The outcome: `cmd_id`, `type`, `outcome` (`ok`, `rejected`, `timeout`, `not_connected`),
    /// `elapsed_ms`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    result: serde_json::Value,
}

/// Sends a command and answers its truthful outcome. An `unlock` (restock) is a restock
/// session: the same checks and answers as `POST /api/v1/sessions`, recorded under the
/// restocker's key id as its `user_id`.
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/commands", tag = "cabinets", params(("id" = String, Path),
    ("Idempotency-Key" = Option<String>, Header, description = "unlock: a repeat answers the first result")),
    request_body = CommandRequest, security(("bearer" = [])),
    responses((status = 200, body = CommandAnswer, description = "lockdown, reboot"),
    (status = 201, body = SessionView, description = "unlock: the restock session, once the cabinet acked"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "cabinet_not_active, cabinet_busy, cabinet_faulted (also locked down), unlock_rejected, request_in_progress"),
    (status = 422, body = ErrorBody, description = "service_expired, idempotency_key_reused"),
    (status = 503, body = ErrorBody, description = "cabinet_offline, unlock_timeout")))]
pub async fn send_command(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<CommandRequest>,
) -> ApiResult<HttpResponse> {
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let body = match body.into_inner() {
        CommandRequest::Unlock { mode, session_id } => {
            // Purchase unlocks belong to sessions (POST /api/v1/sessions); by hand only restock.
            if mode != SessionMode::Restock {
                return Err(ApiError::bad_request("type: unlock by command is for mode \"restock\"; purchases go through /api/v1/sessions"));
            }
            caller.require(Role::Restocker)?;
            if session_id.is_some() {
                return Err(ApiError::bad_request(
                    "session_id: the hub names the session; the answer carries it",
                ));
            }
            // Every door opened by hand goes through the session checks (faulted, locked down,
            // busy, expired, offline) and is recorded: no unlock bypasses them.
            let start = StartSession {
                cabinet_id: cid.to_string(),
                user_id: caller.key_id.clone(),
                channel: None,
                mode,
                planned: None,
            };
            // The caller is part of the request: two restockers' keys reusing one
            // Idempotency-Key must not get each other's session.
            let idem = idempotency(
                &req,
                &serde_json::json!({"type": "unlock", "mode": "restock", "by": caller.key_id}),
            )?;
            if let Some(node) = route::owner_elsewhere(&state, &cid).await? {
                let call = route::Call::Start {
                    caller: caller.clone(),
                    body: start,
                    idem,
                };
                return route::carry(&state, &node, &call).await;
            }
            return Ok(start_answer(&state, &caller, start, idem).await);
        }
        CommandRequest::Lockdown { on, reason } => {
            caller.require(Role::Operator)?;
            CommandBody::Lockdown {
                on,
                reason: reason.or(Some("operator".into())),
            }
        }
        CommandRequest::Reboot => {
            caller.require(Role::Operator)?;
            CommandBody::Reboot
        }
    };
    if !row.active {
        return Err(ApiError::new(
            ErrorCode::CabinetNotActive,
            "the cabinet is not activated",
        ));
    }
    if let Some(node) = route::owner_elsewhere(&state, &cid).await? {
        let call = route::Call::Command {
            cabinet_id: cid.to_string(),
            body,
        };
        return route::carry(&state, &node, &call).await;
    }
    let Some(cabinet) = state.registry.get(&cid) else {
        // No actor: the cabinet has not connected since the hub started; never sent.
        return Ok(HttpResponse::Ok().json(CommandAnswer {
            cabinet_id: cid,
            result: serde_json::json!({"type": body.kind(), "outcome": "not_connected", "elapsed_ms": 0}),
        }));
    };
    let result = cabinet.command(body).await.map_err(|e| match e {
        CommandError::Unreachable(u) => ApiError::new(ErrorCode::ActorUnavailable, u.to_string()),
        CommandError::Restarted => ApiError::new(ErrorCode::ActorRestarted, e.to_string()),
    })?;
    let result = serde_json::to_value(&result).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(CommandAnswer {
        cabinet_id: cid,
        result,
    }))
}
