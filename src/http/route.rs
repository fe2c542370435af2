//! Requests that need a cabinet's actor, when the actor lives on another node (several nodes,
//! Redis): the request is checked and authenticated here, then carried to the owner
//! (`cluster::calls`), which does the actor's part and answers through this node. The owner
//! is the node holding the cabinet's lease, i.e. the one its MQTT connection landed on.
//!
//! What travels is the checked request and who made it (never an API key), and the owner
//! answers with the status and body this node would have answered.

use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use cabinet_actors::alert::AlertType;
use cabinet_actors::handle::CabinetHandle;
use cabinet_actors::ids::CabinetId;
use cabinet_actors::protocol::{CabinetConfig, CommandBody};
use cabinet_actors::CommandError;

use super::auth::Caller;
use super::state::AppState;
use crate::cluster::calls::{CallError, Reply};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::sessions::{Idempotency, StartSession};

/// How often a carried request's wait checks that its node still owns the cabinet.
const OWNER_RECHECK: Duration = Duration::from_millis(250);

/// A request carried to the cabinet's owner.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Call {
    /// `POST /api/v1/sessions` (and a restock unlock by command).
    Start {
        /// Who asked (their scope and role were checked here).
        caller: Caller,
        /// The request.
        body: StartSession,
        /// Its idempotency key.
        idem: Option<Idempotency>,
    },
    /// A command to the cabinet.
    Command {
        /// Cabinet.
        cabinet_id: String,
        /// What to do.
        body: CommandBody,
    },
    /// A new desired configuration (stored already): push it.
    Config {
        /// Cabinet.
        cabinet_id: String,
        /// The configuration.
        config: CabinetConfig,
    },
    /// An alert acknowledged (stored already): the actor's copy.
    AlertAck {
        /// Cabinet.
        cabinet_id: String,
        /// Which.
        alert: AlertType,
    },
    /// An alert cleared by hand (stored already): the actor's copy.
    AlertClear {
        /// Cabinet.
        cabinet_id: String,
        /// Which.
        alert: AlertType,
        /// The key id that cleared it.
        by: String,
    },
}

impl Call {
    /// The cabinet it is for.
    fn cabinet(&self) -> &str {
        match self {
            Call::Start { body, .. } => &body.cabinet_id,
            Call::Command { cabinet_id, .. }
            | Call::Config { cabinet_id, .. }
            | Call::AlertAck { cabinet_id, .. }
            | Call::AlertClear { cabinet_id, .. } => cabinet_id,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Call::Start { .. } => "start",
            Call::Command { .. } => "command",
            Call::Config { .. } => "config",
            Call::AlertAck { .. } => "alert_ack",
            Call::AlertClear { .. } => "alert_clear",
        }
    }
}

/// The node to carry a request for `cid` to: `None` when this node serves it (a single node,
/// an actor here, or this node holds the lease); a `cabinet_offline` refusal when no node does.
pub async fn owner_elsewhere(state: &AppState, cid: &CabinetId) -> ApiResult<Option<String>> {
    // The lease decides, not an actor here: one left behind by a cabinet that moved stays.
    if state.cluster.serves(cid.as_str()) {
        return Ok(None);
    }
    match state.cluster.owner(cid.as_str()).await {
        Ok(Some(o)) if o.node != state.cluster.node_id() => Ok(Some(o.node)),
        Ok(Some(_)) => Ok(None),
        Ok(None) => {
            state
                .metrics
                .routed_calls
                .with_label_values(&["sent", "no_owner"])
                .inc();
            Err(ApiError::new(
                ErrorCode::CabinetOffline,
                "the cabinet is not connected to any node",
            ))
        }
        Err(e) => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("cannot tell which node serves the cabinet: {e}"),
        )),
    }
}

/// How long a carried request may take: a session start waits for the cabinet's unlock ack.
fn call_timeout(state: &AppState) -> Duration {
    Duration::from_millis(state.settings.cabinet.unlock_ack_timeout_ms + 10_000)
}

/// Carries `call` to `node`: its reply and the hop's time (the round trip less the owner's
/// own work), counted and observed.
pub async fn carry_reply(
    state: &AppState,
    node: &str,
    call: &Call,
) -> ApiResult<(Reply, Duration)> {
    let kind = call.kind();
    let body = serde_json::to_string(call).map_err(ApiError::internal)?;
    let started = Instant::now();
    // The owner may die with the request in its stream: once the cabinet's lease is no longer
    // that node's (the cabinet reconnected elsewhere, or the lease ran out), waiting on for its
    // answer only keeps the caller from asking again, which now reaches the new owner.
    let moved = async {
        loop {
            tokio::time::sleep(OWNER_RECHECK).await;
            // Redis not answering says nothing about the owner: wait on.
            match state.cluster.owner(call.cabinet()).await {
                Ok(Some(o)) if o.node == node => {}
                Ok(_) => return,
                Err(_) => {}
            }
        }
    };
    let reply = tokio::select! {
        r = state.cluster.call(node, kind, &body, call_timeout(state)) => r,
        () = moved => {
            state.metrics.routed_calls.with_label_values(&["sent", "owner_moved"]).inc();
            return Err(ApiError::new(
                ErrorCode::NodeUnavailable,
                format!("node {node}, which served the cabinet, no longer does (it stopped, or the cabinet moved) and did not answer; ask again"),
            ));
        }
    };
    let outcome = match &reply {
        Ok(_) => "ok",
        Err(CallError::Timeout(_)) => "timeout",
        Err(CallError::Cluster(_)) => "error",
    };
    state
        .metrics
        .routed_calls
        .with_label_values(&["sent", outcome])
        .inc();
    let reply = reply.map_err(|e| match e {
        CallError::Timeout(n) => ApiError::new(
            ErrorCode::NodeUnavailable,
            format!("node {n}, which serves the cabinet, did not answer in time"),
        ),
        CallError::Cluster(e) => ApiError::new(ErrorCode::Unavailable, e.to_string()),
    })?;
    let hop = started
        .elapsed()
        .saturating_sub(Duration::from_micros(reply.work_us));
    state
        .metrics
        .route_seconds
        .with_label_values(&[kind])
        .observe(hop.as_secs_f64());
    Ok((reply, hop))
}

/// Carries `call` to `node`; the owner's answer as this node's, with the hop added to
/// `Server-Timing` as `route`.
pub async fn carry(state: &AppState, node: &str, call: &Call) -> ApiResult<HttpResponse> {
    let (reply, hop) = carry_reply(state, node, call).await?;
    let status = actix_web::http::StatusCode::from_u16(reply.status)
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut response = HttpResponse::build(status)
        .content_type("application/json")
        .body(reply.body);
    let route = format!("route;dur={:.3}", hop.as_secs_f64() * 1000.0);
    let timing = match reply.timing {
        Some(t) => format!("{t}, {route}"),
        None => route,
    };
    if let Ok(v) = HeaderValue::from_str(&timing) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("server-timing"), v);
    }
    Ok(response)
}

/// [`owner_elsewhere`] for a cabinet named in a request body: `None` (served here, which
/// answers `cabinet_not_found` too) unless the cabinet exists, the caller may see it, and
/// another node serves it.
pub async fn owner_of_visible(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<Option<String>> {
    let Ok(cid) = CabinetId::parse(id) else {
        return Ok(None);
    };
    if state.cluster.serves(cid.as_str()) {
        return Ok(None);
    }
    match state.store.cabinet(cid.as_str()).await? {
        Some(row) if caller.sees(&row.merchant_id) => owner_elsewhere(state, &cid).await,
        _ => Ok(None),
    }
}

/// An answer of this node's as a reply to a carried request. Every answer here is a whole
/// JSON body in memory, taken as it is (no waiting, so the serving future stays `Send`).
fn reply_of(response: HttpResponse) -> Reply {
    use actix_web::body::MessageBody;
    let status = response.status().as_u16();
    let timing = response
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .try_into_bytes()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Reply {
        status,
        timing,
        body,
        work_us: 0,
    }
}

fn refusal(e: ApiError) -> HttpResponse {
    actix_web::ResponseError::error_response(&e)
}

/// Carries out a request another node carried here.
pub async fn serve(state: web::Data<AppState>, kind: String, body: String) -> Reply {
    let call: Call = match serde_json::from_str(&body) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(kind, error = %e, "carried request not understood");
            return reply_of(refusal(ApiError::internal(format!(
                "carried request not understood: {e}"
            ))));
        }
    };
    reply_of(serve_call(&state, call).await)
}

/// The actor here, if the cabinet is still connected to this node.
fn local(state: &AppState, id: &str) -> Option<CabinetHandle> {
    CabinetId::parse(id)
        .ok()
        .and_then(|cid| state.registry.get(&cid))
}

/// The refusal every caller gets when the cabinet left this node too (not carried on again:
/// the caller retries and reaches its new owner).
fn gone() -> HttpResponse {
    refusal(ApiError::new(
        ErrorCode::CabinetOffline,
        "the cabinet is not connected",
    ))
}

async fn serve_call(state: &AppState, call: Call) -> HttpResponse {
    match call {
        Call::Start { caller, body, idem } => {
            if local(state, &body.cabinet_id).is_none() {
                return gone();
            }
            super::sessions::start_answer(state, &caller, body, idem).await
        }
        Call::Command { cabinet_id, body } => {
            let Some(cabinet) = local(state, &cabinet_id) else {
                return gone();
            };
            match cabinet.command(body).await {
                // The same answer as a local command's (`CommandAnswer`: the outcome's fields
                // beside the cabinet's id).
                Ok(result) => {
                    let mut answer =
                        serde_json::to_value(&result).unwrap_or_else(|_| serde_json::json!({}));
                    if let Some(fields) = answer.as_object_mut() {
                        fields.insert("cabinet_id".into(), cabinet_id.into());
                    }
                    HttpResponse::Ok().json(answer)
                }
                Err(CommandError::Unreachable(u)) => {
                    refusal(ApiError::new(ErrorCode::ActorUnavailable, u.to_string()))
                }
                Err(e @ CommandError::Restarted) => {
                    refusal(ApiError::new(ErrorCode::ActorRestarted, e.to_string()))
                }
            }
        }
        Call::Config { cabinet_id, config } => {
            let Some(cabinet) = local(state, &cabinet_id) else {
                return gone();
            };
            let pushed = cabinet.snapshot().await.map(|s| s.online).unwrap_or(false);
            cabinet.set_desired(config);
            HttpResponse::Ok().json(serde_json::json!({ "pushed": pushed }))
        }
        Call::AlertAck { cabinet_id, alert } => {
            let Some(cabinet) = local(state, &cabinet_id) else {
                return gone();
            };
            let _ = cabinet.ack_alert(alert).await;
            HttpResponse::Ok().json(serde_json::json!({}))
        }
        Call::AlertClear {
            cabinet_id,
            alert,
            by,
        } => {
            let Some(cabinet) = local(state, &cabinet_id) else {
                return gone();
            };
            let _ = cabinet.clear_alert(alert, by).await;
            HttpResponse::Ok().json(serde_json::json!({}))
        }
    }
}
