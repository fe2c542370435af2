//! Ungated uplinks (issue 18): publishers that do not wait on anything the hub reports, so the
//! instrument can produce the bursts that lose data, and loss counted from the publishers' side —
//! what the broker acknowledged against what went through the cabinets' actors. The gated mode
//! in `scenarios::ingest` measures the hub's rate at the rate it keeps up with; it could never
//! see a loss.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::json;
use tokio::time::Instant;

use crate::hub::{FleetCabinet, Hub};
use crate::mqtt::{Conn, Login};
use crate::report::{histogram, Report};
use crate::scenarios::{
    connect_publishers, count_heartbeats_at, mosquitto, setup, wait_online, Ctx,
};

/// How long a publisher waits for its next PUBACK with messages in flight before calling the
/// broker stuck. Held by back-pressure, a publisher waits as long as the hub takes to read the
/// backlog before it: seconds, not minutes.
const ACK_PATIENCE: Duration = Duration::from_secs(120);

/// How the publishers send.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Mode {
    /// Each publisher sends as fast as its in-flight window allows until it is `messages` ahead
    /// of the hub's processed count (the closed-loop instrument of the first benchmarks).
    Gated,
    /// Each publisher sends `messages` as fast as its in-flight window allows, ungated.
    Burst,
    /// All publishers together offer `rate` messages a second on a fixed schedule for the
    /// duration, whatever happens to the acknowledgements (open loop).
    OpenLoop,
}

/// Which MQTT client publishes.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Client {
    /// This tool's own client: counts every PUBACK.
    Own,
    /// `mosquitto_pub -l -q 1 -M <window>` per cabinet, fed the messages on stdin: a client
    /// nobody on this project wrote. It exits 0 once the broker has acknowledged every line, so
    /// a publisher that exits 0 counts all its messages as acknowledged. Burst only.
    MosquittoPub,
}

/// What one publisher sends.
#[derive(Clone, Copy)]
enum Plan {
    Burst { messages: u64 },
    Rate { per_s: f64, stop: Instant },
}

/// What one publisher saw.
struct Sent {
    sent: u64,
    acked: u64,
    /// How late each send was against its schedule, µs (open loop only).
    lag: Histogram<u64>,
}

fn heartbeat(seq: u64) -> Vec<u8> {
    json!({"seq": seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked", "temp_c": 4.6,
           "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 0})
    .to_string()
    .into_bytes()
}

/// Publishes by `plan` with up to `window` unacknowledged, counting every PUBACK into `acked`.
/// Sends follow the plan, not the acknowledgements: a full window delays a send (counted in
/// `lag`), it never skips one. `ahead` messages were published on `conn` before (in flight,
/// counted in `sent`). Returns once everything sent is acknowledged.
async fn publish_ungated(
    mut conn: Conn,
    topic: String,
    window: usize,
    plan: Plan,
    first_seq: u64,
    ahead: usize,
    acked_total: Arc<AtomicU64>,
) -> Result<Sent> {
    let t0 = Instant::now();
    let mut out = Sent {
        sent: 0,
        acked: 0,
        lag: histogram()?,
    };
    let mut inflight = ahead;
    loop {
        let now = Instant::now();
        let due = match plan {
            Plan::Burst { messages } => messages,
            Plan::Rate { per_s, stop } => ((now.min(stop) - t0).as_secs_f64() * per_s) as u64 + 1,
        };
        while out.sent < due && inflight < window {
            if let Plan::Rate { per_s, .. } = plan {
                let due_at = t0 + Duration::from_secs_f64(out.sent as f64 / per_s);
                out.lag.saturating_record(
                    Instant::now().saturating_duration_since(due_at).as_micros() as u64,
                );
            }
            out.sent += 1;
            conn.publish(&topic, &heartbeat(first_seq + out.sent))
                .await?;
            inflight += 1;
        }
        let finished = match plan {
            Plan::Burst { messages } => out.sent >= messages,
            Plan::Rate { stop, .. } => now >= stop && out.sent >= due,
        };
        if finished && inflight == 0 {
            break;
        }
        // The next scheduled send, when the window is not what holds it up.
        let next = match plan {
            Plan::Rate { per_s, stop } if inflight < window && now < stop => {
                Some(t0 + Duration::from_secs_f64(out.sent as f64 / per_s))
            }
            _ => None,
        };
        tokio::select! {
            p = tokio::time::timeout(ACK_PATIENCE, conn.read()) => match p {
                Ok(Ok(Packet::PubAck(_))) => {
                    inflight = inflight.saturating_sub(1);
                    out.acked += 1;
                    acked_total.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Packet::Publish(p))) if p.pkid != 0 => conn.puback(p.pkid).await?,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!("no PUBACK for {ACK_PATIENCE:?} with {inflight} in flight"),
            },
            _ = tokio::time::sleep_until(next.unwrap_or(now)), if next.is_some() => {}
        }
    }
    let _ = conn.send(&Packet::Disconnect).await;
    out.sent += ahead as u64;
    Ok(out)
}

/// The publishers' totals.
struct Run {
    sent: u64,
    acked: u64,
    lag: Histogram<u64>,
    /// From the first send until the last PUBACK.
    publish_s: f64,
}

async fn run_publishers(
    conns: Vec<(Conn, String)>,
    window: usize,
    plan: Plan,
    first_seq: u64,
    acked: Arc<AtomicU64>,
) -> Result<Run> {
    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, t)| {
            tokio::spawn(publish_ungated(
                c,
                t,
                window,
                plan,
                first_seq,
                0,
                acked.clone(),
            ))
        })
        .collect();
    let mut run = Run {
        sent: 0,
        acked: 0,
        lag: histogram()?,
        publish_s: 0.0,
    };
    for t in tasks {
        let s = t.await??;
        run.sent += s.sent;
        run.acked += s.acked;
        run.lag.add(&s.lag)?;
    }
    run.publish_s = t0.elapsed().as_secs_f64();
    Ok(run)
}

/// Waits until `count()` (from `base`) reaches `want`, or stops moving for `stall`; returns the
/// count and when it last moved (seconds since `t0`).
async fn drain<F, Fut>(
    t0: Instant,
    base: f64,
    want: f64,
    stall: Duration,
    mut count: F,
) -> Result<(f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut got = count().await? - base;
    let mut moved = Instant::now();
    while got < want && moved.elapsed() < stall {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count().await? - base;
        if now > got {
            moved = Instant::now();
        }
        got = now;
    }
    Ok((got, (moved - t0).as_secs_f64()))
}

/// The burst through `mosquitto_pub`, one process per cabinet; returns the acknowledged count
/// (every message of each publisher that exited 0) and the time until the last one exited.
async fn mosquitto_pub_burst(
    broker: SocketAddr,
    cabs: &[FleetCabinet],
    credentials: bool,
    messages: u64,
    window: usize,
) -> Result<Run> {
    use tokio::io::AsyncWriteExt;
    let mut lines = Vec::new();
    for seq in 1..=messages {
        lines.extend_from_slice(&heartbeat(seq));
        lines.push(b'\n');
    }
    let lines = Arc::new(lines);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in cabs {
        let mut cmd = tokio::process::Command::new("mosquitto_pub");
        cmd.args([
            "-h",
            &broker.ip().to_string(),
            "-p",
            &broker.port().to_string(),
        ])
        .args(["-i", &c.id, "-q", "1", "-M", &window.to_string()])
        .args(["-t", &format!("/tenants/{}/heartbeat", c.id), "-l"]);
        if credentials {
            cmd.args(["-u", &c.id, "-P", &c.secret]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("mosquitto_pub (apt-get install mosquitto-clients): {e}")
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let lines = lines.clone();
        tasks.push(tokio::spawn(async move {
            stdin.write_all(&lines).await?;
            drop(stdin);
            let out = child.wait_with_output().await?;
            if !out.status.success() {
                bail!(
                    "mosquitto_pub: {} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok::<_, anyhow::Error>(messages)
        }));
    }
    let mut run = Run {
        sent: messages * cabs.len() as u64,
        acked: 0,
        lag: histogram()?,
        publish_s: 0.0,
    };
    for t in tasks {
        match t.await? {
            Ok(n) => run.acked += n,
            Err(e) => eprintln!("cabinet-loadtest: {e:#}"),
        }
    }
    run.publish_s = t0.elapsed().as_secs_f64();
    Ok(run)
}

/// Connects one cabinet per publisher and brings each online (its actor started, its first
/// `status` processed) outside the measured window.
async fn online_publishers(hub: &Hub, cabs: &[FleetCabinet]) -> Result<Vec<(Conn, String)>> {
    let mut conns = connect_publishers(hub.mqtt, cabs, true).await?;
    for (conn, topic) in conns.iter_mut() {
        let status = topic.replace("/heartbeat", "/status");
        conn.publish(&status, br#"{"online":true,"boot_id":"ingest","fw":"2.4.1","model":"KM-400","config_version":0,"boot":"power_on"}"#).await?;
        // Its PUBACK is taken here, so the measured run counts only its own.
        loop {
            match tokio::time::timeout(ACK_PATIENCE, conn.read()).await {
                Ok(Ok(Packet::PubAck(_))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!("no PUBACK for a status within {ACK_PATIENCE:?}"),
            }
        }
    }
    wait_online(hub, cabs.len(), Duration::from_secs(60)).await?;
    Ok(conns)
}

fn plan(mode: Mode, messages: u64, rate: f64, publishers: usize, duration: Duration) -> Plan {
    match mode {
        Mode::OpenLoop => Plan::Rate {
            per_s: (rate / publishers.max(1) as f64).max(0.001),
            stop: Instant::now() + duration,
        },
        Mode::Burst | Mode::Gated => Plan::Burst { messages },
    }
}

/// `ingest --mode burst|open-loop`: the same ungated stream into the hub, then into Mosquitto
/// with one subscriber, in the same run. Loss is what the broker acknowledged and the far side
/// (the hub's actors; Mosquitto's subscriber) never got.
#[allow(clippy::too_many_arguments)]
pub async fn ungated(
    ctx: &Ctx,
    mode: Mode,
    client: Client,
    publishers: usize,
    window: usize,
    messages: u64,
    rate: f64,
    duration: Duration,
    mosquitto_addr: Option<SocketAddr>,
) -> Result<Report> {
    let mut r = Report::new(
        "ingest",
        json!({"mode": format!("{mode:?}"), "client": format!("{client:?}"), "publishers": publishers, "window": window,
               "messages_per_publisher": (mode == Mode::Burst).then_some(messages),
               "offered_per_s": (mode == Mode::OpenLoop).then_some(rate),
               "duration_s": (mode == Mode::OpenLoop).then_some(duration.as_secs())}),
    );
    if client == Client::MosquittoPub && mode != Mode::Burst {
        bail!("--client mosquitto-pub sends bursts only (--mode burst)");
    }
    // This tool's own publishers, the same for the hub and for Mosquitto.
    let own = |conns| {
        run_publishers(
            conns,
            window,
            plan(mode, messages, rate, publishers, duration),
            0,
            Arc::new(AtomicU64::new(0)),
        )
    };
    let hub = Arc::new(ctx.hub().await?);
    let (_, cabs) = setup(&hub, publishers, &mut r).await?;
    let conns = online_publishers(&hub, &cabs).await?;

    let processed0 = hub.metric_sum("uplinks_processed_total").await?;
    let holds0 = hub.metric_sum("mqtt_backpressure_holds_total").await?;
    let evicted0 = hub.metric_sum("mqtt_uplinks_evicted_total").await?;
    let cpu0 = hub.cpu_seconds();
    let t0 = Instant::now();
    let run = match client {
        Client::Own => own(conns).await?,
        Client::MosquittoPub => {
            // Each cabinet's own connection goes; mosquitto_pub connects as the cabinet.
            drop(conns);
            mosquitto_pub_burst(hub.mqtt, &cabs, true, messages, window).await?
        }
    };
    let (processed, done_s) = drain(
        t0,
        processed0,
        run.acked as f64,
        Duration::from_secs(30),
        || hub.metric_sum("uplinks_processed_total"),
    )
    .await?;
    let cpu = hub.cpu_seconds().zip(cpu0).map(|(a, b)| a - b);
    r.fig("hub_sent", run.sent as f64, "messages");
    r.fig("hub_acked", run.acked as f64, "messages");
    r.fig("hub_processed", processed, "messages");
    r.fig(
        "hub_lost",
        (run.acked as f64 - processed).max(0.0),
        "messages",
    );
    r.fig("hub_processed_per_s", processed / done_s.max(1e-3), "msg/s");
    r.fig("hub_acked_within_s", run.publish_s, "s");
    r.fig(
        "hub_backpressure_holds",
        hub.metric_sum("mqtt_backpressure_holds_total").await? - holds0,
        "",
    );
    r.fig(
        "hub_evicted",
        hub.metric_sum("mqtt_uplinks_evicted_total").await? - evicted0,
        "messages",
    );
    if let Some(cpu) = cpu {
        r.fig(
            "hub_cpu_us_per_message",
            cpu * 1e6 / processed.max(1.0),
            "µs",
        );
    }
    if mode == Mode::OpenLoop {
        r.fig("hub_offered_per_s", rate, "msg/s");
        r.latency("hub_send_lag", &run.lag);
    }
    drop(hub);

    // Mosquitto: the same publishers, plan and payloads; one subscriber.
    let m = mosquitto(mosquitto_addr).await?;
    let (received, sub_task) = count_heartbeats_at(m.addr).await?;
    let t0 = Instant::now();
    let run = match client {
        Client::Own => {
            let conns = connect_publishers(m.addr, &cabs, false).await?;
            own(conns).await?
        }
        Client::MosquittoPub => mosquitto_pub_burst(m.addr, &cabs, false, messages, window).await?,
    };
    let rc = received.clone();
    let (delivered, done_s) = drain(t0, 0.0, run.acked as f64, Duration::from_secs(10), || {
        let n = rc.load(Ordering::Relaxed) as f64;
        async move { Ok(n) }
    })
    .await?;
    sub_task.abort();
    let hub_rate = r.value("hub_processed_per_s").unwrap_or(0.0);
    let m_rate = delivered / done_s.max(1e-3);
    r.fig("mosquitto_acked", run.acked as f64, "messages");
    r.fig("mosquitto_delivered", delivered, "messages");
    r.fig(
        "mosquitto_lost",
        (run.acked as f64 - delivered).max(0.0),
        "messages",
    );
    r.fig("mosquitto_delivered_per_s", m_rate, "msg/s");
    r.fig("hub_vs_mosquitto", hub_rate / m_rate.max(1.0), "×");
    if mode == Mode::OpenLoop {
        r.latency("mosquitto_send_lag", &run.lag);
    }
    Ok(r)
}

/// `reconnect-flush`: the fleet is online, every connection drops at once (a network or power
/// cut), and every cabinet reconnects at once and flushes the `queued` uplinks it kept while
/// cut off — a `power_restored` event, then heartbeats — ungated. Counted from the cabinets'
/// side: every acknowledged message must go through the actors.
pub async fn reconnect_flush(
    ctx: &Ctx,
    cabinets: usize,
    queued: u64,
    window: usize,
) -> Result<Report> {
    let mut r = Report::new(
        "reconnect-flush",
        json!({"cabinets": cabinets, "queued_per_cabinet": queued, "window": window}),
    );
    let hub = Arc::new(ctx.hub().await?);
    let (_, cabs) = setup(&hub, cabinets, &mut r).await?;
    let conns = online_publishers(&hub, &cabs).await?;
    // The cut: sockets closed without DISCONNECT, as a network loses them.
    drop(conns);
    let processed0 = hub.metric_sum("uplinks_processed_total").await?;
    let holds0 = hub.metric_sum("mqtt_backpressure_holds_total").await?;
    let evicted0 = hub.metric_sum("mqtt_uplinks_evicted_total").await?;

    let t0 = Instant::now();
    let reconnects: Vec<_> = cabs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, c)| {
            let mqtt = hub.mqtt;
            tokio::spawn(async move {
                // The broker may still be closing the cut connection of the same client id.
                let mut tries = 0;
                loop {
                    let login = Login {
                        client_id: &c.id,
                        credentials: Some((c.id.as_str(), c.secret.as_str())),
                        keep_alive: 60,
                        will: None,
                    };
                    match Conn::connect(mqtt, crate::fleet::source_for(i), login).await {
                        Ok(conn) => return Ok((conn, c, tries)),
                        Err(e) if tries >= 20 => return Err(anyhow::Error::from(e)),
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let mut flushes = Vec::new();
    let acked = Arc::new(AtomicU64::new(0));
    let mut retries = 0u64;
    for rc in reconnects {
        let (mut conn, c, tries): (Conn, FleetCabinet, u64) = rc.await??;
        retries += tries;
        let acked = acked.clone();
        flushes.push(tokio::spawn(async move {
            let base = format!("/tenants/{}", c.id);
            conn.publish(&format!("{base}/status"), br#"{"online":true,"boot_id":"flush","fw":"2.4.1","model":"KM-400","config_version":0,"boot":"reconnect"}"#).await?;
            conn.publish(
                &format!("{base}/event"),
                json!({"seq": 1, "ts": 1_763_700_000_000u64, "type": "power_restored"}).to_string().as_bytes(),
            )
            .await?;
            // The status and the event are in flight ahead of the heartbeats.
            publish_ungated(
                conn,
                format!("{base}/heartbeat"),
                window,
                Plan::Burst {
                    messages: queued.saturating_sub(1),
                },
                1,
                2,
                acked,
            )
            .await
        }));
    }
    let connected_s = t0.elapsed().as_secs_f64();
    let mut sent = 0u64;
    let mut got_acks = 0u64;
    for f in flushes {
        let s = f.await??;
        sent += s.sent;
        got_acks += s.acked;
    }
    let acked_total = got_acks;
    let acked_s = t0.elapsed().as_secs_f64();
    let (processed, done_s) = drain(
        t0,
        processed0,
        acked_total as f64,
        Duration::from_secs(30),
        || hub.metric_sum("uplinks_processed_total"),
    )
    .await?;
    r.fig("reconnected_within_s", connected_s, "s");
    r.fig("reconnect_retries", retries as f64, "");
    r.fig("flush_sent", sent as f64, "messages");
    r.fig("flush_acked", acked_total as f64, "messages");
    r.fig("flush_processed", processed, "messages");
    r.fig(
        "flush_lost",
        (acked_total as f64 - processed).max(0.0),
        "messages",
    );
    r.fig("flush_acked_within_s", acked_s, "s");
    r.fig("flush_processed_within_s", done_s, "s");
    r.fig(
        "backpressure_holds",
        hub.metric_sum("mqtt_backpressure_holds_total").await? - holds0,
        "",
    );
    r.fig(
        "evicted",
        hub.metric_sum("mqtt_uplinks_evicted_total").await? - evicted0,
        "messages",
    );
    r.fig("online_after", hub.metric_sum("cabinets_online").await?, "");
    Ok(r)
}
