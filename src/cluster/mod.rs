//! The cluster port: what one node must agree on with the others (docs/architecture.md,
//! "Scaling out"). Two implementations behind the same methods:
//!
//! - **single node** (the default, no Redis): this node leads and owns every cabinet that
//!   talks to it; nothing leaves the process;
//! - **Redis** (`redis.url`): leases in Redis with fencing tokens. The leader lease decides
//!   which node runs the singleton work (settlement, collections, reminders, sweeps); a
//!   cabinet's lease says which node its MQTT connection landed on.
//!
//! A lease is a key holding `node|fence`, with a time to live. The fence comes from one counter
//! that only grows, so whoever took a lease later holds a larger token than anyone before: the
//! token is what a late write from a former owner is refused by. Scripts make every check and
//! change one atomic step on the server; renewals go in batches (one round trip for hundreds of
//! cabinets), not one per cabinet.
//!
//! A node believes it holds a lease only until `lease_ms` after it *sent* the request that
//! took or renewed it, less a margin for clocks running at different rates: Redis started the
//! key's time to live no earlier than that, so no other node can take the lease while this one
//! still believes it holds it. When Redis cannot be reached, beliefs simply run out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;

use crate::metrics::Metrics;

/// The next number from counter `k` (fencing tokens, the shared feed's numbers). A counter
/// Redis lost (a restart without persistence) starts again from the time in microseconds, not
/// from 1, so that numbers keep growing across it: a token taken after the restart is larger
/// than any before, and a feed client's next event is numbered above the last it had. Numbers
/// are written with `%d`: Lua's own formatting would write one this large as `1.7e+15`.
macro_rules! next_number {
    () => {
        r"
local function next_number(k)
  if redis.call('EXISTS', k) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', k, string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  return redis.call('INCR', k)
end
"
    };
}

pub mod bus;
pub mod calls;
pub mod partitions;

/// How long a stream read waits for new entries before it asks again.
const READ_BLOCK_MS: u64 = 2_000;

/// Cabinets renewed per script call: one round trip each, bounded so that one call does not
/// hold Redis (single-threaded) for long.
const RENEW_BATCH: usize = 500;

/// Takes a lease: free, already ours (renewed), or, with `take`, held by another node (taken
/// over, with a new fence). Answers `{fence, previous owner or ""}`; fence 0 means refused.
const CLAIM: &str = concat!(
    next_number!(),
    r"
local cur = redis.call('GET', KEYS[1])
local prev = ''
if cur then
  local node, fence = string.match(cur, '^(.*)|(%d+)$')
  if node == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {fence, node}
  end
  if ARGV[3] ~= 'take' then return {'0', node or ''} end
  prev = node or ''
end
local f = string.format('%d', next_number(KEYS[2]))
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. f, 'PX', ARGV[2])
return {f, prev}
"
);

/// Renews the leases this node holds (`KEYS[i]` with fence `ARGV[i + 2]`), answering per lease
/// `0` (renewed), `-1` (another node holds it now) or a new fence: the lease had run out with
/// nobody taking it (Redis was away longer than a lease) and is taken again, as the cabinet is
/// still connected here (`KEYS[#KEYS]` is the fence counter, not a lease).
const RENEW: &str = concat!(
    next_number!(),
    r"
local out = {}
local counter = KEYS[#KEYS]
for i = 1, #KEYS - 1 do
  local k = KEYS[i]
  local cur = redis.call('GET', k)
  if cur == ARGV[1] .. '|' .. ARGV[i + 2] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = 0
  elseif not cur then
    local f = next_number(counter)
    redis.call('SET', k, ARGV[1] .. '|' .. string.format('%d', f), 'PX', ARGV[2])
    out[i] = f
  else
    out[i] = -1
  end
end
return out
"
);

/// Gives a lease up if it is still ours under this fence.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What the cluster needs from configuration.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster.
    pub node_id: String,
    /// Time to live of a lease.
    pub lease: Duration,
    /// How often leases are renewed (well under `lease`).
    pub renew: Duration,
    /// Prefix of every key, so that several hubs (or test runs) can share one Redis.
    pub key_prefix: String,
}

/// A lease as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Asked for; not answered yet.
    Claiming,
    /// Held under this fence.
    Held(u64),
    /// Another node took it (or it ran out): this node must not act for the cabinet.
    Lost,
}

/// A cabinet's owner, as Redis has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The node.
    pub node: String,
    /// Its fencing token.
    pub fence: u64,
}

/// Why a cluster call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis did not answer or refused.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something these scripts never answer.
    #[error("unexpected answer from redis: {0}")]
    Unexpected(String),
}

struct RedisBackend {
    /// For connections of their own (the feed's blocking reads).
    url: String,
    conn: ConnectionManager,
    claim: Script,
    renew: Script,
    release: Script,
}

/// The cluster port (see the module's documentation).
pub struct Cluster {
    settings: ClusterSettings,
    redis: Option<RedisBackend>,
    metrics: Metrics,
    /// The instant (ms since `epoch`) until which this node leads; 0 when it does not.
    leader_until_ms: AtomicU64,
    leader_fence: AtomicU64,
    epoch: Instant,
    /// Cabinets whose uplinks reach this node, and their leases (Redis only).
    cabinets: Mutex<HashMap<String, Held>>,
    /// Until when (ms since `epoch`) the last successful batch renewal keeps the held cabinet
    /// leases.
    cabinets_until_ms: AtomicU64,
    /// Whether the last call to Redis succeeded.
    redis_ok: AtomicBool,
    /// Set by `step_down`: this node no longer asks to lead.
    stepped_down: AtomicBool,
    /// Calls this node made to others, waiting for their answers.
    pending: calls::Pending,
    /// Partitions of the fleet this node reads from an external broker.
    partitions: Mutex<partitions::Partitions>,
    /// Until when (ms since `epoch`) the last renewal keeps the held partitions.
    partitions_until_ms: AtomicU64,
    /// Told of every cabinet lease this node takes, with its token (storage records it, so
    /// that a former owner's late writes are refused).
    on_cabinet_lease: std::sync::OnceLock<LeaseHook>,
    /// The last token this node held each cabinet's lease under, kept after the lease goes:
    /// what its writes for the cabinet carry.
    last_fences: Mutex<HashMap<String, u64>>,
}

/// What [`Cluster::on_cabinet_lease`] calls: the cabinet and the token it was taken under.
pub type LeaseHook = Box<dyn Fn(&str, u64) + Send + Sync>;

impl Cluster {
    /// A single node: it leads, it owns what connects to it.
    pub fn single(settings: ClusterSettings, metrics: Metrics) -> Arc<Self> {
        metrics.cluster_leader.set(1);
        Arc::new(Self::new(settings, None, metrics))
    }

    /// Connects to Redis (failing start-up when it cannot be reached: a node that cannot
    /// coordinate must not serve as if alone).
    pub async fn redis(
        url: &str,
        settings: ClusterSettings,
        metrics: Metrics,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // A call that waits longer than a renewal period is worth less than a failure:
            // the next round asks again.
            .set_response_timeout(Some(settings.renew.max(Duration::from_millis(200))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = client.get_connection_manager_with_config(config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        metrics.cluster_leader.set(0);
        let backend = RedisBackend {
            url: url.to_owned(),
            conn,
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        };
        Ok(Arc::new(Self::new(settings, Some(backend), metrics)))
    }

    fn new(settings: ClusterSettings, redis: Option<RedisBackend>, metrics: Metrics) -> Self {
        let ok = redis.is_some();
        Self {
            settings,
            redis,
            metrics,
            leader_until_ms: AtomicU64::new(0),
            leader_fence: AtomicU64::new(0),
            epoch: Instant::now(),
            cabinets: Mutex::new(HashMap::new()),
            cabinets_until_ms: AtomicU64::new(0),
            redis_ok: AtomicBool::new(ok),
            stepped_down: AtomicBool::new(false),
            pending: calls::Pending::default(),
            partitions: Mutex::default(),
            partitions_until_ms: AtomicU64::new(0),
            on_cabinet_lease: std::sync::OnceLock::new(),
            last_fences: Mutex::default(),
        }
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// Whether nodes coordinate through Redis.
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// `not_configured` (single node), `ok` or `unreachable`: the last call's outcome.
    pub fn redis_status(&self) -> &'static str {
        match (&self.redis, self.redis_ok.load(Ordering::Relaxed)) {
            (None, _) => "not_configured",
            (Some(_), true) => "ok",
            (Some(_), false) => "unreachable",
        }
    }

    /// Asks Redis now (the readiness probe).
    pub async fn ping(&self) -> bool {
        let Some(r) = &self.redis else { return true };
        let mut conn = r.conn.clone();
        let ok = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok();
        self.redis_ok.store(ok, Ordering::Relaxed);
        ok
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How long after a request was sent this node still believes what it answered: the lease,
    /// less a twentieth for clocks running at different rates.
    fn believed_ms(&self) -> u64 {
        let lease = self.settings.lease.as_millis() as u64;
        lease - lease / 20
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.settings.key_prefix)
    }

    fn cabinet_key(&self, id: &str) -> String {
        format!("{}:cabinet:{id}", self.settings.key_prefix)
    }

    fn failed(&self, op: &'static str, e: &ClusterError) {
        self.redis_ok.store(false, Ordering::Relaxed);
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        tracing::warn!(op, error = %e, "redis call failed");
    }

    fn lease_change(&self, lease: &'static str, change: &'static str) {
        self.metrics
            .cluster_lease_changes
            .with_label_values(&[lease, change])
            .inc();
    }

    // ---- the leader ----------------------------------------------------------------------

    /// Whether this node runs the singleton work now. A single node always does.
    pub fn is_leader(&self) -> bool {
        self.redis.is_none() || self.now_ms() < self.leader_until_ms.load(Ordering::Acquire)
    }

    /// The leader lease's fencing token while this node leads (0 on a single node).
    pub fn leader_fence(&self) -> Option<u64> {
        self.is_leader()
            .then(|| self.leader_fence.load(Ordering::Acquire))
    }

    /// Takes or renews the leader lease when it is free or ours.
    async fn lead(&self) {
        let Some(r) = &self.redis else { return };
        if self.stepped_down.load(Ordering::Acquire) {
            return;
        }
        let sent = self.now_ms();
        let was = self.is_leader();
        let answer = self.run_claim(r, &self.key("leader"), false).await;
        // A step-down while the renewal was in flight wins: its release already ran.
        if self.stepped_down.load(Ordering::Acquire) {
            return;
        }
        match answer {
            Ok((fence, _)) if fence > 0 => {
                self.leader_fence.store(fence, Ordering::Release);
                self.leader_until_ms
                    .store(sent + self.believed_ms(), Ordering::Release);
                if !was {
                    self.lease_change("leader", "acquired");
                    self.metrics.cluster_leader.set(1);
                    tracing::info!(node = %self.settings.node_id, fence, "this node leads the cluster");
                }
            }
            Ok((_, holder)) => {
                self.leader_until_ms.store(0, Ordering::Release);
                if was {
                    self.lease_change("leader", "lost");
                    self.metrics.cluster_leader.set(0);
                    tracing::warn!(node = %self.settings.node_id, leader = %holder, "leader lease lost to another node");
                }
            }
            Err(e) => {
                self.failed("leader", &e);
                // The belief runs out on its own (`is_leader`); said once when it does.
                if was && !self.is_leader() {
                    self.lease_change("leader", "lost");
                }
                if !self.is_leader() {
                    self.metrics.cluster_leader.set(0);
                }
            }
        }
    }

    async fn run_claim(
        &self,
        r: &RedisBackend,
        key: &str,
        take: bool,
    ) -> Result<(u64, String), ClusterError> {
        let mut conn = r.conn.clone();
        let (fence, prev): (String, String) = r
            .claim
            .key(key)
            .key(self.key("fence"))
            .arg(&self.settings.node_id)
            .arg(self.settings.lease.as_millis() as u64)
            .arg(if take { "take" } else { "free" })
            .invoke_async(&mut conn)
            .await?;
        self.redis_ok.store(true, Ordering::Relaxed);
        let fence = fence
            .parse::<u64>()
            .map_err(|_| ClusterError::Unexpected(fence.clone()))?;
        Ok((fence, prev))
    }

    // ---- cabinets ------------------------------------------------------------------------

    /// Calls `hook` with every cabinet lease this node takes and its token (set once).
    pub fn on_cabinet_lease(&self, hook: impl Fn(&str, u64) + Send + Sync + 'static) {
        let _ = self.on_cabinet_lease.set(Box::new(hook));
    }

    fn lease_taken(&self, id: &str, fence: u64) {
        if let Ok(mut last) = self.last_fences.lock() {
            last.insert(id.to_owned(), fence);
        }
        if let Some(hook) = self.on_cabinet_lease.get() {
            hook(id, fence);
        }
    }

    /// An uplink from `id` reached this node: its connection is here, so this node owns it.
    /// Cheap when the lease is already held (every uplink calls it); otherwise the lease is
    /// taken in the background, over any other node's (the cabinet left that node).
    pub fn cabinet_here(self: &Arc<Self>, id: &str) {
        if self.redis.is_none() {
            return;
        }
        {
            let Ok(mut map) = self.cabinets.lock() else {
                return;
            };
            match map.get(id) {
                Some(Held::Claiming) | Some(Held::Held(_)) => return,
                Some(Held::Lost) | None => {
                    map.insert(id.to_owned(), Held::Claiming);
                }
            }
        }
        let (me, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move { me.claim_cabinet(&id).await });
    }

    async fn claim_cabinet(&self, id: &str) {
        let Some(r) = &self.redis else { return };
        let sent = self.now_ms();
        let answer = self.run_claim(r, &self.cabinet_key(id), true).await;
        let held = match answer {
            Ok((fence, prev)) if fence > 0 => {
                let change = if prev.is_empty() || prev == self.settings.node_id {
                    "acquired"
                } else {
                    tracing::info!(cabinet_id = id, from = %prev, fence, "cabinet moved to this node");
                    "taken_over"
                };
                self.lease_change("cabinet", change);
                // A fresh lease lives at least as long as the batch's: keep the earlier bound
                // unless none is set yet.
                let until = sent + self.believed_ms();
                let _ = self.cabinets_until_ms.fetch_update(
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    |cur| (cur == 0).then_some(until),
                );
                self.lease_taken(id, fence);
                Held::Held(fence)
            }
            Ok(_) => Held::Lost,
            Err(e) => {
                self.failed("cabinet_claim", &e);
                // Asked again at the next uplink.
                if let Ok(mut map) = self.cabinets.lock() {
                    map.remove(id);
                }
                return;
            }
        };
        if let Ok(mut map) = self.cabinets.lock() {
            if map.get(id) == Some(&Held::Claiming) {
                map.insert(id.to_owned(), held);
            }
            self.metrics
                .cluster_cabinet_leases
                .set(map.values().filter(|h| matches!(h, Held::Held(_))).count() as i64);
        }
    }

    /// The cabinet went offline here: its lease is given up (unless another node took it
    /// meanwhile), so that it is free when the cabinet connects anywhere.
    pub fn cabinet_gone(self: &Arc<Self>, id: &str) {
        if self.redis.is_none() {
            return;
        }
        let held = self.cabinets.lock().ok().and_then(|mut map| map.remove(id));
        if let Some(Held::Held(fence)) = held {
            self.release_cabinet(id, fence);
        }
    }

    /// The cabinet's messages no longer reach this node (its partition of an external broker
    /// moved to another): its lease is given up, and this node's actor for it no longer speaks
    /// for it, as after a lease lost (its timers' effects are dropped, requests are carried to
    /// the next owner) until the cabinet's messages reach this node again.
    pub fn cabinet_left(self: &Arc<Self>, id: &str) {
        if self.redis.is_none() {
            return;
        }
        let held = self.cabinets.lock().ok().and_then(|mut map| {
            let h = map.get_mut(id)?;
            Some(std::mem::replace(h, Held::Lost))
        });
        if let Some(Held::Held(fence)) = held {
            self.release_cabinet(id, fence);
        }
    }

    fn release_cabinet(self: &Arc<Self>, id: &str, fence: u64) {
        if let Ok(map) = self.cabinets.lock() {
            self.metrics
                .cluster_cabinet_leases
                .set(map.values().filter(|h| matches!(h, Held::Held(_))).count() as i64);
        }
        let (me, key) = (self.clone(), self.cabinet_key(id));
        tokio::spawn(async move { me.release(&key, fence, "cabinet").await });
    }

    /// Gives the lease at `key` up if it is still this node's under `fence`; `lease` names it
    /// in the metrics (`cabinet`, `partition`, `leader`).
    async fn release(&self, key: &str, fence: u64, lease: &'static str) {
        let Some(r) = &self.redis else { return };
        let mut conn = r.conn.clone();
        let done: Result<i64, _> = r
            .release
            .key(key)
            .arg(format!("{}|{fence}", self.settings.node_id))
            .invoke_async(&mut conn)
            .await;
        match done {
            Ok(1) => self.lease_change(lease, "released"),
            Ok(_) => {}
            Err(e) => self.failed("release", &ClusterError::from(e)),
        }
    }

    /// The token this node's writes for the cabinet carry: the last one it held the
    /// cabinet's lease under (also once the lease went: a goodbye written as the cabinet goes
    /// offline), 0 when it never held it (unfenced, as on a single node).
    pub fn write_fence(&self, id: &str) -> u64 {
        // Taking the lease again (the cabinet came back): the new token is not known yet, and
        // the last one may be older than another node's since; unfenced, as a first claim is.
        if self.cabinets.lock().ok().and_then(|m| m.get(id).copied()) == Some(Held::Claiming) {
            return 0;
        }
        self.last_fences
            .lock()
            .ok()
            .and_then(|last| last.get(id).copied())
            .unwrap_or(0)
    }

    /// How this node holds the cabinet's lease: on a single node, always held.
    pub fn cabinet_lease(&self, id: &str) -> Option<Held> {
        if self.redis.is_none() {
            return Some(Held::Held(0));
        }
        let held = self.cabinets.lock().ok()?.get(id).copied()?;
        Some(match held {
            Held::Held(_) if self.now_ms() >= self.cabinets_until_ms.load(Ordering::Acquire) => {
                Held::Lost
            }
            h => h,
        })
    }

    /// Whether this node may still command the cabinet: with several nodes, only while it holds
    /// the lease (or its first claim is in flight), not once another node took it, this node
    /// could not renew it in time, or the cabinet went offline here.
    pub fn may_command(&self, id: &str) -> bool {
        matches!(
            self.cabinet_lease(id),
            Some(Held::Held(_)) | Some(Held::Claiming)
        )
    }

    /// Whether another node took the cabinet's lease (or this node could not renew it): an
    /// actor here no longer speaks for the cabinet.
    pub fn lost(&self, id: &str) -> bool {
        self.redis.is_some() && matches!(self.cabinet_lease(id), Some(Held::Lost))
    }

    /// Whether this node serves the cabinet: always on a single node; with several, while it
    /// holds the lease or is taking it.
    pub fn serves(&self, id: &str) -> bool {
        self.redis.is_none() || self.may_command(id)
    }

    /// Renews every cabinet lease this node holds, in batches; marks those another node took.
    async fn renew_cabinets(&self) {
        let Some(r) = &self.redis else { return };
        let held: Vec<(String, u64)> = match self.cabinets.lock() {
            Ok(map) => map
                .iter()
                .filter_map(|(id, h)| match h {
                    Held::Held(f) => Some((id.clone(), *f)),
                    _ => None,
                })
                .collect(),
            Err(_) => return,
        };
        let sent = self.now_ms();
        let mut lost = Vec::new();
        let mut retaken = Vec::new();
        for chunk in held.chunks(RENEW_BATCH) {
            let mut call = r.renew.prepare_invoke();
            for (id, _) in chunk {
                call.key(self.cabinet_key(id));
            }
            call.key(self.key("fence"));
            call.arg(&self.settings.node_id)
                .arg(self.settings.lease.as_millis() as u64);
            for (_, fence) in chunk {
                call.arg(*fence);
            }
            let mut conn = r.conn.clone();
            match call.invoke_async::<Vec<i64>>(&mut conn).await {
                Ok(answers) => {
                    self.redis_ok.store(true, Ordering::Relaxed);
                    for ((id, fence), a) in chunk.iter().zip(answers) {
                        match a {
                            0 => {}
                            n if n > 0 => retaken.push((id.clone(), *fence, n as u64)),
                            _ => lost.push((id.clone(), *fence)),
                        }
                    }
                }
                Err(e) => {
                    // The leases of this batch run out on their own if no later round
                    // renews them (`cabinet_lease`).
                    self.failed("cabinet_renew", &ClusterError::from(e));
                    return;
                }
            }
        }
        self.cabinets_until_ms
            .store(sent + self.believed_ms(), Ordering::Release);
        if let Ok(mut map) = self.cabinets.lock() {
            for (id, fence) in &lost {
                if map.get(id) == Some(&Held::Held(*fence)) {
                    map.insert(id.clone(), Held::Lost);
                    self.lease_change("cabinet", "lost");
                    tracing::warn!(cabinet_id = %id, "cabinet lease lost to another node");
                }
            }
            for (id, old, new) in &retaken {
                if map.get(id) == Some(&Held::Held(*old)) {
                    map.insert(id.clone(), Held::Held(*new));
                    self.lease_change("cabinet", "acquired");
                    self.lease_taken(id, *new);
                }
            }
            self.metrics
                .cluster_cabinet_leases
                .set(map.values().filter(|h| matches!(h, Held::Held(_))).count() as i64);
        }
    }

    /// A connection of its own for blocking stream reads (a blocking read holds its connection
    /// until it returns), made again and again until Redis answers.
    async fn reading_connection(&self, url: &str, op: &'static str) -> ConnectionManager {
        let mut wait =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let made = async {
                let client = redis::Client::open(url)?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_millis(READ_BLOCK_MS + 3_000)));
                client.get_connection_manager_with_config(config).await
            };
            match made.await {
                Ok(c) => return c,
                Err(e) => {
                    self.failed(op, &e.into());
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        }
    }

    /// Who owns a cabinet now, as Redis has it (`None` when nobody does, or on a single node).
    pub async fn owner(&self, id: &str) -> Result<Option<Owner>, ClusterError> {
        let Some(r) = &self.redis else {
            return Ok(None);
        };
        let mut conn = r.conn.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(self.cabinet_key(id))
            .query_async(&mut conn)
            .await?;
        Ok(v.and_then(|v| {
            let (node, fence) = v.rsplit_once('|')?;
            Some(Owner {
                node: node.to_owned(),
                fence: fence.parse().ok()?,
            })
        }))
    }

    /// Whether another live node serves the cabinet now (holds its lease): what it has under
    /// way is its own. False on a single node. When Redis cannot tell, true: a caller that
    /// would take over another node's work (the start-up sweep, resuming sessions) leaves it
    /// rather than act on it beside a live owner (a later pass, the leader's stale-session
    /// sweep and stalled completions, picks up what truly has no owner).
    pub async fn serves_elsewhere(&self, cabinet: &str) -> bool {
        match self.owner(cabinet).await {
            Ok(Some(o)) => o.node != self.settings.node_id,
            Ok(None) => false,
            Err(e) => {
                self.failed("owner", &e);
                self.redis.is_some()
            }
        }
    }

    /// Renews the leader lease and the cabinets' leases every `renew` until the process ends
    /// (or the task answered is aborted: a node dying, in tests).
    pub fn start(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        self.redis.as_ref()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.settings.renew);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.lead().await;
                me.renew_cabinets().await;
            }
        }))
    }

    /// Gives up the leader lease for good (a clean shutdown), so that another node takes over
    /// at its next renewal rather than after the lease runs out.
    pub async fn step_down(&self) {
        if self.redis.is_none() {
            return;
        }
        self.stepped_down.store(true, Ordering::Release);
        if !self.is_leader() {
            return;
        }
        let fence = self.leader_fence.load(Ordering::Acquire);
        self.leader_until_ms.store(0, Ordering::Release);
        self.metrics.cluster_leader.set(0);
        self.release(&self.key("leader"), fence, "leader").await;
    }
}

/// A node name unique on this machine and across machines: the host, the process and a random
/// suffix (two nodes on one machine, or a restarted node, never share one).
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let suffix = crate::secrets::token(6).unwrap_or_else(|_| "0".to_owned());
    format!("{host}-{}-{suffix}", std::process::id())
}
