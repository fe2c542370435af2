//! Prometheus metrics. Per-cabinet labels appear only on `cabinet_alert_active`, and only while
//! that alert is active, so cardinality is bounded by the number of active alerts.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cabinet_actors::alert::AlertType;
use cabinet_actors::protocol::{CommandKind, RejectReason, UplinkKind};

/// Every series the hub exports.
#[derive(Clone)]
#[allow(missing_docs)]
pub struct Metrics {
    registry: Registry,
    pub cabinets_online: IntGauge,
    pub cabinet_actors: IntGauge,
    pub alert_active: IntGaugeVec,
    pub alerts_raised: IntCounterVec,
    pub command_duration: HistogramVec,
    pub mqtt_in: IntCounterVec,
    pub mqtt_out: IntCounterVec,
    pub mqtt_rejected: IntCounterVec,
    pub mqtt_auth_failures: IntCounterVec,
    pub mqtt_refused: IntCounterVec,
    pub mqtt_duplicates: IntCounter,
    pub mqtt_seq_resets: IntCounter,
    pub uplinks_processed: IntCounter,
    pub mqtt_link_unscheduled: IntCounter,
    pub mqtt_stray_acks: IntCounter,
    pub actor_restarts: IntCounter,
    pub offline_after_restart: IntCounter,
    pub store_errors: IntCounterVec,
    pub cluster_leader: IntGauge,
    pub cluster_cabinet_leases: IntGauge,
    pub cluster_lease_changes: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub cluster_writes_refused: IntCounter,
    pub cluster_fences_recorded: IntCounter,
    pub broker_partitions: IntGauge,
    pub broker_connections: IntGauge,
    pub broker_errors: IntCounterVec,
    pub broker_subscriptions: IntGauge,
    pub broker_subscribe_refused: IntCounter,
    pub routed_calls: IntCounterVec,
    pub route_seconds: HistogramVec,
    pub cluster_commands_refused: IntCounter,
    pub feed_shared_dropped: IntCounter,
    pub feed_gaps: IntCounter,
    pub sessions_closed: IntCounterVec,
    pub refunds: IntCounterVec,
    pub settlements: IntCounterVec,
    pub settlement_failures: IntCounterVec,
    pub service_reminders: IntCounterVec,
    pub service_orders: IntCounterVec,
    pub recognitions: IntCounterVec,
    pub stock_low: prometheus::IntCounter,
    pub stock_discrepancies: prometheus::IntCounter,
    pub recognition_quota_warnings: IntCounterVec,
    pub sessions: IntCounterVec,
    pub session_unlock: prometheus::Histogram,
    pub session_stages: HistogramVec,
    pub orders: IntCounterVec,
    pub payments: IntCounterVec,
    pub notifications_rejected: IntCounterVec,
    pub ws_clients: IntGauge,
    pub ws_sent: IntCounter,
    pub ws_dropped: IntCounterVec,
    /// Read at each scrape (`render`).
    memory: MemoryGauges,
    /// The broker's flow control, counted by the broker (vendored rumqttd, PATCHES.md 11) and
    /// copied into the series below at each scrape.
    pub flow: Arc<rumqttd::FlowMeter>,
    flow_series: FlowSeries,
    /// The merchant's request signing (`payments::crypto::MERCHANT_SIGNING`), copied at each
    /// scrape.
    signing: SigningSeries,
}

#[derive(Clone)]
struct SigningSeries {
    cpu: prometheus::Counter,
    count: IntCounter,
    sync: Arc<Mutex<()>>,
}

impl SigningSeries {
    fn update(&self) {
        let Ok(_one_at_a_time) = self.sync.lock() else {
            return;
        };
        let (cpu, count) = crate::payments::crypto::MERCHANT_SIGNING.read();
        let now = self.cpu.get();
        if cpu > now {
            self.cpu.inc_by(cpu - now);
        }
        advance(&self.count, count);
    }
}

/// Brings a counter copied from elsewhere up to `to` (never down).
fn advance(c: &IntCounter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

#[derive(Clone)]
struct FlowSeries {
    holds: IntCounter,
    held: IntGauge,
    evicted: IntCounter,
    /// Scrapes may run side by side; a counter is advanced by one of them at a time.
    sync: Arc<Mutex<()>>,
}

impl FlowSeries {
    fn update(&self, flow: &rumqttd::FlowMeter) {
        let Ok(_one_at_a_time) = self.sync.lock() else {
            return;
        };
        advance(&self.holds, flow.holds.load(Ordering::Relaxed));
        advance(&self.evicted, flow.skipped.load(Ordering::Relaxed));
        self.held
            .set(i64::try_from(flow.held.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
}

#[derive(Clone)]
struct MemoryGauges {
    resident: IntGauge,
    heap_in_use: IntGauge,
    heap_free: IntGauge,
}

/// Adding a series to our own fresh registry only fails on a duplicate name, a bug caught by
/// the first test that builds the hub.
fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

impl Metrics {
    /// Builds and registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let m = Self {
            cabinets_online: reg(
                &r,
                IntGauge::new("cabinets_online", "Cabinets currently online")?,
            ),
            cabinet_actors: reg(
                &r,
                IntGauge::new("cabinet_actors", "Cabinet actors running")?,
            ),
            alert_active: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cabinet_alert_active",
                        "1 while an alert is active (series exists only then)",
                    ),
                    &["cabinet", "merchant", "type", "severity"],
                )?,
            ),
            alerts_raised: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("cabinet_alerts_raised_total", "Alerts raised"),
                    &["type"],
                )?,
            ),
            command_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cabinet_command_duration_seconds",
                        "Command request to outcome",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                    &["type", "outcome"],
                )?,
            ),
            mqtt_in: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("mqtt_messages_in_total", "Accepted uplink messages"),
                    &["kind"],
                )?,
            ),
            mqtt_out: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("mqtt_messages_out_total", "Commands published"),
                    &["type"],
                )?,
            ),
            mqtt_rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("mqtt_rejected_total", "Uplink messages rejected, by reason"),
                    &["reason"],
                )?,
            ),
            mqtt_auth_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mqtt_auth_failures_total",
                        "MQTT connections refused, by reason",
                    ),
                    &["reason"],
                )?,
            ),
            mqtt_refused: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mqtt_refused_total",
                        "Cabinet publishes and subscriptions the broker refused (outside the cabinet's namespace, retained, too long, too many), by reason",
                    ),
                    &["reason"],
                )?,
            ),
            mqtt_link_unscheduled: reg(
                &r,
                IntCounter::new(
                    "mqtt_link_unscheduled_total",
                    "Times the broker paused the hub's uplink link because its buffer was full",
                )?,
            ),
            uplinks_processed: reg(
                &r,
                IntCounter::new(
                    "uplinks_processed_total",
                    "Uplink messages that went through a cabinet actor's state machine",
                )?,
            ),
            mqtt_duplicates: reg(
                &r,
                IntCounter::new(
                    "mqtt_duplicates_total",
                    "Redelivered heartbeats and events dropped",
                )?,
            ),
            mqtt_seq_resets: reg(
                &r,
                IntCounter::new(
                    "mqtt_seq_resets_total",
                    "Heartbeats and events whose seq jumped outside the duplicate window (accepted)",
                )?,
            ),
            mqtt_stray_acks: reg(
                &r,
                IntCounter::new("mqtt_stray_acks_total", "Acks for no pending command")?,
            ),
            actor_restarts: reg(
                &r,
                IntCounter::new(
                    "actor_restarts_total",
                    "Cabinet actors restarted after a panic",
                )?,
            ),
            offline_after_restart: reg(
                &r,
                IntCounter::new(
                    "cabinets_offline_after_restart_total",
                    "Cabinets online before a restart that did not come back (marked offline by the start-up sweep)",
                )?,
            ),
            sessions_closed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "sessions_closed_total",
                        "Sessions ended from outside, by who: an operator, or the supervisor's sweep of sessions that outlived their timeouts",
                    ),
                    &["by"],
                )?,
            ),
            refunds: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "refunds_total",
                        "Refunds settled, by the provider's word: succeeded, failed (refused, or its ABNORMAL), closed",
                    ),
                    &["status"],
                )?,
            ),
            settlements: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "settlements_total",
                        "Settlement moves, by the state reached: splitting, split, finished, failed, pending (a retry)",
                    ),
                    &["state"],
                )?,
            ),
            settlement_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "settlement_failures_total",
                        "Failed settlement steps, by step: split, follow, finish",
                    ),
                    &["step"],
                )?,
            ),
            service_reminders: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "service_reminders_total",
                        "Service-time reminders sent, by reminder: 30, 7, 1 days before expiry, 0 once expired",
                    ),
                    &["days"],
                )?,
            ),
            service_orders: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "service_orders_total",
                        "Service-time orders, by what happened: created, paid, cancelled",
                    ),
                    &["status"],
                )?,
            ),
            stock_low: reg(
                &r,
                prometheus::IntCounter::new(
                    "stock_low_total",
                    "Products that ran low in a cabinet (once per descent below their mark)",
                )?,
            ),
            stock_discrepancies: reg(
                &r,
                prometheus::IntCounter::new(
                    "stock_discrepancies_total",
                    "Products whose restock count differed from what was expected (库存不一致)",
                )?,
            ),
            recognitions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "recognitions_total",
                        "Recognitions applied to sessions (billed to merchants), by billing: prepaid, postpaid",
                    ),
                    &["billing"],
                )?,
            ),
            recognition_quota_warnings: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "recognition_quota_warnings_total",
                        "Prepaid recognition quotas that reached the warning level (low) or ran out (exhausted)",
                    ),
                    &["state"],
                )?,
            ),
            store_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("store_errors_total", "Failed background writes"),
                    &["op"],
                )?,
            ),
            cluster_leader: reg(
                &r,
                IntGauge::new(
                    "cluster_leader",
                    "1 while this node holds the leader lease and runs the singleton work (always 1 on a single node)",
                )?,
            ),
            cluster_cabinet_leases: reg(
                &r,
                IntGauge::new(
                    "cluster_cabinet_leases",
                    "Cabinet ownership leases this node holds in Redis",
                )?,
            ),
            cluster_lease_changes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cluster_lease_changes_total",
                        "Lease changes on this node, by lease (leader, cabinet) and change (acquired, taken_over, lost, released)",
                    ),
                    &["lease", "change"],
                )?,
            ),
            cluster_commands_refused: reg(
                &r,
                IntCounter::new(
                    "cluster_commands_refused_total",
                    "Commands not sent because another node owns the cabinet now (or its lease could not be renewed)",
                )?,
            ),
            feed_shared_dropped: reg(
                &r,
                IntCounter::new(
                    "feed_shared_dropped_total",
                    "Feed events the shared stream (Redis) could not take in time and were dropped; screens resync from snapshots",
                )?,
            ),
            feed_gaps: reg(
                &r,
                IntCounter::new(
                    "feed_gaps_total",
                    "Jumps in the shared feed's numbering seen on this node (events it never received)",
                )?,
            ),
            routed_calls: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "routed_calls_total",
                        "Requests carried between nodes for a cabinet another node owns: side (sent, served) and outcome (ok, timeout, error, no_owner, expired)",
                    ),
                    &["side", "outcome"],
                )?,
            ),
            route_seconds: reg(
                &r,
                HistogramVec::new(
                    prometheus::HistogramOpts::new(
                        "route_seconds",
                        "The hop through Redis to the owning node and back, by call kind (the owner's own work excluded)",
                    )
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]),
                    &["kind"],
                )?,
            ),
            cluster_writes_refused: reg(
                &r,
                IntCounter::new(
                    "cluster_writes_refused_total",
                    "Writes for a cabinet (alerts, online state) refused because another node took its lease since (fencing token)",
                )?,
            ),
            cluster_fences_recorded: reg(
                &r,
                IntCounter::new(
                    "cluster_fences_recorded_total",
                    "Cabinet lease tokens this node recorded in storage (a former owner's later writes are refused from then on)",
                )?,
            ),
            broker_partitions: reg(
                &r,
                IntGauge::new(
                    "external_broker_partitions",
                    "Partitions of the fleet this node reads from the external broker",
                )?,
            ),
            broker_connections: reg(
                &r,
                IntGauge::new(
                    "external_broker_connections",
                    "This node's connections to the external broker that are up (one per partition read, one for commands)",
                )?,
            ),
            broker_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "external_broker_errors_total",
                        "Connections to the external broker lost or refused, by client (partition reader or command publisher)",
                    ),
                    &["client"],
                )?,
            ),
            broker_subscriptions: reg(
                &r,
                IntGauge::new(
                    "external_broker_subscriptions",
                    "Cabinet subscriptions this node holds at the external broker",
                )?,
            ),
            broker_subscribe_refused: reg(
                &r,
                IntCounter::new(
                    "external_broker_subscribe_refused_total",
                    "Cabinet subscriptions the external broker refused (the hub's account lacks read access to /tenants/#)",
                )?,
            ),
            redis_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("redis_errors_total", "Failed calls to Redis, by operation"),
                    &["op"],
                )?,
            ),
            sessions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("sessions_total", "Sessions by mode and outcome"),
                    &["mode", "outcome"],
                )?,
            ),
            session_unlock: reg(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("session_unlock_seconds", "Session request to unlock ack")
                        .buckets(vec![
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        ]),
                )?,
            ),
            session_stages: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "session_start_stage_seconds",
                        "Where a session start's time goes: checks, provider, confirm, unlock, record",
                    )
                    .buckets(vec![
                        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 30.0,
                    ]),
                    &["stage"],
                )?,
            ),
            orders: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("orders_total", "Orders reaching a status"),
                    &["status"],
                )?,
            ),
            payments: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("payments_total", "Payment provider calls"),
                    &["provider", "operation", "outcome"],
                )?,
            ),
            notifications_rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "payment_notifications_rejected_total",
                        "Payment notifications refused or ignored",
                    ),
                    &["provider", "reason"],
                )?,
            ),
            ws_clients: reg(
                &r,
                IntGauge::new("ws_clients", "Operator feed clients connected")?,
            ),
            ws_sent: reg(
                &r,
                IntCounter::new("ws_messages_sent_total", "Operator feed messages sent")?,
            ),
            ws_dropped: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ws_dropped_total",
                        "Operator feed clients dropped, by reason",
                    ),
                    &["reason"],
                )?,
            ),
            memory: MemoryGauges {
                resident: reg(
                    &r,
                    IntGauge::new(
                        "process_resident_memory_bytes",
                        "Resident memory of the hub process",
                    )?,
                ),
                heap_in_use: reg(
                    &r,
                    IntGauge::new(
                        "process_heap_in_use_bytes",
                        "Heap allocated and not freed (jemalloc stats.allocated)",
                    )?,
                ),
                heap_free: reg(
                    &r,
                    IntGauge::new(
                        "process_heap_free_bytes",
                        "Memory the allocator holds beyond what is allocated: freed pages not yet returned, and its metadata (jemalloc stats.resident - stats.allocated)",
                    )?,
                ),
            },
            flow: Arc::new(rumqttd::FlowMeter::default()),
            flow_series: FlowSeries {
                holds: reg(
                    &r,
                    IntCounter::new(
                        "mqtt_backpressure_holds_total",
                        "Times the broker held a cabinet connection (no reads, no acks) until the hub had read the uplinks before its next one",
                    )?,
                ),
                held: reg(
                    &r,
                    IntGauge::new(
                        "mqtt_backpressure_held",
                        "Cabinet connections held by the broker right now, waiting for the hub to read",
                    )?,
                ),
                evicted: reg(
                    &r,
                    IntCounter::new(
                        "mqtt_uplinks_evicted_total",
                        "Acknowledged uplinks the broker dropped before the hub read them (the hub's filter is lossless: any increase is a bug)",
                    )?,
                ),
                sync: Arc::new(Mutex::new(())),
            },
            signing: SigningSeries {
                cpu: reg(
                    &r,
                    prometheus::Counter::new(
                        "payment_signing_cpu_seconds_total",
                        "CPU the hub spent signing its requests to the payment providers (RSA-2048; its cost is the CPU's)",
                    )?,
                ),
                count: reg(
                    &r,
                    IntCounter::new(
                        "payment_signatures_total",
                        "Requests to the payment providers the hub signed",
                    )?,
                ),
                sync: Arc::new(Mutex::new(())),
            },
            registry: r,
        };
        // Pre-create the label sets so dashboards see zeros rather than gaps.
        for reason in RejectReason::ALL {
            m.mqtt_rejected.with_label_values(&[reason.as_str()]);
        }
        for kind in UplinkKind::ALL {
            m.mqtt_in.with_label_values(&[kind.as_str()]);
        }
        for kind in CommandKind::ALL {
            m.mqtt_out.with_label_values(&[kind.as_str()]);
        }
        for t in AlertType::ALL {
            m.alerts_raised.with_label_values(&[t.as_str()]);
        }
        Ok(m)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = crate::telemetry::memory_use();
        let set = |g: &IntGauge, v: Option<u64>| {
            if let Some(v) = v {
                g.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        };
        set(&self.memory.resident, m.resident);
        set(&self.memory.heap_in_use, m.heap_in_use);
        set(&self.memory.heap_free, m.heap_free);
        self.flow_series.update(&self.flow);
        self.signing.update();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
