//! The HTTP API (API.md): merchants, API keys, cabinets, configuration, commands, alerts,
//! health and metrics. Every endpoint enforces role and merchant scope; another merchant's
//! resource is a 404.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::{json, Value};

use cabinet_actors::actor::{AckAlert, ClearAlert, GetSnapshot, SendCommand, SetDesired};
use cabinet_actors::alert::AlertType;
use cabinet_actors::ids::{CabinetId, MerchantId};
use cabinet_actors::machine::CabinetSnapshot;
use cabinet_actors::protocol::{CommandBody, LightSchedule, SessionMode};

use crate::app::AppState;
use crate::config::valid_hhmm;
use crate::mqtt::DirectoryEntry;
use crate::secrets::{sha256_hex, token};
use crate::store::{AlertFilter, CabinetRow, MerchantRow, StoreError};

/// An API error: one wire shape, stable codes, an exhaustive status mapping.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("missing or unknown API key")]
    Unauthorized,
    /// 404; also for other merchants' resources.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 403 for a role that may not do this at all (the resource's existence is not leaked:
    /// role checks come before any lookup).
    #[error("the key's role may not do this")]
    Forbidden,
    /// 409 with a code.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 422 with a code: a rule of the business refuses it.
    #[error("{1}")]
    Unprocessable(&'static str, String),
    /// 503 with a code.
    #[error("{1}")]
    Unavailable(&'static str, String),
    /// 500.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.into())
    }
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden => "forbidden",
            ApiError::Conflict(code, _)
            | ApiError::Unprocessable(code, _)
            | ApiError::Unavailable(code, _) => code,
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::Unprocessable(..) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(e) = self {
            tracing::error!(error = %format!("{e:#}"), "request failed");
        }
        let mut b = HttpResponse::build(self.status_code());
        if let ApiError::Unavailable(..) = self {
            b.insert_header(("Retry-After", "5"));
        }
        if let ApiError::Unauthorized = self {
            b.insert_header(("WWW-Authenticate", "Bearer"));
        }
        b.json(json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}

pub(crate) type ApiResult<T = HttpResponse> = Result<T, ApiError>;

/// Key roles, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "viewer" => Role::Viewer,
            "restocker" => Role::Restocker,
            "operator" => Role::Operator,
            "merchant_admin" => Role::MerchantAdmin,
            "admin" => Role::Admin,
            _ => return None,
        })
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Restocker => "restocker",
            Role::Operator => "operator",
            Role::MerchantAdmin => "merchant_admin",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Key id (audit).
    pub key_id: String,
    /// Role.
    pub role: Role,
    /// Scope; `None` for admin.
    pub merchant: Option<String>,
}

impl Caller {
    pub(crate) fn require(&self, min: Role) -> ApiResult<()> {
        if self.role >= min {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    pub(crate) fn sees(&self, merchant_id: &str) -> bool {
        self.merchant.as_deref().is_none_or(|m| m == merchant_id)
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        return h.strip_prefix("Bearer ").map(|s| s.trim().to_owned());
    }
    // Browsers cannot set headers on a WebSocket: `?token=` is accepted too.
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let key = bearer(req);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let (Some(key), Some(state)) = (key, state) else {
                return Err(ApiError::Unauthorized);
            };
            let row = state.store.api_key_by_hash(&sha256_hex(&key)).await?;
            let row = row.ok_or(ApiError::Unauthorized)?;
            let role = Role::parse(&row.role).ok_or(ApiError::Unauthorized)?;
            Ok(Caller {
                key_id: row.id,
                role,
                merchant: row.merchant_id,
            })
        })
    }
}

pub(crate) fn rfc3339(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn parse_cabinet_id(s: &str) -> ApiResult<CabinetId> {
    CabinetId::parse(s).map_err(|_| ApiError::NotFound("cabinet"))
}

/// Loads a cabinet the caller may see, or 404.
pub(crate) async fn visible_cabinet(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<(CabinetId, CabinetRow)> {
    let cid = parse_cabinet_id(id)?;
    let row = state.store.cabinet(cid.as_str()).await?;
    match row {
        Some(r) if caller.sees(&r.merchant_id) => Ok((cid, r)),
        _ => Err(ApiError::NotFound("cabinet")),
    }
}

/// A cabinet as the API shows it: registration plus live state from its actor.
pub(crate) fn cabinet_view(row: &CabinetRow, live: Option<&CabinetSnapshot>) -> Value {
    let offline = CabinetSnapshot {
        id: match CabinetId::parse(&row.id) {
            Ok(i) => i,
            Err(_) => return json!({"id": row.id}),
        },
        online: false,
        door: None,
        lock: None,
        cameras: vec![],
        temp_c: None,
        light: None,
        boot_id: None,
        fw: None,
        model: None,
        config_version_desired: None,
        config_version_reported: None,
        faulted: false,
        locked_down: false,
        alerts: vec![],
        session: None,
        last_seen_ms: None,
    };
    let mut v = live_view(live.unwrap_or(&offline));
    if let Value::Object(m) = &mut v {
        m.insert("merchant_id".into(), json!(row.merchant_id));
        m.insert("model".into(), json!(row.model));
        m.insert("point".into(), json!(row.point));
        m.insert(
            "status".into(),
            json!(if row.active { "active" } else { "registered" }),
        );
        m.insert("registered_at".into(), json!(rfc3339(row.created_at)));
        m.insert(
            "activated_at".into(),
            json!(row.activated_at.and_then(rfc3339)),
        );
        m.insert(
            "service_expires_at".into(),
            json!(row.service_expires_at.and_then(rfc3339)),
        );
        m.insert("actor".into(), json!(live.is_some()));
    }
    v
}

/// An active alert as the API and the feed show it.
pub(crate) fn active_alert_view(a: &cabinet_actors::alert::ActiveAlert) -> Value {
    json!({"id": a.id, "type": a.kind, "severity": a.kind.severity(), "raised_at": rfc3339(a.raised_at as i64),
           "acked": a.acked, "detail": a.detail})
}

/// A cabinet's live state as the API and the feed's `cabinet` events show it (the same shape in
/// both, so a screen merges a delta into its snapshot row field by field).
pub(crate) fn live_view(s: &CabinetSnapshot) -> Value {
    let alerts: Vec<Value> = s.alerts.iter().map(active_alert_view).collect();
    json!({
        "id": s.id,
        "online": s.online,
        "door": s.door,
        "lock": s.lock,
        "cameras": s.cameras,
        "temp_c": s.temp_c,
        "light": s.light,
        "fw": s.fw,
        "reported_model": s.model,
        "boot_id": s.boot_id,
        "config_version": {"desired": s.config_version_desired, "reported": s.config_version_reported},
        "faulted": s.faulted,
        "locked_down": s.locked_down,
        "alerts": alerts,
        "session": s.session,
        "last_seen_at": s.last_seen_ms.and_then(|m| rfc3339(m as i64)),
    })
}

pub(crate) async fn snapshot_of(
    state: &AppState,
    id: &CabinetId,
) -> ApiResult<Option<CabinetSnapshot>> {
    match state.registry.get(id) {
        Some(addr) => addr.send(GetSnapshot).await.map(Some).map_err(|e| {
            ApiError::Unavailable(
                "actor_unavailable",
                format!("cabinet actor did not answer: {e}"),
            )
        }),
        None => Ok(None),
    }
}

// ---- health ----------------------------------------------------------------------------------

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let db = state.store.ping().await.is_ok();
    let pump = state.pump_alive.load(Ordering::SeqCst);
    let broker = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(state.mqtt_probe),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let ready = db && pump && broker;
    let body = json!({"ready": ready, "database": db, "broker": broker && pump, "redis": "not_configured"});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("../docs/openapi.json"))
}

// ---- merchants and keys ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMerchant {
    id: MerchantId,
    name: String,
    #[serde(default)]
    commission_bps: i64,
}

async fn create_merchant(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewMerchant>,
) -> ApiResult {
    caller.require(Role::Admin)?;
    let b = body.into_inner();
    if !(0..=3000).contains(&b.commission_bps) {
        return Err(ApiError::BadRequest(
            "commission_bps must be between 0 and 3000 (30%)".into(),
        ));
    }
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::BadRequest(
            "name must be 1 to 200 characters".into(),
        ));
    }
    let row = MerchantRow {
        id: b.id.to_string(),
        name: b.name,
        commission_bps: b.commission_bps,
        created_at: state.now(),
    };
    match state.store.create_merchant(&row).await {
        Ok(()) => Ok(HttpResponse::Created().json(json!({"id": row.id, "name": row.name, "commission_bps": row.commission_bps, "created_at": rfc3339(row.created_at)}))),
        Err(StoreError::Conflict) => Err(ApiError::Conflict("merchant_exists", format!("merchant {} exists", row.id))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    merchant_id: Option<MerchantId>,
    role: String,
}

/// Creates a key; shared by the API and first start.
pub async fn issue_key(
    state: &AppState,
    merchant: Option<&str>,
    role: Role,
) -> ApiResult<(String, String)> {
    let id = format!(
        "k_{}",
        token(12).map_err(|_| anyhow::anyhow!("no randomness"))?
    );
    let key = format!(
        "chk_{}_{}",
        &id[2..],
        token(40).map_err(|_| anyhow::anyhow!("no randomness"))?
    );
    state
        .store
        .create_api_key(&id, &sha256_hex(&key), merchant, role.as_str(), state.now())
        .await?;
    Ok((id, key))
}

async fn create_key(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewKey>,
) -> ApiResult {
    caller.require(Role::MerchantAdmin)?;
    let b = body.into_inner();
    let role = Role::parse(&b.role).ok_or_else(|| {
        ApiError::BadRequest(
            "role must be one of admin, merchant_admin, operator, restocker, viewer".into(),
        )
    })?;
    if role > caller.role {
        return Err(ApiError::Forbidden);
    }
    let merchant = match (role, b.merchant_id) {
        (Role::Admin, None) => None,
        (Role::Admin, Some(_)) => {
            return Err(ApiError::BadRequest(
                "merchant_id: an admin key is platform-wide".into(),
            ))
        }
        (_, None) => {
            return Err(ApiError::BadRequest(
                "merchant_id is required for this role".into(),
            ))
        }
        (_, Some(m)) => {
            if !caller.sees(m.as_str()) || state.store.merchant(m.as_str()).await?.is_none() {
                return Err(ApiError::NotFound("merchant"));
            }
            Some(m.to_string())
        }
    };
    let (id, key) = issue_key(&state, merchant.as_deref(), role).await?;
    Ok(HttpResponse::Created()
        .json(json!({"id": id, "key": key, "role": role.as_str(), "merchant_id": merchant})))
}

// ---- cabinets --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCabinet {
    id: CabinetId,
    merchant_id: MerchantId,
    #[serde(default)]
    model: String,
    #[serde(default)]
    point: String,
}

async fn register_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewCabinet>,
) -> ApiResult {
    caller.require(Role::MerchantAdmin)?;
    let b = body.into_inner();
    if !caller.sees(b.merchant_id.as_str())
        || state
            .store
            .merchant(b.merchant_id.as_str())
            .await?
            .is_none()
    {
        return Err(ApiError::NotFound("merchant"));
    }
    if b.model.len() > 64 || b.point.len() > 200 {
        return Err(ApiError::BadRequest(
            "model (≤64) or point (≤200) too long".into(),
        ));
    }
    let secret = token(32).map_err(|_| anyhow::anyhow!("no randomness"))?;
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
            return Err(ApiError::Conflict(
                "cabinet_exists",
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
    let mut v = cabinet_view(&row, None);
    v["secret"] = json!(secret);
    Ok(HttpResponse::Created().json(v))
}

async fn activate_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::MerchantAdmin)?;
    let not_registered = || {
        ApiError::Conflict(
            "not_registered",
            "device not maintained (设备未维护): register the cabinet before activating it".into(),
        )
    };
    let Ok((cid, row)) = visible_cabinet(&state, &caller, &path).await else {
        return Err(not_registered());
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
    let live = snapshot_of(&state, &cid).await?;
    Ok(HttpResponse::Ok().json(cabinet_view(&row, live.as_ref())))
}

async fn list_cabinets(state: web::Data<AppState>, caller: Caller) -> ApiResult {
    caller.require(Role::Viewer)?;
    let rows = state.store.cabinets(caller.merchant.as_deref()).await?;
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
    let items: Vec<Value> = rows
        .iter()
        .zip(snapshots.iter())
        .map(|(r, s)| cabinet_view(r, s.as_ref()))
        .collect();
    let online = snapshots
        .iter()
        .filter(|s| s.as_ref().is_some_and(|s| s.online))
        .count();
    Ok(HttpResponse::Ok().json(json!({"items": items, "count": items.len(), "online": online})))
}

async fn get_cabinet(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let live = snapshot_of(&state, &cid).await?;
    Ok(HttpResponse::Ok().json(cabinet_view(&row, live.as_ref())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigPatch {
    temp_target_c: Option<f64>,
    temp_range_c: Option<[f64; 2]>,
    light: Option<LightSchedule>,
    heartbeat_s: Option<u32>,
    foreign_object_lock: Option<bool>,
}

async fn patch_config(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ConfigPatch>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let p = body.into_inner();
    if let Some(t) = p.temp_target_c {
        if !(-30.0..=60.0).contains(&t) {
            return Err(ApiError::BadRequest(
                "temp_target_c must be between -30 and 60".into(),
            ));
        }
    }
    if let Some([lo, hi]) = p.temp_range_c {
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(ApiError::BadRequest(
                "temp_range_c must be [low, high] with low < high".into(),
            ));
        }
    }
    if let Some(l) = &p.light {
        if !valid_hhmm(&l.on) || !valid_hhmm(&l.off) {
            return Err(ApiError::BadRequest(
                "light.on and light.off must be HH:MM".into(),
            ));
        }
    }
    if let Some(h) = p.heartbeat_s {
        if !(5..=600).contains(&h) {
            return Err(ApiError::BadRequest(
                "heartbeat_s must be between 5 and 600".into(),
            ));
        }
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
    let mut online = false;
    if let Some(addr) = state.registry.get(&cid) {
        online = addr
            .send(GetSnapshot)
            .await
            .map(|s| s.online)
            .unwrap_or(false);
        addr.do_send(SetDesired(config.clone()));
    }
    Ok(HttpResponse::Ok().json(json!({"config": config, "pushed": online})))
}

async fn whoami(caller: Caller) -> ApiResult {
    Ok(HttpResponse::Ok().json(json!({"key_id": caller.key_id, "role": caller.role.as_str(), "merchant_id": caller.merchant})))
}

async fn get_config(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let config = state.store.latest_config(cid.as_str()).await?;
    Ok(HttpResponse::Ok().json(json!({"config": config})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceExtension {
    years: u32,
}

async fn extend_service(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ServiceExtension>,
) -> ApiResult {
    caller.require(Role::Admin)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    if !(1..=10).contains(&body.years) {
        return Err(ApiError::BadRequest(
            "years must be a whole number from 1 to 10".into(),
        ));
    }
    let base = row.service_expires_at.unwrap_or(0).max(state.now());
    let expires = base + i64::from(body.years) * 365 * 86_400_000;
    state
        .store
        .set_service_expiry(cid.as_str(), expires)
        .await?;
    Ok(HttpResponse::Ok().json(json!({"id": cid, "service_expires_at": rfc3339(expires)})))
}

async fn issue_certificate(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::MerchantAdmin)?;
    let (cid, _) = visible_cabinet(&state, &caller, &path).await?;
    let issued = state.ca.issue_client(&cid, 825)?;
    state
        .store
        .record_certificate(
            &issued.serial,
            cid.as_str(),
            state.now(),
            issued.not_after_ms,
        )
        .await?;
    Ok(HttpResponse::Created().json(json!({
        "cabinet_id": cid, "serial": issued.serial, "cert_pem": issued.cert_pem, "key_pem": issued.key_pem,
        "ca_pem": issued.ca_pem, "not_after": rfc3339(issued.not_after_ms),
        "mqtt_tls_listen": state.settings.mqtt.tls_listen.map(|a| a.to_string()),
    })))
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum CommandRequest {
    Unlock {
        mode: SessionMode,
        #[serde(default)]
        session_id: Option<String>,
    },
    Lockdown {
        on: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    Reboot,
}

async fn send_command(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<CommandRequest>,
) -> ApiResult {
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let body = match body.into_inner() {
        CommandRequest::Unlock { mode, session_id } => {
            // Purchase unlocks belong to sessions (POST /api/v1/sessions); by hand only restock.
            if mode != SessionMode::Restock {
                return Err(ApiError::BadRequest("type: unlock by command is for mode \"restock\"; purchases go through /api/v1/sessions".into()));
            }
            caller.require(Role::Restocker)?;
            let session_id = match session_id {
                Some(s) if !s.is_empty() && s.len() <= 64 => s,
                Some(_) => {
                    return Err(ApiError::BadRequest(
                        "session_id must be 1 to 64 characters".into(),
                    ))
                }
                None => format!(
                    "r_{}",
                    token(20).map_err(|_| anyhow::anyhow!("no randomness"))?
                ),
            };
            let expires_at = (state.now() as u64) + state.settings.cabinet.unlock_ack_timeout_ms;
            CommandBody::Unlock {
                session_id,
                mode,
                expires_at,
            }
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
        return Err(ApiError::Conflict(
            "cabinet_not_active",
            "the cabinet is not activated".into(),
        ));
    }
    let Some(addr) = state.registry.get(&cid) else {
        // No actor: the cabinet has not connected since the hub started; never sent.
        return Ok(HttpResponse::Ok().json(json!({"cabinet_id": cid, "type": body.kind(), "outcome": "not_connected", "elapsed_ms": 0})));
    };
    let result = addr
        .send(SendCommand(body))
        .await
        .map_err(|e| {
            ApiError::Unavailable(
                "actor_unavailable",
                format!("cabinet actor did not answer: {e}"),
            )
        })?
        .map_err(|e| ApiError::Unavailable("actor_restarted", e.to_string()))?;
    let mut v = serde_json::to_value(&result).map_err(anyhow::Error::from)?;
    v["cabinet_id"] = json!(cid);
    Ok(HttpResponse::Ok().json(v))
}

// ---- alerts ----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertQuery {
    active: Option<bool>,
    cabinet_id: Option<String>,
    limit: Option<i64>,
    #[allow(dead_code)]
    token: Option<String>,
}

fn alert_view(a: &crate::store::AlertRow) -> Value {
    json!({
        "id": a.id, "cabinet_id": a.cabinet_id, "merchant_id": a.merchant_id, "type": a.kind,
        "severity": a.severity, "detail": a.detail, "raised_at": rfc3339(a.raised_at),
        "acked_at": a.acked_at.and_then(rfc3339), "acked_by": a.acked_by,
        "cleared_at": a.cleared_at.and_then(rfc3339), "cleared_by": a.cleared_by,
        "active": a.cleared_at.is_none(),
    })
}

async fn list_alerts(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<AlertQuery>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let q = q.into_inner();
    let rows = state
        .store
        .alerts(&AlertFilter {
            merchant_id: caller.merchant.clone(),
            cabinet_id: q.cabinet_id,
            active: q.active,
            limit: q.limit.unwrap_or(500).clamp(1, 5000),
        })
        .await?;
    let items: Vec<Value> = rows.iter().map(alert_view).collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "count": items.len()})))
}

async fn visible_alert(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<crate::store::AlertRow> {
    match state.store.alert(id).await? {
        Some(a) if caller.sees(&a.merchant_id) => Ok(a),
        _ => Err(ApiError::NotFound("alert")),
    }
}

async fn ack_alert(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let a = visible_alert(&state, &caller, &path).await?;
    state
        .store
        .ack_alert(&a.id, &caller.key_id, state.now())
        .await?;
    if let (Some(kind), Ok(cid)) = (AlertType::parse(&a.kind), CabinetId::parse(&a.cabinet_id)) {
        if let Some(addr) = state.registry.get(&cid) {
            let _ = addr.send(AckAlert(kind)).await;
        }
    }
    let a = visible_alert(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(alert_view(&a)))
}

async fn clear_alert(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let a = visible_alert(&state, &caller, &path).await?;
    if a.cleared_at.is_some() {
        return Ok(HttpResponse::Ok().json(alert_view(&a)));
    }
    // History first, so the answer below already shows the clear; the actor's own write of
    // the same clear is then a no-op.
    state
        .store
        .clear_alert(&a.id, &caller.key_id, state.now())
        .await?;
    if let (Some(kind), Ok(cid)) = (AlertType::parse(&a.kind), CabinetId::parse(&a.cabinet_id)) {
        if let Some(addr) = state.registry.get(&cid) {
            let _ = addr
                .send(ClearAlert {
                    kind,
                    by: caller.key_id.clone(),
                })
                .await;
        }
    }
    let a = visible_alert(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(alert_view(&a)))
}

fn json_error(err: actix_web::error::JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("body: {err}")).into()
}

fn query_error(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("query: {err}")).into()
}

fn path_error(err: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("path: {err}")).into()
}

/// Mounts every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(64 * 1024)
            .error_handler(json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .app_data(web::PathConfig::default().error_handler(path_error))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(readyz))
    .route("/metrics", web::get().to(metrics))
    .route("/api/openapi.json", web::get().to(openapi))
    .configure(crate::api_sessions::configure_sim_control)
    .configure(crate::api_feed::configure)
    .configure(crate::web::configure)
    .service(
        crate::api_sessions::configure(crate::api_catalog::configure(web::scope("/api/v1")))
            .route("/me", web::get().to(whoami))
            .route("/merchants", web::post().to(create_merchant))
            .route("/api-keys", web::post().to(create_key))
            .route("/cabinets", web::post().to(register_cabinet))
            .route("/cabinets", web::get().to(list_cabinets))
            .route("/cabinets/{id}", web::get().to(get_cabinet))
            .route("/cabinets/{id}/activate", web::post().to(activate_cabinet))
            .route(
                "/cabinets/{id}/certificate",
                web::post().to(issue_certificate),
            )
            .route("/cabinets/{id}/config", web::patch().to(patch_config))
            .route("/cabinets/{id}/config", web::get().to(get_config))
            .route("/cabinets/{id}/service", web::post().to(extend_service))
            .route("/cabinets/{id}/commands", web::post().to(send_command))
            .route("/alerts", web::get().to(list_alerts))
            .route("/alerts/{id}/ack", web::post().to(ack_alert))
            .route("/alerts/{id}/clear", web::post().to(clear_alert)),
    )
    .default_service(web::to(|| async {
        ApiError::NotFound("route").error_response()
    }));
}
