//! Storage over sqlx's `Any` driver: SQLite (the embedded default) and PostgreSQL, portable
//! column types only (BIGINT, TEXT, DOUBLE PRECISION; money in fen, times in Unix ms, flags 0/1).
//!
//! A bound limit is written `LIMIT CAST($n AS BIGINT)`, never as a bare parameter: SQLite plans
//! with the value of a bare limit parameter and so compiles the statement again every time a
//! value is bound to it, which sqlx does on every run (the due-work scans several times a
//! second, and every list). Through a cast the prepared statement is kept.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Row, SqlSafeStr};

use cabinet_actors::alert::{ActiveAlert, AlertType};
use cabinet_actors::pricing::ListPrice;
use cabinet_actors::protocol::CabinetConfig;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with that key exists.
    #[error("already exists")]
    Conflict,
    /// Stored data did not decode (a bug or a hand-edited row).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An `Idempotency-Key` stored with another request.
    #[error("idempotency key reused for another request")]
    KeyReused,
}

pub(crate) fn conflict_or(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Db(e),
    }
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

mod audit;
mod bills;
mod cache;
mod catalog;
mod keys;
mod recognition;
mod service_orders;
mod sessions;
mod settlements;
mod stock;
pub use audit::AuditRow;
pub use bills::DayRows;
pub use catalog::{PromotionRow, PromotionRule};
pub use keys::{ApiKeyRecord, Revocation};
pub use service_orders::{ServiceOrderRow, ServicePaid, ServicePayment, YEAR_MS};
pub use sessions::{
    BlacklistRow, KeyedSession, Notice, NoticeEffect, NoticeOutcome, OrderFilter, OrderRow,
    OrderUpdate, PaymentExceptionRow, RefundRow, SessionRow,
};
pub use settlements::{SettlementMove, SettlementReturnRow, SettlementRow};
pub use stock::{Recount, Recounted, StockDiscrepancyRow, StockRow, Taken, TemplateRow};

/// A merchant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MerchantRow {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Platform commission in basis points.
    pub commission_bps: i64,
    /// Unix ms.
    pub created_at: i64,
}

/// A merchant's payment settings: what its pay-after-use orders are created with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MerchantPayment {
    /// The risk ceiling (`risk_fund.amount`), fen.
    pub risk_ceiling_fen: i64,
    /// Its WeChat second-level merchant number (平台收付通 `sub_mchid`).
    pub wechat_sub_mchid: Option<String>,
    /// The customer-service phone its shoppers see with the order.
    pub service_phone: Option<String>,
    /// Its Alipay sub-merchant id (`smid`).
    pub alipay_smid: Option<String>,
    /// The `app_auth_token` it granted the platform's Alipay app (secret).
    pub alipay_app_auth_token: Option<String>,
    /// Recognitions are paid from a prepaid quota (else after use, on the bill).
    pub recognition_prepaid: bool,
    /// What is left of the prepaid quota (below zero: owed).
    pub recognition_quota: i64,
}

/// A merchant's prepaid recognition quota, as the feed tells it when it runs low or out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecognitionQuota {
    /// Whose.
    pub merchant_id: String,
    /// What is left (below zero: owed).
    pub quota_left: i64,
    /// `low` or `exhausted`.
    pub state: &'static str,
}

/// An API key (its hash; the key itself is shown once).
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    /// Public id (prefix of the key).
    pub id: String,
    /// Scope; `None` for admin.
    pub merchant_id: Option<String>,
    /// Role name.
    pub role: String,
}

/// A registered cabinet.
#[derive(Debug, Clone)]
pub struct CabinetRow {
    /// Id.
    pub id: String,
    /// Owner.
    pub merchant_id: String,
    /// Model.
    pub model: String,
    /// Placement (点位).
    pub point: String,
    /// SHA-256 of the MQTT secret, hex.
    pub secret_hash: String,
    /// Activated.
    pub active: bool,
    /// Unix ms.
    pub service_expires_at: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub activated_at: Option<i64>,
    /// Ever counted in by a restock: purchases take from its stock.
    pub keeps_stock: bool,
}

/// A stored alert, active or not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertRow {
    /// Id.
    pub id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Severity name.
    pub severity: String,
    /// Context.
    pub detail: Option<String>,
    /// Unix ms.
    pub raised_at: i64,
    /// Unix ms.
    pub acked_at: Option<i64>,
    /// Key id.
    pub acked_by: Option<String>,
    /// Unix ms.
    pub cleared_at: Option<i64>,
    /// `condition` or a key id.
    pub cleared_by: Option<String>,
    /// While flapping (or once it flapped): how many times its condition was raised; 0 for an
    /// alert that never flapped.
    pub flaps: i64,
}

/// Filters for listing alerts.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// Only this merchant's.
    pub merchant_id: Option<String>,
    /// Only this cabinet's.
    pub cabinet_id: Option<String>,
    /// Only active (or only ended).
    pub active: Option<bool>,
    /// At most this many, newest first.
    pub limit: i64,
}

// The two dialects' files are identical today (portable types only); they stay separate so
// either can diverge without touching the other. One line per migration, in order.
fn migrator(postgres: bool) -> Migrator {
    macro_rules! sql {
        ($file:literal) => {
            if postgres {
                include_str!(concat!("../../migrations/postgres/", $file))
            } else {
                include_str!(concat!("../../migrations/sqlite/", $file))
            }
        };
    }
    let files: Vec<(i64, &str, &'static str)> = vec![
        (1, "core", sql!("0001_core.sql")),
        (2, "catalog", sql!("0002_catalog.sql")),
        (3, "sessions", sql!("0003_sessions.sql")),
        (4, "exceptions", sql!("0004_exceptions.sql")),
        (5, "api_keys", sql!("0005_api_keys.sql")),
        (6, "ops", sql!("0006_ops.sql")),
        (
            7,
            "certificate_revocation",
            sql!("0007_certificate_revocation.sql"),
        ),
        (8, "alert_flaps", sql!("0008_alert_flaps.sql")),
        (9, "pending_collect", sql!("0009_pending_collect.sql")),
        (10, "session_close", sql!("0010_session_close.sql")),
        (
            11,
            "merchant_payment_readiness",
            sql!("0011_merchant_payment_readiness.sql"),
        ),
        (
            12,
            "payment_exceptions",
            sql!("0012_payment_exceptions.sql"),
        ),
        (13, "refund_states", sql!("0013_refund_states.sql")),
        (14, "price_terms", sql!("0014_price_terms.sql")),
        (15, "audit", sql!("0015_audit.sql")),
        (16, "authorised_amount", sql!("0016_authorised_amount.sql")),
        (17, "deduction_failure", sql!("0017_deduction_failure.sql")),
        (18, "settlements", sql!("0018_settlements.sql")),
        (19, "bills", sql!("0019_bills.sql")),
        (20, "service_reminders", sql!("0020_service_reminders.sql")),
        (21, "service_orders", sql!("0021_service_orders.sql")),
        (
            22,
            "recognition_billing",
            sql!("0022_recognition_billing.sql"),
        ),
        (23, "stock", sql!("0023_stock.sql")),
        (24, "lease_fence", sql!("0024_lease_fence.sql")),
    ];
    Migrator::with_migrations(
        files
            .into_iter()
            .map(|(v, name, sql)| {
                Migration::new(
                    v,
                    Cow::Owned(name.to_owned()),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The hub's database.
#[derive(Clone, Debug)]
pub struct Store {
    /// Where reads go (see [`Conns`]).
    reads: Conns,
    /// Where every write goes. On SQLite one connection: SQLite takes one writer at a time, so
    /// writes wait their turn on its lock, in order, rather than each retrying in SQLite's busy
    /// handler, and a transaction never meets SQLITE_BUSY from a sibling connection of the
    /// same hub. On PostgreSQL the pool of reads.
    writes: Conns,
    postgres: bool,
    changes: Option<tokio::sync::mpsc::UnboundedSender<Change>>,
    caches: std::sync::Arc<Caches>,
}

/// What a purchase reads and people rarely change (see [`cache`]).
#[derive(Debug)]
struct Caches {
    announce: cache::Announce,
    cabinets: cache::Cached<String, Option<CabinetRow>>,
    /// By cabinet and merchant (the merchant names the products).
    prices: cache::Cached<(String, String), BTreeMap<String, ListPrice>>,
    /// A merchant's promotions that have not ended.
    promotions: cache::Cached<String, Vec<PromotionRow>>,
    /// A merchant's payment settings.
    terms: cache::Cached<String, Option<MerchantPayment>>,
    /// Live API keys by hash, for at most [`cache::KEY_TTL`].
    keys: cache::Cached<String, ApiKeyRow>,
}

impl Caches {
    fn new(ttl: Duration) -> Self {
        let a = cache::Announce::default();
        Self {
            cabinets: cache::Cached::named("cabinets", ttl, a.clone()),
            prices: cache::Cached::named("prices", ttl, a.clone()),
            promotions: cache::Cached::named("promotions", ttl, a.clone()),
            terms: cache::Cached::named("terms", ttl, a.clone()),
            keys: cache::Cached::named("keys", ttl.min(cache::KEY_TTL), a.clone()),
            announce: a,
        }
    }
}

/// How long a cached row may be served after a hand edit of the database changed it; the
/// hub's own writes apply at once. (Nodes that share a database must tell one another of their
/// writes before they can share it: see docs/architecture.md.)
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// Connections. On SQLite they are held for the life of the store, each behind a lock, rather
/// than pooled: a pool tests every connection it gets back (a ping, one more round trip to the
/// connection's worker thread per statement, half a statement's cost on the purchase path),
/// and a SQLite connection is a file handle in this process that cannot go stale. On
/// PostgreSQL the pool, whose test finds a connection the server or the network dropped.
#[derive(Clone, Debug)]
enum Conns {
    Held(std::sync::Arc<Held>),
    Pooled(AnyPool),
}

#[derive(Debug)]
struct Held {
    /// To open a connection again in the slot of one that broke.
    options: AnyConnectOptions,
    conns: Vec<tokio::sync::Mutex<Option<AnyConnection>>>,
    /// One permit per connection: who holds one finds a connection free, and who waits for one
    /// waits in turn (fair), not behind one slow statement while another connection is idle.
    permits: tokio::sync::Semaphore,
    /// Where the next statement starts looking for a free connection.
    next: std::sync::atomic::AtomicUsize,
}

impl Conns {
    /// Opens `n` (at least one) SQLite connections through a pool that applies the pragmas
    /// every connection gets, and keeps them.
    async fn held(options: &AnyConnectOptions, n: u32) -> Result<Self> {
        let mut conns = Vec::with_capacity(n.max(1) as usize);
        for _ in 0..n.max(1) {
            conns.push(tokio::sync::Mutex::new(Some(open_sqlite(options).await?)));
        }
        Ok(Conns::Held(std::sync::Arc::new(Held {
            options: options.clone(),
            permits: tokio::sync::Semaphore::new(conns.len()),
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        })))
    }

    /// Tests every connection and opens a new one in the slot of any that broke (its worker
    /// thread gone: every statement on it would fail until a restart). Run by the readiness
    /// probe and every `HEALTH_CHECK` by the node.
    async fn check(&self) -> Result<()> {
        match self {
            Conns::Held(h) => {
                for slot in &h.conns {
                    let mut c = slot.lock().await;
                    let Some(conn) = c.as_mut() else {
                        return Err(StoreError::Db(sqlx::Error::PoolClosed));
                    };
                    if let Err(e) = conn.ping().await {
                        tracing::error!(error = %e, "a database connection broke; opening a new one");
                        *c = Some(open_sqlite(&h.options).await?);
                    }
                }
                Ok(())
            }
            Conns::Pooled(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
                Ok(())
            }
        }
    }

    /// A connection for one statement or transaction: a free one, waiting in turn when all
    /// are busy. After [`Conns::close`], `PoolClosed`.
    async fn get(&self) -> Result<Conn<'_>> {
        let closed = || StoreError::Db(sqlx::Error::PoolClosed);
        match self {
            Conns::Held(h) => {
                // As long as a pool would have waited: then 503 rather than an endless queue
                // (another process holding the file's lock, or more writes than the disk takes).
                let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, h.permits.acquire())
                    .await
                    .map_err(|_| StoreError::Db(sqlx::Error::PoolTimedOut))?
                    .map_err(|_| closed())?;
                let n = h.conns.len();
                loop {
                    let start = h.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
                    // With a permit a connection is free, or is being given back by a holder
                    // that let its permit go first: look again after letting it finish.
                    if let Some(guard) =
                        (0..n).find_map(|i| h.conns[(start + i) % n].try_lock().ok())
                    {
                        return tokio::sync::MutexGuard::try_map(guard, Option::as_mut)
                            .map(|conn| Conn::Held {
                                conn,
                                _permit: permit,
                            })
                            .map_err(|_| closed());
                    }
                    tokio::task::yield_now().await;
                }
            }
            Conns::Pooled(pool) => Ok(Conn::Pooled(pool.acquire().await?)),
        }
    }

    /// Closes every connection, waiting for statements in flight.
    async fn close(&self) {
        match self {
            Conns::Held(h) => {
                h.permits.close();
                for c in &h.conns {
                    if let Some(c) = c.lock().await.take() {
                        if let Err(e) = c.close().await {
                            tracing::warn!(error = %e, "a database connection did not close cleanly");
                        }
                    }
                }
            }
            Conns::Pooled(pool) => pool.close().await,
        }
    }
}

/// How long a statement waits for a connection before the request is refused (503).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the node tests its database connections (see [`Store::ping`]).
pub const HEALTH_CHECK: Duration = Duration::from_secs(30);

/// One SQLite connection with the pragmas every connection gets (applied by a pool of one that
/// only opens it).
async fn open_sqlite(options: &AnyConnectOptions) -> Result<AnyConnection> {
    let opener = pool_options(false, 1).connect_with(options.clone()).await?;
    let conn = opener.acquire().await?.detach();
    opener.close().await;
    Ok(conn)
}

/// The connection one statement or transaction uses (see [`Conns`]).
pub(crate) enum Conn<'a> {
    /// The connection, then its permit (fields drop in order: the connection is free before
    /// the permit lets the next one in).
    Held {
        conn: tokio::sync::MappedMutexGuard<'a, AnyConnection>,
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
    Pooled(PoolConnection<Any>),
}

impl std::ops::Deref for Conn<'_> {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            Conn::Held { conn, .. } => conn,
            Conn::Pooled(c) => c,
        }
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Conn::Held { conn, .. } => conn,
            Conn::Pooled(c) => c,
        }
    }
}

/// A committed change to a session or an order with the row as committed, announced after the
/// commit so that the operator feed shows only what is durable.
#[derive(Debug, Clone)]
pub enum Change {
    /// A session was created or changed state.
    Session(sessions::SessionRow),
    /// An order was created or changed (status, amounts).
    Order(sessions::OrderRow),
    /// A provider notice did not match its order and was not applied, or a settlement step
    /// failed.
    PaymentException(sessions::PaymentExceptionRow),
    /// An order's settlement moved.
    Settlement(settlements::SettlementRow),
    /// A service-time order was made, paid or cancelled.
    ServiceOrder(service_orders::ServiceOrderRow),
    /// A prepaid recognition quota ran low or out.
    RecognitionQuota(RecognitionQuota),
    /// A product ran low in a cabinet (`true`) or is above its mark again (`false`): the
    /// merchant, the product's stock.
    StockLow(String, stock::StockRow, bool),
    /// A restock's count did not match what was expected.
    StockDiscrepancy(stock::StockDiscrepancyRow),
}

fn pool_options(postgres: bool, max_connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // A SQLite connection is a file handle in this process and cannot go stale; pinging it
        // before every statement was a second round trip to its worker thread per query.
        .test_before_acquire(postgres)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !postgres {
                    // WAL lets readers run beside the writer. The busy timeout is for other
                    // processes on the same file (a backup, a second hub by mistake): within
                    // the hub, writes queue for the one writer connection.
                    sqlx::raw_sql("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
}

impl Store {
    /// Connects and applies migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres");
        let options = AnyConnectOptions::from_str(url)?;
        let pool = pool_options(postgres, max_connections)
            .connect_with(options.clone())
            .await?;
        migrator(postgres).run(&pool).await?;
        let (reads, writes) = if postgres {
            (Conns::Pooled(pool.clone()), Conns::Pooled(pool))
        } else {
            pool.close().await;
            (
                Conns::held(&options, max_connections).await?,
                Conns::held(&options, 1).await?,
            )
        };
        Ok(Self {
            reads,
            writes,
            postgres,
            changes: None,
            caches: std::sync::Arc::new(Caches::new(DEFAULT_CACHE_TTL)),
        })
    }

    /// Serves the cached rows (see [`cache`]) for at most `ttl` after another node changed
    /// them; zero reads storage every time. Call before the store is cloned.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.caches = std::sync::Arc::new(Caches::new(ttl));
        self
    }

    /// Tells `f` the name of every cache a write through this store changes, and the key (or
    /// `None`, all of them), after the write (several nodes: the others drop theirs,
    /// [`Store::forget`]). Call once, at start-up.
    pub fn announce_cache_changes(
        &self,
        f: impl Fn(&'static str, Option<&str>) + Send + Sync + 'static,
    ) {
        self.caches.announce.set(Box::new(f));
    }

    /// Drops the kept row `key` of the cache `name`, or all of them (another node changed
    /// some); unknown names are ignored.
    pub fn forget(&self, name: &str, key: Option<&str>) {
        fn drop_from<V: Clone>(c: &cache::Cached<String, V>, key: Option<&str>) {
            match key {
                Some(k) => c.invalidate(&k.to_owned()),
                None => c.clear(),
            }
        }
        let c = &self.caches;
        match name {
            "cabinets" => drop_from(&c.cabinets, key),
            "promotions" => drop_from(&c.promotions, key),
            "terms" => drop_from(&c.terms, key),
            "keys" => drop_from(&c.keys, key),
            "prices" => c.prices.clear(),
            _ => {}
        }
    }

    /// Announces every later committed session and order change on `tx`. Call before the
    /// store is cloned: clones made earlier do not announce.
    pub fn announce_changes(&mut self, tx: tokio::sync::mpsc::UnboundedSender<Change>) {
        self.changes = Some(tx);
    }

    pub(crate) fn changed(&self, c: Change) {
        if let Some(tx) = &self.changes {
            // A closed receiver means the node is shutting down; nothing is lost from storage.
            let _ = tx.send(c);
        }
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The connection for one write: the SQLite writer's turn, or one of the PostgreSQL
    /// pool's.
    pub(crate) async fn write(&self) -> Result<Conn<'_>> {
        self.writes.get().await
    }

    /// A connection for one read.
    pub(crate) async fn read(&self) -> Result<Conn<'_>> {
        self.reads.get().await
    }

    /// Tests the writer and every reader, opening a new SQLite connection in place of a broken
    /// one: the readiness probe, and the node every [`HEALTH_CHECK`].
    pub async fn ping(&self) -> Result<()> {
        self.writes.check().await?;
        self.reads.check().await
    }

    /// Closes the pool, waiting for queries in flight.
    pub async fn close(&self) {
        self.writes.close().await;
        self.reads.close().await;
    }

    // ---- merchants -------------------------------------------------------------------------

    /// Creates a merchant.
    pub async fn create_merchant(&self, m: &MerchantRow) -> Result<()> {
        let _fresh = self.caches.terms.invalidating(m.id.clone());
        sqlx::query(
            "INSERT INTO merchants (id, name, commission_bps, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&m.id)
        .bind(&m.name)
        .bind(m.commission_bps)
        .bind(m.created_at)
        .execute(&mut *self.write().await?)
        .await
        .map_err(conflict_or)?;
        Ok(())
    }

    /// A merchant by id.
    pub async fn merchant(&self, id: &str) -> Result<Option<MerchantRow>> {
        let row =
            sqlx::query("SELECT id, name, commission_bps, created_at FROM merchants WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *self.read().await?)
                .await?;
        row.map(|r| {
            Ok(MerchantRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                commission_bps: r.try_get("commission_bps")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    // ---- API keys --------------------------------------------------------------------------

    /// Stores a key's hash.
    pub async fn create_api_key(
        &self,
        id: &str,
        key_hash: &str,
        merchant_id: Option<&str>,
        role: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, key_hash, merchant_id, role, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(key_hash)
            .bind(merchant_id)
            .bind(role)
            .bind(now)
            .execute(&mut *self.write().await?)
            .await
            .map_err(conflict_or)?;
        Ok(())
    }

    /// The live key with this hash.
    pub async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRow>> {
        self.caches
            .keys
            .get_or_load_found(&key_hash.to_owned(), || self.load_api_key(key_hash))
            .await
    }

    async fn load_api_key(&self, key_hash: &str) -> Result<Option<ApiKeyRow>> {
        let row = sqlx::query(
            "SELECT id, merchant_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&mut *self.read().await?)
        .await?;
        row.map(|r| {
            Ok(ApiKeyRow {
                id: r.try_get("id")?,
                merchant_id: r.try_get("merchant_id")?,
                role: r.try_get("role")?,
            })
        })
        .transpose()
    }

    /// Whether any admin key exists.
    pub async fn has_admin_key(&self) -> Result<bool> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&mut *self.read().await?)
        .await?
        .try_get("n")?;
        Ok(n > 0)
    }

    // ---- cabinets --------------------------------------------------------------------------

    /// Registers a cabinet with its first desired configuration, atomically.
    pub async fn register_cabinet(
        &self,
        c: &CabinetRow,
        config: &CabinetConfig,
        by: &str,
    ) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query("INSERT INTO cabinets (id, merchant_id, model, point, secret_hash, active, created_at) VALUES ($1, $2, $3, $4, $5, 0, $6)")
            .bind(&c.id)
            .bind(&c.merchant_id)
            .bind(&c.model)
            .bind(&c.point)
            .bind(&c.secret_hash)
            .bind(c.created_at)
            .execute(&mut *tx)
            .await
            .map_err(conflict_or)?;
        insert_config(&mut tx, &c.id, config, c.created_at, by).await?;
        let _fresh = self.caches.cabinets.invalidating(c.id.clone());
        tx.commit().await?;
        Ok(())
    }

    /// A cabinet by id.
    pub async fn cabinet(&self, id: &str) -> Result<Option<CabinetRow>> {
        self.caches
            .cabinets
            .get_or_load(&id.to_owned(), || async {
                let row = sqlx::query("SELECT * FROM cabinets WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *self.read().await?)
                    .await?;
                row.map(|r| cabinet_row(&r)).transpose()
            })
            .await
    }

    /// Cabinets, optionally of one merchant, by id.
    pub async fn cabinets(&self, merchant_id: Option<&str>) -> Result<Vec<CabinetRow>> {
        let rows = match merchant_id {
            Some(m) => {
                sqlx::query("SELECT * FROM cabinets WHERE merchant_id = $1 ORDER BY id")
                    .bind(m)
                    .fetch_all(&mut *self.read().await?)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM cabinets ORDER BY id")
                    .fetch_all(&mut *self.read().await?)
                    .await?
            }
        };
        rows.iter().map(cabinet_row).collect()
    }

    /// Activates a registered cabinet; returns false when it was already active.
    pub async fn activate_cabinet(&self, id: &str, now: i64, expires_at: i64) -> Result<bool> {
        let _fresh = self.caches.cabinets.invalidating(id.to_owned());
        let r = sqlx::query("UPDATE cabinets SET active = 1, activated_at = $2, service_expires_at = COALESCE(service_expires_at, $3) WHERE id = $1 AND active = 0")
            .bind(id)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replaces a cabinet's MQTT secret (its hash).
    pub async fn set_cabinet_secret(&self, id: &str, secret_hash: &str) -> Result<bool> {
        let _fresh = self.caches.cabinets.invalidating(id.to_owned());
        let r = sqlx::query("UPDATE cabinets SET secret_hash = $2 WHERE id = $1")
            .bind(id)
            .bind(secret_hash)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Active cabinets whose service ends before `until` (expired ones included), soonest
    /// first, with the reminder already given for that expiry.
    pub async fn cabinets_expiring(&self, until: i64) -> Result<Vec<(CabinetRow, Option<i64>)>> {
        let rows = sqlx::query(
            "SELECT * FROM cabinets WHERE active = 1 AND service_expires_at IS NOT NULL \
             AND service_expires_at < $1 ORDER BY service_expires_at, id",
        )
        .bind(until)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok((cabinet_row(r)?, r.try_get("service_reminded_days")?)))
            .collect()
    }

    /// Records a service reminder unless an equal or nearer one was given for this expiry;
    /// answers whether it was recorded (and so is to be sent).
    pub async fn note_service_reminder(
        &self,
        id: &str,
        expires_at: i64,
        days: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE cabinets SET service_reminded_days = $3 WHERE id = $1 AND service_expires_at = $2 \
             AND (service_reminded_days IS NULL OR service_reminded_days > $3)",
        )
        .bind(id)
        .bind(expires_at)
        .bind(days)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Sets the service expiry.
    pub async fn set_service_expiry(&self, id: &str, expires_at: i64) -> Result<()> {
        let _fresh = self.caches.cabinets.invalidating(id.to_owned());
        sqlx::query(
            "UPDATE cabinets SET service_expires_at = $2, service_reminded_days = NULL WHERE id = $1",
        )
            .bind(id)
            .bind(expires_at)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// Records that a cabinet came online (`Some(at)`) or went offline (`None`), for the
    /// start-up sweep after a restart.
    pub async fn set_cabinet_online(&self, id: &str, online_at: Option<i64>) -> Result<()> {
        self.set_cabinet_online_fenced(id, online_at, 0)
            .await
            .map(|_| ())
    }

    /// As [`Store::set_cabinet_online`], by the holder of the cabinet's lease under `fence`
    /// (0: unfenced, a single node): false, and nothing written, when a newer owner's token is
    /// recorded ([`Store::record_lease_fence`]).
    pub async fn set_cabinet_online_fenced(
        &self,
        id: &str,
        online_at: Option<i64>,
        fence: u64,
    ) -> Result<bool> {
        // Not in the cached row: a connect storm must not drop every cabinet read in flight.
        let r = sqlx::query(
            "UPDATE cabinets SET online_at = $2 WHERE id = $1 AND ($3 = 0 OR lease_fence <= $3)",
        )
        .bind(id)
        .bind(online_at)
        .bind(fence as i64)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The newest lease token recorded for the cabinet (0: none).
    pub async fn lease_fence(&self, id: &str) -> Result<u64> {
        let fence: Option<i64> =
            sqlx::query_scalar("SELECT lease_fence FROM cabinets WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *self.read().await?)
                .await?;
        Ok(fence.unwrap_or(0).max(0) as u64)
    }

    /// Records that the cabinet's lease was taken under `fence`: from now on writes for it
    /// under an older token are refused. A token older than the one recorded changes nothing.
    pub async fn record_lease_fence(&self, id: &str, fence: u64) -> Result<()> {
        sqlx::query("UPDATE cabinets SET lease_fence = $2 WHERE id = $1 AND lease_fence < $2")
            .bind(id)
            .bind(fence as i64)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// The cabinets stored as online (the hub stopped while they were connected).
    pub async fn cabinets_stored_online(&self) -> Result<Vec<CabinetRow>> {
        let rows = sqlx::query("SELECT * FROM cabinets WHERE online_at IS NOT NULL ORDER BY id")
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter().map(cabinet_row).collect()
    }

    /// The newest desired configuration of a cabinet.
    pub async fn latest_config(&self, cabinet_id: &str) -> Result<Option<CabinetConfig>> {
        let row = sqlx::query("SELECT config FROM cabinet_configs WHERE cabinet_id = $1 ORDER BY version DESC LIMIT 1")
            .bind(cabinet_id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| {
            let text: String = r.try_get("config")?;
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// Stores a new desired configuration whose version is one above the newest; `edit`
    /// turns the newest into the new one. Returns the stored configuration.
    pub async fn new_config_version(
        &self,
        cabinet_id: &str,
        now: i64,
        by: &str,
        edit: impl Fn(&CabinetConfig) -> CabinetConfig,
    ) -> Result<CabinetConfig> {
        // Two operators editing at once both read version N; the primary key lets only one
        // write N+1, and the other retries on top of it.
        for _ in 0..5 {
            let Some(current) = self.latest_config(cabinet_id).await? else {
                return Err(StoreError::Corrupt(format!(
                    "cabinet {cabinet_id} has no configuration"
                )));
            };
            let mut next = edit(&current);
            next.version = current.version + 1;
            let mut w = self.write().await?;
            let mut tx = sqlx::Connection::begin(&mut *w).await?;
            match insert_config(&mut tx, cabinet_id, &next, now, by).await {
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(next);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Records an issued certificate and revokes the cabinet's earlier ones, in one
    /// transaction: a cabinet has one valid certificate at a time.
    pub async fn record_certificate(
        &self,
        serial: &str,
        cabinet_id: &str,
        issued_at: i64,
        expires_at: i64,
    ) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query(
            "UPDATE certificates SET revoked_at = $1 WHERE cabinet_id = $2 AND revoked_at IS NULL",
        )
        .bind(issued_at)
        .bind(cabinet_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO certificates (serial, cabinet_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(serial)
            .bind(cabinet_id)
            .bind(issued_at)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(conflict_or)?;
        tx.commit().await?;
        Ok(())
    }

    /// Revokes every valid certificate of a cabinet; answers how many there were.
    pub async fn revoke_certificates(&self, cabinet_id: &str, now: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE certificates SET revoked_at = $1 WHERE cabinet_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(cabinet_id)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(done.rows_affected())
    }

    /// Serials of one cabinet's certificates not revoked.
    pub async fn valid_certificates_of(&self, cabinet_id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT serial FROM certificates WHERE cabinet_id = $1 AND revoked_at IS NULL",
        )
        .bind(cabinet_id)
        .fetch_all(&mut *self.write().await?)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("serial")?)).collect()
    }

    /// `(cabinet id, serial)` of every certificate not revoked (expiry is the TLS layer's).
    pub async fn valid_certificates(&self) -> Result<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT cabinet_id, serial FROM certificates WHERE revoked_at IS NULL")
                .fetch_all(&mut *self.read().await?)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("cabinet_id")?, r.try_get("serial")?)))
            .collect()
    }

    // ---- alerts ----------------------------------------------------------------------------

    /// Stores a raised alert; a second active alert of the same (cabinet, type) is ignored.
    pub async fn insert_alert(
        &self,
        cabinet_id: &str,
        merchant_id: &str,
        a: &ActiveAlert,
    ) -> Result<bool> {
        self.insert_alert_fenced(cabinet_id, merchant_id, a, 0)
            .await
    }

    /// As [`Store::insert_alert`], by the holder of the cabinet's lease under `fence` (0:
    /// unfenced): false, and nothing written, when a newer owner's token is recorded.
    pub async fn insert_alert_fenced(
        &self,
        cabinet_id: &str,
        merchant_id: &str,
        a: &ActiveAlert,
        fence: u64,
    ) -> Result<bool> {
        // `WHERE` on the SELECT also keeps SQLite from reading `ON CONFLICT` as a join.
        let r = sqlx::query("INSERT INTO alerts (id, cabinet_id, merchant_id, type, severity, detail, raised_at, flaps) SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE $9 = 0 OR COALESCE((SELECT lease_fence FROM cabinets WHERE id = $2), 0) <= $9 ON CONFLICT DO NOTHING")
            .bind(&a.id)
            .bind(cabinet_id)
            .bind(merchant_id)
            .bind(a.kind.as_str())
            .bind(a.kind.severity().as_str())
            .bind(a.detail.as_deref())
            .bind(a.raised_at as i64)
            .bind(i64::from(if a.flapping { a.flaps.max(1) } else { 0 }))
            .bind(fence as i64)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Updates a flapping alert's count (the alert is not raised again per toggle).
    pub async fn set_alert_flaps(&self, id: &str, flaps: u32) -> Result<bool> {
        let r = sqlx::query("UPDATE alerts SET flaps = $2 WHERE id = $1")
            .bind(id)
            .bind(i64::from(flaps))
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks an alert acknowledged (once).
    pub async fn ack_alert(&self, id: &str, by: &str, at: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE alerts SET acked_at = $2, acked_by = $3 WHERE id = $1 AND acked_at IS NULL",
        )
        .bind(id)
        .bind(at)
        .bind(by)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks an alert cleared (once).
    pub async fn clear_alert(&self, id: &str, by: &str, at: i64) -> Result<bool> {
        self.clear_alert_fenced(id, by, at, 0).await
    }

    /// As [`Store::clear_alert`], under `fence` (0: unfenced): false, and nothing written,
    /// when a newer owner of the alert's cabinet has recorded its token.
    pub async fn clear_alert_fenced(
        &self,
        id: &str,
        by: &str,
        at: i64,
        fence: u64,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE alerts SET cleared_at = $2, cleared_by = $3 WHERE id = $1 AND cleared_at IS NULL AND ($4 = 0 OR COALESCE((SELECT lease_fence FROM cabinets WHERE cabinets.id = alerts.cabinet_id), 0) <= $4)")
            .bind(id)
            .bind(at)
            .bind(by)
            .bind(fence as i64)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// One alert.
    pub async fn alert(&self, id: &str) -> Result<Option<AlertRow>> {
        let row = sqlx::query("SELECT * FROM alerts WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| alert_row(&r)).transpose()
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>> {
        // Numbered placeholders work on both backends; sqlx's QueryBuilder under `Any` emits
        // `?`, which PostgreSQL rejects.
        let mut sql = String::from("SELECT * FROM alerts WHERE 1=1");
        let mut binds: Vec<String> = Vec::new();
        if let Some(m) = &f.merchant_id {
            binds.push(m.clone());
            sql.push_str(&format!(" AND merchant_id = ${}", binds.len()));
        }
        if let Some(c) = &f.cabinet_id {
            binds.push(c.clone());
            sql.push_str(&format!(" AND cabinet_id = ${}", binds.len()));
        }
        match f.active {
            Some(true) => sql.push_str(" AND cleared_at IS NULL"),
            Some(false) => sql.push_str(" AND cleared_at IS NOT NULL"),
            None => {}
        }
        sql.push_str(&format!(
            " ORDER BY raised_at DESC, id LIMIT CAST(${} AS BIGINT)",
            binds.len() + 1
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.bind(f.limit).fetch_all(&mut *self.read().await?).await?;
        rows.iter().map(alert_row).collect()
    }

    /// The active alerts of a cabinet, for seeding its actor.
    pub async fn active_alerts(&self, cabinet_id: &str) -> Result<Vec<ActiveAlert>> {
        let rows = self
            .alerts(&AlertFilter {
                cabinet_id: Some(cabinet_id.to_owned()),
                active: Some(true),
                limit: 100,
                ..AlertFilter::default()
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(ActiveAlert {
                    kind: AlertType::parse(&r.kind)?,
                    id: r.id,
                    raised_at: r.raised_at.max(0) as u64,
                    acked: r.acked_at.is_some(),
                    detail: r.detail,
                    flapping: r.flaps > 0,
                    flaps: u32::try_from(r.flaps).unwrap_or(0),
                })
            })
            .collect())
    }
}

async fn insert_config(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cabinet_id: &str,
    config: &CabinetConfig,
    now: i64,
    by: &str,
) -> Result<()> {
    let text = serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query("INSERT INTO cabinet_configs (cabinet_id, version, config, created_at, created_by) VALUES ($1, $2, $3, $4, $5)")
        .bind(cabinet_id)
        .bind(config.version as i64)
        .bind(text)
        .bind(now)
        .bind(by)
        .execute(&mut **tx)
        .await
        .map_err(conflict_or)?;
    Ok(())
}

fn cabinet_row(r: &AnyRow) -> Result<CabinetRow> {
    Ok(CabinetRow {
        id: r.try_get("id")?,
        merchant_id: r.try_get("merchant_id")?,
        model: r.try_get("model")?,
        point: r.try_get("point")?,
        secret_hash: r.try_get("secret_hash")?,
        active: r.try_get::<i64, _>("active")? != 0,
        service_expires_at: r.try_get("service_expires_at")?,
        created_at: r.try_get("created_at")?,
        activated_at: r.try_get("activated_at")?,
        keeps_stock: r.try_get::<i64, _>("keeps_stock")? != 0,
    })
}

fn alert_row(r: &AnyRow) -> Result<AlertRow> {
    Ok(AlertRow {
        id: r.try_get("id")?,
        cabinet_id: r.try_get("cabinet_id")?,
        merchant_id: r.try_get("merchant_id")?,
        kind: r.try_get("type")?,
        severity: r.try_get("severity")?,
        detail: r.try_get("detail")?,
        raised_at: r.try_get("raised_at")?,
        acked_at: r.try_get("acked_at")?,
        acked_by: r.try_get("acked_by")?,
        cleared_at: r.try_get("cleared_at")?,
        cleared_by: r.try_get("cleared_by")?,
        flaps: r.try_get("flaps")?,
    })
}
