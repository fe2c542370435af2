//! Requests carried from one node to another: a request that reached node A for a cabinet
//! whose actor lives on node B is appended to B's call stream in Redis; B carries it out and
//! appends the answer to A's reply stream; A answers its caller. Streams, not pub/sub: a call
//! waits in Redis while B's reader reconnects, and so does an answer while A's does.
//!
//! A call carries its deadline: B skips one whose caller has given up (it answered its caller
//! with a timeout, and a retry carries the same idempotency key anyway). What a call does is
//! not this module's business: the node sets a [`CallHandler`] (`http::route`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use tokio::sync::oneshot;

use super::{Cluster, ClusterError};

/// Entries kept per stream: calls are answered within seconds.
const KEEP: usize = 10_000;

/// What a node answers to a call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Server-Timing` of the work on the owner, if any.
    pub timing: Option<String>,
    /// JSON body.
    pub body: String,
    /// How long the owner worked on it, µs: the rest of the round trip is the hop.
    #[serde(default)]
    pub work_us: u64,
}

/// Carries out one call: its kind and JSON body.
pub type CallHandler =
    Arc<dyn Fn(String, String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Redis did not take it.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// No answer in time (the owner died or is overloaded).
    #[error("no answer from node {0} in time")]
    Timeout(String),
}

/// Calls this node made and waits on, by id.
#[derive(Default)]
pub(super) struct Pending(Mutex<HashMap<String, oneshot::Sender<Reply>>>);

/// Takes a call's entry out of [`Pending`] when dropped.
struct Forget<'a>(&'a Pending, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.1);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Entry = (String, Vec<String>);
/// An `XREAD` answer: per stream, its entries; `None` when the wait ended with none.
pub(super) type ReadReply = Option<Vec<(String, Vec<Entry>)>>;

fn field<'a>(fields: &'a [String], name: &str) -> Option<&'a str> {
    fields
        .chunks(2)
        .find(|p| p.first().is_some_and(|k| k == name))
        .and_then(|p| p.get(1))
        .map(String::as_str)
}

impl Cluster {
    fn calls_key(&self, node: &str) -> String {
        self.key(&format!("node:{node}:calls"))
    }

    fn replies_key(&self, node: &str) -> String {
        self.key(&format!("node:{node}:replies"))
    }

    /// Asks `node` to carry out a call; its answer, or why there is none within `within`.
    pub async fn call(
        &self,
        node: &str,
        kind: &str,
        body: &str,
        within: Duration,
    ) -> Result<Reply, CallError> {
        let Some(r) = &self.redis else {
            return Err(CallError::Timeout(node.to_owned()));
        };
        let id = crate::secrets::token(16).map_err(|e| ClusterError::Unexpected(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.pending
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), tx);
        let deadline = unix_ms() + within.as_millis() as u64;
        let mut conn = r.conn.clone();
        let sent: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(self.calls_key(node))
            .arg("MAXLEN")
            .arg("~")
            .arg(KEEP)
            .arg("*")
            .arg("id")
            .arg(&id)
            .arg("from")
            .arg(&self.settings.node_id)
            .arg("kind")
            .arg(kind)
            .arg("body")
            .arg(body)
            .arg("deadline")
            .arg(deadline)
            .query_async(&mut conn)
            .await;
        // However the wait ends (an answer, a timeout, a failed send, or the caller's request
        // dropped mid-wait), the entry goes.
        let _forget = Forget(&self.pending, &id);
        if let Err(e) = sent {
            let e = ClusterError::from(e);
            self.failed("call", &e);
            return Err(e.into());
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(CallError::Timeout(node.to_owned())),
        }
    }

    /// Serves calls made to this node with `handler`, and takes the answers to this node's
    /// own calls. Nothing on a single node.
    pub fn serve_calls(self: &Arc<Self>, handler: CallHandler) {
        let Some(r) = &self.redis else { return };
        let url = r.url.clone();
        let me = self.clone();
        let calls = self.calls_key(&self.settings.node_id);
        tokio::spawn(async move {
            me.read_stream(&url, calls, |me, fields| {
                let (Some(id), Some(from), Some(kind), Some(body), Some(deadline)) = (
                    field(&fields, "id"),
                    field(&fields, "from"),
                    field(&fields, "kind"),
                    field(&fields, "body"),
                    field(&fields, "deadline").and_then(|d| d.parse::<u64>().ok()),
                ) else {
                    tracing::warn!("call not understood; skipped");
                    return;
                };
                if unix_ms() > deadline {
                    me.metrics
                        .routed_calls
                        .with_label_values(&["served", "expired"])
                        .inc();
                    return;
                }
                let (id, from, kind, body) = (
                    id.to_owned(),
                    from.to_owned(),
                    kind.to_owned(),
                    body.to_owned(),
                );
                let (me, handler) = (me.clone(), handler.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let mut reply = handler(kind.clone(), body).await;
                    reply.work_us = started.elapsed().as_micros() as u64;
                    me.metrics
                        .routed_calls
                        .with_label_values(&["served", "ok"])
                        .inc();
                    me.answer(&from, &id, &reply).await;
                });
            })
            .await
        });
        let url = self
            .redis
            .as_ref()
            .map(|r| r.url.clone())
            .unwrap_or_default();
        let me = self.clone();
        let replies = self.replies_key(&self.settings.node_id);
        tokio::spawn(async move {
            me.read_stream(&url, replies, |me, fields| {
                let (Some(id), Some(reply)) = (field(&fields, "id"), field(&fields, "reply"))
                else {
                    return;
                };
                let Ok(reply) = serde_json::from_str::<Reply>(reply) else {
                    tracing::warn!("reply not understood; skipped");
                    return;
                };
                if let Some(tx) = me
                    .pending
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id)
                {
                    let _ = tx.send(reply);
                }
            })
            .await
        });
    }

    async fn answer(&self, to: &str, id: &str, reply: &Reply) {
        let Some(r) = &self.redis else { return };
        let Ok(text) = serde_json::to_string(reply) else {
            return;
        };
        let mut conn = r.conn.clone();
        let sent: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(self.replies_key(to))
            .arg("MAXLEN")
            .arg("~")
            .arg(KEEP)
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("reply")
            .arg(text)
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            self.failed("call_answer", &e.into());
        }
    }

    /// Reads `stream` from its end onwards for good, on a connection of its own (a blocking
    /// read holds its connection), handing each entry's fields to `each`; after a lost
    /// connection it goes on from the last entry read.
    async fn read_stream(
        self: &Arc<Self>,
        url: &str,
        stream: String,
        each: impl Fn(&Arc<Self>, Vec<String>),
    ) {
        let mut wait =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut conn = self.reading_connection(url, "stream_read").await;
        // From the stream's end as it is now: what came before was for an earlier run.
        let last = loop {
            let tail: redis::RedisResult<Vec<Entry>> = redis::cmd("XREVRANGE")
                .arg(&stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await;
            match tail {
                Ok(t) => {
                    break t
                        .first()
                        .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone())
                }
                Err(e) => {
                    self.failed("stream_read", &e.into());
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        };
        self.follow_stream(&mut conn, &stream, last, 256, "stream_read", |_, fields| {
            each(self, fields)
        })
        .await;
    }

    /// Reads `stream` after entry `last` for good on `conn` (`count` entries at most per read),
    /// handing each entry's id and fields to `each`; a failed read is counted under `op` and
    /// tried again, from the last entry read.
    pub(super) async fn follow_stream(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
        mut last: String,
        count: usize,
        op: &'static str,
        mut each: impl FnMut(&str, Vec<String>),
    ) {
        let mut wait =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let read: redis::RedisResult<ReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(super::READ_BLOCK_MS)
                .arg("STREAMS")
                .arg(stream)
                .arg(&last)
                .query_async(conn)
                .await;
            match read {
                Ok(Some(streams)) => {
                    wait.reset();
                    self.redis_ok.store(true, Ordering::Relaxed);
                    for (_, entries) in streams {
                        for (id, fields) in entries {
                            each(&id, fields);
                            last = id;
                        }
                    }
                }
                Ok(None) => wait.reset(),
                Err(e) => {
                    self.failed(op, &e.into());
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        }
    }
}
