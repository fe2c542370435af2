//! The scenarios. Each starts from a fresh hub (unless one is given), sets up what it needs
//! outside the measured window, measures, and returns a report.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::fleet::{self, Behaviour, Control, Faults, Handle, Stats};
use crate::hub::{FleetCabinet, Hub};
use crate::mqtt::{Conn, Login};
use crate::report::{histogram, Report};

/// What every scenario is given.
#[derive(Clone)]
pub struct Ctx {
    /// The hub binary (when this tool starts the hub).
    pub hub_bin: std::path::PathBuf,
    /// An external hub instead: HTTP, MQTT, admin key.
    pub external: Option<(SocketAddr, SocketAddr, String)>,
    /// Extra hub settings (`HUB__…=…`).
    pub hub_env: Vec<(String, String)>,
    /// Heartbeat interval pushed to the fleet.
    pub heartbeat_s: u32,
    /// Connections per second while the fleet comes up; all at once when unset.
    pub ramp_per_s: Option<f64>,
    /// Injected faults.
    pub faults: Faults,
    /// The payment simulators in a process of their own (`cabinet-hub simulate`), not the hub's.
    pub simulator_apart: bool,
}

impl Ctx {
    pub(crate) async fn hub(&self) -> Result<Hub> {
        match &self.external {
            Some((http, mqtt, key)) => Hub::external(*http, *mqtt, key.clone()),
            None => {
                let mut env = self.hub_env.clone();
                env.push((
                    "HUB__CABINET__HEARTBEAT_S".into(),
                    self.heartbeat_s.to_string(),
                ));
                // Shoppers who authorised Pay Score before (免确认): the measured latency is
                // the hub's, not a simulated person's 50 ms tap on "confirm".
                env.push(("HUB__PAYMENTS__SIMULATOR_CONFIRM_MS".into(), "0".into()));
                // The simulator runs inside the hub's process here, so what it remembers counts
                // in the hub's memory, though in the field it is WeChat's. Five minutes cover
                // the deduction check (a minute after completing; refunds are not exercised),
                // and match the feed's replay window: what fills, fills within five minutes,
                // the first quarter of a 30-minute soak. An order still owed is never forgotten.
                env.push((
                    "HUB__PAYMENTS__SIMULATOR_ORDERS_KEPT_S".into(),
                    "300".into(),
                ));
                Hub::spawn(&self.hub_bin, &env, self.simulator_apart).await
            }
        }
    }

    pub(crate) fn behaviour(&self, items: Value, door_open: Duration) -> Arc<Behaviour> {
        Arc::new(Behaviour {
            heartbeat_s: self.heartbeat_s,
            door_open,
            items,
            faults: self.faults,
            ramp_per_s: self.ramp_per_s,
        })
    }

    /// Waits until every cabinet has sent its first heartbeat, which comes up to one interval
    /// after it connects: a cabinet's first messages (its actor starting and reading its stored
    /// state, the broker learning its topics) belong to the connect phase, not to the steady
    /// state being measured.
    pub(crate) async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(u64::from(self.heartbeat_s) + 1)).await;
    }

    /// How long `n` cabinets may take to come online: the ramp plus two minutes.
    pub(crate) fn online_within(&self, n: usize) -> Duration {
        let ramp = self.ramp_per_s.map_or(0.0, |r| n as f64 / r);
        Duration::from_secs_f64(120.0 + ramp)
    }
}

pub(crate) struct Fleet {
    handles: Vec<Handle>,
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
}

impl Fleet {
    pub(crate) fn start(hub: &Hub, cabs: &[FleetCabinet], behaviour: Arc<Behaviour>) -> Self {
        Self::start_over(&[hub.mqtt], cabs, behaviour)
    }

    /// The fleet spread over several brokers (a cluster's nodes): cabinet `i` goes to
    /// `brokers[i % n]`, and on to the next when that one is down.
    pub(crate) fn start_over(
        brokers: &[std::net::SocketAddr],
        cabs: &[FleetCabinet],
        behaviour: Arc<Behaviour>,
    ) -> Self {
        let stats = Arc::new(Stats::default());
        let (stop, rx) = watch::channel(false);
        let handles = fleet::start(brokers, cabs, behaviour, stats.clone(), rx);
        Fleet {
            handles,
            stats,
            stop,
        }
    }

    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(true);
        // Give the tasks a moment to send DISCONNECT so the hub sees clean goodbyes.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub(crate) async fn wait_online(hub: &Hub, n: usize, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let online = hub.metric_sum("cabinets_online").await?;
        if online as usize >= n {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            bail!("only {online} of {n} cabinets online after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn setup(
    hub: &Hub,
    n: usize,
    report: &mut Report,
) -> Result<(String, Vec<FleetCabinet>)> {
    let t = Instant::now();
    let (admin, op) = hub.merchant("lt").await?;
    let cabs = hub.register_fleet("lt", &admin, "LT", n).await?;
    report.note(format!(
        "set-up (not measured): {n} cabinets registered and activated in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok((op, cabs))
}

/// Skips to the end of the feed's snapshot: probes are timed from a live feed, not from one
/// still building its first picture of the fleet.
async fn wait_snapshot(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>,
) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some((_, v))) if v["type"] == "snapshot" => return Ok(()),
            Ok(Some(_)) => {}
            _ => bail!("no feed snapshot"),
        }
    }
}

/// Probes in flight: (cabinet, temperature in m°C) → when it was sent.
type Probes = Mutex<HashMap<(String, i64), Instant>>;

/// Records the latency of the probe a feed event answers, if it answers one.
fn probe_answered(sent: &Probes, h: &mut Histogram<u64>, at: Instant, v: &Value) {
    if v["type"] != "cabinet" {
        return;
    }
    if let (Some(id), Some(t)) = (v["data"]["id"].as_str(), v["data"]["temp_c"].as_f64()) {
        let key = (id.to_owned(), (t * 1000.0).round() as i64);
        if let Some(s) = sent.lock().ok().and_then(|mut m| m.remove(&key)) {
            h.saturating_record(at.duration_since(s).as_micros() as u64);
        }
    }
}

/// `connect-storm`: every cabinet connects at once; time until the hub reports all online.
pub async fn connect_storm(ctx: &Ctx, n: usize) -> Result<Report> {
    let mut r = Report::new("connect-storm", json!({"cabinets": n}));
    let hub = ctx.hub().await?;
    let (_, cabs) = setup(&hub, n, &mut r).await?;
    let at_once = Ctx {
        ramp_per_s: None,
        ..ctx.clone()
    };
    let fleet = Fleet::start(
        &hub,
        &cabs,
        at_once.behaviour(json!([]), Duration::from_secs(1)),
    );
    let took = wait_online(&hub, n, Duration::from_secs(600)).await?;
    r.fig("all_online_s", took.as_secs_f64(), "s");
    r.fig(
        "connect_retries",
        Stats::get(&fleet.stats.connect_failed) as f64,
        "",
    );
    r.fig(
        "sources",
        (n.div_ceil(fleet::PER_SOURCE)).max(1) as f64,
        "loopback addresses",
    );
    if let Some(rss) = hub.rss() {
        r.fig("hub_rss_mb", rss as f64 / 1e6, "MB");
    }
    fleet.shutdown().await;
    Ok(r)
}

/// Watches the feed: `(type, data)` of every event, with its arrival time.
async fn feed(
    hub: &Hub,
    key: &str,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/ws", hub.http)
        .into_client_request()
        .context("feed request")?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().context("feed key")?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .context("feed connect")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let at = Instant::now();
                if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                    if tx.send((at, v)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// `steady-fleet`: N cabinets at the standard heartbeat; hub memory per connected cabinet and
/// CPU; device event → operator feed latency under that load.
pub async fn steady_fleet(ctx: &Ctx, n: usize, duration: Duration) -> Result<Report> {
    let mut r = Report::new(
        "steady-fleet",
        json!({"cabinets": n, "duration_s": duration.as_secs(), "heartbeat_s": ctx.heartbeat_s}),
    );
    let hub = ctx.hub().await?;
    let (op, cabs) = setup(&hub, n, &mut r).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = hub.rss();
    let fleet = Fleet::start(
        &hub,
        &cabs,
        ctx.behaviour(json!([]), Duration::from_secs(1)),
    );
    let took = wait_online(&hub, n, ctx.online_within(n)).await?;
    r.fig("all_online_s", took.as_secs_f64(), "s");
    ctx.settle().await;

    let mut events = feed(&hub, &op).await?;
    wait_snapshot(&mut events).await?;
    let cpu0 = hub.cpu_seconds();
    let t0 = Instant::now();
    let sent: Arc<Probes> = Arc::default();
    let mut h = histogram()?;
    let mut k: i64 = 0;
    let mut probe = tokio::time::interval(Duration::from_millis(20));
    let mut i = 0usize;
    while t0.elapsed() < duration {
        tokio::select! {
            _ = probe.tick() => {
                // A unique temperature per probe: the feed event that carries it is the answer.
                k += 1;
                let temp = 2.0 + (k % 4000) as f64 / 1000.0;
                let cab = &fleet.handles[i % fleet.handles.len()];
                i = i.wrapping_add(7919);
                let key = (cab.id.clone(), (temp * 1000.0).round() as i64);
                if let Ok(mut m) = sent.lock() { m.insert(key, Instant::now()); }
                let _ = cab.tx.send(Control::HeartbeatTemp(temp));
            }
            ev = events.recv() => {
                let Some((at, v)) = ev else { bail!("the feed closed") };
                probe_answered(&sent, &mut h, at, &v);
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    // Probes sent in the last moments are still on their way: give them a second.
    let grace = Instant::now() + Duration::from_secs(1);
    while sent.lock().map(|m| !m.is_empty()).unwrap_or(false) {
        let Ok(Some((at, v))) = tokio::time::timeout_at(grace, events.recv()).await else {
            break;
        };
        probe_answered(&sent, &mut h, at, &v);
    }
    if let (Some(a), Some(b)) = (cpu0, hub.cpu_seconds()) {
        r.fig("hub_cpu_pct_of_one_core", (b - a) / wall * 100.0, "%");
    }
    if let (Some(idle), Some(full)) = (idle, hub.rss()) {
        r.fig("hub_rss_idle_mb", idle as f64 / 1e6, "MB");
        r.fig("hub_rss_fleet_mb", full as f64 / 1e6, "MB");
        r.fig(
            "hub_kb_per_cabinet",
            (full.saturating_sub(idle)) as f64 / n.max(1) as f64 / 1024.0,
            "KB",
        );
    }
    r.latency("event_to_feed", &h);
    let unanswered = sent.lock().map(|m| m.len()).unwrap_or_default();
    r.fig("feed_probes_unanswered", unanswered as f64, "");
    r.fig(
        "dropped_connections",
        Stats::get(&fleet.stats.dropped) as f64,
        "",
    );
    fleet.shutdown().await;
    Ok(r)
}

/// End-to-end flow control shared by the publishers: at most `budget` messages sent but not
/// yet seen by the consumer (the hub's actors, or Mosquitto's subscriber). Both brokers ack a
/// QoS 1 publish once it is queued, not once it is delivered, so an open-loop blaster measures
/// only how fast a broker can queue — and rumqttd drops what its bounded per-topic logs cannot
/// hold — instead of the rate the consumer sustains.
struct Gate {
    acked: AtomicU64,
    done: AtomicU64,
    /// Messages each publisher may have ahead of its share of what the consumer has seen:
    /// per publisher, because rumqttd keeps a bounded log per topic, and a global budget let a
    /// few fast publishers overrun their own topics' logs.
    per_publisher: u64,
    publishers: u64,
}

impl Gate {
    fn open(&self, mine: u64) -> bool {
        mine < self.done.load(Ordering::Relaxed) / self.publishers.max(1) + self.per_publisher
    }
}

/// Publishes heartbeats as fast as the gate allows, with up to `window` PUBACKs outstanding.
async fn blast(
    mut conn: Conn,
    topic: String,
    window: usize,
    until: Instant,
    gate: Arc<Gate>,
) -> Result<()> {
    let mut seq = 0u64;
    let mut inflight = 0usize;
    let body = |seq: u64| {
        json!({"seq": seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked", "temp_c": 4.6,
               "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 0})
        .to_string()
    };
    while Instant::now() < until {
        while inflight < window && gate.open(seq) {
            seq += 1;
            conn.publish(&topic, body(seq).as_bytes()).await?;
            inflight += 1;
        }
        if inflight == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.read()).await {
            Ok(Ok(Packet::PubAck(_))) => {
                inflight -= 1;
                gate.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(Packet::Publish(p))) => conn.puback(p.pkid).await?,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("no PUBACK within 5 s"),
        }
    }
    let _ = conn.send(&Packet::Disconnect).await;
    Ok(())
}

/// A Mosquitto for the baseline: the machine's binary on a free port, anonymous, loopback.
pub(crate) struct Mosquitto {
    pub(crate) addr: SocketAddr,
    _child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) async fn mosquitto(given: Option<SocketAddr>) -> Result<Mosquitto> {
    if let Some(addr) = given {
        return Ok(Mosquitto {
            addr,
            _child: None,
            _dir: None,
        });
    }
    let port = crate::hub::free_port()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        // TCP_NODELAY, as the hub's broker has: without it Nagle's algorithm meets the
        // client's delayed ACK and a lone small message waits ~40 ms, which is no floor.
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n"),
    )?;
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("mosquitto is not installed (apt-get install mosquitto), and no --mosquitto address was given")?;
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("mosquitto did not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Mosquitto {
        addr,
        _child: Some(child),
        _dir: Some(dir),
    })
}

/// Let the kernel choose the source address and port.
pub(crate) const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Connects one publisher per cabinet to `broker` (with the cabinets' credentials when
/// `credentials`), each with its heartbeat topic.
pub(crate) async fn connect_publishers(
    broker: SocketAddr,
    cabs: &[FleetCabinet],
    credentials: bool,
) -> Result<Vec<(Conn, String)>> {
    let mut conns = Vec::with_capacity(cabs.len());
    for (i, c) in cabs.iter().enumerate() {
        let login = Login {
            client_id: &c.id,
            credentials: credentials.then_some((c.id.as_str(), c.secret.as_str())),
            keep_alive: 60,
            will: None,
        };
        conns.push((
            Conn::connect(broker, fleet::source_for(i), login).await?,
            format!("/tenants/{}/heartbeat", c.id),
        ));
    }
    Ok(conns)
}

/// Runs the publishers for `duration` behind a gate whose `done` count the `watch` task keeps
/// up to date (it is handed the gate and the deadline); returns the gate and the elapsed time.
async fn run_gated(
    conns: Vec<(Conn, String)>,
    window: usize,
    per_publisher: u64,
    duration: Duration,
    watch: impl FnOnce(Arc<Gate>, Instant) -> tokio::task::JoinHandle<()>,
) -> Result<(Arc<Gate>, f64)> {
    let gate = Arc::new(Gate {
        acked: AtomicU64::new(0),
        done: AtomicU64::new(0),
        per_publisher,
        publishers: conns.len() as u64,
    });
    let t0 = Instant::now();
    let until = t0 + duration;
    let watcher = watch(gate.clone(), until);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, t)| tokio::spawn(blast(c, t, window, until, gate.clone())))
        .collect();
    for t in tasks {
        t.await??;
    }
    let _ = watcher.await;
    Ok((gate, t0.elapsed().as_secs_f64()))
}

/// `ingest`: uplinks as fast as the hub processes them, then the same stream through Mosquitto
/// to one subscriber; both rates and the ratio.
pub async fn ingest(
    ctx: &Ctx,
    publishers: usize,
    window: usize,
    duration: Duration,
    mosquitto_addr: Option<SocketAddr>,
) -> Result<Report> {
    let per_publisher = 40u64;
    let mut r = Report::new(
        "ingest",
        json!({"publishers": publishers, "window": window, "ahead_per_publisher": per_publisher, "duration_s": duration.as_secs()}),
    );
    let hub = Arc::new(ctx.hub().await?);
    let (_, cabs) = setup(&hub, publishers, &mut r).await?;

    // The hub: cabinets publish their heartbeats; processed = through the actors.
    let mut conns = connect_publishers(hub.mqtt, &cabs, true).await?;
    // Actors exist after a cabinet's first message; start them before the clock.
    for (conn, topic) in conns.iter_mut() {
        let status = format!(
            "/tenants/{}/status",
            &topic["/tenants/".len()..topic.len() - "/heartbeat".len()]
        );
        conn.publish(&status, br#"{"online":true,"boot_id":"ingest","fw":"2.4.1","model":"KM-400","config_version":0,"boot":"power_on"}"#).await?;
    }
    wait_online(&hub, publishers, Duration::from_secs(30)).await?;
    let before = hub.metric_sum("uplinks_processed_total").await?;
    let (gate, elapsed) = run_gated(conns, window, per_publisher, duration, |gate, until| {
        let hub = hub.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                if let Ok(p) = hub.metric_sum("uplinks_processed_total").await {
                    gate.done
                        .store((p - before).max(0.0) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    })
    .await?;
    let processed_in_window = hub.metric_sum("uplinks_processed_total").await? - before;
    // Drain: whatever the broker acknowledged must come through the actors.
    let sent = gate.acked.load(Ordering::Relaxed) as f64;
    let t = Instant::now();
    let mut processed = processed_in_window;
    while processed < sent && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        processed = hub.metric_sum("uplinks_processed_total").await? - before;
    }
    let hub_rate = processed_in_window / elapsed;
    r.fig("hub_processed_per_s", hub_rate, "msg/s");
    r.fig("hub_lost", (sent - processed).max(0.0), "messages");
    drop(hub);

    // Mosquitto: the same publishers and payloads, one subscriber.
    let m = mosquitto(mosquitto_addr).await?;
    let (received, sub_task) = count_heartbeats_at(m.addr).await?;
    let conns = connect_publishers(m.addr, &cabs, false).await?;
    let r0 = received.load(Ordering::Relaxed);
    let (_, elapsed) = run_gated(conns, window, per_publisher, duration, |gate, until| {
        let received = received.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                gate.done
                    .store(received.load(Ordering::Relaxed) - r0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    })
    .await?;
    let mrate = (received.load(Ordering::Relaxed) - r0) as f64 / elapsed;
    sub_task.abort();
    r.fig("mosquitto_delivered_per_s", mrate, "msg/s");
    r.fig("hub_vs_mosquitto", hub_rate / mrate.max(1.0), "×");
    Ok(r)
}

/// One subscriber to every cabinet's heartbeats on the baseline broker at `addr`, counting what
/// it receives; returns the count and the task (abort it when done). QoS 0, like the hub's
/// internal link: it acknowledges nothing, so its own PUBACKs do not limit the relay.
pub(crate) async fn count_heartbeats_at(
    addr: SocketAddr,
) -> Result<(Arc<AtomicU64>, tokio::task::JoinHandle<()>)> {
    let sub_login = Login {
        client_id: "lt-subscriber",
        credentials: None,
        keep_alive: 60,
        will: None,
    };
    let mut sub = Conn::connect(addr, LOOPBACK, sub_login).await?;
    sub.subscribe_qos("/tenants/+/heartbeat", rumqttc::mqttbytes::QoS::AtMostOnce)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let rcv = received.clone();
    let task = tokio::spawn(async move {
        while let Ok(p) = sub.read().await {
            if let Packet::Publish(p) = p {
                rcv.fetch_add(1, Ordering::Relaxed);
                if p.pkid != 0 && sub.puback(p.pkid).await.is_err() {
                    return;
                }
            }
        }
    });
    // The subscription is in place before anything is published.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((received, task))
}

/// Two probe clients bouncing a message through a broker on the same machine: the bare MQTT
/// round trip (a command to a cabinet and its ack, without the hub's logic). Through Mosquitto,
/// not the hub's broker: the hub's broker confines every client to its own cabinet's topics (a
/// cabinet may not publish to another's `cmd`), so no client of it can bounce a message to
/// another. Both brokers share the loaded machine, which is what makes it a floor.
async fn floor_probe(
    broker: SocketAddr,
    every: Duration,
    until: Instant,
) -> Result<Histogram<u64>> {
    let (aid, bid) = ("floorprobea".to_owned(), "floorprobeb".to_owned());
    let mut ca = Conn::connect(
        broker,
        LOOPBACK,
        Login {
            client_id: &aid,
            credentials: None,
            keep_alive: 60,
            will: None,
        },
    )
    .await?;
    let mut cb = Conn::connect(
        broker,
        LOOPBACK,
        Login {
            client_id: &bid,
            credentials: None,
            keep_alive: 60,
            will: None,
        },
    )
    .await?;
    let (a_in, b_in) = (format!("/tenants/{aid}/cmd"), format!("/tenants/{bid}/cmd"));
    ca.subscribe(&a_in).await?;
    cb.subscribe(&b_in).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // B answers every command it receives, as a cabinet acks.
    let echo = tokio::spawn(async move {
        while let Ok(p) = cb.read().await {
            if let Packet::Publish(p) = p {
                if cb.puback(p.pkid).await.is_err() || cb.publish(&a_in, &p.payload).await.is_err()
                {
                    return;
                }
            }
        }
    });
    let mut h = histogram()?;
    let mut tick = tokio::time::interval(every);
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        ca.publish(&b_in, br#"{"cmd_id":"probe","type":"reboot"}"#)
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ca.read()).await {
                Ok(Ok(Packet::Publish(p))) => {
                    h.saturating_record(t.elapsed().as_micros() as u64);
                    ca.puback(p.pkid).await?;
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!("the floor probe got no answer within 5 s"),
            }
        }
    }
    echo.abort();
    Ok(h)
}

/// The bare HTTP round trip to the hub (`GET /healthz`) every `every` until `until`: what any
/// session start pays before the hub does anything of its own.
async fn http_floor_probe(hub: &Hub, every: Duration, until: Instant) -> Result<Histogram<u64>> {
    let mut h = histogram()?;
    let mut tick = tokio::time::interval(every);
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        hub.healthz().await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    Ok(h)
}

pub(crate) async fn price_fleet(hub: &Hub, op: &str, cabs: &[FleetCabinet]) -> Result<()> {
    use futures_util::stream::{self, TryStreamExt};
    for sku in ["6901234567890", "6907992100012"] {
        let (s, v) = hub
            .call(
                reqwest::Method::PUT,
                &format!("/api/v1/products/{sku}"),
                op,
                Some(json!({"name": sku})),
            )
            .await?;
        if s != 200 && s != 201 {
            bail!("product {sku}: {s} {v}");
        }
    }
    stream::iter(cabs.iter().map(Ok::<_, anyhow::Error>))
        .map_ok(|c| async move {
            let (s, v) = hub
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/v1/cabinets/{}/prices", c.id),
                    op,
                    Some(json!({"items": [{"sku": "6901234567890", "price_fen": 350}, {"sku": "6907992100012", "price_fen": 600}]})),
                )
                .await?;
            if s != 200 {
                bail!("prices of {}: {s} {v}", c.id);
            }
            Ok(())
        })
        .try_buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Outcome of the shoppers.
#[derive(Default)]
pub(crate) struct Shopping {
    pub(crate) started: u64,
    pub(crate) ok: u64,
    pub(crate) refused: HashMap<String, u64>,
    pub(crate) errors: u64,
}

/// Latencies of the unlocked sessions: the whole request, and the part of it the payment
/// provider took (its create round trip and the confirmation), read from `Server-Timing`.
pub(crate) struct Unlocks {
    pub(crate) total: Histogram<u64>,
    provider: Histogram<u64>,
    hub_own: Histogram<u64>,
    pub(crate) stages: std::collections::BTreeMap<String, Histogram<u64>>,
    untimed: u64,
}

/// The stages of a `Server-Timing` value, in microseconds.
fn server_timing_us(server_timing: &str) -> Option<Vec<(&str, u64)>> {
    server_timing
        .split(',')
        .map(|metric| {
            let mut parts = metric.trim().split(';');
            let name = parts.next()?;
            let dur: f64 = parts
                .find_map(|p| p.trim().strip_prefix("dur="))?
                .parse()
                .ok()?;
            Some((name, (dur * 1000.0) as u64))
        })
        .collect()
}

/// Microseconds spent in the `provider` and `confirm` stages of a `Server-Timing` value.
/// The mean of each quarter of `samples`, oldest first; `None` with fewer than four.
fn quarters(samples: &[f64]) -> Option<[f64; 4]> {
    if samples.len() < 4 {
        return None;
    }
    let q = samples.len() / 4;
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let mut out = [0.0; 4];
    for (i, o) in out.iter_mut().enumerate() {
        let end = if i == 3 { samples.len() } else { (i + 1) * q };
        *o = mean(&samples[i * q..end]);
    }
    Some(out)
}

fn provider_share_us(server_timing: &str) -> Option<u64> {
    let stages = server_timing_us(server_timing)?;
    let provider = stages
        .iter()
        .filter(|(name, _)| *name == "provider" || *name == "confirm");
    provider
        .clone()
        .next()
        .map(|_| provider.map(|(_, us)| us).sum())
}

/// Starts sessions at `rate` per second over the fleet until `until`, round robin so that a
/// cabinet is not asked again while its last shopper may still be inside.
pub(crate) async fn shop(
    hub: Arc<Hub>,
    op: String,
    cabs: Vec<FleetCabinet>,
    rate: f64,
    until: Instant,
) -> Result<(Unlocks, Shopping)> {
    let h = Arc::new(Mutex::new(Unlocks {
        total: histogram()?,
        provider: histogram()?,
        hub_own: histogram()?,
        stages: Default::default(),
        untimed: 0,
    }));
    let out = Arc::new(Mutex::new(Shopping::default()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0usize;
    let mut tasks = Vec::new();
    // Keys unique across calls on the same hub: a repeated key would get the first answer back.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    while Instant::now() < until {
        tick.tick().await;
        let cab = cabs[i % cabs.len()].id.clone();
        i += 1;
        let (hub, op, h, out) = (hub.clone(), op.clone(), h.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = hub
                .call_timed(
                    reqwest::Method::POST,
                    "/api/v1/sessions",
                    &op,
                    // As a shop's backend calls it: with a key, so that a retry cannot open
                    // the door twice (the hub then stores its answer with the session).
                    Some(&format!("rush-{run}-{i}")),
                    Some(json!({"cabinet_id": cab, "user_id": format!("shopper{i}"), "channel": "wechat", "mode": "purchase"})),
                )
                .await;
            // A purchase answers 202 with the shopper's confirmation; the simulator's shoppers
            // confirm at once, and the door opens without the caller: followed as a shop's
            // backend follows it, with long polls, so that the time measured ends at the open
            // door (or the failure), as the shopper sees it.
            let r = match r {
                Ok((202, v, timing)) => hub
                    .follow_session(&op, &v)
                    .await
                    .map(|(state, v)| match state.as_str() {
                        "open" => (201, v, timing),
                        _ => (409, json!({"error": {"code": v["session"]["failure"]}}), timing),
                    }),
                other => other,
            };
            let us = t.elapsed().as_micros() as u64;
            let Ok(mut o) = out.lock() else { return };
            o.started += 1;
            match r {
                Ok((201, _, timing)) => {
                    o.ok += 1;
                    if let Ok(mut h) = h.lock() {
                        h.total.saturating_record(us);
                        for (stage, us) in timing
                            .as_deref()
                            .and_then(server_timing_us)
                            .unwrap_or_default()
                        {
                            if !h.stages.contains_key(stage) {
                                let Ok(new) = histogram() else { continue };
                                h.stages.insert(stage.to_owned(), new);
                            }
                            if let Some(sh) = h.stages.get_mut(stage) {
                                sh.saturating_record(us);
                            }
                        }
                        match timing.as_deref().and_then(provider_share_us) {
                            Some(p) => {
                                h.provider.saturating_record(p);
                                h.hub_own.saturating_record(us.saturating_sub(p));
                            }
                            None => h.untimed += 1,
                        }
                    }
                }
                Ok((_, v, _)) => {
                    let code = v["error"]["code"]
                        .as_str()
                        .or_else(|| v["code"].as_str())
                        .unwrap_or("unknown")
                        .to_owned();
                    *o.refused.entry(code).or_default() += 1;
                }
                Err(_) => o.errors += 1,
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = Arc::try_unwrap(h)
        .map_err(|_| anyhow::anyhow!("a shopper still holds the histograms"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let o = std::mem::take(&mut *out.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok((h, o))
}

pub(crate) async fn wait_orders(hub: &Hub, want: u64, within: Duration) -> Result<f64> {
    let t = Instant::now();
    loop {
        let m = hub.metrics().await?;
        let paid = crate::hub::metric_sum(&m, "orders_total{status=\"paid\"}");
        if paid as u64 >= want || t.elapsed() > within {
            return Ok(paid);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `n` priced cabinets online, each taking two items a visit with the door open 1.5 s, settled:
/// the rush's fleet. Returns the operator key, the cabinets and the running fleet.
pub(crate) async fn shopping_fleet(
    ctx: &Ctx,
    hub: &Hub,
    n: usize,
    r: &mut Report,
) -> Result<(String, Vec<FleetCabinet>, Fleet)> {
    let (op, cabs) = setup(hub, n, r).await?;
    price_fleet(hub, &op, &cabs).await?;
    let items = json!([{"sku": "6901234567890", "qty": 1}, {"sku": "6907992100012", "qty": 1}]);
    let fleet = Fleet::start(
        hub,
        &cabs,
        ctx.behaviour(items, Duration::from_millis(1500)),
    );
    wait_online(hub, n, ctx.online_within(n)).await?;
    ctx.settle().await;
    Ok((op, cabs, fleet))
}

/// `shopping-rush`: sessions at `rate`/s across the fleet; request → unlock-ack latency beside
/// the bare MQTT round trip measured on the same broker at the same time.
pub async fn shopping_rush(ctx: &Ctx, n: usize, rate: f64, duration: Duration) -> Result<Report> {
    let mut r = Report::new(
        "shopping-rush",
        json!({"cabinets": n, "rate_per_s": rate, "duration_s": duration.as_secs()}),
    );
    let hub = Arc::new(ctx.hub().await?);
    let floor_broker = mosquitto(None).await?;
    let (op, cabs, fleet) = shopping_fleet(ctx, &hub, n, &mut r).await?;

    let until = Instant::now() + duration;
    let floor = {
        let addr = floor_broker.addr;
        tokio::spawn(async move { floor_probe(addr, Duration::from_millis(20), until).await })
    };
    let http_floor = {
        let hub = hub.clone();
        tokio::spawn(async move { http_floor_probe(&hub, Duration::from_millis(20), until).await })
    };
    let cpu0 = (hub.cpu_seconds(), hub.simulator_cpu_seconds());
    let signing0 = hub.metric_sum(crate::capacity::SIGNING_CPU).await.ok();
    let (h, s) = shop(hub.clone(), op, cabs.clone(), rate, until).await?;
    let floor = floor.await??;
    let http_floor = http_floor.await??;
    r.latency("unlock", &h.total);
    r.latency("unlock_provider", &h.provider);
    r.latency("unlock_hub_own", &h.hub_own);
    for (stage, sh) in &h.stages {
        r.latency(&format!("stage_{stage}"), sh);
    }
    r.latency("floor_rtt", &floor);
    let f50 = floor.value_at_quantile(0.5).max(1) as f64;
    r.fig(
        "unlock_p50_over_floor_p50",
        h.total.value_at_quantile(0.5) as f64 / f50,
        "×",
    );
    r.fig(
        "unlock_hub_own_p50_over_floor_p50",
        h.hub_own.value_at_quantile(0.5) as f64 / f50,
        "×",
    );
    // What a session start cannot go below whatever the hub does: one HTTP round trip to ask
    // and one MQTT round trip to the cabinet. The hub's own share over both floors is what its
    // logic and its durable writes add.
    r.latency("floor_http_rtt", &http_floor);
    let both = f50 + http_floor.value_at_quantile(0.5) as f64;
    r.fig(
        "unlock_hub_own_p50_over_floors_p50",
        h.hub_own.value_at_quantile(0.5) as f64 / both.max(1.0),
        "×",
    );
    r.fig("sessions_untimed", h.untimed as f64, "");
    r.fig("sessions_started", s.started as f64, "");
    r.fig("sessions_unlocked", s.ok as f64, "");
    r.fig("sessions_errors", s.errors as f64, "");
    for (code, count) in &s.refused {
        r.note(format!("{count} sessions refused: {code}"));
    }
    let paid = wait_orders(&hub, s.ok, Duration::from_secs(60)).await?;
    r.fig("orders_paid", paid, "");
    r.fig("orders_missing", (s.ok as f64 - paid).max(0.0), "");
    // CPU per session, from the processes themselves, once every order is paid: the session's
    // whole path (start, unlock, door, recognition, order, payment). The hub's includes the
    // fleet's heartbeats meanwhile (a few µs each).
    let per_session = |a: Option<f64>, b: Option<f64>| {
        a.zip(b).map(|(a, b)| (b - a) * 1000.0 / s.ok.max(1) as f64)
    };
    let hub_cpu = per_session(cpu0.0, hub.cpu_seconds());
    if let Some(ms) = hub_cpu {
        r.fig("hub_cpu_ms_per_session", ms, "ms");
    }
    let signing = per_session(
        signing0,
        hub.metric_sum(crate::capacity::SIGNING_CPU).await.ok(),
    );
    crate::capacity::signing_figures(&mut r, hub_cpu, signing);
    if let Some(ms) = per_session(cpu0.1, hub.simulator_cpu_seconds()) {
        r.fig("simulator_cpu_ms_per_session", ms, "ms");
    }
    r.fig(
        "dropped_connections",
        Stats::get(&fleet.stats.dropped) as f64,
        "",
    );
    fleet.shutdown().await;
    Ok(r)
}

/// `alert-storm`: K cabinets have their door forced within one second; every alert must be
/// raised once and reach the operator feed; API latency meanwhile.
pub async fn alert_storm(ctx: &Ctx, k: usize) -> Result<Report> {
    let mut r = Report::new("alert-storm", json!({"cabinets": k}));
    let hub = Arc::new(ctx.hub().await?);
    let (op, cabs) = setup(&hub, k, &mut r).await?;
    let fleet = Fleet::start(
        &hub,
        &cabs,
        ctx.behaviour(json!([]), Duration::from_secs(1)),
    );
    wait_online(&hub, k, ctx.online_within(k)).await?;
    let mut events = feed(&hub, &op).await?;
    wait_snapshot(&mut events).await?;
    // API latency while the storm lasts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let api = {
        let (hub, op, stop, ids) = (
            hub.clone(),
            op.clone(),
            stop.clone(),
            cabs.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let mut h = histogram()?;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                hub.call(
                    reqwest::Method::GET,
                    &format!("/api/v1/cabinets/{}", ids[i % ids.len()]),
                    &op,
                    None,
                )
                .await?;
                h.saturating_record(t.elapsed().as_micros() as u64);
                i += 7;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, anyhow::Error>(h)
        })
    };
    let t0 = Instant::now();
    let gap = Duration::from_secs(1).div_f64(k.max(1) as f64);
    let sender = {
        let txs: Vec<_> = fleet.handles.iter().map(|h| h.tx.clone()).collect();
        tokio::spawn(async move {
            for (i, tx) in txs.iter().enumerate() {
                let _ = tx.send(Control::Event("door_opened"));
                tokio::time::sleep_until(t0 + gap.mul_f64((i + 1) as f64)).await;
            }
        })
    };
    let mut raised: HashMap<String, u32> = HashMap::new();
    let mut last = t0;
    let deadline = t0 + Duration::from_secs(60);
    while raised.len() < k && Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((at, v))) => {
                if v["type"] == "alert"
                    && v["data"]["state"] == "raised"
                    && v["data"]["alert"]["type"] == "door_forced"
                {
                    if let Some(id) = v["data"]["cabinet_id"].as_str() {
                        *raised.entry(id.to_owned()).or_default() += 1;
                        last = at;
                    }
                }
            }
            _ => break,
        }
    }
    sender.await?;
    // Anything more arriving now would be a duplicate.
    let settle = Instant::now() + Duration::from_secs(2);
    while let Ok(Some((_, v))) = tokio::time::timeout_at(settle, events.recv()).await {
        if v["type"] == "alert"
            && v["data"]["state"] == "raised"
            && v["data"]["alert"]["type"] == "door_forced"
        {
            if let Some(id) = v["data"]["cabinet_id"].as_str() {
                *raised.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let api = api.await??;
    let dupes: u32 = raised.values().map(|c| c - 1).sum();
    r.fig("alerts_on_feed", raised.len() as f64, "");
    r.fig("alerts_missing", (k - raised.len().min(k)) as f64, "");
    r.fig("alerts_duplicated", f64::from(dupes), "");
    r.fig(
        "last_alert_on_feed_s",
        last.duration_since(t0).as_secs_f64(),
        "s",
    );
    let (_, v) = hub
        .call(
            reqwest::Method::GET,
            "/api/v1/alerts?active=true&limit=5000",
            &op,
            None,
        )
        .await?;
    let stored = v["items"]
        .as_array()
        .map(|a| a.iter().filter(|a| a["type"] == "door_forced").count())
        .unwrap_or_default();
    r.fig("alerts_active_in_api", stored as f64, "");
    r.latency("api_get_cabinet", &api);
    fleet.shutdown().await;
    Ok(r)
}

/// `soak`: the steady fleet with shopping for `duration`; memory growth, errors, and lost
/// messages or orders (which must be zero).
pub async fn soak(ctx: &Ctx, n: usize, rate: f64, duration: Duration) -> Result<Report> {
    let mut r = Report::new(
        "soak",
        json!({"cabinets": n, "rate_per_s": rate, "duration_s": duration.as_secs(), "heartbeat_s": ctx.heartbeat_s}),
    );
    let hub = Arc::new(ctx.hub().await?);
    let (op, cabs) = setup(&hub, n, &mut r).await?;
    price_fleet(&hub, &op, &cabs).await?;
    let items = json!([{"sku": "6901234567890", "qty": 2}]);
    let fleet = Fleet::start(
        &hub,
        &cabs,
        ctx.behaviour(items, Duration::from_millis(1500)),
    );
    wait_online(&hub, n, ctx.online_within(n)).await?;
    let processed0 = hub.metric_sum("uplinks_processed_total").await?;
    let published0 = Stats::get(&fleet.stats.published);
    let until = Instant::now() + duration;
    let sampler = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut heap = Vec::new();
            while Instant::now() < until {
                if let Some(rss) = hub.rss() {
                    samples.push(rss as f64);
                }
                // What the hub's data takes, apart from what the allocator keeps: a flat heap
                // under a growing RSS is fragmentation, not a leak.
                if let Ok(b) = hub.metric_sum("process_heap_in_use_bytes").await {
                    if b > 0.0 {
                        heap.push(b);
                    }
                }
                tokio::time::sleep(Duration::from_secs(5).min(
                    until.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
                ))
                .await;
            }
            (samples, heap)
        })
    };
    let (h, s) = shop(hub.clone(), op, cabs.clone(), rate, until).await?;
    let (samples, heap) = sampler.await?;
    let paid = wait_orders(&hub, s.ok, Duration::from_secs(60)).await?;
    // Every uplink the fleet sent must have gone through an actor.
    let published = (Stats::get(&fleet.stats.published) - published0) as f64;
    let t = Instant::now();
    let mut processed = hub.metric_sum("uplinks_processed_total").await? - processed0;
    while processed < published && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        processed = hub.metric_sum("uplinks_processed_total").await? - processed0;
    }
    r.fig("uplinks_sent", published, "");
    r.fig("uplinks_lost", (published - processed).max(0.0), "");
    r.fig("sessions_unlocked", s.ok as f64, "");
    r.fig("sessions_failed", (s.started - s.ok) as f64, "");
    r.fig("orders_paid", paid, "");
    r.fig("orders_missing", (s.ok as f64 - paid).max(0.0), "");
    r.latency("unlock", &h.total);
    for (code, count) in &s.refused {
        r.note(format!("{count} sessions refused: {code}"));
    }
    // The mean of each quarter of the run. Bounded buffers (the feed's replay window, the
    // simulator's finished orders, SQLite's page caches) fill during the first part; what must
    // stay flat is the second half. The heap's base includes capacity reserved and never
    // touched (the broker's connection slabs, sized by its connection limit), so its growth is
    // given in MB: a percentage of it would flatter.
    for (what, samples) in [("rss", &samples), ("heap", &heap)] {
        let Some(q) = quarters(samples) else { continue };
        for (i, name) in ["first", "second", "third", "last"].iter().enumerate() {
            r.fig(&format!("hub_{what}_{name}_quarter_mb"), q[i] / 1e6, "MB");
        }
        r.fig(
            &format!("hub_{what}_growth_second_half_mb"),
            (q[3] - q[1]) / 1e6,
            "MB",
        );
        if what == "rss" {
            r.fig("hub_rss_growth_pct", (q[3] - q[0]) / q[0] * 100.0, "%");
            r.fig(
                "hub_rss_growth_second_half_pct",
                (q[3] - q[1]) / q[1] * 100.0,
                "%",
            );
        }
    }
    r.fig(
        "dropped_connections",
        Stats::get(&fleet.stats.dropped) as f64,
        "",
    );
    fleet.shutdown().await;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::{provider_share_us, quarters};

    #[test]
    fn quarters_are_means_and_the_last_takes_the_remainder() {
        assert_eq!(quarters(&[1.0, 2.0, 3.0]), None);
        let s = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0];
        assert_eq!(quarters(&s), Some([2.0, 6.0, 10.0, 16.0]));
    }

    #[test]
    fn provider_share_sums_provider_and_confirm() {
        let t = "checks;dur=0.400, provider;dur=2.500, confirm;dur=1.250, unlock;dur=0.600, record;dur=0.200";
        assert_eq!(provider_share_us(t), Some(3750));
    }

    #[test]
    fn provider_share_absent_or_malformed() {
        assert_eq!(
            provider_share_us("checks;dur=0.4, unlock;dur=0.6, record;dur=0.2"),
            None
        );
        assert_eq!(provider_share_us("provider;dur=abc"), None);
        assert_eq!(provider_share_us("provider"), None);
    }
}
