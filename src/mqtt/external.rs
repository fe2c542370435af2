//! The hub as a client of an existing MQTT broker (Mosquitto, EMQX, HiveMQ) instead of the
//! embedded one (docs/architecture.md, "External broker").
//!
//! The fleet is cut into partitions (`cluster::partitions`); the node holding a partition's
//! lease reads it through one connection whose client id belongs to the partition, not to the
//! node (`{prefix}-p{n}`), with a persistent session (clean session off) subscribed to each of
//! the partition's cabinets (`/tenants/{id}/+`). So:
//!
//! - one cabinet's messages reach one connection, in the order the broker got them (shared
//!   subscriptions would deal them round-robin between nodes: reordered);
//! - when the partition moves to another node its session moves with it: the broker queues
//!   what arrives meanwhile and hands it, with anything delivered but not acknowledged, to the
//!   next holder. Nothing the broker acknowledged to a cabinet is lost on a handover;
//! - two nodes can never read one partition at once: the broker keeps one connection per
//!   client id and closes the older;
//! - a message is acknowledged to the broker only after it was handed to its actor, and the
//!   broker's in-flight window holds back the rest (back-pressure, no eviction here).
//!
//! Commands go out through one more connection per node, QoS 1. The broker authenticates the
//! cabinets and must confine each to its topics (README, "An existing MQTT broker").

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::watch;

use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::LiveSeed;

use super::auth::Directory;
use super::publisher::CommandPublisher;
use super::Pump;
use crate::backoff::Backoff;
use crate::cluster::partitions::partition_of;
use crate::cluster::Cluster;
use crate::config::ExternalBrokerSettings;
use crate::feed::Feed;
use crate::metrics::Metrics;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or address.
    pub host: String,
    /// Port (1883 / 8883 by default).
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl BrokerAddress {
    /// Reads `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| {
            anyhow::anyhow!("external_broker.url (HUB__EXTERNAL_BROKER__URL) {url:?} is not a URL: {e}; use mqtt://HOST:PORT or mqtts://HOST:PORT")
        })?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => anyhow::bail!(
                "external_broker.url (HUB__EXTERNAL_BROKER__URL) has scheme {other:?}; use mqtt:// or mqtts://"
            ),
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "external_broker.url (HUB__EXTERNAL_BROKER__URL) {url:?} has no host"
                )
            })?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !parsed.username().is_empty() || parsed.password().is_some() {
            anyhow::bail!("external_broker.url (HUB__EXTERNAL_BROKER__URL): give the account as external_broker.username and external_broker.password, not in the URL");
        }
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
        })
    }
}

/// A partition being read.
struct Reader {
    client: AsyncClient,
    /// Set for a clean stop: nothing more is handed to actors; what was handed is acknowledged.
    stopping: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    subscriber: tokio::task::JoinHandle<()>,
}

/// The external broker's side of the hub: partition readers and the command connection.
pub struct External {
    connector: Connector,
    /// Other nodes' last picture of their cabinets, for those of a partition taken over.
    feed: Arc<Feed>,
    pump: Arc<Pump>,
    directory: Arc<Directory>,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    readers: tokio::sync::Mutex<HashMap<u32, Reader>>,
    /// The command connection is up.
    commands_up: Arc<AtomicBool>,
    /// Subscriptions held, per partition (for the gauge).
    subscriptions: Mutex<HashMap<u32, usize>>,
    renew: Duration,
    /// Set by `shut_down`: no partition is taken or read again.
    closing: AtomicBool,
    /// The balancing loop, stopped by `shut_down`.
    managing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How many filters go in one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 100;

fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let Some(path) = ca_file else {
        anyhow::bail!("external_broker.url is mqtts:// but external_broker.ca_file (HUB__EXTERNAL_BROKER__CA_FILE) is unset: give the PEM roots the broker's certificate chains to");
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "external_broker.ca_file (HUB__EXTERNAL_BROKER__CA_FILE) = {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "external_broker.ca_file (HUB__EXTERNAL_BROKER__CA_FILE) = {}: no certificate in it",
            path.display()
        );
    }
    for c in certs {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// How this node connects to the broker.
pub struct Connector {
    settings: ExternalBrokerSettings,
    address: BrokerAddress,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// The command connection's event loop, run by [`External::start`].
pub struct CommandEvents(EventLoop);

impl Connector {
    /// Checks the settings (URL, CA file).
    pub fn new(settings: &ExternalBrokerSettings) -> anyhow::Result<Self> {
        let url = settings.url.as_deref().unwrap_or_default();
        let address = BrokerAddress::parse(url)?;
        let tls = if address.tls {
            Some(tls_config(settings.ca_file.as_deref())?)
        } else {
            None
        };
        Ok(Self {
            settings: settings.clone(),
            address,
            tls,
        })
    }

    /// The command publisher of node `node_id`; it connects once [`External::start`] runs.
    pub fn commands(&self, node_id: &str) -> (CommandPublisher, CommandEvents) {
        let id = format!("{}-cmd-{node_id}", self.settings.client_id_prefix);
        let mut options = self.options(&id);
        options.set_clean_session(true);
        let (client, events) = AsyncClient::new(options, 4096);
        (CommandPublisher::External(client), CommandEvents(events))
    }

    fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.address.host, self.address.port);
        o.set_keep_alive(Duration::from_secs(self.settings.keep_alive_s));
        // As the embedded broker: larger than the protocol's 16 KiB, so that an oversize
        // payload reaches the parser and is counted with its reason.
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some(u) = &self.settings.username {
            o.set_credentials(u, self.settings.password.as_deref().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }
}

impl External {
    /// Runs the command connection and starts taking partitions (every `renew`).
    pub fn start(
        connector: Connector,
        commands: CommandEvents,
        pump: Arc<Pump>,
        cluster: Arc<Cluster>,
        feed: Arc<Feed>,
        renew: Duration,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            connector,
            feed,
            directory: pump.directory.clone(),
            metrics: pump.metrics.clone(),
            pump,
            cluster,
            readers: tokio::sync::Mutex::new(HashMap::new()),
            commands_up: Arc::new(AtomicBool::new(false)),
            subscriptions: Mutex::new(HashMap::new()),
            renew,
            closing: AtomicBool::new(false),
            managing: Mutex::new(None),
        });
        tokio::spawn(me.clone().publish_loop(commands.0));
        let managing = tokio::spawn(me.clone().manage());
        if let Ok(mut m) = me.managing.lock() {
            *m = Some(managing);
        }
        me
    }

    /// Whether every connection this node needs is up.
    pub async fn ready(&self) -> bool {
        self.commands_up.load(Ordering::Acquire)
            && self
                .readers
                .lock()
                .await
                .values()
                .all(|r| r.connected.load(Ordering::Acquire))
    }

    async fn publish_loop(self: Arc<Self>, mut events: EventLoop) {
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.commands_up.store(true, Ordering::Release);
                    self.count_connections().await;
                    wait.reset();
                    tracing::info!(broker = %self.connector.address.host, "command connection to the external broker up");
                }
                Ok(_) => {}
                Err(e) => {
                    if self.commands_up.swap(false, Ordering::AcqRel) {
                        self.count_connections().await;
                    }
                    self.metrics
                        .broker_errors
                        .with_label_values(&["command"])
                        .inc();
                    tracing::warn!(error = %e, broker = %self.connector.address.host, "command connection to the external broker down; reconnecting");
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        }
    }

    async fn count_connections(&self) {
        let readers = self
            .readers
            .lock()
            .await
            .values()
            .filter(|r| r.connected.load(Ordering::Acquire))
            .count();
        let commands = usize::from(self.commands_up.load(Ordering::Acquire));
        self.metrics
            .broker_connections
            .set((readers + commands) as i64);
    }

    /// Takes, keeps and gives up partitions: a balancing round every renewal period, and
    /// twice a second a check that every partition read is still held (a belief runs out
    /// when Redis cannot be reached).
    async fn manage(self: Arc<Self>) {
        let total = self.connector.settings.partitions;
        let mut round = tokio::time::interval(self.renew);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(Duration::from_millis(500));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = round.tick() => {
                    let plan = self.cluster.balance_partitions(total).await;
                    for p in plan.surplus {
                        self.stop(p, true).await;
                        self.cluster.release_partition(p).await;
                        tracing::info!(partition = p, "partition handed over (more nodes share the fleet)");
                    }
                }
                _ = check.tick() => {}
            }
            self.reconcile().await;
        }
    }

    /// Reads exactly the partitions this node holds.
    async fn reconcile(self: &Arc<Self>) {
        let running: Vec<u32> = self.readers.lock().await.keys().copied().collect();
        for p in &running {
            if !self.cluster.holds_partition(*p) {
                tracing::warn!(partition = p, "partition no longer held; its reader stops");
                self.stop(*p, false).await;
            }
        }
        for p in 0..self.connector.settings.partitions {
            if self.cluster.holds_partition(p) && !running.contains(&p) {
                self.start_reader(p).await;
            }
        }
        self.metrics
            .broker_partitions
            .set(self.readers.lock().await.len() as i64);
        self.count_connections().await;
    }

    async fn start_reader(self: &Arc<Self>, p: u32) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        // Its cabinets that were online on another node are served from here at once, as that
        // node last showed them: they have no reason to say anything before their next
        // heartbeat. Their actors start before the first message of the partition is read.
        let total = self.connector.settings.partitions;
        for cabinet in self.directory.ids() {
            if partition_of(cabinet.as_str(), total) != p {
                continue;
            }
            let Some(data) = self.feed.remote_cabinet(cabinet.as_str()) else {
                continue;
            };
            match serde_json::from_str::<LiveSeed>(&data) {
                Ok(live) if live.online => self.pump.adopt(&cabinet, live),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(cabinet_id = %cabinet, error = %e, "another node's picture of a cabinet not understood; it is served from its next message")
                }
            }
        }
        let id = format!("{}-p{p}", self.connector.settings.client_id_prefix);
        let mut options = self.connector.options(&id);
        // The partition's session outlives the connection: subscriptions and queued messages
        // wait at the broker for whichever node holds the partition next.
        options.set_clean_session(false);
        options.set_manual_acks(true);
        let (client, events) = AsyncClient::new(options, 4096);
        let stopping = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let (connects, connected_rx) = watch::channel(0u64);
        let task = tokio::spawn(self.clone().read(
            p,
            client.clone(),
            events,
            stopping.clone(),
            connected.clone(),
            connects,
        ));
        let subscriber = tokio::spawn(self.clone().subscribe(p, client.clone(), connected_rx));
        tracing::info!(partition = p, client_id = %id, "reading partition");
        self.readers.lock().await.insert(
            p,
            Reader {
                client,
                stopping,
                connected,
                task,
                subscriber,
            },
        );
    }

    /// Stops reading partition `p`: cleanly (what was handed to actors is acknowledged first,
    /// the rest stays queued at the broker for the next holder), or at once when another node
    /// may hold it already. Either way this node lets go of the partition's cabinets.
    async fn stop(&self, p: u32, clean: bool) {
        let Some(reader) = self.readers.lock().await.remove(&p) else {
            return;
        };
        reader.subscriber.abort();
        let mut task = reader.task;
        if clean {
            reader.stopping.store(true, Ordering::Release);
            let _ = reader.client.try_disconnect();
            if tokio::time::timeout(Duration::from_secs(3), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        } else {
            task.abort();
        }
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.remove(&p);
            self.metrics
                .broker_subscriptions
                .set(subs.values().sum::<usize>() as i64);
        }
        let total = self.connector.settings.partitions;
        let ids: Vec<CabinetId> = self
            .directory
            .ids()
            .into_iter()
            .filter(|id| partition_of(id.as_str(), total) == p)
            .collect();
        // What was acknowledged here is in its actors' mailboxes: processed while this node
        // still holds the cabinets, or its effects (a recognition, an order) would be dropped
        // as a former owner's. A snapshot queues behind them.
        let queued = ids
            .iter()
            .filter_map(|id| self.pump.registry.get(id))
            .map(|h| async move { h.snapshot().await.map(|_| ()) });
        if tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(queued),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                partition = p,
                "the partition's actors did not catch up within 5 s; handed over anyway"
            );
        }
        for id in &ids {
            self.cluster.cabinet_left(id.as_str());
        }
        self.count_connections().await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn read(
        self: Arc<Self>,
        p: u32,
        client: AsyncClient,
        mut events: EventLoop,
        stopping: Arc<AtomicBool>,
        connected: Arc<AtomicBool>,
        connects: watch::Sender<u64>,
    ) {
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let label = "partition";
        loop {
            let event = events.poll().await;
            if stopping.load(Ordering::Acquire) {
                // Flush the acknowledgements queued before the DISCONNECT, hand nothing more
                // to the actors: what is not acknowledged is delivered to the next holder.
                match event {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    _ => continue,
                }
            }
            match event {
                Ok(Event::Incoming(Packet::Publish(m))) => {
                    // A belief that ran out: another node may read the partition now. Nothing
                    // more is handed on or acknowledged here; the broker delivers it there.
                    if !self.cluster.holds_partition(p) {
                        break;
                    }
                    self.pump.handle(m.topic.as_bytes(), &m.payload);
                    // Acknowledged once its actor has it; a full queue (never at the broker's
                    // in-flight window) leaves it to be delivered again.
                    if let Err(e) = client.try_ack(&m) {
                        tracing::warn!(partition = p, error = %e, "acknowledgement not queued; the broker delivers the message again");
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected.store(true, Ordering::Release);
                    connects.send_modify(|n| *n += 1);
                    wait.reset();
                    tracing::info!(
                        partition = p,
                        session_present = ack.session_present,
                        "partition connection up"
                    );
                    self.count_connections().await;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    let refused = s
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        self.metrics.broker_subscribe_refused.inc_by(refused as u64);
                        tracing::error!(partition = p, refused, "the broker refused cabinet subscriptions: the hub's account needs read access to /tenants/#");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connected.store(false, Ordering::Release);
                    self.metrics.broker_errors.with_label_values(&[label]).inc();
                    tracing::warn!(partition = p, error = %e, "partition connection down; reconnecting");
                    self.count_connections().await;
                    tokio::time::sleep(wait.next_delay()).await;
                    // Reconnecting without the lease would push its new holder off the broker.
                    if !self.cluster.holds_partition(p) || self.closing.load(Ordering::Acquire) {
                        break;
                    }
                }
            }
        }
        connected.store(false, Ordering::Release);
    }

    /// Keeps the partition's subscriptions to its cabinets: every one again after each
    /// connect (a broker that lost the session), new and removed ones as the directory
    /// changes.
    async fn subscribe(
        self: Arc<Self>,
        p: u32,
        client: AsyncClient,
        mut connects: watch::Receiver<u64>,
    ) {
        let total = self.connector.settings.partitions;
        let mut changes = self.directory.changes();
        let mut subscribed: HashSet<CabinetId> = HashSet::new();
        loop {
            tokio::select! {
                r = connects.changed() => {
                    if r.is_err() {
                        return;
                    }
                    subscribed.clear();
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            let wanted: HashSet<CabinetId> = self
                .directory
                .ids()
                .into_iter()
                .filter(|id| partition_of(id.as_str(), total) == p)
                .collect();
            let new: Vec<&CabinetId> = wanted.difference(&subscribed).collect();
            let mut ok = true;
            for chunk in new.chunks(SUBSCRIBE_BATCH) {
                let filters = chunk
                    .iter()
                    .map(|id| SubscribeFilter::new(format!("/tenants/{id}/+"), QoS::AtLeastOnce));
                if let Err(e) = client.subscribe_many(filters).await {
                    tracing::warn!(partition = p, error = %e, "subscriptions not sent");
                    ok = false;
                    break;
                }
            }
            for gone in subscribed.difference(&wanted) {
                if client
                    .unsubscribe(format!("/tenants/{gone}/+"))
                    .await
                    .is_err()
                {
                    ok = false;
                }
            }
            if ok {
                subscribed = wanted;
            }
            if let Ok(mut subs) = self.subscriptions.lock() {
                subs.insert(p, subscribed.len());
                self.metrics
                    .broker_subscriptions
                    .set(subs.values().sum::<usize>() as i64);
            }
        }
    }

    /// A clean shutdown: every partition handed back (what was handed to actors acknowledged,
    /// the rest left queued for the next holder), and this node out of the live set.
    pub async fn shut_down(&self) {
        // The balancing loop first: it would start the readers stopped below again, and take
        // partitions back after this node left.
        self.closing.store(true, Ordering::Release);
        let managing = self.managing.lock().ok().and_then(|mut m| m.take());
        if let Some(m) = managing {
            m.abort();
            let _ = m.await;
        }
        let held: Vec<u32> = self.readers.lock().await.keys().copied().collect();
        for p in held {
            self.stop(p, true).await;
            self.cluster.release_partition(p).await;
        }
        self.cluster.leave().await;
    }
}

#[cfg(test)]
mod tests {
    use super::BrokerAddress;

    #[test]
    fn broker_addresses() {
        let a = BrokerAddress::parse("mqtt://broker.internal").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("broker.internal", 1883, false)
        );
        let a = BrokerAddress::parse("mqtts://10.0.0.5:18883").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.host.as_str(), a.port, a.tls), ("10.0.0.5", 18883, true));
        let a = BrokerAddress::parse("mqtt://[::1]:1884").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.host.as_str(), a.port), ("::1", 1884));
        for bad in [
            "http://broker:1883",
            "broker:1883",
            "mqtt://hub:pw@broker:1883",
            "mqtt://",
        ] {
            assert!(BrokerAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
