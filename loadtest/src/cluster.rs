//! `cluster`: two hub nodes on one PostgreSQL database and one Redis, on this machine. The fleet
//! is split between their brokers (cabinet `i` to node `i % 2`, the next node when that one is
//! down, as behind a TCP load balancer); sessions are all asked of node a, so half of them run
//! where they were asked and half are carried to node b and answered back (the routed hop);
//! then node b is killed (`kill -9`) and the time until node a serves every cabinet is measured.
//! The payment simulators run in a process of their own, shared by the nodes as WeChat is.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::time::Instant;

use crate::fleet::{self, Behaviour, Faults, Stats};
use crate::hub::{FleetCabinet, Hub};
use crate::report::Report;
use crate::scenarios::{price_fleet, setup, shop, Ctx, Fleet};

/// Where the cluster's shared services are.
pub struct Shared {
    /// A PostgreSQL server URL whose user may create databases; a fresh one is made per run.
    pub postgres: String,
    /// The Redis both nodes coordinate through.
    pub redis: String,
    /// The nodes' `cluster.lease_ms`.
    pub lease_ms: u64,
}

/// A fresh database on the server at `admin_url` (`psql` creates it): `hub_test_…`, which the
/// test command drops on its next run.
fn fresh_database(admin_url: &str) -> Result<String> {
    let name = format!(
        "hub_test_lt{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let out = std::process::Command::new("psql")
        .arg(admin_url)
        .arg("-qc")
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .context("running psql to create the cluster's database")?;
    if !out.status.success() {
        bail!(
            "CREATE DATABASE on {admin_url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // postgres://user@host:port/db[?…]: the same server, the new database.
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url, String::new()),
    };
    let Some((server, _)) = base.rsplit_once('/') else {
        bail!("--postgres-url {admin_url}: write postgres://USER@HOST:PORT/DB");
    };
    Ok(format!("{server}/{name}{query}"))
}

async fn sum(nodes: &[&Hub], metric: &str) -> f64 {
    let mut total = 0.0;
    for n in nodes {
        total += n.metric_sum(metric).await.unwrap_or(0.0);
    }
    total
}

/// Waits until `nodes` together report `n` of `metric`; the time it took.
async fn until_sum(nodes: &[&Hub], metric: &str, n: usize, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let got = sum(nodes, metric).await;
        if got as usize >= n {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            bail!("{metric}: {got} of {n} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn cluster(
    ctx: &Ctx,
    n: usize,
    rate: f64,
    duration: Duration,
    shared: &Shared,
) -> Result<Report> {
    let mut r = Report::new(
        "cluster",
        json!({"cabinets": n, "rate_per_s": rate, "duration_s": duration.as_secs(),
               "nodes": 2, "lease_ms": shared.lease_ms}),
    );
    let db = fresh_database(&shared.postgres)?;
    let prefix = format!(
        "lt{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let mut env = ctx.hub_env.clone();
    env.extend([
        ("HUB__DATABASE__URL".to_owned(), db),
        ("HUB__REDIS__URL".to_owned(), shared.redis.clone()),
        ("HUB__CLUSTER__KEY_PREFIX".to_owned(), prefix),
        (
            "HUB__CLUSTER__LEASE_MS".to_owned(),
            shared.lease_ms.to_string(),
        ),
        (
            "HUB__CLUSTER__RENEW_MS".to_owned(),
            (shared.lease_ms / 3).max(1).to_string(),
        ),
        (
            "HUB__CABINET__HEARTBEAT_S".to_owned(),
            ctx.heartbeat_s.to_string(),
        ),
        (
            "HUB__PAYMENTS__SIMULATOR_CONFIRM_MS".to_owned(),
            "0".to_owned(),
        ),
        // A cabinet whose node died is offline there only after this; it is served by the
        // other node as soon as it reconnects.
        ("HUB__MQTT__MAX_CONNECTIONS".to_owned(), "40000".to_owned()),
    ]);
    // The simulators read the same settings (the shoppers confirm at once, as in every rush).
    let (_sim_child, _sim_dir, sim) = crate::hub::spawn_simulator(&ctx.hub_bin, &env).await?;
    let a = Arc::new(Hub::spawn_node(&ctx.hub_bin, &env, sim, "a").await?);
    let mut b = Hub::spawn_node(&ctx.hub_bin, &env, sim, "b").await?;

    let (op, cabs) = setup(&a, n, &mut r).await?;
    price_fleet(&a, &op, &cabs).await?;
    let items = json!([{"sku": "6901234567890", "qty": 1}, {"sku": "6907992100012", "qty": 1}]);
    // Beyond one process's descriptors the rest of the fleet runs in child processes; an even
    // split keeps cabinet i on node i % 2 in every process.
    let here = if cabs.len() > PER_PROCESS {
        PER_PROCESS
    } else {
        cabs.len()
    };
    let fleet = Fleet::start_over(
        &[a.mqtt, b.mqtt],
        &cabs[..here],
        ctx.behaviour(items.clone(), Duration::from_millis(1500)),
    );
    let mut workers = Vec::new();
    for part in cabs[here..].chunks(PER_PROCESS) {
        workers.push(fleet_process(ctx, &[a.mqtt, b.mqtt], part, &items).await?);
    }
    if !workers.is_empty() {
        r.note(format!(
            "the fleet ran in {} processes (at most {PER_PROCESS} cabinets each: the open-file limit)",
            workers.len() + 1
        ));
    }
    let within = ctx.online_within(n);
    let online = until_sum(&[&a, &b], "cabinets_online", n, within).await?;
    r.fig("connect_all_online_s", online.as_secs_f64(), "s");
    let leased = until_sum(&[&a, &b], "cluster_cabinet_leases", n, within).await?;
    r.fig("connect_all_leased_s", leased.as_secs_f64(), "s");
    ctx.settle().await;
    let (ra, rb) = (a.rss(), b.rss());
    if let (Some(ra), Some(rb)) = (ra, rb) {
        r.fig("node_a_rss_mb", ra as f64 / 1e6, "MB");
        r.fig("node_b_rss_mb", rb as f64 / 1e6, "MB");
        r.fig(
            "kb_per_cabinet_both_nodes",
            (ra + rb) as f64 / 1000.0 / n as f64,
            "KB",
        );
    }
    let leader = (
        a.metric_sum("cluster_leader").await.unwrap_or(0.0),
        b.metric_sum("cluster_leader").await.unwrap_or(0.0),
    );
    r.fig("leaders", leader.0 + leader.1, "");

    // Sessions asked of node a: for a's own cabinets, then for b's (carried through Redis).
    let (local, routed): (Vec<_>, Vec<_>) = cabs
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let local: Vec<_> = local.into_iter().map(|(_, c)| c).collect();
    let routed: Vec<_> = routed.into_iter().map(|(_, c)| c).collect();
    let half = duration / 2;
    let (hl, sl) = shop(a.clone(), op.clone(), local, rate, Instant::now() + half).await?;
    let (hr, sr) = shop(a.clone(), op.clone(), routed, rate, Instant::now() + half).await?;
    r.latency("unlock_local", &hl.total);
    r.latency("unlock_routed", &hr.total);
    if let Some(route) = hr.stages.get("route") {
        r.latency("route_hop", route);
    }
    for (stage, h) in &hl.stages {
        r.latency(&format!("stage_local_{stage}"), h);
    }
    let p50 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1000.0;
    r.fig(
        "routed_minus_local_p50_ms",
        p50(&hr.total) - p50(&hl.total),
        "ms",
    );
    for (what, s) in [("local", &sl), ("routed", &sr)] {
        r.fig(&format!("sessions_{what}_started"), s.started as f64, "");
        r.fig(&format!("sessions_{what}_unlocked"), s.ok as f64, "");
        for (code, count) in &s.refused {
            r.note(format!("{what}: {count} sessions refused: {code}"));
        }
        r.fig(&format!("sessions_{what}_errors"), s.errors as f64, "");
    }

    // Node b dies: its cabinets reconnect to a; how long until a serves them all. Only when
    // one node can hold the whole fleet (the open-file limit): beyond, a third node would be
    // needed to take them.
    if n > ONE_NODE_HOLDS {
        r.note(format!(
            "no failover step: {n} cabinets do not fit on one surviving node here (at most {ONE_NODE_HOLDS}, the open-file limit); run with --cabinets {ONE_NODE_HOLDS} or fewer for it"
        ));
        fleet.shutdown().await;
        drop(workers);
        return Ok(r);
    }
    let on_a = a.metric_sum("cabinets_online").await.unwrap_or(0.0);
    b.kill9()?;
    let died = Instant::now();
    let served = until_sum(&[&a], "cluster_cabinet_leases", n, Duration::from_secs(300)).await?;
    r.fig("failover_all_leased_on_a_s", served.as_secs_f64(), "s");
    let all_online = until_sum(&[&a], "cabinets_online", n, Duration::from_secs(300))
        .await
        .map(|_| died.elapsed());
    match all_online {
        Ok(t) => r.fig("failover_all_online_on_a_s", t.as_secs_f64(), "s"),
        Err(e) => r.note(format!("after the failover: {e}")),
    }
    r.fig("failover_cabinets_moved", n as f64 - on_a, "");
    // From the outside: a shopper's session through the survivor, for a sample of b's
    // cabinets, asked again every half second from the kill until the door opens.
    let b_cabinets: Vec<FleetCabinet> = cabs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, c)| c.clone())
        .collect();
    let step = (b_cabinets.len() / SERVED_SAMPLE).max(1);
    let sample: Vec<FleetCabinet> = b_cabinets.into_iter().step_by(step).collect();
    let (served, never) = served_again(a.clone(), op.clone(), sample, died).await;
    if let Some(h) = &served {
        r.latency("failover_served_again", h);
        r.fig("failover_served_again_max_s", h.max() as f64 / 1e6, "s");
    }
    r.fig("failover_never_served", never as f64, "");
    r.fig(
        "failover_target_s",
        shared.lease_ms as f64 / 1000.0 + 5.0,
        "s",
    );
    fleet.shutdown().await;
    drop(workers);
    Ok(r)
}

/// How many of the dead node's cabinets are asked for a session after the kill.
const SERVED_SAMPLE: usize = 100;

/// For each cabinet of `sample`, the time from `died` until a purchase session asked of `a`
/// opened its door (asked every 500 ms, each time with a new key, for up to two minutes), in
/// microseconds; and how many were never served.
async fn served_again(
    a: Arc<Hub>,
    op: String,
    sample: Vec<FleetCabinet>,
    died: Instant,
) -> (Option<hdrhistogram::Histogram<u64>>, usize) {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tasks: Vec<_> = sample
        .into_iter()
        .enumerate()
        .map(|(i, cab)| {
            let (a, op) = (a.clone(), op.clone());
            tokio::spawn(async move {
                let deadline = died + Duration::from_secs(120);
                for k in 0.. {
                    let asked = a
                        .call_timed(
                            reqwest::Method::POST,
                            "/api/v1/sessions",
                            &op,
                            Some(&format!("failover-{run}-{i}-{k}")),
                            Some(json!({"cabinet_id": cab.id, "user_id": format!("failover{i}"), "channel": "wechat", "mode": "purchase"})),
                        )
                        .await;
                    if let Ok((202, v, _)) = asked {
                        if matches!(a.follow_session(&op, &v).await, Ok((state, _)) if state == "open")
                        {
                            return Some(died.elapsed());
                        }
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None
            })
        })
        .collect();
    let mut h = crate::report::histogram().ok();
    let mut never = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => {
                if let Some(h) = h.as_mut() {
                    h.saturating_record(d.as_micros() as u64);
                }
            }
            None => never += 1,
        }
    }
    (h, never)
}

/// The most cabinets one node holds here: the hard open-file limit is 20,000 per process and a
/// node needs about 85 descriptors of its own.
const ONE_NODE_HOLDS: usize = 19_500;

/// A process's share of the cabinets: past about 19,000 a process runs out of descriptors (the
/// hard open-file limit here is 20,000), so a fleet beyond that is split.
const PER_PROCESS: usize = 15_000;

/// Runs `cabs` in a child process (`fleet-worker`) against `brokers`; it runs until the returned
/// child is dropped (its stdin closes).
async fn fleet_process(
    ctx: &Ctx,
    brokers: &[std::net::SocketAddr],
    cabs: &[FleetCabinet],
    items: &serde_json::Value,
) -> Result<(tokio::process::Child, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("fleet.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&json!({"cabinets": cabs, "items": items}))?,
    )?;
    let me = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(me);
    cmd.arg("fleet-worker")
        .arg("--brokers")
        .arg(
            brokers
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .arg("--input")
        .arg(&input)
        .arg("--heartbeat-s")
        .arg(ctx.heartbeat_s.to_string())
        .arg("--door-open-ms")
        .arg("1500")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(r) = ctx.ramp_per_s {
        cmd.arg("--ramp-per-s").arg(r.to_string());
    }
    let child = cmd.spawn().context("starting a fleet-worker")?;
    Ok((child, dir))
}

/// The `fleet-worker` subcommand: the cabinets of `input` against `brokers` until stdin closes.
pub async fn fleet_worker(
    brokers: &[std::net::SocketAddr],
    input: &std::path::Path,
    heartbeat_s: u32,
    ramp_per_s: Option<f64>,
    door_open: Duration,
) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Input {
        cabinets: Vec<FleetCabinet>,
        items: serde_json::Value,
    }
    let text = std::fs::read(input).with_context(|| input.display().to_string())?;
    let Input { cabinets, items } = serde_json::from_slice(&text)?;
    let behaviour = Arc::new(Behaviour {
        heartbeat_s,
        door_open,
        items,
        faults: Faults::default(),
        ramp_per_s,
    });
    let (stop, rx) = tokio::sync::watch::channel(false);
    let _handles = fleet::start(
        brokers,
        &cabinets,
        behaviour,
        Arc::new(Stats::default()),
        rx,
    );
    // Until the parent goes (its end of stdin closes).
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    })
    .await;
    let _ = stop.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}
