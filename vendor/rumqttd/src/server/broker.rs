use crate::link::alerts::{self};
use crate::link::console::ConsoleLink;
use crate::link::network::{self, Network, N};
use crate::link::remote::{self, mqtt_connect, RemoteLink};
use crate::link::{bridge, timer};
use crate::local::LinkBuilder;
use crate::protocol::v4::V4;
use crate::protocol::v5::V5;
use crate::protocol::{Packet, Protocol};
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
use crate::server::tls::{self, TLSAcceptor};
use crate::{meters, ConnectionSettings, Meter};
use flume::{RecvError, SendError, Sender};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tracing::{error, field, info, warn, Instrument};
use uuid::Uuid;

#[cfg(feature = "websocket")]
use async_tungstenite::tokio::accept_hdr_async;
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::http::HeaderValue;
#[cfg(feature = "websocket")]
use ws_stream_tungstenite::WsStream;

use metrics::gauge;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use std::{io, thread};

use crate::link::console;
use crate::link::local::{self, LinkRx, LinkTx};
use crate::router::{Event, Router};
use crate::{Config, ConnectionId, ServerSettings, TlsConfig};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::error::Elapsed;
use tokio::{task, time};

#[derive(Debug, thiserror::Error)]
#[error("Acceptor error")]
pub enum Error {
    #[error("I/O {0}")]
    Io(#[from] io::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    #[error("Certs error = {0}")]
    Certs(#[from] tls::Error),
    #[error("Accept error = {0}")]
    Accept(String),
    #[error("Remote error = {0}")]
    Remote(#[from] remote::Error),
    #[error("Invalid configuration")]
    Config(String),
}

pub struct Broker {
    config: Arc<Config>,
    router_tx: Sender<(ConnectionId, Event)>,
}

impl Broker {
    pub fn new(config: Config) -> Broker {
        let config = Arc::new(config);
        let router_config = config.router.clone();
        let router: Router = Router::new(config.id, router_config);

        // Setup cluster if cluster settings are configured.
        match config.cluster.clone() {
            Some(_cluster_config) => {
                // let node_id = cluster_config.node_id;
                // let listen = cluster_config.listen;
                // let seniors = cluster_config.seniors;
                // let mut cluster = RemoteCluster::new(node_id, &listen, seniors);
                // Broker::setup_remote_cluster(&mut router, node_id, &mut cluster);

                // Start router first and then cluster in the background
                let router_tx = router.spawn();
                // cluster.spawn();
                Broker { config, router_tx }
            }
            None => {
                let router_tx = router.spawn();
                Broker { config, router_tx }
            }
        }
    }

    // pub fn new_local_cluster(
    //     config: Config,
    //     node_id: NodeId,
    //     seniors: Vec<(NodeId, Sender<ReplicationData>)>,
    // ) -> (Broker, Sender<ReplicationData>) {
    //     let config = Arc::new(config);
    //     let router_config = config.router.clone();

    //     let mut router = Router::new(config.id, router_config);
    //     let (mut cluster, tx) = LocalCluster::new(node_id, seniors);
    //     Broker::setup_local_cluster(&mut router, node_id, &mut cluster);

    //     // Start router first and then cluster in the background
    //     let router_tx = router.spawn();
    //     cluster.spawn();

    //     (Broker { config, router_tx }, tx)
    // }

    // fn setup_remote_cluster(router: &mut Router, node_id: NodeId, cluster: &mut RemoteCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // fn setup_local_cluster(router: &mut Router, node_id: NodeId, cluster: &mut LocalCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // Link to get meters
    pub fn meters(&self) -> Result<meters::MetersLink, meters::LinkError> {
        let link = meters::MetersLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    // Link to get alerts
    pub fn alerts(&self) -> Result<alerts::AlertsLink, alerts::LinkError> {
        let link = alerts::AlertsLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), local::LinkError> {
        // Register this connection with the router. Router replies with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex. max connection limit).
        let (link_tx, link_rx, _ack) =
            LinkBuilder::new(client_id, self.router_tx.clone()).build()?;
        Ok((link_tx, link_rx))
    }

    #[tracing::instrument(skip(self))]
    pub fn start(&mut self) -> Result<(), Error> {
        if self.config.v4.is_none()
            && self.config.v5.is_none()
            && (cfg!(not(feature = "websocket")) || self.config.ws.is_none())
        {
            return Err(Error::Config(
                "Atleast one server config must be specified, \
                consider adding either of [v4.x]/[v5.x] or [ws.x] (if enabled) in config file."
                    .to_string(),
            ));
        }

        // we don't know which servers (v4/v5/ws) user will spawn
        // so we collect handles for all of the spawned servers
        let mut server_thread_handles = Vec::new();

        if let Some(metrics_config) = self.config.metrics.clone() {
            let timer_thread = thread::Builder::new().name("timer".to_owned());
            let router_tx = self.router_tx.clone();
            timer_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    timer::start(metrics_config, router_tx).await;
                });
            })?;
        }

        // Spawn bridge in a separate thread.
        if let Some(bridge_config) = self.config.bridge.clone() {
            let bridge_thread = thread::Builder::new().name(bridge_config.name.clone());
            let router_tx = self.router_tx.clone();
            bridge_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    if let Err(e) = bridge::start(bridge_config, router_tx, V4).await {
                        error!(error=?e, "Bridge Link error");
                    };
                });
            })?;
        }

        // Spawn servers in a separate thread.
        if let Some(v4_config) = &self.config.v4 {
            for (_, config) in v4_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V4");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(v5_config) = &self.config.v5 {
            for (_, config) in v5_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let mut server = Server::new(config, self.router_tx.clone(), V5);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V5");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        #[cfg(not(feature = "websocket"))]
        if self.config.ws.is_some() {
            warn!("websocket feature is disabled, [ws] config will be ignored.");
        }

        #[cfg(feature = "websocket")]
        if let Some(ws_config) = &self.config.ws {
            for (_, config) in ws_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                //TODO: Add support for V5 procotol with websockets. Registered in config or on ServerSettings
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Websocket).await {
                            error!(error=?e, "Server error - WS");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(prometheus_setting) = &self.config.prometheus {
            let timeout = prometheus_setting.interval;
            // If port is specified use it instead of listen.
            // NOTE: This means listen is ignored when `port` is specified.
            // `port` will be removed in future release in favour of `listen`
            let addr = {
                #[allow(deprecated)]
                match prometheus_setting.port {
                    Some(port) => SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                    None => prometheus_setting.listen.unwrap_or(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                        9042,
                    )),
                }
            };
            let metrics_thread = thread::Builder::new().name("Metrics".to_owned());
            let meter_link = self.meters().unwrap();
            metrics_thread.spawn(move || {
                let builder = PrometheusBuilder::new().with_http_listener(addr);
                builder.install().unwrap();

                let total_publishes = gauge!("metrics.router.total_publishes");
                let total_connections = gauge!("metrics.router.total_connections");
                let failed_publishes = gauge!("metrics.router.failed_publishes");
                loop {
                    if let Ok(metrics) = meter_link.recv() {
                        for m in metrics {
                            match m {
                                Meter::Router(_, ref r) => {
                                    total_connections.set(r.total_connections as f64);
                                    total_publishes.set(r.total_publishes as f64);
                                    failed_publishes.set(r.failed_publishes as f64);
                                }
                                _ => continue,
                            }
                        }
                    }

                    std::thread::sleep(Duration::from_secs(timeout));
                }
            })?;
        }

        if let Some(console) = self.config.console.clone() {
            let console_link = ConsoleLink::new(console, self.router_tx.clone());

            let console_link = Arc::new(console_link);
            let console_thread = thread::Builder::new().name("Console".to_string());
            console_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();
                runtime.block_on(console::start(console_link));
            })?;
        }

        // in ideal case, where server doesn't crash, join() will never resolve
        // we still try to join threads so that we don't return from function
        // unless everything crashes.
        server_thread_handles.into_iter().for_each(|handle| {
            // join() might panic in case the thread panics
            // we just ignore it
            let _ = handle.join();
        });

        Ok(())
    }
}

#[derive(Copy, Clone)]
pub enum LinkType {
    #[cfg(feature = "websocket")]
    Websocket,
    Remote,
}

#[derive(PartialEq)]
enum AwaitingWill {
    Cancel,
    Fire,
}

pub struct Server<P> {
    config: ServerSettings,
    router_tx: Sender<(ConnectionId, Event)>,
    protocol: P,
    awaiting_will_handler: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
}

impl<P: Protocol + Clone + Send + 'static> Server<P> {
    pub fn new(
        config: ServerSettings,
        router_tx: Sender<(ConnectionId, Event)>,
        protocol: P,
    ) -> Server<P> {
        Server {
            config,
            router_tx,
            protocol,
            awaiting_will_handler: Arc::new(Mutex::new(HashMap::default())),
        }
    }

    pub async fn start(&mut self, link_type: LinkType) -> Result<(), Error> {
        let listener = TcpListener::bind(&self.config.listen).await?;
        let delay = Duration::from_millis(self.config.next_connection_delay_ms);
        let mut count: usize = 0;

        let config = Arc::new(self.config.connections.clone());
        info!(
            config = self.config.name,
            listen_addr = self.config.listen.to_string(),
            "Listening for remote connections",
        );
        loop {
            // Await new network connection.
            let (stream, addr) = match listener.accept().await {
                Ok((s, r)) => (s, r),
                Err(e) => {
                    error!(error=?e, "Unable to accept socket.");
                    // cabinet-hub patch (PATCHES.md): out of file descriptors the listener
                    // stays readable and accept fails at once, so this loop spun a core and
                    // flooded the log. Waiting a little lets connections close meanwhile.
                    time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };

            info!(name=?self.config.name, ?addr, count, "accept");

            let config = config.clone();
            let router_tx = self.router_tx.clone();
            count += 1;

            let protocol = self.protocol.clone();
            let awaiting_will_handler = self.awaiting_will_handler.clone();
            let tls_config = self.config.tls.clone();
            // cabinet-hub patch (PATCHES.md): the TLS (and websocket) handshake runs in the
            // connection's own task, within the connection timeout. It ran here in the accept
            // loop without a deadline, so one client that opened a connection and sent nothing
            // stopped every other client of this listener from connecting.
            let handshake_timeout = Duration::from_millis(config.connection_timeout_ms.into());
            let span = match link_type {
                #[cfg(feature = "websocket")]
                LinkType::Websocket => tracing::info_span!(
                    "websocket_link",
                    client_id = field::Empty,
                    connection_id = field::Empty
                ),
                LinkType::Remote => tracing::error_span!(
                    "remote_link",
                    tenant_id = field::Empty,
                    client_id = field::Empty,
                    connection_id = field::Empty,
                ),
            };
            // cabinet-hub patch (PATCHES.md): everything the set-up needs travels in one box and
            // the set-up runs as a boxed future of its own, freed once the client is connected.
            // A task's future is as large as its largest state, so the handshake, the CONNECT
            // and `RemoteLink::new` held inline kept every connection's task at ~5 KB for life.
            let setup = Box::new(Setup {
                config,
                router_tx,
                stream,
                addr,
                tls_config,
                link_type,
                handshake_timeout,
                protocol,
                will_handlers: awaiting_will_handler,
            });
            task::spawn(
                async move {
                    // `let else`: an `if let` head's temporary would live across `serve`.
                    let Some(connected) = Box::pin(connect(setup)).await else {
                        return;
                    };
                    serve(connected).await;
                }
                .instrument(span),
            );

            // cabinet-hub patch (PATCHES.md): a zero delay still waited for the next timer tick,
            // about a millisecond, so the listener accepted at most ~1,000 connections a second.
            if !delay.is_zero() {
                time::sleep(delay).await;
            }
        }
    }
}

/// The TLS handshake when the listener has TLS, then the websocket one for a websocket link.
/// Answers the stream, the tenant and (cabinet-hub patch, PATCHES.md 10) the client
/// certificate's serial.
async fn handshake(
    tls: Option<&TlsConfig>,
    stream: TcpStream,
    link_type: LinkType,
) -> Result<(Box<dyn N>, Option<String>, Option<String>), Error> {
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    let (network, tenant_id, serial): (Box<dyn N>, Option<String>, Option<String>) = match tls {
        Some(c) => {
            let (tenant_id, serial, network) = TLSAcceptor::new(c)?.accept(stream).await?;
            (network, tenant_id, serial)
        }
        None => (Box::new(stream), None, None),
    };
    #[cfg(not(any(feature = "use-rustls", feature = "use-native-tls")))]
    let (network, tenant_id, serial): (Box<dyn N>, Option<String>, Option<String>) = {
        let _ = tls;
        (Box::new(stream), None, None)
    };
    match link_type {
        #[cfg(feature = "websocket")]
        LinkType::Websocket => {
            let stream = accept_hdr_async(network, WSCallback)
                .await
                .map_err(|e| Error::Accept(e.to_string()))?;
            Ok((Box::new(WsStream::new(stream)), tenant_id, serial))
        }
        LinkType::Remote => Ok((network, tenant_id, serial)),
    }
}

/// Configures the Websocket connection to indicate the correct protocol
/// by adding the "sec-websocket-protocol" with value of "mqtt" to the response header
#[cfg(feature = "websocket")]
struct WSCallback;
#[cfg(feature = "websocket")]
impl Callback for WSCallback {
    fn on_request(
        self,
        _request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        Ok(response)
    }
}

/// What a new connection's task starts with.
struct Setup<P> {
    config: Arc<ConnectionSettings>,
    router_tx: Sender<(ConnectionId, Event)>,
    stream: TcpStream,
    addr: SocketAddr,
    tls_config: Option<TlsConfig>,
    link_type: LinkType,
    handshake_timeout: Duration,
    protocol: P,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
}

/// What a connection keeps once the client is connected.
struct Connected<P> {
    link: RemoteLink<P>,
    client_id: String,
    tenant_id: Option<String>,
    router_tx: Sender<(ConnectionId, Event)>,
    will_rx: flume::Receiver<AwaitingWill>,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
}

/// The TLS (or websocket) handshake within the connection timeout, then `remote_connect`.
async fn connect<P: Protocol>(setup: Box<Setup<P>>) -> Option<Connected<P>> {
    let Setup {
        config,
        router_tx,
        stream,
        addr,
        tls_config,
        link_type,
        handshake_timeout,
        protocol,
        will_handlers,
    } = *setup;
    let handshake = time::timeout(
        handshake_timeout,
        handshake(tls_config.as_ref(), stream, link_type),
    )
    .await;
    let (network, tenant_id, serial) = match handshake {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            error!(error=?e, ?addr, "Tls accept error");
            return None;
        }
        Err(_) => {
            error!(?addr, "Handshake timed out");
            return None;
        }
    };
    if let Some(tenant_id) = &tenant_id {
        tracing::Span::current().record("tenant_id", tenant_id.as_str());
    }
    // cabinet-hub patch (PATCHES.md 10): a revoked certificate is refused before CONNECT.
    if let (Some(check), Some(tenant_id), Some(serial)) =
        (&config.certificate_check, &tenant_id, &serial)
    {
        if !check(tenant_id, serial) {
            warn!(?addr, tenant_id, serial, "client certificate refused");
            return None;
        }
    }
    remote_connect(
        config,
        tenant_id,
        router_tx,
        network,
        protocol,
        will_handlers,
    )
    .await
}

/// A new network connection should wait for a mqtt connect packet. This should be handled
/// asynchronously to avoid blocking other new connections while this connection is
/// waiting for mqtt connect packet. Also this honours connection wait time as per config to prevent
/// denial of service attacks (rogue clients which only establish network connections without
/// sending a mqtt connection packet to make the server reach its concurrent connection limit).
async fn remote_connect<P: Protocol>(
    config: Arc<ConnectionSettings>,
    tenant_id: Option<String>,
    router_tx: Sender<(ConnectionId, Event)>,
    stream: Box<dyn N>,
    protocol: P,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
) -> Option<Connected<P>> {
    let mut network = Network::new(
        stream,
        config.max_payload_size,
        config.max_inflight_count,
        protocol,
    );

    let dynamic_filters = config.dynamic_filters;
    let bind_tenant = config.bind_tenant_to_client_id;

    let connect_packet = match mqtt_connect(config, &mut network).await {
        Ok(p) => p,
        Err(e) => {
            error!(error=?e, "Error while handling MQTT connect packet");
            return None;
        }
    };

    let (mut client_id, clean_session) = match &connect_packet {
        Packet::Connect(ref connect, _, _, _, _) => {
            (connect.client_id.clone(), connect.clean_session)
        }
        _ => unreachable!(),
    };

    // cabinet-hub patch (PATCHES.md 10): an authenticated password client is its own tenant,
    // so the router confines it as it confines a certificate client.
    let tenant_id = match tenant_id {
        None if bind_tenant => {
            if client_id.is_empty() || !client_id.chars().all(|c| c.is_ascii_alphanumeric()) {
                warn!(
                    client_id,
                    "client id is not a tenant id; connection refused"
                );
                return None;
            }
            Some(client_id.clone())
        }
        other => other,
    };

    let mut assigned_client_id = None;
    if client_id.is_empty() {
        let uuid = Uuid::new_v4().simple();
        client_id = format!("rumqtt-{uuid}");
        assigned_client_id = Some(client_id.clone());
    }

    if let Some(tenant_id) = &tenant_id {
        // client_id is set to "tenant_id.client_id"
        // this is to make sure we are consistent,
        // as Connection uses this format of client_id
        client_id = format!("{tenant_id}.{client_id}");
    }

    if let Some(sender) = will_handlers.lock().unwrap().remove(&client_id) {
        let awaiting_will = if clean_session {
            AwaitingWill::Fire
        } else {
            AwaitingWill::Cancel
        };
        sender.try_send(awaiting_will).unwrap();
    }

    let (will_tx, will_rx) = flume::bounded::<AwaitingWill>(1);
    will_handlers
        .lock()
        .unwrap()
        .insert(client_id.clone(), will_tx);

    // Start the link
    let link = match RemoteLink::new(
        router_tx.clone(),
        tenant_id.clone(),
        network,
        connect_packet,
        dynamic_filters,
        assigned_client_id,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            error!(error=?e, "Remote link error");
            return None;
        }
    };
    Some(Connected {
        link,
        client_id,
        tenant_id,
        router_tx,
        will_rx,
        will_handlers,
    })
}

/// A connected client's life: its link until it ends, then its last will.
fn serve<P: Protocol>(mut c: Connected<P>) -> impl std::future::Future<Output = ()> {
    // An `async move` block over fields rather than an `async fn` with locals: an async fn's
    // future keeps its arguments for its whole life and moves them into locals as well, so it
    // would hold the connection twice.
    async move {
        let connection_id = c.link.connection_id;
        let will_delay_interval = c.link.will_delay_interval;
        let mut send_disconnect = true;

        match c.link.start().await {
            // Connection got closed. This shouldn't usually happen.
            Ok(_) => error!("connection-stop"),
            // No need to send a disconnect message when disconnection
            // originated internally in the router.
            Err(remote::Error::Link(e)) => {
                error!(error=?e, "router-drop");
                send_disconnect = false;
            }
            // Connection was closed by peer
            Err(remote::Error::Network(network::Error::Io(err)) | remote::Error::Io(err))
                if err.kind() == io::ErrorKind::ConnectionAborted =>
            {
                info!(error=?err, "disconnected");
            }
            // Any other error
            Err(e) => {
                error!(error=?e, "disconnected");
            }
        };

        if send_disconnect {
            let disconnect = Event::Disconnect;
            let message = (connection_id, disconnect);
            c.router_tx.send(message).ok();
        }

        // this is important to stop the connection
        drop(c.link);

        let publish_will = match tokio::time::timeout(
            Duration::from_secs(will_delay_interval as u64),
            c.will_rx.recv_async(),
        )
        .await
        {
            Ok(w) => w.is_ok_and(|k| k == AwaitingWill::Fire),
            Err(_) => {
                // no need to keep the sender after timeout
                c.will_handlers.lock().unwrap().remove(&c.client_id);
                // as will delay interval has passed, publish the will message
                true
            }
        };

        if publish_will {
            let message = Event::PublishWill((c.client_id, c.tenant_id));
            // is this connection_id really correct at this point?
            // as we have disconnected already, some other connection
            // might be using this connection ID!
            // It won't matter in this case as we don't use it
            // but might affect logs?
            c.router_tx.send((connection_id, message)).ok();
        }
    }
}

// cabinet-hub patch (PATCHES.md)
#[cfg(test)]
mod task_size {
    use super::*;

    /// The size of the future a function returns, without calling it.
    fn future_size<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_connected_clients_task_keeps_only_its_connected_state() {
        // Every connected client's task holds this for its whole life (it was ~3.9 KB inline
        // with the set-up); the set-up is boxed and freed once connected.
        let serve = future_size(serve::<V4>);
        assert!(serve <= 1_536, "serve's future is {serve} bytes");
        let setup = future_size(connect::<V4>);
        assert!(
            setup > serve,
            "the set-up ({setup} bytes) is the large part, boxed"
        );
    }
}
