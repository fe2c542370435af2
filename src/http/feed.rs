//! `GET /ws`: the operator feed over WebSocket (API.md). A `snapshot` of every cabinet the key
//! may see, then deltas; `?since=` replays what a reconnecting client missed, or sends a fresh
//! snapshot when that is no longer kept. A client that falls behind is dropped with a counted
//! reason; it never slows the hub or other clients.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest};
use actix_ws::Message;
use serde::Deserialize;
use tokio::sync::broadcast::{self, error::RecvError};

use cabinet_actors::ids::CabinetId;

use super::auth::{Caller, Role};
use super::cabinets::{live_json, snapshot_of};
use super::state::AppState;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::feed::FeedCap;
use crate::views::CabinetView;

const PING_EVERY: Duration = Duration::from_secs(10);
const PONG_WITHIN: Duration = Duration::from_secs(30);
const LAG_CHECK: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
pub struct FeedQuery {
    since: Option<u64>,
    /// A browser's single-use ticket (`POST /api/v1/feed-tickets`) in place of the header.
    ticket: Option<String>,
}

/// Who opens the socket: the ticket's key, else the `Authorization` header's. A ticket counts
/// only while its key stands, checked in storage as for any request.
async fn feed_caller(
    state: &AppState,
    req: &HttpRequest,
    ticket: Option<&str>,
) -> ApiResult<Caller> {
    let Some(ticket) = ticket else {
        return Caller::from_header(state, req).await;
    };
    let refused = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "feed ticket unknown, used or expired",
        )
    };
    let holder = state.access.redeem_ticket(ticket).ok_or_else(refused)?;
    match state.store.api_key(&holder.key_id).await? {
        Some(k) if k.revoked_at.is_none() => Ok(Caller {
            key_id: holder.key_id,
            role: holder.role,
            merchant: holder.merchant,
        }),
        _ => Err(refused()),
    }
}

/// Resolves once key `id` is revoked. Cancel-safe (a broadcast receive), so it can lose a
/// `select!` and be called again; a burst of revocations that overran the receiver is checked
/// against the node's record instead.
async fn revoked(
    rx: &mut broadcast::Receiver<std::sync::Arc<str>>,
    access: &super::access::KeyAccess,
    id: &str,
) {
    loop {
        match rx.recv().await {
            Ok(r) if *r == *id => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                if access.is_revoked(id) {
                    return;
                }
            }
            // The node is going away; the feed's own channel ends the socket.
            Err(RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Close code of a socket whose key was revoked (4000–4999: the application's own).
const KEY_REVOKED: u16 = 4401;

/// The feed's first message: every visible cabinet. Each cabinet's view is written out as soon as
/// it is built, so the JSON trees of a whole fleet (several KB of small allocations a cabinet)
/// never exist at once: glibc kept such a peak resident after it was freed, and at 10,000
/// cabinets it showed up as memory per cabinet.
async fn snapshot(state: &AppState, caller: &Caller, seq: u64) -> ApiResult<String> {
    let rows = state.store.cabinets(caller.merchant.as_deref()).await?;
    let mut out = format!(r#"{{"type":"snapshot","seq":{seq},"data":{{"cabinets":["#);
    let mut first = true;
    for r in &rows {
        let live = match CabinetId::parse(&r.id) {
            Ok(id) => snapshot_of(state, &id).await.ok().flatten(),
            Err(_) => None,
        };
        let text = match (&live, state.feed.remote_cabinet(&r.id)) {
            // Another node's cabinet: its last published state over the stored row.
            (None, Some(_)) => match live_json(state, r, None) {
                Ok(v) => v.to_string(),
                Err(_) => continue,
            },
            _ => {
                let Some(view) = CabinetView::new(r, live.as_ref()) else {
                    continue;
                };
                serde_json::to_string(&view).map_err(ApiError::internal)?
            }
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&text);
    }
    out.push_str("]}}");
    Ok(out)
}

/// Sends one event, giving up when the socket has not taken it within `within` (`slow`)
/// or when, meanwhile, the client's queue of events not yet sent is full (`lagged`): a blocked
/// socket is noticed as soon as the client is a queue behind, not only after the timeout.
async fn send_unless_behind(
    session: &mut actix_ws::Session,
    text: String,
    rx: &broadcast::Receiver<std::sync::Arc<crate::feed::FeedEvent>>,
    queue: usize,
    within: Duration,
) -> Result<(), &'static str> {
    let deadline = tokio::time::Instant::now() + within;
    let send = session.text(text);
    tokio::pin!(send);
    loop {
        tokio::select! {
            r = &mut send => return r.map_err(|_| "closed"),
            _ = tokio::time::sleep(LAG_CHECK) => {
                if rx.len() >= queue {
                    return Err("lagged");
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err("slow");
                }
            }
        }
    }
}

/// The operator feed over WebSocket: a `snapshot` of every cabinet the key may see, then
/// `cabinet`, `alert`, `session` and `order` events; `?since=` resumes.
/// The key goes in `Authorization: Bearer`; a browser passes a ticket from
/// `POST /api/v1/feed-tickets` instead. A socket whose key is revoked is closed with 4401.
#[utoipa::path(get, path = "/ws", tag = "feed", params(
    ("since" = Option<u64>, Query, description = "the last seq received: replay from there"),
    ("ticket" = Option<String>, Query, description = "a single-use feed ticket (browsers)")),
    security(("bearer" = [])), responses((status = 101, description = "switching to WebSocket"),
    (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
    (status = 429, body = super::ErrorBody, description = "too_many_feeds: feed.max_sockets or feed.max_sockets_per_key reached")))]
pub async fn ws(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
    q: web::Query<FeedQuery>,
) -> ApiResult<actix_web::HttpResponse> {
    let FeedQuery { since, ticket } = q.into_inner();
    let caller = feed_caller(&state, &req, ticket.as_deref()).await?;
    caller.require(Role::Viewer)?;
    // Subscribed before the check, so that a revocation in between is seen by one of them.
    let mut revocations = state.access.revocations();
    if state.access.is_revoked(&caller.key_id) {
        return Err(ApiError::unauthorized());
    }
    let f = &state.settings.feed;
    // Capped before the upgrade: a refused client costs no task and no buffer.
    let slot = match state
        .feed
        .admit(&caller.key_id, f.max_sockets, f.max_sockets_per_key)
    {
        Ok(slot) => slot,
        Err(cap) => {
            let (reason, what) = match cap {
                FeedCap::Node => ("too_many_feeds", "this node has feed.max_sockets open"),
                FeedCap::Key => (
                    "too_many_feeds_key",
                    "this key has feed.max_sockets_per_key open",
                ),
            };
            state.metrics.ws_dropped.with_label_values(&[reason]).inc();
            return Err(ApiError::new(
                ErrorCode::TooManyFeeds,
                format!("too many feed sockets: {what}; close one or retry later"),
            ));
        }
    };
    let (response, mut session, mut stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request(format!("not a WebSocket handshake: {e}")))?;
    let state = state.into_inner();
    let metrics = state.metrics.clone();
    let queue = state.settings.feed.client_queue.max(1);
    // Every send has this deadline, the first ones (snapshot, replay) included: a client that
    // never reads is dropped, not kept with its task and its buffers.
    let within = Duration::from_millis(state.settings.feed.send_timeout_ms);
    actix_web::rt::spawn(async move {
        let _slot = slot;
        metrics.ws_clients.inc();
        let visible = |m: &str| caller.merchant.as_deref().is_none_or(|own| own == m);
        let (mut rx, seq) = state.feed.subscribe();
        // Replay when every missed event is still kept; otherwise start over from a snapshot.
        // The replayed events are shared with the ring, copied only as each is sent.
        let first: Vec<First> = match since.and_then(|s| state.feed.since(s).map(|evs| (s, evs))) {
            Some((_, evs)) => evs
                .into_iter()
                .filter(|e| e.seq <= seq && visible(&e.merchant))
                .map(First::Event)
                .collect(),
            None => match snapshot(&state, &caller, seq).await {
                Ok(s) => vec![First::Snapshot(s)],
                Err(e) => {
                    tracing::error!(error = %e, "feed snapshot failed");
                    metrics
                        .ws_dropped
                        .with_label_values(&["snapshot_failed"])
                        .inc();
                    metrics.ws_clients.dec();
                    let _ = tokio::time::timeout(within, session.close(None)).await;
                    return;
                }
            },
        };
        let mut reason = "closed";
        let mut live = true;
        for item in first {
            let text = match item {
                First::Snapshot(s) => s,
                First::Event(e) => e.json.clone(),
            };
            match tokio::time::timeout(within, session.text(text)).await {
                Ok(Ok(())) => metrics.ws_sent.inc(),
                Ok(Err(_)) => {
                    live = false;
                    break;
                }
                Err(_) => {
                    reason = "slow";
                    live = false;
                    break;
                }
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut last_pong = Instant::now();
        loop {
            if !live {
                break;
            }
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.seq > seq && visible(&e.merchant) => {
                        // A revocation is not held up by a client that is slow to take this.
                        let sent = tokio::select! {
                            r = send_unless_behind(&mut session, e.json.clone(), &rx, queue, within) => r,
                            () = revoked(&mut revocations, &state.access, &caller.key_id) => Err("revoked"),
                        };
                        match sent {
                            Ok(()) => metrics.ws_sent.inc(),
                            Err(r) => { reason = r; break; }
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => { reason = "lagged"; break; }
                    Err(RecvError::Closed) => { reason = "shutdown"; break; }
                },
                () = revoked(&mut revocations, &state.access, &caller.key_id) => {
                    reason = "revoked";
                    break;
                }
                msg = stream.recv() => match msg {
                    Some(Ok(Message::Ping(b))) => match tokio::time::timeout(within, session.pong(&b)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => { reason = "slow"; break; }
                    },
                    Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => { reason = "closed"; break; }
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if last_pong.elapsed() > PONG_WITHIN { reason = "heartbeat_timeout"; break; }
                    match tokio::time::timeout(within, session.ping(b"feed")).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => { reason = "closed"; break; }
                        Err(_) => { reason = "slow"; break; }
                    }
                }
            }
        }
        if reason != "closed" {
            metrics.ws_dropped.with_label_values(&[reason]).inc();
            tracing::info!(reason, "feed client dropped");
        }
        metrics.ws_clients.dec();
        let close = (reason == "revoked").then(|| actix_ws::CloseReason {
            code: actix_ws::CloseCode::Other(KEY_REVOKED),
            description: Some("key revoked".into()),
        });
        // The close frame waits behind whatever the socket has not taken: bounded like a send.
        let _ = tokio::time::timeout(within, session.close(close)).await;
    });
    Ok(response)
}

/// What a feed client gets before live events: a snapshot, or the replayed events.
enum First {
    Snapshot(String),
    Event(std::sync::Arc<crate::feed::FeedEvent>),
}
