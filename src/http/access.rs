//! What the node keeps in memory about API keys: when each was last used (written to storage
//! at most once a minute per key, not on every request), the feed tickets handed out to
//! browsers, and revocations, announced to the open feed sockets so they close at once.
//!
//! Nothing here lets a key in: every request still looks its key up in storage, so a revoked
//! key is refused by the next request whatever this node remembers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::auth::Role;
use crate::secrets::{sha256_hex, token};

/// How often a key's last use is written to storage, at most.
pub const LAST_USED_WRITE_EVERY_MS: i64 = 60_000;
/// Tickets one key may have outstanding; a further one replaces the oldest.
const TICKETS_PER_KEY: usize = 16;

/// A feed ticket's holder: the key it was issued to, with that key's role and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketHolder {
    /// The key's id.
    pub key_id: String,
    /// Its role.
    pub role: Role,
    /// Its scope.
    pub merchant: Option<String>,
}

struct Ticket {
    holder: TicketHolder,
    issued: Instant,
    /// Issue order (instants may tie).
    n: u64,
}

#[derive(Default)]
struct Tickets {
    next: u64,
    /// By the SHA-256 of the ticket: the ticket itself is kept nowhere.
    by_hash: HashMap<String, Ticket>,
}

#[derive(Default)]
struct Usage {
    /// The latest use seen, Unix ms.
    last: i64,
    /// The last use written to storage, Unix ms.
    written: i64,
}

/// API-key state of this node.
pub struct KeyAccess {
    usage: Mutex<HashMap<String, Usage>>,
    tickets: Mutex<Tickets>,
    revoked: Mutex<HashSet<String>>,
    revocations: broadcast::Sender<Arc<str>>,
    ticket_ttl: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section below leaves its map consistent: a panic elsewhere poisons
    // nothing worth refusing requests over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyAccess {
    /// Tickets live `ticket_ttl`.
    pub fn new(ticket_ttl: Duration) -> Self {
        let (revocations, _) = broadcast::channel(256);
        Self {
            usage: Mutex::new(HashMap::new()),
            tickets: Mutex::new(Tickets::default()),
            revoked: Mutex::new(HashSet::new()),
            revocations,
            ticket_ttl,
        }
    }

    /// How long a ticket lives.
    pub fn ticket_ttl(&self) -> Duration {
        self.ticket_ttl
    }

    /// Notes a use of key `id` at `now` (Unix ms); true when it is time to write it down.
    pub fn used(&self, id: &str, now: i64) -> bool {
        let mut usage = lock(&self.usage);
        let u = usage.entry(id.to_owned()).or_default();
        u.last = u.last.max(now);
        if now - u.written >= LAST_USED_WRITE_EVERY_MS {
            u.written = now;
            true
        } else {
            false
        }
    }

    /// The latest use of key `id` this node has seen since it started.
    pub fn last_used(&self, id: &str) -> Option<i64> {
        lock(&self.usage).get(id).map(|u| u.last)
    }

    /// A new single-use ticket for the holder.
    pub fn issue_ticket(&self, holder: TicketHolder) -> Result<String, ring::error::Unspecified> {
        let ticket = format!("ft_{}", token(40)?);
        let now = Instant::now();
        let mut tickets = lock(&self.tickets);
        let ttl = self.ticket_ttl;
        tickets
            .by_hash
            .retain(|_, t| now.duration_since(t.issued) < ttl);
        let mine = tickets
            .by_hash
            .iter()
            .filter(|(_, t)| t.holder.key_id == holder.key_id);
        if mine.clone().count() >= TICKETS_PER_KEY {
            if let Some(oldest) = mine.min_by_key(|(_, t)| t.n).map(|(h, _)| h.clone()) {
                tickets.by_hash.remove(&oldest);
            }
        }
        tickets.next += 1;
        let n = tickets.next;
        tickets.by_hash.insert(
            sha256_hex(&ticket),
            Ticket {
                holder,
                issued: now,
                n,
            },
        );
        Ok(ticket)
    }

    /// Takes a ticket: its holder, once, within its lifetime and while its key stands.
    pub fn redeem_ticket(&self, ticket: &str) -> Option<TicketHolder> {
        let t = lock(&self.tickets).by_hash.remove(&sha256_hex(ticket))?;
        if t.issued.elapsed() >= self.ticket_ttl || self.is_revoked(&t.holder.key_id) {
            return None;
        }
        Some(t.holder)
    }

    /// Announces that key `id` was revoked: its tickets die and its feed sockets close.
    pub fn revoked(&self, id: &str) {
        lock(&self.revoked).insert(id.to_owned());
        lock(&self.tickets)
            .by_hash
            .retain(|_, t| t.holder.key_id != id);
        // No receiver means no open socket: nothing to close.
        let _ = self.revocations.send(Arc::from(id));
    }

    /// Whether key `id` was revoked while this node ran.
    pub fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked).contains(id)
    }

    /// Revocations from now on. Subscribe before checking [`KeyAccess::is_revoked`], so that
    /// a revocation between the two is not missed.
    pub fn revocations(&self) -> broadcast::Receiver<Arc<str>> {
        self.revocations.subscribe()
    }
}

/// Query parameters whose values are never logged, by name (and by these suffixes after `_`).
const SECRET_PARAMS: &[&str] = &[
    "token",
    "ticket",
    "key",
    "secret",
    "sign",
    "signature",
    "password",
];

fn secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS
        .iter()
        .any(|s| name == *s || name.ends_with(&format!("_{s}")))
        || name == "apikey"
}

/// `query` with the values of secret-looking parameters replaced by `REDACTED`. The name is
/// compared decoded, so `%74oken=` is caught like `token=`.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (raw_name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name: String = url::form_urlencoded::parse(raw_name.as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect();
            if secret_param(&name) && !value.is_empty() {
                format!("{raw_name}=REDACTED")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The HTTP access log: method, path, the query with secrets redacted, status, duration.
pub fn access_log() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%{request}xi %s %Dms")
        .custom_request_replace("request", |req| {
            let query = req.query_string();
            let sep = if query.is_empty() { "" } else { "?" };
            format!(
                "{} {}{sep}{} {:?}",
                req.method(),
                req.path(),
                redact_query(query),
                req.version()
            )
        })
        .log_target("http")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(id: &str) -> TicketHolder {
        TicketHolder {
            key_id: id.into(),
            role: Role::Viewer,
            merchant: Some("m1".into()),
        }
    }

    #[test]
    fn secret_query_values_are_redacted() {
        assert_eq!(
            redact_query("token=chk_a_b&since=4&ticket=ft_x&Key=1&sign=s&signature=t&secret=u"),
            "token=REDACTED&since=4&ticket=REDACTED&Key=REDACTED&sign=REDACTED&signature=REDACTED&secret=REDACTED"
        );
        assert_eq!(redact_query("%74oken=chk_x&a"), "%74oken=REDACTED&a");
        assert_eq!(
            redact_query("access_token=x&api_key=y&monkey=z"),
            "access_token=REDACTED&api_key=REDACTED&monkey=z"
        );
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn last_use_is_written_at_most_once_a_minute() {
        let a = KeyAccess::new(Duration::from_secs(30));
        assert!(a.used("k", 1_000_000), "the first use is written");
        assert!(!a.used("k", 1_000_500));
        assert!(!a.used("k", 1_059_999));
        assert_eq!(a.last_used("k"), Some(1_059_999), "but remembered");
        assert!(a.used("k", 1_060_000));
        assert!(a.used("other", 1_060_000), "per key");
    }

    #[test]
    fn a_ticket_is_single_use_and_dies_with_its_key() {
        let a = KeyAccess::new(Duration::from_secs(30));
        let t = a.issue_ticket(holder("k1")).unwrap_or_default();
        assert!(t.starts_with("ft_"));
        assert_eq!(a.redeem_ticket(&t), Some(holder("k1")));
        assert_eq!(a.redeem_ticket(&t), None, "single use");
        let t = a.issue_ticket(holder("k1")).unwrap_or_default();
        let mut rx = a.revocations();
        a.revoked("k1");
        assert_eq!(a.redeem_ticket(&t), None, "revoked with its key");
        assert_eq!(rx.try_recv().ok().as_deref(), Some("k1"));
        assert!(a.is_revoked("k1"));
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let a = KeyAccess::new(Duration::from_millis(0));
        let t = a.issue_ticket(holder("k1")).unwrap_or_default();
        assert_eq!(a.redeem_ticket(&t), None);
    }

    #[test]
    fn outstanding_tickets_per_key_are_bounded() {
        let a = KeyAccess::new(Duration::from_secs(30));
        let first = a.issue_ticket(holder("k1")).unwrap_or_default();
        for _ in 0..TICKETS_PER_KEY {
            a.issue_ticket(holder("k1")).unwrap_or_default();
        }
        assert_eq!(lock(&a.tickets).by_hash.len(), TICKETS_PER_KEY);
        assert_eq!(a.redeem_ticket(&first), None, "the oldest made room");
    }
}
