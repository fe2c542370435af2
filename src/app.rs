//! `Application::build` binds everything, reports the real ports, and runs until stopped.
//! `main` and the tests build the hub the same way.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use cabinet_actors::actor::{Clock, SystemClock};
use cabinet_actors::registry::Registry;

use crate::ca::DeviceCa;
use crate::cluster::Cluster;
use crate::config::Settings;
use crate::feed::Feed;
use crate::http::access::KeyAccess;
use crate::http::auth::{issue_key, Role};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::mqtt::auth::Directory;
use crate::mqtt::external::{CommandEvents, Connector, External};
use crate::mqtt::{start_broker, BrokerListeners, Pump};

/// Where uplinks come from.
enum Edge {
    /// The embedded broker's link.
    Embedded(rumqttd::local::LinkRx),
    /// A client of an existing broker.
    External(Box<(Connector, CommandEvents)>),
}
use crate::payments::Providers;
use crate::ports::{alert_writer, AlertWrite, HubPorts};
use crate::secrets::sha256_hex;
use crate::sessions::Sessions;
use crate::store::Store;

/// A running hub.
pub struct Application {
    http: SocketAddr,
    mqtt: SocketAddr,
    mqtt_tls: Option<SocketAddr>,
    server: actix_web::dev::Server,
    /// `metrics.listen`'s own server: its address and a handle to stop it with the main one.
    metrics_server: Option<(SocketAddr, actix_web::dev::ServerHandle)>,
    state: actix_web::web::Data<AppState>,
    admin_key: Option<String>,
    alerts: mpsc::UnboundedSender<AlertWrite>,
}

fn probe_addr(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
    } else {
        a
    }
}

fn check_free(addr: SocketAddr, key: &str) -> anyhow::Result<()> {
    // rumqttd binds on its own thread and only logs a failure: find out here, with the key.
    TcpListener::bind(addr).map(drop).with_context(|| {
        format!(
            "{key} ({}) = {addr}: cannot listen there (port taken?); choose another address",
            env_key(key)
        )
    })
}

fn env_key(key: &str) -> String {
    format!("HUB__{}", key.replace('.', "__").to_uppercase())
}

async fn wait_listening(addr: SocketAddr, key: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(probe_addr(addr))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "{key} ({}) = {addr}: the broker did not start listening",
        env_key(key)
    )
}

/// Caps the kernel's send buffer of every HTTP connection. Left to autotuning, a WebSocket
/// client that stops reading can park several megabytes in the kernel before its feed queue
/// fills and it is dropped; 256 KiB still carries a 10,000-cabinet snapshot at full speed on a
/// LAN while bounding what each stuck screen costs.
fn bound_send_buffer(conn: &dyn std::any::Any, _: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(HTTP_SEND_BUFFER) {
            tracing::debug!(error = %e, "could not cap the HTTP send buffer");
        }
    }
}

const HTTP_SEND_BUFFER: usize = 256 * 1024;

impl Application {
    /// Binds the listeners, opens storage, starts the broker, the actors and the HTTP server.
    /// Must run inside an actix `System`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        crate::private::create_dir(&settings.data_dir).with_context(|| {
            format!(
                "data_dir (HUB__DATA_DIR) = {}: cannot create it",
                settings.data_dir.display()
            )
        })?;
        simulators_where_they_belong(&settings)?;
        let http_listener = TcpListener::bind(settings.http.listen).with_context(|| {
            format!("http.listen (HUB__HTTP__LISTEN) = {}: cannot listen there (port taken?); choose another address", settings.http.listen)
        })?;
        let http = http_listener.local_addr()?;
        let metrics_listener = match settings.metrics.listen {
            Some(addr) => Some(TcpListener::bind(addr).with_context(|| {
                format!("metrics.listen (HUB__METRICS__LISTEN) = {addr}: cannot listen there (port taken?); choose another address")
            })?),
            None => None,
        };
        let embedded_broker = settings.external_broker.url.is_none();
        if !embedded_broker {
            // Cabinets connect to the external broker: no listener here.
        } else if settings.mqtt.password_enabled {
            check_free(settings.mqtt.listen, "mqtt.listen")?;
        } else if settings.mqtt.tls_listen.is_none() {
            anyhow::bail!("mqtt.password_enabled (HUB__MQTT__PASSWORD_ENABLED) is false and mqtt.tls_listen (HUB__MQTT__TLS_LISTEN) is unset: cabinets could not connect at all; set a certificate-mode address or turn password mode back on");
        }
        if let Some(tls) = settings.mqtt.tls_listen.filter(|_| embedded_broker) {
            check_free(tls, "mqtt.tls_listen")?;
        }

        let url = settings.database_url();
        let sqlite_file = crate::private::sqlite_file(&url);
        if let Some(db) = &sqlite_file {
            crate::private::prepare_sqlite(db).with_context(|| {
                format!(
                    "database.url (HUB__DATABASE__URL): cannot create {} as a private file",
                    db.display()
                )
            })?;
        }
        let mut store = Store::connect(&url, settings.database.max_connections)
            .await
            .with_context(|| {
                format!(
                    "database.url (HUB__DATABASE__URL): cannot open {}",
                    redact(&url)
                )
            })?
            .with_cache_ttl(Duration::from_millis(settings.database.cache_ttl_ms));
        if let Some(db) = &sqlite_file {
            // -wal and -shm exist now: created with the database file's mode, or left by an
            // older version.
            crate::private::prepare_sqlite(db)?;
        }
        let metrics = Metrics::new()?;
        let node_id = settings.node_id();
        let cluster = match &settings.redis.url {
            None => Cluster::single(settings.cluster(node_id.clone()), metrics.clone()),
            Some(url) => Cluster::redis(url, settings.cluster(node_id.clone()), metrics.clone())
                .await
                .with_context(|| {
                    format!(
                        "redis.url (HUB__REDIS__URL) = {}: cannot reach Redis",
                        redact(url)
                    )
                })?,
        };
        {
            // Every cabinet lease taken here is recorded with its token, so that storage
            // refuses the late writes of the node that held it before (`cluster_writes_refused_total`).
            let (store, metrics) = (store.clone(), metrics.clone());
            cluster.on_cabinet_lease(move |id, fence| {
                let (store, metrics, id) = (store.clone(), metrics.clone(), id.to_owned());
                tokio::spawn(async move {
                    match store.record_lease_fence(&id, fence).await {
                        Ok(()) => metrics.cluster_fences_recorded.inc(),
                        Err(e) => {
                            metrics.store_errors.with_label_values(&["lease_fence"]).inc();
                            tracing::warn!(cabinet_id = %id, fence, error = %e, "lease token not recorded");
                        }
                    }
                });
            });
        }
        let _renewing = cluster.start();
        tracing::info!(node = %node_id, shared = cluster.is_shared(), "cluster port ready");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let directory = Arc::new(Directory::load(&store).await?);
        let ca = Arc::new(DeviceCa::load_or_create(&settings.data_dir.join("ca"))?);

        let tls = match settings.mqtt.tls_listen {
            Some(addr) => {
                let (cert, key) = ca.server_cert(&settings.mqtt.tls_server_names)?;
                Some((addr, ca.ca_path(), cert, key))
            }
            None => None,
        };
        let listeners = BrokerListeners {
            plain: settings
                .mqtt
                .password_enabled
                .then_some(settings.mqtt.listen),
            tls,
            max_connections: settings.mqtt.max_connections,
            uplink_buffer_mib: settings.mqtt.uplink_buffer_mib,
            max_topic_len: settings.mqtt.max_topic_len,
            max_subscriptions: settings.mqtt.max_subscriptions,
        };
        // The embedded broker, or a client of an existing one (`mqtt::external`).
        let (publisher, edge) = if embedded_broker {
            let (publisher, link_rx) =
                start_broker(&listeners, directory.clone(), metrics.clone())?;
            (publisher, Edge::Embedded(link_rx))
        } else {
            let connector = Connector::new(&settings.external_broker)?;
            let (publisher, commands) = connector.commands(&node_id);
            (publisher, Edge::External(Box::new((connector, commands))))
        };

        let (alert_tx, alert_rx) = mpsc::unbounded_channel();
        let (session_tx, session_rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::new(
            settings.feed.replay_events,
            Duration::from_secs(settings.feed.replay_s),
            settings.feed.client_queue,
        ));
        // Several nodes: one numbered stream of events in Redis, read back by every node.
        cluster.share_feed(&feed, settings.feed.replay_events).await;
        if cluster.is_shared() {
            let feed = feed.clone();
            store.announce_cache_changes(move |name, key| {
                feed.publish_internal("cache", &serde_json::json!({ "name": name, "key": key }));
            });
        }
        // Set once the supervisor exists: other nodes' confirmations are told to it.
        let supervisor: Arc<std::sync::OnceLock<Arc<Sessions>>> = Arc::default();
        {
            let (directory, store) = (directory.clone(), store.clone());
            let supervisor = supervisor.clone();
            feed.on_internal(move |e| {
                #[derive(serde::Deserialize)]
                struct Changed {
                    cabinet_id: String,
                }
                #[derive(serde::Deserialize)]
                struct Cache {
                    name: String,
                    key: Option<String>,
                }
                #[derive(serde::Deserialize)]
                struct Confirmed {
                    session_id: String,
                }
                if e.kind == "confirmed" {
                    if let (Some(s), Ok(Confirmed { session_id })) =
                        (supervisor.get(), serde_json::from_str(&e.data))
                    {
                        s.confirmed_elsewhere(&session_id);
                    }
                    return;
                }
                if e.kind == "gap" {
                    // Missed changes of other nodes: every cached row and every credential
                    // is read again.
                    for name in ["cabinets", "prices", "promotions", "terms", "keys"] {
                        store.forget(name, None);
                    }
                    let (directory, store) = (directory.clone(), store.clone());
                    tokio::spawn(async move {
                        if let Err(e) = directory.reload_all(&store).await {
                            tracing::error!(error = %e, "credentials not read again after a gap in the shared feed");
                        }
                    });
                    return;
                }
                if e.kind == "cache" {
                    if let Ok(Cache { name, key }) = serde_json::from_str(&e.data) {
                        store.forget(&name, key.as_deref());
                    }
                    return;
                }
                if e.kind != "directory" {
                    return;
                }
                let Ok(Changed { cabinet_id }) = serde_json::from_str(&e.data) else {
                    return;
                };
                let Ok(id) = cabinet_actors::ids::CabinetId::parse(&cabinet_id) else {
                    return;
                };
                let (directory, store) = (directory.clone(), store.clone());
                tokio::spawn(async move {
                    if let Err(e) = directory.reload(&store, &id).await {
                        tracing::error!(cabinet_id = %id, error = %e, "credentials changed on another node not read again");
                    }
                });
            });
        }
        let (change_tx, change_rx) = mpsc::unbounded_channel();
        store.announce_changes(change_tx);
        tokio::spawn(crate::feed::relay_store_changes(feed.clone(), change_rx));
        tokio::spawn(alert_writer(store.clone(), metrics.clone(), alert_rx));
        let ports = Arc::new(HubPorts {
            publisher: Arc::new(publisher),
            metrics: metrics.clone(),
            alerts: alert_tx.clone(),
            sessions: session_tx,
            feed: feed.clone(),
            cluster: cluster.clone(),
        });
        let threads = match settings.actors.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let registry = Arc::new(Registry::new(
            threads,
            ports.clone(),
            clock.clone(),
            settings.timing(),
        ));

        let pump_alive = Arc::new(AtomicBool::new(false));
        let pump = Arc::new(Pump {
            directory: directory.clone(),
            registry: registry.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            alive: pump_alive.clone(),
            cluster: cluster.clone(),
        });
        let (external, mqtt_listening) = match edge {
            Edge::Embedded(link_rx) => {
                tokio::spawn(pump.run(link_rx));
                let listening: Vec<SocketAddr> = listeners
                    .plain
                    .into_iter()
                    .chain(settings.mqtt.tls_listen)
                    .collect();
                (None, listening)
            }
            Edge::External(external) => {
                let (connector, commands) = *external;
                let external = External::start(
                    connector,
                    commands,
                    pump.clone(),
                    cluster.clone(),
                    feed.clone(),
                    Duration::from_millis(settings.cluster.renew_ms),
                );
                (Some(external), Vec::new())
            }
        };
        if embedded_broker {
            if let Some(plain) = listeners.plain {
                wait_listening(plain, "mqtt.listen").await?;
            }
            crate::mqtt::tune_listeners(mqtt_listening.iter().map(|a| a.port()).collect());
            if let Some(tls) = settings.mqtt.tls_listen {
                wait_listening(tls, "mqtt.tls_listen").await?;
            }
        }

        let (providers, simulators) = payment_providers(&settings, probe_addr(http))?;
        #[cfg(not(feature = "simulators"))]
        let () = simulators;
        let sessions = Sessions::new(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            clock.clone(),
            settings.clone(),
            providers,
        );
        let _ = supervisor.set(sessions.clone());
        if cluster.is_shared() {
            let feed = feed.clone();
            sessions.on_confirmation_elsewhere(move |id| {
                feed.publish_internal("confirmed", &serde_json::json!({ "session_id": id }));
            });
        }
        // After a crash: runs once the HTTP server (which also serves the simulator) is up.
        let (resumer, resumed_by) = (sessions.clone(), cluster.clone());
        tokio::spawn(async move { resumer.resume(&resumed_by).await });
        // Singleton work (payment collection, refunds followed, reminders, settlement, sweeps)
        // runs on the node holding the leader lease: always this one on a single node.
        let collector = sessions.clone();
        let leads = cluster.clone();
        let every =
            Duration::from_millis((settings.payments.collect_interval_ms / 4).clamp(100, 60_000));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if leads.is_leader() {
                    collector.collect_due().await;
                    collector.follow_refunds().await;
                    collector.complete_stalled().await;
                }
            }
        });
        // Service-time reminders: one pass per interval (reminders.rs).
        {
            let (store, feed, metrics, clock) =
                (store.clone(), feed.clone(), metrics.clone(), clock.clone());
            let every =
                Duration::from_millis(settings.cabinet.service_reminder_interval_ms.max(100));
            let leads = cluster.clone();
            tokio::spawn(async move {
                loop {
                    if leads.is_leader() {
                        crate::reminders::remind(&store, &feed, &metrics, clock.now_ms() as i64)
                            .await;
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
        // The settlement supervisor: one pass per tick over what is due (sessions::settle).
        if settings.settlement.enabled {
            let settler = sessions.clone();
            let every = Duration::from_millis(settings.settlement.tick_ms.max(50));
            // Paced: settlement is background work (the money is frozen for up to 180 days, a
            // rush can wait for it), and three signed provider calls an order would otherwise
            // take their CPU from the shoppers in the rush (docs/architecture.md, "Settlement").
            let per_pass = (settings.settlement.max_steps_per_s as u128 * every.as_millis() / 1000)
                .max(1) as usize;
            let leads = cluster.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if leads.is_leader() {
                        settler.settle_due(per_pass).await;
                    }
                }
            });
        }
        // Unpaid service-time orders: closed at the provider and cancelled when their time is
        // up (sessions::service_time).
        {
            let swept = sessions.clone();
            let every = Duration::from_millis(settings.service.sweep_ms.max(50));
            let leads = cluster.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if leads.is_leader() {
                        swept.sweep_service_orders().await;
                    }
                }
            });
        }
        tokio::spawn(sessions.clone().apply_events(session_rx));
        // The backstop for sessions no cabinet actor will end (docs/architecture.md, "No
        // session outlives its purpose").
        let sweeper = sessions.clone();
        let every = Duration::from_millis(settings.session.sweep_interval_ms.max(100));
        let leads = cluster.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if !leads.is_leader() {
                    continue;
                }
                if let Err(e) = sweeper.sweep_stale().await {
                    tracing::error!(error = %e, "stale-session sweep failed");
                }
            }
        });
        // A broken database connection is replaced here even when nobody probes readiness.
        let checked = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::store::HEALTH_CHECK).await;
                if let Err(e) = checked.ping().await {
                    tracing::error!(error = %e, "database health check failed");
                }
            }
        });
        let state = actix_web::web::Data::new(AppState {
            sessions,
            #[cfg(feature = "simulators")]
            simulators: simulators.clone(),
            feed,
            access: Arc::new(KeyAccess::new(Duration::from_millis(
                settings.auth.feed_ticket_ttl_ms,
            ))),
            // Readiness probes the listener cabinets use: password mode, else certificate mode.
            // (None with an external broker: its connections say whether it is reachable.)
            mqtt_probe: embedded_broker.then(|| {
                probe_addr(
                    mqtt_listening
                        .first()
                        .copied()
                        .unwrap_or(settings.mqtt.listen),
                )
            }),
            external,
            settings: settings.clone(),
            store,
            cluster: cluster.clone(),
            registry,
            directory,
            metrics,
            ca,
            clock,
            pump_alive,
        });
        let admin_key = ensure_admin_key(&state).await?;
        // Requests other nodes carry here for this node's cabinets (http::route).
        {
            let served = state.clone();
            cluster.serve_calls(Arc::new(move |kind, body| {
                let state = served.clone();
                Box::pin(async move { crate::http::route::serve(state, kind, body).await })
            }));
        }

        let workers = match settings.http.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let data = state.clone();
        let simulators_on = state.simulators_on();
        let body_within = Duration::from_millis(settings.http.body_timeout_ms);
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .wrap(actix_web::middleware::from_fn(move |req, next| {
                    crate::http::deadline::body_deadline(body_within, req, next)
                }))
                .wrap(crate::http::access::access_log())
                .configure(|c| {
                    // The hub's routes first: the mini-program hand-offs it serves under the
                    // simulators' prefixes (`/sim/wechatpay/confirm`) come before their scopes.
                    crate::http::configure(c, simulators_on);
                    #[cfg(feature = "simulators")]
                    if let Some(sims) = &simulators {
                        sims.configure(c);
                    }
                })
        })
        .on_connect(bound_send_buffer)
        // A request's head: actix's own 5 s, or less when the body gets less (actix answers
        // 408 itself).
        .client_request_timeout(body_within.min(Duration::from_secs(5)))
        .workers(workers)
        .shutdown_timeout(10)
        .listen(http_listener)?
        .run();
        let metrics_server = match metrics_listener {
            Some(l) => Some(metrics_server(state.clone(), l)?),
            None => None,
        };
        tokio::spawn(
            crate::sweep::OfflineSweep {
                store: state.store.clone(),
                registry: state.registry.clone(),
                ports,
                metrics: state.metrics.clone(),
                clock: state.clock.clone(),
                heartbeat_s: settings.cabinet.heartbeat_s,
                missed_heartbeats: settings.cabinet.missed_heartbeats,
            }
            .run(),
        );

        tracing::info!(%http, mqtt = %settings.mqtt.listen, mqtt_tls = ?settings.mqtt.tls_listen, database = %redact(&url), "cabinet-hub started");
        Ok(Self {
            http,
            mqtt: settings.mqtt.listen,
            mqtt_tls: settings.mqtt.tls_listen,
            server,
            metrics_server,
            state,
            admin_key,
            alerts: alert_tx,
        })
    }

    /// The address `/metrics` is served on when `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|(a, _)| *a)
    }

    /// The HTTP address actually bound.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The password-mode MQTT address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    /// The certificate-mode MQTT address.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls
    }

    /// The admin key generated at this start, if one was.
    pub fn generated_admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }

    /// A handle that stops the HTTP server gracefully.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Runs until SIGTERM/SIGINT (or the handle stops it), then drains: HTTP requests in
    /// flight finish, pending alert writes are flushed, the database is closed.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        if let Some((_, metrics)) = &self.metrics_server {
            metrics.stop(true).await;
        }
        tracing::info!("HTTP stopped; flushing alert history");
        let Application { state, alerts, .. } = self;
        // Partitions read from an external broker are handed over now, not a lease later.
        if let Some(external) = &state.external {
            external.shut_down().await;
        }
        // Another node takes the singleton work over now, not a lease later.
        state.cluster.step_down().await;
        // Every raise and clear queued before this marker lands before the database closes.
        let (done, flushed) = tokio::sync::oneshot::channel();
        if alerts.send(AlertWrite::Flush(done)).is_ok()
            && tokio::time::timeout(Duration::from_secs(10), flushed)
                .await
                .is_err()
        {
            tracing::error!("alert history did not flush within 10 s");
        }
        state.store.close().await;
        tracing::info!("cabinet-hub stopped");
        Ok(())
    }
}

/// `metrics.listen`: a small server of its own answering `/metrics` only, so that the scrape
/// can live on an internal address while the API faces the world.
fn metrics_server(
    state: actix_web::web::Data<AppState>,
    listener: TcpListener,
) -> anyhow::Result<(SocketAddr, actix_web::dev::ServerHandle)> {
    use actix_web::{web, ResponseError};
    let addr = listener.local_addr()?;
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .app_data(crate::http::health::MetricsListener)
            .route("/metrics", web::get().to(crate::http::health::metrics))
            .default_service(web::to(|| async {
                crate::error::ApiError::not_found("route").error_response()
            }))
    })
    .workers(1)
    .shutdown_timeout(2)
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    tracing::info!(%addr, "metrics served on their own address");
    Ok((addr, handle))
}

/// The simulators carry development keys and an admin control API: on a public address only
/// when asked for by name (`payments.simulator_public`), and then loudly.
fn simulators_where_they_belong(settings: &Settings) -> anyhow::Result<()> {
    let p = &settings.payments;
    let listen = settings.http.listen;
    if !p.simulator && p.simulator_url.is_some() {
        anyhow::bail!("payments.simulator_url (HUB__PAYMENTS__SIMULATOR_URL) is set while payments.simulator is off: either use the simulators (HUB__PAYMENTS__SIMULATOR=true) or remove the address");
    }
    if !p.simulator || listen.ip().is_loopback() {
        return Ok(());
    }
    if !p.simulator_public {
        anyhow::bail!(
            "payments.simulator (HUB__PAYMENTS__SIMULATOR) is on and http.listen (HUB__HTTP__LISTEN) = {listen} is not a loopback address: the payment simulators (development keys, /sim control routes) would be reachable from the network. Set HUB__PAYMENTS__SIMULATOR=false and configure payments.wechat / payments.alipay, listen on 127.0.0.1, or set HUB__PAYMENTS__SIMULATOR_PUBLIC=true for a shared test environment"
        );
    }
    tracing::warn!(%listen, "PAYMENT SIMULATORS ARE PUBLIC (payments.simulator_public): anyone who reaches {listen} reaches the simulated providers and their development keys; never do this in production");
    eprintln!("cabinet-hub: WARNING: payment simulators served on the non-loopback address {listen} (HUB__PAYMENTS__SIMULATOR_PUBLIC=true); never in production");
    Ok(())
}

#[cfg(feature = "simulators")]
type Simulators = Option<crate::simulators::Simulators>;
#[cfg(not(feature = "simulators"))]
type Simulators = ();

/// The payment providers: the simulators served by this hub when `payments.simulator` is on,
/// else the real ones configured.
fn payment_providers(
    settings: &Settings,
    http: SocketAddr,
) -> anyhow::Result<(Providers, Simulators)> {
    if settings.payments.simulator
        && (settings.payments.wechat.is_some()
            || settings.payments.wechat_merchant.is_some()
            || settings.payments.alipay.is_some())
    {
        // Simulators beside real credentials would take real shoppers' sessions and trust the
        // simulators' development keys: never a silent choice.
        anyhow::bail!("payments.simulator (HUB__PAYMENTS__SIMULATOR) is on while real provider credentials are configured (payments.wechat / payments.alipay): the simulators would stand in for the real providers; set HUB__PAYMENTS__SIMULATOR=false to use the real ones, or remove the credentials to simulate");
    }
    if !settings.payments.simulator {
        let real = Providers::real(
            settings.payments.wechat.as_ref(),
            settings.payments.wechat_merchant.as_ref(),
            settings.payments.alipay.as_ref(),
        )?;
        #[cfg(feature = "simulators")]
        return Ok((real, None));
        #[cfg(not(feature = "simulators"))]
        return Ok((real, ()));
    }
    #[cfg(feature = "simulators")]
    {
        if let Some(url) = &settings.payments.simulator_url {
            // Served by a `cabinet-hub simulate` process: this hub serves none of its own.
            let providers = crate::simulators::dev_providers(url, &format!("http://{http}"))?;
            return Ok((providers, None));
        }
        let (providers, sims) = crate::simulators::Simulators::start(settings, http)?;
        Ok((providers, Some(sims)))
    }
    #[cfg(not(feature = "simulators"))]
    {
        let _ = http;
        anyhow::bail!("payments.simulator (HUB__PAYMENTS__SIMULATOR) is on, but this build has no simulators (built without the `simulators` feature); configure payments.wechat or payments.alipay")
    }
}

fn redact(url: &str) -> String {
    crate::config::redact_url(url, "***").unwrap_or_else(|| url.to_owned())
}

/// The id of the key configured as `auth.admin_key`: stable, and no part of the secret.
pub fn configured_admin_key_id(key: &str) -> String {
    format!("k_admin_{}", &sha256_hex(key)[..8])
}

/// Makes sure an admin key exists: the configured one, or one generated and printed once.
async fn ensure_admin_key(state: &AppState) -> anyhow::Result<Option<String>> {
    if let Some(key) = &state.settings.auth.admin_key {
        if key.len() < 16 {
            anyhow::bail!("auth.admin_key (HUB__AUTH__ADMIN_KEY) must be at least 16 characters");
        }
        let hash = sha256_hex(key);
        match state.store.api_key_any_by_hash(&hash).await? {
            None => {
                // Derived from the key, so the configured key keeps its id across restarts and
                // can be listed and revoked like any other.
                let id = configured_admin_key_id(key);
                state
                    .store
                    .create_api_key(&id, &hash, None, "admin", state.now())
                    .await?;
            }
            Some(k) if k.revoked_at.is_some() => {
                // A revocation through the API stands: configuration does not bring it back.
                tracing::warn!(key_id = %k.id, "auth.admin_key (HUB__AUTH__ADMIN_KEY) was revoked; it stays revoked: remove it from the configuration");
            }
            Some(_) => {}
        }
        return Ok(None);
    }
    if state.store.has_admin_key().await? {
        return Ok(None);
    }
    let (_, key) = issue_key(state, None, Role::Admin)
        .await
        .map_err(|e| anyhow::anyhow!("creating the admin key: {e}"))?;
    println!("\n  cabinet-hub: created the platform admin API key (shown once, keep it safe):\n\n    {key}\n");
    Ok(Some(key))
}
