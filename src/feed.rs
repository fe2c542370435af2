//! The operator feed: every visible change as a sequenced JSON event, fanned out to WebSocket
//! clients, with a replay buffer for clients that reconnect with `?since=`.
//!
//! Events come from actor state (the ports), never from polling the database. `seq` increases
//! by one per event across the node; a client sees only its merchant's events, so its `seq`
//! values increase but may skip the numbers of other merchants' events.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::cluster::bus::{Incoming, Outgoing};
use crate::store::{Change, SessionRow};
use crate::views::OrderView;

/// One event.
#[derive(Debug)]
pub struct FeedEvent {
    /// Position in the node's stream.
    pub seq: u64,
    /// Whose it is (scoping).
    pub merchant: String,
    /// `{"type", "seq", "data"}`, serialised once for every client.
    pub json: String,
    /// When it was published, for the replay window's age limit.
    at: Instant,
}

/// An event on the wire: `{"type", "seq", "data"}`.
#[derive(Serialize)]
struct Envelope<'a, T> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    data: &'a T,
}

struct Ring {
    seq: u64,
    events: VecDeque<Arc<FeedEvent>>,
}

/// What a node does with another node's internal event.
type InternalHook = Box<dyn Fn(&Incoming) + Send + Sync>;

/// The merchant of events no merchant's screen sees.
const MERCHANT_NONE: &str = "";

/// The fan-out.
pub struct Feed {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<FeedEvent>>,
    replay: usize,
    replay_for: Duration,
    sockets: Mutex<Sockets>,
    /// Long polls waiting for a session's next change (`GET /api/v1/sessions/{id}?wait_s=`).
    session_waiters: Mutex<HashMap<String, Vec<SessionSender>>>,
    /// Several nodes: events go to the shared stream (and come back numbered from there), and
    /// this node's name tells its own events from the others'.
    bus: OnceLock<(tokio::sync::mpsc::Sender<Outgoing>, String)>,
    /// Events the shared stream could not take in time (Redis unreachable long enough).
    bus_dropped: AtomicU64,
    /// Jumps in the shared numbering (events never seen here): each starts the replay window
    /// afresh, so a `?since=` from before it gets a snapshot.
    gaps: AtomicU64,
    /// The last live state (`cabinet` event data) of each cabinet whose actor is on another
    /// node, for snapshots and reads here.
    remote_cabinets: Mutex<HashMap<String, Arc<str>>>,
    /// Told of other nodes' internal events (`INTERNAL`).
    on_internal: OnceLock<InternalHook>,
}

/// Events between nodes that no screen sees: `directory` (a cabinet's credentials changed,
/// read them again), `cache` (rows another node changed: drop the cache of that name),
/// `confirmed` (a shopper confirmed a session another node may be waiting on).
const INTERNAL: &[&str] = &["directory", "cache", "confirmed"];

type SessionSender = tokio::sync::mpsc::UnboundedSender<SessionRow>;

/// A long poll's view of one session's committed changes (see [`Feed::watch_session`]). Its
/// registration goes with it however the request ends (a client that hangs up drops it
/// mid-wait).
pub struct SessionWatch {
    rx: tokio::sync::mpsc::UnboundedReceiver<SessionRow>,
    feed: Arc<Feed>,
    id: String,
}

impl SessionWatch {
    /// The next committed change, in commit order; `None` only if the feed is gone.
    pub async fn next(&mut self) -> Option<SessionRow> {
        self.rx.recv().await
    }
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        self.rx.close();
        self.feed.session_wait_over(&self.id);
    }
}

/// Open feed sockets, in all and by API key.
#[derive(Default)]
struct Sockets {
    total: usize,
    by_key: HashMap<String, usize>,
}

/// Which cap refused a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedCap {
    /// `feed.max_sockets` on this node.
    Node,
    /// `feed.max_sockets_per_key`.
    Key,
}

/// One open feed socket, counted against the caps until dropped.
pub struct FeedSlot {
    feed: Arc<Feed>,
    key: String,
}

impl Drop for FeedSlot {
    fn drop(&mut self) {
        let mut s = self.feed.sockets.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.by_key.remove(&self.key);
            }
        }
    }
}

impl Feed {
    /// The last `replay` events, and none older than `replay_for`, are kept for `?since=`;
    /// each client may lag `client_queue` events behind before it is dropped.
    pub fn new(replay: usize, replay_for: Duration, client_queue: usize) -> Self {
        let (tx, _) = broadcast::channel(client_queue.max(1));
        Self {
            ring: Mutex::new(Ring {
                seq: 0,
                events: VecDeque::new(),
            }),
            tx,
            replay: replay.max(1),
            replay_for,
            sockets: Mutex::new(Sockets::default()),
            session_waiters: Mutex::new(HashMap::new()),
            bus: OnceLock::new(),
            bus_dropped: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            remote_cabinets: Mutex::new(HashMap::new()),
            on_internal: OnceLock::new(),
        }
    }

    /// What to do with another node's internal event. Call once, at start-up.
    pub fn on_internal(&self, f: impl Fn(&Incoming) + Send + Sync + 'static) {
        let _ = self.on_internal.set(Box::new(f));
    }

    /// Tells the other nodes (none on a single node) of an internal event.
    pub fn publish_internal<T: Serialize>(&self, kind: &'static str, data: &T) {
        debug_assert!(INTERNAL.contains(&kind));
        if self.bus.get().is_some() {
            self.publish(MERCHANT_NONE, kind, data);
        }
    }

    /// Sends every later event through the shared stream (`cluster::bus`) instead of numbering
    /// it here. Call once, at start-up.
    pub fn attach_bus(&self, tx: tokio::sync::mpsc::Sender<Outgoing>, node: String) {
        let _ = self.bus.set((tx, node));
    }

    /// Events dropped because the shared stream could not take them, and gaps seen in it.
    pub fn bus_losses(&self) -> (u64, u64) {
        (
            self.bus_dropped.load(Ordering::Relaxed),
            self.gaps.load(Ordering::Relaxed),
        )
    }

    /// The last live state another node published for `cabinet` (a `cabinet` event's data).
    pub fn remote_cabinet(&self, cabinet: &str) -> Option<Arc<str>> {
        self.remote_cabinets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cabinet)
            .cloned()
    }

    /// An event read from the shared stream: numbered there, the same on every node. `live`
    /// is false while a starting node fills its replay window from the stream's tail.
    pub fn take_shared(&self, e: &Incoming, live: bool) {
        // Data that is not JSON never reaches a screen (Redis is trusted, not blindly).
        if serde_json::from_str::<&serde_json::value::RawValue>(&e.data).is_err() {
            tracing::warn!(seq = e.seq, kind = %e.kind, "shared feed event whose data is not JSON; skipped");
            return;
        }
        let theirs = self.bus.get().is_some_and(|(_, me)| *me != e.origin);
        let gap = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            // The stream is read forwards only, so a number not above the last one means the
            // counter started again (Redis lost it): a new numbering, kept from here.
            if e.seq <= ring.seq {
                tracing::warn!(
                    from = ring.seq,
                    to = e.seq,
                    "the shared feed's numbering started again"
                );
                self.gaps.fetch_add(1, Ordering::Relaxed);
                ring.events.clear();
                ring.seq = e.seq - 1;
            }
            let gap = ring.seq > 0 && e.seq > ring.seq + 1;
            if gap {
                self.gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    from = ring.seq,
                    to = e.seq,
                    "feed events missed here; replay starts afresh"
                );
                ring.events.clear();
            }
            gap
        };
        // Missed events may have been internal ones (credentials, cached rows): whatever this
        // node keeps of other nodes' changes is read again.
        if gap && live {
            if let Some(f) = self.on_internal.get() {
                f(&Incoming {
                    kind: "gap".to_owned(),
                    ..e.clone()
                });
            }
        }
        if INTERNAL.contains(&e.kind.as_str()) {
            if theirs && live {
                if let Some(f) = self.on_internal.get() {
                    f(e);
                }
            }
            // Numbered like the rest, never shown.
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.seq = ring.seq.max(e.seq);
            return;
        }
        if theirs {
            match e.kind.as_str() {
                "cabinet" => {
                    #[derive(serde::Deserialize)]
                    struct Id {
                        id: String,
                    }
                    if let Ok(Id { id }) = serde_json::from_str(&e.data) {
                        self.remote_cabinets
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id, Arc::from(e.data.as_str()));
                    }
                }
                // This node's own are told to its long polls as they commit.
                "session" if live => {
                    if let Ok(s) = serde_json::from_str::<SessionRow>(&e.data) {
                        self.session_changed(&s);
                    }
                }
                _ => {}
            }
        }
        let kind = match serde_json::to_string(&e.kind) {
            Ok(k) => k,
            Err(_) => return,
        };
        let now = Instant::now();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if e.seq <= ring.seq {
            return;
        }
        let json = format!(r#"{{"type":{kind},"seq":{},"data":{}}}"#, e.seq, e.data);
        ring.seq = e.seq;
        self.keep(&mut ring, e.seq, &e.merchant, json, now);
    }

    /// Every committed change of session `id` from now on, with the row as committed, until
    /// the watch is dropped.
    pub fn watch_session(self: &Arc<Self>, id: &str) -> SessionWatch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.session_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        SessionWatch {
            rx,
            feed: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Drops the watches of session `id` that nobody holds any more, so that a session that
    /// never changes again keeps no memory.
    fn session_wait_over(&self, id: &str) {
        let mut w = self
            .session_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(v) = w.get_mut(id) {
            v.retain(|tx| !tx.is_closed());
            if v.is_empty() {
                w.remove(id);
            }
        }
    }

    fn session_changed(&self, s: &SessionRow) {
        let mut w = self
            .session_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(v) = w.get_mut(&s.id) {
            v.retain(|tx| tx.send(s.clone()).is_ok());
            if v.is_empty() {
                w.remove(&s.id);
            }
        }
    }

    /// Takes a socket slot for `key`, or says which cap is reached: at most `max` sockets on
    /// the node and `per_key` of one key, so that no caller can hold unbounded tasks and
    /// buffers.
    pub fn admit(
        self: &Arc<Self>,
        key: &str,
        max: usize,
        per_key: usize,
    ) -> Result<FeedSlot, FeedCap> {
        let mut s = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if s.total >= max {
            return Err(FeedCap::Node);
        }
        let mine = s.by_key.get(key).copied().unwrap_or(0);
        if mine >= per_key {
            return Err(FeedCap::Key);
        }
        s.total += 1;
        s.by_key.insert(key.to_owned(), mine + 1);
        Ok(FeedSlot {
            feed: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Publishes an event of `kind` for a merchant's screens.
    pub fn publish<T: Serialize>(&self, merchant: &str, kind: &'static str, data: &T) {
        self.publish_at(merchant, kind, data, Instant::now());
    }

    fn publish_at<T: Serialize>(&self, merchant: &str, kind: &'static str, data: &T, now: Instant) {
        if let Some((tx, _)) = self.bus.get() {
            let data = match serde_json::to_string(data) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(kind, error = %e, "feed event not serialisable; dropped");
                    return;
                }
            };
            let out = Outgoing {
                merchant: merchant.to_owned(),
                kind,
                data,
            };
            if tx.try_send(out).is_err() {
                let n = self.bus_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "feed events dropped: the shared stream is not taking them (Redis unreachable?); screens resync from snapshots");
                }
            }
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let seq = ring.seq + 1;
        let mut json = match serde_json::to_string(&Envelope { kind, seq, data }) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(kind, error = %e, "feed event not serialisable; dropped");
                return;
            }
        };
        ring.seq = seq;
        // Kept for replay: without this the text keeps the up-to-double room it grew into
        // while being written, and the replay ring holds tens of thousands of them.
        json.shrink_to_fit();
        self.keep(&mut ring, seq, merchant, json, now);
    }

    /// Keeps a numbered event for replay and sends it to the subscribers, under the ring's
    /// lock so that they see events in `seq` order.
    fn keep(&self, ring: &mut Ring, seq: u64, merchant: &str, json: String, now: Instant) {
        let ev = Arc::new(FeedEvent {
            seq,
            merchant: merchant.to_owned(),
            json,
            at: now,
        });
        if ring.events.len() == self.replay {
            ring.events.pop_front();
        }
        // The age limit is what levels memory off on a quiet fleet, where the count would take
        // hours to reach: a screen that was away longer starts again from a snapshot.
        while ring
            .events
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > self.replay_for)
        {
            ring.events.pop_front();
        }
        ring.events.push_back(ev.clone());
        // A send with no receivers is not an error worth reporting.
        let _ = self.tx.send(ev);
    }

    /// Subscribes, returning the current `seq`: every later event arrives on the receiver.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<FeedEvent>>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (self.tx.subscribe(), ring.seq)
    }

    /// The events after `since`, or `None` when some of them are no longer kept.
    pub fn since(&self, since: u64) -> Option<Vec<Arc<FeedEvent>>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if since > ring.seq {
            return None;
        }
        let oldest = ring.events.front().map_or(ring.seq + 1, |e| e.seq);
        if since + 1 < oldest {
            return None;
        }
        Some(
            ring.events
                .iter()
                .filter(|e| e.seq > since)
                .cloned()
                .collect(),
        )
    }
}

/// Publishes every committed session and order change as a `session` or `order` event, with
/// the row as its transaction committed it.
pub async fn relay_store_changes(
    feed: Arc<Feed>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Change>,
) {
    while let Some(change) = rx.recv().await {
        match change {
            Change::Session(s) => {
                feed.session_changed(&s);
                feed.publish(&s.merchant_id, "session", &s)
            }
            Change::Order(o) => feed.publish(&o.merchant_id, "order", &OrderView::from(&o)),
            // The platform's feed sees one that names no order of any merchant.
            Change::PaymentException(e) => feed.publish(
                e.merchant_id.as_deref().unwrap_or_default(),
                "payment_exception",
                &e,
            ),
            Change::Settlement(s) => feed.publish(&s.merchant_id, "settlement", &s),
            Change::StockLow(merchant, s, low) => feed.publish(
                &merchant,
                "stock_low",
                &serde_json::json!({"cabinet_id": s.cabinet_id, "sku": s.sku, "qty": s.qty,
                    "low_at": s.low_at, "updated_at": s.updated_at,
                    "state": if low { "raised" } else { "cleared" }}),
            ),
            Change::StockDiscrepancy(d) => feed.publish(&d.merchant_id, "stock_discrepancy", &d),
            Change::RecognitionQuota(q) => feed.publish(&q.merchant_id, "recognition_quota", &q),
            Change::ServiceOrder(o) => {
                let merchant = o.merchant_id.clone();
                feed.publish(
                    &merchant,
                    "service_order",
                    &crate::views::ServiceOrderView::from(o),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn replay_window() {
        let f = Feed::new(3, HOUR, 8);
        for i in 0..5 {
            f.publish("m", "cabinet", &json!(i));
        }
        assert_eq!(f.since(5).map(|v| v.len()), Some(0));
        assert_eq!(
            f.since(2)
                .map(|v| v.iter().map(|e| e.seq).collect::<Vec<_>>()),
            Some(vec![3, 4, 5])
        );
        assert!(
            f.since(1).is_none(),
            "event 2 is gone: a snapshot is needed"
        );
        assert!(f.since(9).is_none(), "from the future");
    }

    #[test]
    fn events_older_than_the_window_are_not_replayed() {
        let f = Feed::new(100, Duration::from_secs(60), 8);
        let t0 = Instant::now();
        f.publish_at("m", "cabinet", &json!(1), t0);
        f.publish_at("m", "cabinet", &json!(2), t0 + Duration::from_secs(30));
        f.publish_at("m", "cabinet", &json!(3), t0 + Duration::from_secs(61));
        assert!(
            f.since(0).is_none(),
            "event 1 is 61 s old when event 3 comes: a snapshot is needed"
        );
        assert_eq!(
            f.since(1)
                .map(|v| v.iter().map(|e| e.seq).collect::<Vec<_>>()),
            Some(vec![2, 3])
        );
        f.publish_at("m", "cabinet", &json!(4), t0 + Duration::from_secs(200));
        assert_eq!(
            f.since(3)
                .map(|v| v.iter().map(|e| e.seq).collect::<Vec<_>>()),
            Some(vec![4]),
            "the newest is kept whatever its neighbours' age"
        );
        assert!(f.since(2).is_none());
    }

    #[test]
    fn socket_caps_per_node_and_per_key_free_on_drop() {
        let f = Arc::new(Feed::new(3, HOUR, 8));
        let a1 = f.admit("a", 3, 2);
        let a2 = f.admit("a", 3, 2);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(f.admit("a", 3, 2).err(), Some(FeedCap::Key));
        let b1 = f.admit("b", 3, 2);
        assert!(b1.is_ok());
        assert_eq!(f.admit("c", 3, 2).err(), Some(FeedCap::Node));
        drop(a1);
        assert!(f.admit("a", 3, 2).is_ok(), "a closed socket frees its slot");
        drop((a2, b1));
        let s = f.sockets.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!((s.total, s.by_key.len()), (0, 0));
    }

    #[tokio::test]
    async fn subscribers_get_later_events_in_order() {
        let f = Feed::new(10, HOUR, 8);
        f.publish("m", "cabinet", &json!(1));
        let (mut rx, seq) = f.subscribe();
        assert_eq!(seq, 1);
        f.publish("m", "alert", &json!(2));
        f.publish("m2", "alert", &json!(3));
        assert_eq!(rx.recv().await.map(|e| e.seq).ok(), Some(2));
        assert_eq!(
            rx.recv().await.map(|e| e.merchant.clone()).ok(),
            Some("m2".into())
        );
    }
}
