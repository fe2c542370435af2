//! Partitions of the fleet, for nodes attached to an external MQTT broker (`mqtt::external`).
//! With the embedded broker a cabinet's connection lands on one node and that decides who owns
//! it; behind a broker every node could read everything, so the fleet is cut into a fixed
//! number of partitions (a cabinet's is a hash of its id) and each partition is read by the
//! one node holding its lease.
//!
//! Partition leases are ordinary leases (the same scripts and fences as the leader's). Each
//! node aims at an equal share: it counts the live nodes (a sorted set each node re-enters at
//! every renewal, timed by Redis's clock), gives up what it holds beyond its share, and takes
//! free partitions up to it. A dead node's partitions fall free when their leases run out.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use redis::Script;

use super::Cluster;

/// Enters this node in the live set (`KEYS[1]`, scored by when each entry runs out, on Redis's
/// clock), drops entries that ran out, and answers how many nodes are live.
const NODES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
";

/// What one balancing round decided. The caller starts reading `gained`, stops reading `lost`
/// at once (another node may hold them), and stops reading `surplus` cleanly and then gives
/// each up with [`Cluster::release_partition`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Newly held.
    pub gained: Vec<u32>,
    /// No longer held.
    pub lost: Vec<u32>,
    /// Held beyond this node's share.
    pub surplus: Vec<u32>,
}

/// The partitions this node holds, with their fences.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    held: BTreeMap<u32, u64>,
    /// Set once a single node has taken every partition.
    all_taken: bool,
}

/// A cabinet's partition: FNV-1a of its id, modulo the number of partitions. Stable across
/// releases and nodes (it decides who reads the cabinet), so never change it.
pub fn partition_of(cabinet: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in cabinet.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

impl Cluster {
    fn partition_key(&self, p: u32) -> String {
        format!("{}:partition:{p}", self.settings.key_prefix)
    }

    /// Whether this node holds partition `p` now (always on a single node).
    pub fn holds_partition(&self, p: u32) -> bool {
        if self.redis.is_none() {
            return true;
        }
        let believed = self.now_ms() < self.partitions_until_ms.load(Ordering::Acquire);
        believed
            && self
                .partitions
                .lock()
                .is_ok_and(|parts| parts.held.contains_key(&p))
    }

    /// How many partitions this node holds.
    pub fn partitions_held(&self) -> usize {
        self.partitions.lock().map_or(0, |p| p.held.len())
    }

    /// One balancing round (every renewal period): renews what this node holds, and moves
    /// towards an equal share of `total` between the live nodes.
    pub async fn balance_partitions(&self, total: u32) -> PartitionPlan {
        let Some(r) = &self.redis else {
            let Ok(mut parts) = self.partitions.lock() else {
                return PartitionPlan::default();
            };
            if parts.all_taken {
                return PartitionPlan::default();
            }
            parts.all_taken = true;
            parts.held = (0..total).map(|p| (p, 0)).collect();
            return PartitionPlan {
                gained: (0..total).collect(),
                ..PartitionPlan::default()
            };
        };
        let mut plan = PartitionPlan::default();
        let sent = self.now_ms();
        let mut conn = r.conn.clone();
        let live: Result<u32, _> = Script::new(NODES)
            .key(self.key("nodes"))
            .arg(&self.settings.node_id)
            .arg(self.settings.lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        let live = match live {
            Ok(n) => n.max(1),
            Err(e) => {
                // Beliefs run out on their own (`holds_partition`); nothing new is taken.
                self.failed("partitions", &e.into());
                return plan;
            }
        };
        // Renew.
        let held: Vec<(u32, u64)> = match self.partitions.lock() {
            Ok(parts) => parts.held.iter().map(|(p, f)| (*p, *f)).collect(),
            Err(_) => return plan,
        };
        if !held.is_empty() {
            let mut call = r.renew.prepare_invoke();
            for (p, _) in &held {
                call.key(self.partition_key(*p));
            }
            call.key(self.key("fence"));
            call.arg(&self.settings.node_id)
                .arg(self.settings.lease.as_millis() as u64);
            for (_, fence) in &held {
                call.arg(*fence);
            }
            match call.invoke_async::<Vec<i64>>(&mut conn).await {
                Ok(answers) => {
                    let Ok(mut parts) = self.partitions.lock() else {
                        return plan;
                    };
                    for ((p, _), a) in held.iter().zip(answers) {
                        match a {
                            0 => {}
                            n if n > 0 => {
                                parts.held.insert(*p, n as u64);
                            }
                            _ => {
                                parts.held.remove(p);
                                plan.lost.push(*p);
                                self.lease_change("partition", "lost");
                                tracing::warn!(
                                    partition = p,
                                    "partition lease lost to another node"
                                );
                            }
                        }
                    }
                    self.partitions_until_ms
                        .store(sent + self.believed_ms(), Ordering::Release);
                }
                Err(e) => {
                    self.failed("partition_renew", &e.into());
                    return plan;
                }
            }
        }
        let share = total.div_ceil(live) as usize;
        let holding = self.partitions_held();
        if holding > share {
            if let Ok(parts) = self.partitions.lock() {
                plan.surplus = parts
                    .held
                    .keys()
                    .rev()
                    .take(holding - share)
                    .copied()
                    .collect();
            }
            return plan;
        }
        if holding == share {
            return plan;
        }
        // Take free partitions up to the share, starting at a place of this node's own so
        // that nodes starting together do not all ask for the same ones first.
        let keys: Vec<String> = (0..total).map(|p| self.partition_key(p)).collect();
        let owners: Vec<Option<String>> =
            match redis::cmd("MGET").arg(&keys).query_async(&mut conn).await {
                Ok(v) => v,
                Err(e) => {
                    self.failed("partition_claim", &e.into());
                    return plan;
                }
            };
        let start = partition_of(&self.settings.node_id, total);
        let mut wanted = share - holding;
        for i in 0..total {
            if wanted == 0 {
                break;
            }
            let p = (start + i) % total;
            if owners.get(p as usize).is_some_and(|o| o.is_some()) {
                continue;
            }
            let sent = self.now_ms();
            match self.run_claim(r, &self.partition_key(p), false).await {
                Ok((fence, _)) if fence > 0 => {
                    let Ok(mut parts) = self.partitions.lock() else {
                        return plan;
                    };
                    parts.held.insert(p, fence);
                    // A fresh lease lives at least as long as the renewed ones.
                    if parts.held.len() == 1 {
                        self.partitions_until_ms
                            .store(sent + self.believed_ms(), Ordering::Release);
                    }
                    plan.gained.push(p);
                    wanted -= 1;
                    self.lease_change("partition", "acquired");
                }
                Ok(_) => {}
                Err(e) => {
                    self.failed("partition_claim", &e);
                    return plan;
                }
            }
        }
        plan
    }

    /// Gives partition `p` up (its reader has stopped), so that another node takes it at its
    /// next round rather than when the lease runs out.
    pub async fn release_partition(&self, p: u32) {
        let fence = match self.partitions.lock() {
            Ok(mut parts) => parts.held.remove(&p),
            Err(_) => None,
        };
        if let Some(fence) = fence {
            self.release(&self.partition_key(p), fence, "partition")
                .await;
        }
    }

    /// Leaves the live set (a clean shutdown, after every partition was released), so that
    /// the others' shares grow at their next round.
    pub async fn leave(&self) {
        let Some(r) = &self.redis else { return };
        let mut conn = r.conn.clone();
        let done: Result<i64, _> = redis::cmd("ZREM")
            .arg(self.key("nodes"))
            .arg(&self.settings.node_id)
            .query_async(&mut conn)
            .await;
        if let Err(e) = done {
            self.failed("leave", &e.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::partition_of;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: a different hash would move every cabinet to another partition.
        assert_eq!(partition_of("KM400A00017", 64), 0xb521_33a2 % 64);
        assert_eq!(partition_of("KM400A00017", 64), 34);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(&format!("CAB{i:05}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(partition_of("x", 1), 0);
    }
}
