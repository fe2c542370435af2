//! The feed across nodes: every node appends its feed events to one Redis stream and reads
//! every node's back, so that operators see the whole fleet from any node, in one order.
//!
//! An event is numbered where it is appended: one script takes the next number from a counter
//! and appends the event under it, so the stream's order and the numbers agree, and `?since=`
//! means the same on every node. A node publishes what it produced in the order produced (one
//! writer task, batches in order), so the events of one cabinet (whose actor lives on one node)
//! keep their order. A stream, not pub/sub: a reader that lost its connection goes on from the
//! last entry it read, and a node that starts fills its replay window from the stream's tail.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::mpsc;

use super::Cluster;
use crate::feed::Feed;

/// Events appended per script call.
const BATCH: usize = 256;
/// Entries asked for per read.
const READ_COUNT: usize = 512;
/// Events waiting for Redis (while it is unreachable); beyond this, new ones are dropped and
/// counted: the screens resync from a snapshot, and storage has every order and session
/// regardless.
pub const PENDING_MAX: usize = 100_000;

/// Appends `(merchant, kind, data, origin)` for each event in `ARGV[2..]`, numbering them
/// from `KEYS[2]` (which a Redis restart does not send back to 1: `next_number!`), keeping about
/// `ARGV[1]` entries.
const APPEND: &str = concat!(
    next_number!(),
    r"
local n = 0
for i = 2, #ARGV, 4 do
  local seq = string.format('%d', next_number(KEYS[2]))
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    's', seq, 'm', ARGV[i], 'k', ARGV[i + 1], 'd', ARGV[i + 2], 'o', ARGV[i + 3])
  n = n + 1
end
return n
"
);

/// One event on its way to the stream.
#[derive(Debug)]
pub struct Outgoing {
    /// Whose it is.
    pub merchant: String,
    /// `cabinet`, `alert`, `session`, …
    pub kind: &'static str,
    /// The event's data, as JSON.
    pub data: String,
}

/// One event read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// Its number, the same on every node.
    pub seq: u64,
    /// Whose it is.
    pub merchant: String,
    /// Its type.
    pub kind: String,
    /// Its data, as JSON.
    pub data: String,
    /// The node that produced it.
    pub origin: String,
}

type Entry = (String, Vec<String>);

fn incoming(fields: &[String]) -> Option<Incoming> {
    let mut e = Incoming {
        seq: 0,
        merchant: String::new(),
        kind: String::new(),
        data: String::new(),
        origin: String::new(),
    };
    for pair in fields.chunks(2) {
        let [k, v] = pair else { return None };
        match k.as_str() {
            "s" => e.seq = v.parse().ok()?,
            "m" => e.merchant = v.clone(),
            "k" => e.kind = v.clone(),
            "d" => e.data = v.clone(),
            "o" => e.origin = v.clone(),
            _ => {}
        }
    }
    (e.seq > 0 && !e.kind.is_empty()).then_some(e)
}

impl Cluster {
    fn stream_key(&self) -> String {
        self.key("feed")
    }

    /// Starts the feed's writer and reader: the feed hands its events to the writer from now
    /// on, and takes every node's back from the reader. Nothing on a single node.
    pub async fn share_feed(self: &Arc<Self>, feed: &Arc<Feed>, keep: usize) {
        let Some(r) = &self.redis else { return };
        let (tx, rx) = mpsc::channel(PENDING_MAX);
        feed.attach_bus(tx, self.settings.node_id.clone());
        let writer = self.clone();
        let conn = r.conn.clone();
        tokio::spawn(async move { writer.write_feed(conn, rx, keep).await });
        // Its own connection: a blocking read holds its connection until it returns.
        let reader = self.clone();
        let feed = feed.clone();
        let url = r.url.clone();
        tokio::spawn(async move { reader.read_feed(url, feed, keep).await });
    }

    async fn write_feed(
        &self,
        mut conn: ConnectionManager,
        mut rx: mpsc::Receiver<Outgoing>,
        keep: usize,
    ) {
        let script = Script::new(APPEND);
        let (stream, seq) = (self.stream_key(), self.key("feed:seq"));
        let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
        let mut wait =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if batch.is_empty() {
                match rx.recv().await {
                    Some(e) => batch.push(e),
                    None => return,
                }
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let mut call = script.prepare_invoke();
            call.key(&stream).key(&seq).arg(keep);
            for e in &batch {
                call.arg(&e.merchant)
                    .arg(e.kind)
                    .arg(&e.data)
                    .arg(&self.settings.node_id);
            }
            match call.invoke_async::<u64>(&mut conn).await {
                Ok(_) => {
                    self.redis_ok.store(true, Ordering::Relaxed);
                    batch.clear();
                    wait.reset();
                }
                Err(e) => {
                    // Kept, in order, and tried again: the channel behind it fills meanwhile,
                    // and the feed drops (and counts) what does not fit.
                    self.failed("feed_append", &e.into());
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        }
    }

    async fn read_feed(&self, url: String, feed: Arc<Feed>, keep: usize) {
        let mut conn = self.reading_connection(&url, "feed_read").await;
        let stream = self.stream_key();
        // The tail first: a node that starts can replay what its screens missed elsewhere.
        let mut last = String::from("0-0");
        let tail: redis::RedisResult<Vec<Entry>> = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(keep.min(10_000))
            .query_async(&mut conn)
            .await;
        match tail {
            Ok(entries) => {
                if let Some((id, _)) = entries.first() {
                    last = id.clone();
                }
                for (_, fields) in entries.iter().rev() {
                    if let Some(e) = incoming(fields) {
                        feed.take_shared(&e, false);
                    }
                }
            }
            Err(e) => {
                self.failed("feed_read", &e.into());
                last = "$".to_owned();
            }
        }
        self.follow_stream(
            &mut conn,
            &stream,
            last,
            READ_COUNT,
            "feed_read",
            |id, fields| match incoming(&fields) {
                Some(e) => feed.take_shared(&e, true),
                None => tracing::warn!(entry = %id, "feed stream entry not understood; skipped"),
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn stream_entries_are_read_back_or_refused() {
        let e = incoming(&s(&[
            "s", "7", "m", "m1", "k", "alert", "d", "{}", "o", "n1",
        ]));
        assert_eq!(
            e,
            Some(Incoming {
                seq: 7,
                merchant: "m1".into(),
                kind: "alert".into(),
                data: "{}".into(),
                origin: "n1".into()
            })
        );
        assert_eq!(
            incoming(&s(&["s", "x", "k", "alert"])),
            None,
            "a bad number"
        );
        assert_eq!(incoming(&s(&["m", "m1", "k", "alert"])), None, "no number");
        assert_eq!(incoming(&s(&["s", "1", "k"])), None, "an odd field list");
    }
}
