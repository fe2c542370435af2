//! Layered configuration: embedded `config/default.toml` → a file (`--config` or
//! `config/$HUB_ENV.toml`) → `HUB__SECTION__KEY` environment variables → flags.
//! Unknown keys, malformed URLs and bad addresses stop start-up with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use cabinet_actors::machine::Timing;
use cabinet_actors::pricing::Limits;
use cabinet_actors::protocol::{CabinetConfig, LightSchedule};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Everything a node needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the embedded database, device CA and keys live.
    pub data_dir: PathBuf,
    /// HTTP and WebSocket.
    pub http: HttpSettings,
    /// The embedded broker.
    pub mqtt: MqttSettings,
    /// Storage.
    pub database: DatabaseSettings,
    /// Multi-node coordination.
    pub redis: RedisSettings,
    /// This node.
    #[serde(default)]
    pub node: NodeSettings,
    /// Leases between nodes.
    pub cluster: ClusterSettings,
    /// An existing MQTT broker to attach to instead of the embedded one.
    #[serde(default)]
    pub external_broker: ExternalBrokerSettings,
    /// API keys.
    pub auth: AuthSettings,
    /// Cabinet timings and the first desired configuration.
    pub cabinet: CabinetSettings,
    /// Purchase sessions.
    pub session: SessionSettings,
    /// Payment providers.
    pub payments: PaymentSettings,
    /// Splitting paid orders between the platform and the merchant.
    pub settlement: SettlementSettings,
    pub service: ServiceSettings,
    pub recognition: RecognitionSettings,
    pub stock: StockSettings,
    /// The operator feed.
    pub feed: FeedSettings,
    /// Promotion clock.
    pub pricing: PricingSettings,
    /// Bounds on baskets and prices.
    pub limits: LimitsSettings,
    /// Actor threads.
    pub actors: ActorSettings,
    /// Logging.
    pub log: LogSettings,
    /// Who may scrape `/metrics`, and where.
    pub metrics: MetricsSettings,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `HUB__HTTP__LISTEN`
    pub listen: SocketAddr,
    /// 0 = one per core.
    pub workers: usize,
    /// `HUB__HTTP__BODY_TIMEOUT_MS`: a request whose body has not fully arrived by then is
    /// answered 408 and its connection closed (a slowloris holds nothing for long). The head
    /// gets the lesser of this and 5 s.
    pub body_timeout_ms: u64,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// `HUB__METRICS__TOKEN`: when set, `/metrics` needs `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// `HUB__METRICS__LISTEN`: when set, `/metrics` is served on this address only (404 on the
    /// main listener).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    /// `HUB__MQTT__LISTEN`: password mode.
    pub listen: SocketAddr,
    /// `HUB__MQTT__PASSWORD_ENABLED`: the password-mode listener; off for certificate-only
    /// deployments (then `tls_listen` is required).
    pub password_enabled: bool,
    /// `HUB__MQTT__MAX_TOPIC_LEN`: the longest topic or filter a cabinet may use, bytes.
    pub max_topic_len: usize,
    /// `HUB__MQTT__MAX_SUBSCRIPTIONS`: subscriptions one cabinet connection may hold.
    pub max_subscriptions: usize,
    /// `HUB__MQTT__TLS_LISTEN`: certificate mode, off when unset.
    #[serde(default)]
    pub tls_listen: Option<SocketAddr>,
    /// Names in the broker's server certificate.
    pub tls_server_names: Vec<String>,
    /// Connection limit of the broker.
    pub max_connections: usize,
    /// `HUB__MQTT__UPLINK_BUFFER_MIB`: how much uplink (topic + payload bytes) the broker
    /// holds for the hub while it has not read it yet; a burst beyond it is held back at the
    /// publishing cabinets (no PUBACK until there is room). Real memory is about twice this
    /// once full.
    pub uplink_buffer_mib: usize,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `HUB__DATABASE__URL`; a SQLite file in the data dir when unset.
    #[serde(default)]
    pub url: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// `HUB__DATABASE__CACHE_TTL_MS`: how long a cabinet, its sellable list and its merchant's
    /// promotions and payment terms may be served from memory after a hand edit of the
    /// database changed them; the hub's own writes apply at once. 0: read every time.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
}

fn default_cache_ttl_ms() -> u64 {
    60_000
}

/// `[redis]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `HUB__REDIS__URL`; single node when unset.
    #[serde(default)]
    pub url: Option<String>,
}

/// `[node]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// `HUB__NODE__ID`: this node's name in the cluster; unique by default (host, process,
    /// random), so that two nodes can run on one machine.
    #[serde(default)]
    pub id: Option<String>,
}

/// `[cluster]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// How long a lease (the leader's, a cabinet's) lives without renewal: how long the
    /// cluster waits before a dead node's work and cabinets are taken over.
    pub lease_ms: u64,
    /// How often a node renews its leases.
    pub renew_ms: u64,
    /// The prefix of every key in Redis.
    pub key_prefix: String,
}

/// `[external_broker]`: the nodes attach to an existing MQTT broker (Mosquitto, EMQX, HiveMQ)
/// as clients instead of running the embedded one (docs/architecture.md, "External broker").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalBrokerSettings {
    /// `HUB__EXTERNAL_BROKER__URL`: `mqtt://HOST:PORT` or `mqtts://HOST:PORT`; the embedded
    /// broker when unset.
    #[serde(default)]
    pub url: Option<String>,
    /// `HUB__EXTERNAL_BROKER__USERNAME`: the hub's own account at the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// `HUB__EXTERNAL_BROKER__PASSWORD`
    #[serde(default)]
    pub password: Option<String>,
    /// `HUB__EXTERNAL_BROKER__CA_FILE`: PEM roots that `mqtts://` trusts.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `HUB__EXTERNAL_BROKER__CLIENT_ID_PREFIX`: partition `n` connects as `{prefix}-p{n}`,
    /// whichever node holds it, so that its broker session (subscriptions, queued messages)
    /// passes from node to node with it.
    #[serde(default = "default_client_id_prefix")]
    pub client_id_prefix: String,
    /// `HUB__EXTERNAL_BROKER__PARTITIONS`: how many parts the fleet is split into between the
    /// nodes; the same on every node, and never changed while any node runs.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// `HUB__EXTERNAL_BROKER__KEEP_ALIVE_S`
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
}

fn default_completion_stalled_ms() -> u64 {
    300_000
}

fn default_client_id_prefix() -> String {
    "cabinet-hub".to_owned()
}

fn default_partitions() -> u32 {
    64
}

fn default_keep_alive_s() -> u64 {
    30
}

impl Default for ExternalBrokerSettings {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            ca_file: None,
            client_id_prefix: default_client_id_prefix(),
            partitions: default_partitions(),
            keep_alive_s: default_keep_alive_s(),
        }
    }
}

impl Settings {
    /// This node's name: `node.id`, else a unique one.
    pub fn node_id(&self) -> String {
        self.node
            .id
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(crate::cluster::default_node_id)
    }

    /// What the cluster port needs.
    pub fn cluster(&self, node_id: String) -> crate::cluster::ClusterSettings {
        crate::cluster::ClusterSettings {
            node_id,
            lease: std::time::Duration::from_millis(self.cluster.lease_ms),
            renew: std::time::Duration::from_millis(self.cluster.renew_ms),
            key_prefix: self.cluster.key_prefix.clone(),
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `HUB__AUTH__ADMIN_KEY`
    #[serde(default)]
    pub admin_key: Option<String>,
    /// `HUB__AUTH__FEED_TICKET_TTL_MS`: how long a feed ticket (`POST /api/v1/feed-tickets`)
    /// may wait for its socket.
    pub feed_ticket_ttl_ms: u64,
}

/// `[cabinet]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct CabinetSettings {
    pub unlock_ack_timeout_ms: u64,
    pub command_ack_timeout_ms: u64,
    pub latch_timeout_ms: u64,
    pub door_open_max_ms: u64,
    pub heartbeat_s: u32,
    pub missed_heartbeats: u32,
    pub temp_out_of_range_ms: u64,
    pub initial_service_days: u32,
    /// `HUB__CABINET__SERVICE_REMINDER_INTERVAL_MS`: how often the service-time reminders
    /// (30, 7, 1 days before expiry, and at expiry) are looked for.
    pub service_reminder_interval_ms: u64,
    pub temp_target_c: f64,
    pub temp_min_c: f64,
    pub temp_max_c: f64,
    pub light_on: String,
    pub light_off: String,
    pub foreign_object_lock: bool,
}

/// `[session]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// `HUB__SESSION__RECOGNITION_TIMEOUT_MS`
    pub recognition_timeout_ms: u64,
    /// `HUB__SESSION__DOOR_OPEN_TIMEOUT_MS`: unlock acked, door not opened → the session fails
    /// `door_never_opened`.
    pub door_open_timeout_ms: u64,
    /// `HUB__SESSION__OPEN_TIMEOUT_MS`: unlock acked, door not closed → abnormal
    /// `session_timeout`.
    pub open_timeout_ms: u64,
    /// `HUB__SESSION__SWEEP_INTERVAL_MS`: how often the supervisor looks for sessions no
    /// cabinet actor holds that outlived their time.
    pub sweep_interval_ms: u64,
}

/// `[payments]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    /// Run the WeChat Pay simulator in-process and use it.
    pub simulator: bool,
    /// `HUB__PAYMENTS__SIMULATOR_PUBLIC`: allow the simulators (development keys, an admin
    /// control API) on a non-loopback HTTP address. Off: such a start-up is refused.
    #[serde(default)]
    pub simulator_public: bool,
    /// `HUB__PAYMENTS__CONFIRM_TIMEOUT_MS`
    pub confirm_timeout_ms: u64,
    /// `HUB__PAYMENTS__DEDUCTION_CHECK_MS`
    pub deduction_check_ms: u64,
    /// `HUB__PAYMENTS__COMPLETION_STALLED_MS`: an order still `completing` this long after
    /// its last change was left by a node that died (its deduction check died with it): the
    /// leader completes it again, as a restart would. Well above `deduction_check_ms`.
    #[serde(default = "default_completion_stalled_ms")]
    pub completion_stalled_ms: u64,
    /// `HUB__PAYMENTS__COLLECT_INTERVAL_MS`
    pub collect_interval_ms: u64,
    /// `HUB__PAYMENTS__REFUND_CHECK_MS`: a refund still processing this long after its last
    /// word is asked about again.
    pub refund_check_ms: u64,
    /// `HUB__PAYMENTS__BLACKLIST_UNPAID_ORDERS`
    pub blacklist_unpaid_orders: u32,
    /// `HUB__PAYMENTS__BLACKLIST_AFTER_MS`
    pub blacklist_after_ms: u64,
    /// `HUB__PAYMENTS__SIMULATOR_RETRY_SCALE`
    pub simulator_retry_scale: f64,
    /// `HUB__PAYMENTS__SIMULATOR_CONFIRM_MS`: how long the simulators' shoppers take to confirm.
    pub simulator_confirm_ms: u64,
    /// `HUB__PAYMENTS__SIMULATOR_ORDERS_KEPT_S`: how long the WeChat Pay simulator remembers a
    /// finished order after its creation (a refund needs it).
    pub simulator_orders_kept_s: u64,
    /// `HUB__PAYMENTS__SIMULATOR_URL`: with `simulator` on, use the simulators served by a
    /// `cabinet-hub simulate` process at this address (`http://127.0.0.1:8090`) instead of
    /// serving them here, as the providers' own servers are in the field (the load tests use it
    /// so that the simulators' signing is not counted as the hub's).
    #[serde(default)]
    pub simulator_url: Option<String>,
    /// The real WeChat Pay service (when `simulator` is false).
    #[serde(default)]
    pub wechat: Option<crate::payments::wechat::WechatConfig>,
    /// The platform's own ordinary merchant account (普通商户), which takes the merchants'
    /// payments to the platform (service time) by WeChat Pay Native: a partner (服务商)
    /// account, as `wechat` is, cannot take a payment itself.
    #[serde(default)]
    pub wechat_merchant: Option<crate::payments::wechat::WechatConfig>,
    /// Real Alipay credentials (when `simulator` is false).
    #[serde(default)]
    pub alipay: Option<crate::payments::alipay::AlipaySettings>,
}

/// `[settlement]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementSettings {
    /// `HUB__SETTLEMENT__ENABLED`: split every paid WeChat order (the merchant's
    /// `commission_bps` to the platform, the rest released to the merchant). Off: orders are
    /// completed without profit sharing, and the whole payment is the merchant's at once.
    pub enabled: bool,
    /// `HUB__SETTLEMENT__FIRST_AFTER_MS`: how long after the completion the split is first
    /// asked for (WeChat takes one about 30 s after the payment).
    pub first_after_ms: u64,
    /// `HUB__SETTLEMENT__TICK_MS`: how often the supervisor takes what is due.
    pub tick_ms: u64,
    /// `HUB__SETTLEMENT__MAX_STEPS_PER_S`: at most this many provider steps a second (three an
    /// order): a rush's settlement waits rather than taking the shoppers' CPU.
    pub max_steps_per_s: u32,
    /// `HUB__SETTLEMENT__RETRY_MS`: the first wait after a failure, doubling per failure.
    pub retry_ms: u64,
    /// `HUB__SETTLEMENT__RETRY_MAX_MS`: the longest wait between attempts.
    pub retry_max_ms: u64,
    /// `HUB__SETTLEMENT__FOLLOW_MS`: how long a split the provider is still carrying out waits
    /// before it is asked about again.
    pub follow_ms: u64,
    /// `HUB__SETTLEMENT__SURFACE_AFTER`: failures in a row before a settlement is `failed` and
    /// an operator is told (a refusal on the merits is surfaced at once).
    pub surface_after: u32,
}

/// `[service]`: device service time (设备使用时长) bought by merchants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// `HUB__SERVICE__YEARLY_PRICE_FEN`: the price of one cabinet's year (fen).
    pub yearly_price_fen: i64,
    /// `HUB__SERVICE__UNPAID_CANCEL_MS`: an order not paid this long after it was made is
    /// closed at the provider and cancelled.
    pub unpaid_cancel_ms: u64,
    /// `HUB__SERVICE__SWEEP_MS`: how often unpaid orders are looked at (closed when due, asked
    /// about at the provider when a notification may have been lost).
    pub sweep_ms: u64,
    /// `HUB__SERVICE__MAX_CABINETS`: at most this many cabinets in one order.
    pub max_cabinets: usize,
}

/// `[recognition]`: how recognitions (算法识别次数) are billed to merchants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecognitionSettings {
    /// `HUB__RECOGNITION__FEE_FEN`: what one recognition costs a merchant that pays after use
    /// (fen, on the day's bill).
    pub fee_fen: i64,
    /// `HUB__RECOGNITION__LOW_QUOTA`: a prepaid merchant is warned when this many are left.
    pub low_quota: i64,
    /// `HUB__RECOGNITION__WHEN_EXHAUSTED`: a prepaid merchant with none left: `refuse` new
    /// purchase sessions (`recognition_quota_exhausted`) or `continue` (what is used beyond
    /// the quota is owed, taken from the next top-up).
    pub when_exhausted: String,
}

impl RecognitionSettings {
    /// Whether purchases are refused once a prepaid quota is used up.
    pub fn refuse_when_exhausted(&self) -> bool {
        self.when_exhausted == "refuse"
    }
}

/// `[stock]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockSettings {
    /// `HUB__STOCK__LOW_AT`: a product first counted into a cabinet is low there at or below
    /// this many (each can be set apart: `PUT /api/v1/cabinets/{id}/stock/{sku}`).
    pub low_at: i64,
}

/// `[feed]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedSettings {
    /// `HUB__FEED__REPLAY_EVENTS`
    pub replay_events: usize,
    /// `HUB__FEED__REPLAY_S`: no event older than this is kept for replay.
    pub replay_s: u64,
    /// `HUB__FEED__CLIENT_QUEUE`
    pub client_queue: usize,
    /// `HUB__FEED__MAX_SOCKETS`: open feed sockets on this node.
    pub max_sockets: usize,
    /// `HUB__FEED__MAX_SOCKETS_PER_KEY`: open feed sockets of one API key.
    pub max_sockets_per_key: usize,
    /// `HUB__FEED__SEND_TIMEOUT_MS`: a send (snapshot, replay or event) not taken by the socket
    /// within this drops the client.
    pub send_timeout_ms: u64,
}

/// `[pricing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    /// `HUB__PRICING__UTC_OFFSET_MIN`: local time of daily promotion slots.
    pub utc_offset_min: i32,
}

/// `[limits]`: bounds on baskets (quote, resolve, recognition) and list prices. The MQTT edge
/// rejects a recognition beyond the defaults (99 per line, 64 lines) whatever these say; a
/// recognition within those but beyond tighter limits here makes the order abnormal
/// (`out_of_range`) for a person to resolve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// `HUB__LIMITS__MAX_LINE_QTY`: largest quantity of one basket line.
    pub max_line_qty: u32,
    /// `HUB__LIMITS__MAX_BASKET_LINES`: most lines in one basket.
    pub max_basket_lines: usize,
    /// `HUB__LIMITS__MAX_BASKET_QTY`: most items in one basket, all lines together.
    pub max_basket_qty: u32,
    /// `HUB__LIMITS__MAX_PRICE_FEN`: largest list (unit) price, fen.
    pub max_price_fen: i64,
}

impl LimitsSettings {
    /// As the pricing function takes them.
    pub fn limits(&self) -> Limits {
        Limits {
            max_line_qty: self.max_line_qty,
            max_basket_lines: self.max_basket_lines,
            max_basket_qty: self.max_basket_qty,
            max_price_fen: self.max_price_fen,
        }
    }
}

/// `[actors]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSettings {
    /// 0 = one arbiter per core.
    pub threads: usize,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter.
    pub level: String,
}

/// Command-line overrides, applied last.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--http-listen`
    pub http_listen: Option<String>,
    /// `--mqtt-listen`
    pub mqtt_listen: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<String>,
    /// `--database-url`
    pub database_url: Option<String>,
}

impl Settings {
    /// Loads all layers. `file` is `--config`; without it `config/$HUB_ENV.toml` when `HUB_ENV`
    /// is set.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        Self::load_with_view(file, overrides).map(|(s, _)| s)
    }

    /// [`Settings::load`], and every layered key with its value for people to read, secrets
    /// shown as `"<redacted>"` (see [`redact_secrets`]).
    pub fn load_with_view(
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> anyhow::Result<(Self, serde_json::Value)> {
        let mut b = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        let env_file = std::env::var("HUB_ENV")
            .ok()
            .filter(|e| !e.is_empty())
            .map(|e| PathBuf::from(format!("config/{e}.toml")));
        if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
            if !path.exists() {
                bail!("configuration file {} does not exist", path.display());
            }
            b = b.add_source(config::File::from(path.clone()).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("HUB")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("mqtt.tls_server_names")
                .try_parsing(true),
        );
        let pairs = [
            ("http.listen", &overrides.http_listen),
            ("mqtt.listen", &overrides.mqtt_listen),
            ("data_dir", &overrides.data_dir),
            ("database.url", &overrides.database_url),
        ];
        for (key, value) in pairs {
            if let Some(v) = value {
                b = b.set_override(key, v.as_str())?;
            }
        }
        let layered = b.build().context("reading configuration")?;
        let mut view: serde_json::Value = layered
            .clone()
            .try_deserialize()
            .context("reading configuration")?;
        redact_secrets(&mut view);
        let settings: Settings = layered
            .try_deserialize()
            .map_err(|e| {
                anyhow::anyhow!(
                    "configuration: {e} (keys are set in a TOML file or as HUB__SECTION__KEY environment variables; see README.md)"
                )
            })?;
        settings.validate()?;
        Ok((settings, view))
    }

    /// Checks what serde cannot: URLs, ranges, formats.
    pub fn validate(&self) -> anyhow::Result<()> {
        // The longest topic a cabinet must be able to use: `/tenants/` + a 32-character id +
        // `/recognition`.
        const LONGEST_UPLINK: usize = 9 + 32 + 12;
        if !(LONGEST_UPLINK..=65_535).contains(&self.mqtt.max_topic_len) {
            bail!("mqtt.max_topic_len (HUB__MQTT__MAX_TOPIC_LEN) = {}: must be {LONGEST_UPLINK} to 65535 bytes (the longest uplink topic of a 32-character cabinet id is {LONGEST_UPLINK})", self.mqtt.max_topic_len);
        }
        if self.mqtt.max_subscriptions == 0 {
            bail!("mqtt.max_subscriptions (HUB__MQTT__MAX_SUBSCRIPTIONS) = 0: a cabinet must be able to subscribe to its commands; use at least 1");
        }
        if let Some(url) = &self.database.url {
            let parsed = url::Url::parse(url).map_err(|e| {
                anyhow::anyhow!("database.url (HUB__DATABASE__URL) {url:?} is not a URL: {e}; use sqlite://PATH or postgres://USER@HOST:PORT/DB")
            })?;
            if !matches!(parsed.scheme(), "sqlite" | "postgres" | "postgresql") {
                bail!("database.url (HUB__DATABASE__URL) has scheme {:?}; use sqlite:// or postgres://", parsed.scheme());
            }
        }
        if self.cluster.renew_ms == 0 || self.cluster.renew_ms * 2 > self.cluster.lease_ms {
            bail!("cluster.renew_ms (HUB__CLUSTER__RENEW_MS) = {} with cluster.lease_ms (HUB__CLUSTER__LEASE_MS) = {}: renew at least twice per lease (a third of it is usual)", self.cluster.renew_ms, self.cluster.lease_ms);
        }
        if let Some(id) = &self.node.id {
            if id.contains('|') || id.len() > 128 {
                bail!("node.id (HUB__NODE__ID) {id:?}: at most 128 characters, without '|'");
            }
        }
        if let Some(url) = &self.redis.url {
            let parsed = url::Url::parse(url).map_err(|e| {
                anyhow::anyhow!(
                    "redis.url (HUB__REDIS__URL) {url:?} is not a URL: {e}; use redis://HOST:PORT"
                )
            })?;
            if !matches!(parsed.scheme(), "redis" | "rediss") {
                bail!(
                    "redis.url (HUB__REDIS__URL) has scheme {:?}; use redis://",
                    parsed.scheme()
                );
            }
        }
        if let Some(url) = &self.external_broker.url {
            crate::mqtt::external::BrokerAddress::parse(url)?;
            let b = &self.external_broker;
            if !(1..=4096).contains(&b.partitions) {
                bail!("external_broker.partitions (HUB__EXTERNAL_BROKER__PARTITIONS) = {}: must be 1 to 4096", b.partitions);
            }
            if b.client_id_prefix.is_empty()
                || b.client_id_prefix.len() > 64
                || !b
                    .client_id_prefix
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                bail!("external_broker.client_id_prefix (HUB__EXTERNAL_BROKER__CLIENT_ID_PREFIX) {:?}: 1 to 64 of [A-Za-z0-9_-]", b.client_id_prefix);
            }
            if !(5..=600).contains(&b.keep_alive_s) {
                bail!("external_broker.keep_alive_s (HUB__EXTERNAL_BROKER__KEEP_ALIVE_S) = {}: must be 5 to 600", b.keep_alive_s);
            }
        }
        if !self.payments.simulator
            && self.payments.wechat.is_none()
            && self.payments.alipay.is_none()
        {
            bail!("payments.wechat or payments.alipay must be configured when payments.simulator is false");
        }
        if !(-720..=840).contains(&self.pricing.utc_offset_min) {
            bail!("pricing.utc_offset_min (HUB__PRICING__UTC_OFFSET_MIN) must be between -720 and 840");
        }
        if !(1..=100_000_000).contains(&self.service.yearly_price_fen) {
            bail!("service.yearly_price_fen (HUB__SERVICE__YEARLY_PRICE_FEN) = {}: must be 1 to 100000000 fen", self.service.yearly_price_fen);
        }
        if !(0..=100_000).contains(&self.recognition.fee_fen) {
            bail!(
                "recognition.fee_fen (HUB__RECOGNITION__FEE_FEN) = {}: must be 0 to 100000 fen",
                self.recognition.fee_fen
            );
        }
        if !(0..=100_000).contains(&self.stock.low_at) {
            bail!(
                "stock.low_at (HUB__STOCK__LOW_AT) = {}: must be 0 to 100000",
                self.stock.low_at
            );
        }
        if self.recognition.low_quota < 0 {
            bail!("recognition.low_quota (HUB__RECOGNITION__LOW_QUOTA) must not be negative");
        }
        if !matches!(
            self.recognition.when_exhausted.as_str(),
            "refuse" | "continue"
        ) {
            bail!("recognition.when_exhausted (HUB__RECOGNITION__WHEN_EXHAUSTED) = {:?}: use \"refuse\" or \"continue\"", self.recognition.when_exhausted);
        }
        if self.service.max_cabinets == 0 || self.service.max_cabinets > 10_000 {
            bail!(
                "service.max_cabinets (HUB__SERVICE__MAX_CABINETS) = {}: must be 1 to 10000",
                self.service.max_cabinets
            );
        }
        if !(1..=300_000).contains(&self.auth.feed_ticket_ttl_ms) {
            bail!("auth.feed_ticket_ttl_ms (HUB__AUTH__FEED_TICKET_TTL_MS) must be between 1 and 300000");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!(
                "log.format (HUB__LOG__FORMAT) must be \"text\" or \"json\", not {:?}",
                self.log.format
            );
        }
        let l = &self.limits;
        if l.max_line_qty == 0 || l.max_basket_lines == 0 || l.max_basket_qty == 0 {
            bail!("limits.max_line_qty, limits.max_basket_lines and limits.max_basket_qty (HUB__LIMITS__…) must be at least 1");
        }
        // Every amount then fits an i64 with room to spare (and a provider's amount field).
        if !(1..=1_000_000_000).contains(&l.max_price_fen) {
            bail!("limits.max_price_fen (HUB__LIMITS__MAX_PRICE_FEN) must be 1 to 1000000000");
        }
        if l.max_basket_qty > 100_000 || l.max_basket_lines > 10_000 {
            bail!("limits.max_basket_qty (HUB__LIMITS__MAX_BASKET_QTY) must be at most 100000 and limits.max_basket_lines at most 10000");
        }
        let c = &self.cabinet;
        if c.heartbeat_s == 0 || c.missed_heartbeats == 0 {
            bail!("cabinet.heartbeat_s and cabinet.missed_heartbeats must be at least 1");
        }
        if c.temp_min_c >= c.temp_max_c {
            bail!("cabinet.temp_min_c must be below cabinet.temp_max_c");
        }
        for (key, v) in [
            ("cabinet.light_on", &c.light_on),
            ("cabinet.light_off", &c.light_off),
        ] {
            if !valid_hhmm(v) {
                bail!("{key} must be HH:MM, not {v:?}");
            }
        }
        if self.http.body_timeout_ms == 0 || self.feed.send_timeout_ms == 0 {
            bail!("http.body_timeout_ms (HUB__HTTP__BODY_TIMEOUT_MS) and feed.send_timeout_ms (HUB__FEED__SEND_TIMEOUT_MS) must be at least 1");
        }
        if self.metrics.token.as_ref().is_some_and(|t| t.len() < 16) {
            bail!("metrics.token (HUB__METRICS__TOKEN) must be at least 16 characters");
        }
        if let Some(m) = self.metrics.listen {
            if m == self.http.listen && m.port() != 0 {
                bail!("metrics.listen (HUB__METRICS__LISTEN) = {m} is http.listen (HUB__HTTP__LISTEN); choose another address or leave it unset");
            }
        }
        if self.mqtt.tls_listen.is_some() && self.mqtt.tls_server_names.is_empty() {
            bail!("mqtt.tls_server_names must name at least one host when mqtt.tls_listen is set");
        }
        Ok(())
    }

    /// The database URL, defaulting to a SQLite file in the data dir.
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(u) => u.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("hub.db").display()
            ),
        }
    }

    /// The machine timings.
    pub fn timing(&self) -> Timing {
        let c = &self.cabinet;
        Timing {
            unlock_ack_timeout_ms: c.unlock_ack_timeout_ms,
            command_ack_timeout_ms: c.command_ack_timeout_ms,
            latch_timeout_ms: c.latch_timeout_ms,
            door_open_max_ms: c.door_open_max_ms,
            heartbeat_s: c.heartbeat_s,
            missed_heartbeats: c.missed_heartbeats,
            temp_out_of_range_ms: c.temp_out_of_range_ms,
            recognition_timeout_ms: self.session.recognition_timeout_ms,
            door_open_timeout_ms: self.session.door_open_timeout_ms,
            session_open_timeout_ms: self.session.open_timeout_ms,
        }
    }

    /// The first desired configuration of a newly registered cabinet.
    pub fn initial_cabinet_config(&self) -> CabinetConfig {
        let c = &self.cabinet;
        CabinetConfig {
            version: 1,
            temp_target_c: c.temp_target_c,
            temp_range_c: [c.temp_min_c, c.temp_max_c],
            light: LightSchedule {
                on: c.light_on.clone(),
                off: c.light_off.clone(),
            },
            heartbeat_s: c.heartbeat_s,
            foreign_object_lock: c.foreign_object_lock,
        }
    }

    /// The embedded defaults with a data dir (used by tests and tools).
    pub fn defaults(data_dir: &Path) -> anyhow::Result<Self> {
        let mut s: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .build()?
            .try_deserialize()?;
        s.data_dir = data_dir.to_path_buf();
        Ok(s)
    }
}

/// Last words of a key name (after `_`) that mark its value a secret: `admin_key`,
/// `api_v3_key`, `apiv2_key`, `metrics.token`, a cabinet `secret`… Matched by name so that a
/// key added later is covered without a list to keep up to date; `*_path` keys name files and
/// are shown.
const SECRET_WORDS: &[&str] = &[
    "key",
    "secret",
    "token",
    "password",
    "passphrase",
    "sign",
    "signature",
];

/// Whether a configuration key's value is a secret.
pub fn secret_key_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let last = name.rsplit(['_', '.']).next().unwrap_or(&name);
    SECRET_WORDS.contains(&last) || last.ends_with("key") || last.ends_with("secret")
}

/// Replaces, in place, the value of every secret-named key (see [`secret_key_name`]) that is
/// set with `"<redacted>"`, and the password in any URL (`postgres://user:<redacted>@…`).
pub fn redact_secrets(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if secret_key_name(k) && !v.is_null() {
                    *v = Value::String("<redacted>".into());
                } else {
                    redact_secrets(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        Value::String(s) => {
            if let Some(r) = redact_url(s, "<redacted>") {
                *s = r;
            }
        }
        _ => {}
    }
}

/// A URL with its secrets masked: the password in its user info, and query parameters that
/// carry one (`postgres://h/db?password=…`, `sslpassword`, `token`, …). `None` when `s` is not
/// a URL or has nothing to mask.
pub fn redact_url(s: &str, mask: &str) -> Option<String> {
    let mut u = url::Url::parse(s).ok()?;
    let mut changed = u.password().is_some() && u.set_password(Some(mask)).is_ok();
    let secret = |name: &str| {
        let n = name.to_ascii_lowercase();
        ["password", "passwd", "pwd", "secret", "token", "key"]
            .iter()
            .any(|w| n == *w || n.ends_with(w))
    };
    if u.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    mask.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    changed.then(|| u.to_string())
}

/// `HH:MM`, 00:00–23:59.
pub fn valid_hhmm(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 5
        && b[2] == b':'
        && s[..2].parse::<u8>().is_ok_and(|h| h < 24)
        && s[3..].parse::<u8>().is_ok_and(|m| m < 60)
        && b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_loses_its_secrets_and_keeps_the_rest() {
        let r = redact_url(
            "postgres://hub:pw1@db:5432/hub?sslmode=require&sslpassword=pw2&password=pw3",
            "***",
        )
        .unwrap_or_default();
        assert!(
            !r.contains("pw1") && !r.contains("pw2") && !r.contains("pw3"),
            "{r}"
        );
        assert!(
            r.contains("sslmode=require") && r.contains("db:5432/hub"),
            "{r}"
        );
        assert_eq!(
            redact_url("postgres://hub@db/hub?sslmode=require", "***"),
            None
        );
        assert_eq!(redact_url("not a url", "***"), None);
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::defaults(Path::new("/tmp/x")).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.validate().is_ok());
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert!(s.database_url().starts_with("sqlite:///tmp/x/hub.db"));
        assert_eq!(s.timing(), Timing::default());
        assert_eq!(
            s.limits.limits(),
            Limits::DEFAULT,
            "the edge's caps are the defaults"
        );
    }

    #[test]
    fn secrets_are_redacted_by_name_wherever_they_are() {
        let mut v = serde_json::json!({
            "auth": {"admin_key": "chk_admin", "feed_ticket_ttl_ms": 30000},
            "metrics": {"token": "metrics-token", "listen": "127.0.0.1:9100"},
            "payments": {"wechat": {"api_v3_key": "v3", "apiv2_key": "v2", "mchid": "190",
                                    "merchant_key_path": "/etc/hub/key.pem"},
                         "alipay": {"app_secret": "s"}},
            "database": {"url": "postgres://hub:pw@db:5432/hub", "max_connections": 8},
            "redis": {"url": null},
            "mqtt": {"tls_server_names": ["localhost"]},
        });
        redact_secrets(&mut v);
        let text = v.to_string();
        for secret in [
            "chk_admin",
            "metrics-token",
            "\"v3\"",
            "\"v2\"",
            ":pw@",
            "\"s\"",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(v["auth"]["admin_key"], "<redacted>");
        assert_eq!(v["metrics"]["token"], "<redacted>");
        assert_eq!(v["payments"]["wechat"]["apiv2_key"], "<redacted>");
        assert_eq!(v["payments"]["wechat"]["mchid"], "190");
        assert_eq!(
            v["payments"]["wechat"]["merchant_key_path"],
            "/etc/hub/key.pem"
        );
        assert_eq!(
            v["database"]["url"],
            "postgres://hub:%3Credacted%3E@db:5432/hub"
        );
        assert_eq!(
            v["redis"]["url"],
            serde_json::Value::Null,
            "unset stays visible as unset"
        );
        assert_eq!(v["auth"]["feed_ticket_ttl_ms"], 30000);
    }

    #[test]
    fn the_example_configurations_load_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
            let path = e.unwrap_or_else(|e| panic!("{e}")).path();
            if path.to_string_lossy().ends_with(".example.toml") {
                Settings::load(Some(&path), &Overrides::default())
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "the examples: {seen}");
        let a = Settings::load(
            Some(&dir.join("cluster-node-a.example.toml")),
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.node_id(), "hub-a");
        assert!(a.redis.url.is_some());
        let e = Settings::load(
            Some(&dir.join("external-broker-node.example.toml")),
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.external_broker.partitions, 64);
    }

    #[test]
    fn external_broker_settings_are_checked() {
        let ok = |f: &dyn Fn(&mut Settings)| {
            let mut s = Settings::defaults(Path::new("/tmp/x")).unwrap_or_else(|e| panic!("{e}"));
            s.external_broker.url = Some("mqtt://broker:1883".into());
            f(&mut s);
            s.validate().map_err(|e| e.to_string())
        };
        assert!(ok(&|_| {}).is_ok());
        for (bad, key) in [
            (
                &(|s: &mut Settings| s.external_broker.url = Some("http://broker".into()))
                    as &dyn Fn(&mut Settings),
                "HUB__EXTERNAL_BROKER__URL",
            ),
            (
                &|s: &mut Settings| s.external_broker.partitions = 0,
                "HUB__EXTERNAL_BROKER__PARTITIONS",
            ),
            (
                &|s: &mut Settings| s.external_broker.client_id_prefix = "a b".into(),
                "HUB__EXTERNAL_BROKER__CLIENT_ID_PREFIX",
            ),
            (
                &|s: &mut Settings| s.external_broker.keep_alive_s = 1,
                "HUB__EXTERNAL_BROKER__KEEP_ALIVE_S",
            ),
        ] {
            let e = ok(bad).err().unwrap_or_else(|| panic!("{key} accepted"));
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn a_renewal_slower_than_half_the_lease_is_refused() {
        let mut s = Settings::defaults(Path::new("/tmp/x")).unwrap_or_else(|e| panic!("{e}"));
        s.cluster.renew_ms = s.cluster.lease_ms / 2 + 1;
        assert!(s.validate().is_err());
        s.cluster.renew_ms = 0;
        assert!(s.validate().is_err());
        s.cluster.renew_ms = s.cluster.lease_ms / 3;
        assert!(s.validate().is_ok());
        assert_ne!(
            s.node_id(),
            Settings::defaults(Path::new("/tmp/x"))
                .unwrap_or_else(|e| panic!("{e}"))
                .node_id(),
            "two nodes on one machine get different names"
        );
    }

    #[test]
    fn hhmm() {
        assert!(valid_hhmm("07:00"));
        assert!(valid_hhmm("23:59"));
        assert!(!valid_hhmm("24:00"));
        assert!(!valid_hhmm("7:00"));
        assert!(!valid_hhmm("07:60"));
        assert!(!valid_hhmm("+7:00"));
    }
}
