//! `cabinet-loadtest`: a fleet of simulated cabinets against a cabinet-hub, with the scenarios of
//! docs/benchmarks.md. Loopback only, bounded in count and time; prints a report, writes JSON
//! with `--json`, and exits 1 when a `--target` is missed.

mod capacity;
mod cluster;
mod fleet;
mod hub;
mod ingest;
mod mqtt;
mod report;
mod scenarios;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::report::{Report, Target};

/// The most cabinets one run may simulate, and the longest it may last.
const MAX_CABINETS: usize = 60_000;
const MAX_DURATION_S: u64 = 4 * 3600;

#[derive(Parser)]
#[command(
    name = "cabinet-loadtest",
    about = "Fleet simulator and benchmarks for cabinet-hub"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// The hub binary to start (default: beside this binary).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Use a running hub instead (its HTTP address, loopback only).
    #[arg(long, requires_all = ["hub_mqtt", "admin_key"])]
    hub_http: Option<SocketAddr>,
    /// The running hub's password-mode MQTT address.
    #[arg(long)]
    hub_mqtt: Option<SocketAddr>,
    /// The running hub's admin key.
    #[arg(long)]
    admin_key: Option<String>,
    /// Extra hub settings for the started hub, `HUB__SECTION__KEY=value` (repeatable).
    #[arg(long = "hub-env")]
    hub_env: Vec<String>,
    /// Heartbeat interval pushed to the fleet, seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u32,
    /// Bring the fleet up at this many connections per second instead of all at once, as a
    /// fleet does in the field (`connect-storm` always connects all at once).
    #[arg(long)]
    ramp_per_s: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A target, `figure<=value` or `figure>=value` (repeatable); missing one exits 1.
    #[arg(long = "target")]
    targets: Vec<Target>,
    /// Where the payment simulators run: `apart` in a process of their own (`cabinet-hub
    /// simulate`, as the providers' servers are in the field, so their signing is not counted as
    /// the hub's), or `in-hub` (served by the hub, as on its embedded defaults).
    #[arg(long, value_enum, default_value_t = SimulatorAt::Apart)]
    simulator: SimulatorAt,
    /// Fault: share of unlocks ignored (0–1).
    #[arg(long, default_value_t = 0.0)]
    fault_unlock_ignored: f64,
    /// Fault: share of visits whose lock never latches (0–1).
    #[arg(long, default_value_t = 0.0)]
    fault_lock_not_latching: f64,
    /// Fault: share of cabinets with a failing camera (0–1).
    #[arg(long, default_value_t = 0.0)]
    fault_camera_failing: f64,
    /// Fault: chance per heartbeat of an abrupt disconnect and reconnect (0–1).
    #[arg(long, default_value_t = 0.0)]
    fault_abrupt_disconnect: f64,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum SimulatorAt {
    Apart,
    InHub,
}

#[derive(Subcommand)]
enum Scenario {
    /// N cabinets connect at once: time until the hub reports all online.
    ConnectStorm {
        #[arg(long, default_value_t = 20_000)]
        cabinets: usize,
        #[command(flatten)]
        common: Common,
    },
    /// N cabinets at the standard heartbeat: hub memory per cabinet, CPU, event → feed latency.
    SteadyFleet {
        #[arg(long, default_value_t = 20_000)]
        cabinets: usize,
        #[arg(long, default_value_t = 90)]
        duration_s: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Uplinks into the hub, then the same into Mosquitto: rates, and loss counted from the
    /// publishers' side (acknowledged against processed).
    Ingest {
        /// `burst`: each publisher sends `--messages` as fast as its window allows; `open-loop`:
        /// `--rate` messages a second in all on a fixed schedule for `--duration-s`; `gated`:
        /// publishers wait on the hub's processed count (cannot see loss; the first benchmarks).
        #[arg(long, value_enum, default_value_t = ingest::Mode::Burst)]
        mode: ingest::Mode,
        /// The publishing client (`mosquitto-pub`: burst only).
        #[arg(long, value_enum, default_value_t = ingest::Client::Own)]
        client: ingest::Client,
        #[arg(long, default_value_t = 200)]
        publishers: usize,
        /// Unacknowledged publishes each publisher keeps in flight.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Messages per publisher (burst).
        #[arg(long, default_value_t = 5_000)]
        messages: u64,
        /// Offered messages a second, all publishers together (open loop).
        #[arg(long, default_value_t = 50_000.0)]
        rate: f64,
        /// How long to offer (open loop, gated).
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
        /// A Mosquitto to use instead of starting one.
        #[arg(long)]
        mosquitto: Option<SocketAddr>,
        #[command(flatten)]
        common: Common,
    },
    /// Sessions at R per second over N cabinets: unlock latency beside the MQTT round-trip floor.
    ShoppingRush {
        #[arg(long, default_value_t = 10_000)]
        cabinets: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        #[command(flatten)]
        common: Common,
    },
    /// The fleet online, every connection cut at once, every cabinet reconnecting at once and
    /// flushing the uplinks it queued meanwhile: acknowledged against processed.
    ReconnectFlush {
        #[arg(long, default_value_t = 2_000)]
        cabinets: usize,
        /// Uplinks each cabinet flushes on reconnect (a status, a `power_restored`, heartbeats).
        #[arg(long, default_value_t = 50)]
        queued: u64,
        /// Unacknowledged publishes each cabinet keeps in flight.
        #[arg(long, default_value_t = 20)]
        window: usize,
        #[command(flatten)]
        common: Common,
    },
    /// The shopping rush at rising offered rates until unlock p99 passes 50 ms or anything is
    /// refused or lost: the curve (table, SVG) and the CPU per session (gross, net of what the
    /// connected fleet costs the hub idle, and what of it the hub's RSA signing took).
    Capacity {
        #[arg(long, default_value_t = 4_000)]
        cabinets: usize,
        /// Offered sessions a second, one step each, in order.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "25,50,100,150,200,300,400,600,800"
        )]
        rates: Vec<f64>,
        /// Seconds per step.
        #[arg(long, default_value_t = 15)]
        step_s: u64,
        /// Write the plot here (SVG).
        #[arg(long)]
        svg: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Two hub nodes on one PostgreSQL and one Redis: the fleet split between them, sessions
    /// asked of one (half run there, half carried to the other), then the other killed: how long
    /// until every cabinet is served again.
    Cluster {
        #[arg(long, default_value_t = 30_000)]
        cabinets: usize,
        /// Sessions a second while shopping (half the time local, half routed).
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
        /// A PostgreSQL server whose user may create databases (a fresh one per run).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
        postgres_url: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// The nodes' lease (`cluster.lease_ms`): the failover target is this plus 5 s.
        #[arg(long, default_value_t = 10_000)]
        lease_ms: u64,
        #[command(flatten)]
        common: Common,
    },
    /// K cabinets fault within one second: each alert once, all on the feed, API latency.
    AlertStorm {
        #[arg(long, default_value_t = 5_000)]
        cabinets: usize,
        #[command(flatten)]
        common: Common,
    },
    /// The steady fleet with shopping: memory growth, errors, lost messages and orders.
    Soak {
        #[arg(long, default_value_t = 5_000)]
        cabinets: usize,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 1800)]
        duration_s: u64,
        #[command(flatten)]
        common: Common,
    },
    /// (Started by `cluster`.) Part of a fleet in a process of its own, past one process's
    /// open-file limit: the cabinets in `--input` (JSON: `{"cabinets": [{id, secret}], "items":
    /// […]}`) against `--brokers`, until stdin closes.
    #[command(hide = true)]
    FleetWorker {
        #[arg(long, value_delimiter = ',')]
        brokers: Vec<SocketAddr>,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 30)]
        heartbeat_s: u32,
        #[arg(long)]
        ramp_per_s: Option<f64>,
        #[arg(long, default_value_t = 1500)]
        door_open_ms: u64,
    },
    /// Writes docs/benchmarks.md's results section from JSON reports.
    Report {
        /// The JSON reports, in the order to show.
        files: Vec<PathBuf>,
        /// Where to write the Markdown (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Criterion's output directory, for the hot-path table.
        #[arg(long)]
        criterion: Option<PathBuf>,
        /// A paragraph for the top of the document (repeatable).
        #[arg(long = "note")]
        notes: Vec<String>,
    },
}

fn loopback(a: SocketAddr, what: &str) -> Result<SocketAddr> {
    if !a.ip().is_loopback() {
        bail!("{what} {a}: this tool only drives a hub on loopback");
    }
    Ok(a)
}

fn ctx(c: &Common) -> Result<scenarios::Ctx> {
    let external = match (c.hub_http, c.hub_mqtt, &c.admin_key) {
        (Some(h), Some(m), Some(k)) => Some((
            loopback(h, "--hub-http")?,
            loopback(m, "--hub-mqtt")?,
            k.clone(),
        )),
        _ => None,
    };
    let hub_env = c
        .hub_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--hub-env {kv}: write KEY=value"))
        })
        .collect::<Result<Vec<_>>>()?;
    for (name, p) in [
        ("--fault-unlock-ignored", c.fault_unlock_ignored),
        ("--fault-lock-not-latching", c.fault_lock_not_latching),
        ("--fault-camera-failing", c.fault_camera_failing),
        ("--fault-abrupt-disconnect", c.fault_abrupt_disconnect),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} {p}: a share between 0 and 1");
        }
    }
    Ok(scenarios::Ctx {
        hub_bin: c.hub_bin.clone().unwrap_or_else(hub::default_hub_bin),
        external,
        hub_env,
        heartbeat_s: c.heartbeat_s.max(1),
        ramp_per_s: c.ramp_per_s.filter(|r| *r > 0.0),
        simulator_apart: c.simulator == SimulatorAt::Apart,
        faults: fleet::Faults {
            unlock_ignored: c.fault_unlock_ignored,
            lock_not_latching: c.fault_lock_not_latching,
            camera_failing: c.fault_camera_failing,
            abrupt_disconnect: c.fault_abrupt_disconnect,
        },
    })
}

fn bounded(n: usize, what: &str) -> Result<usize> {
    if n == 0 || n > MAX_CABINETS {
        bail!("{what} {n}: between 1 and {MAX_CABINETS}");
    }
    Ok(n)
}

fn secs(s: u64) -> Result<Duration> {
    if s == 0 || s > MAX_DURATION_S {
        bail!("duration {s} s: between 1 and {MAX_DURATION_S}");
    }
    Ok(Duration::from_secs(s))
}

/// Tens of thousands of sockets need more descriptors than the usual 1,024 (or 20,000): raise
/// the limit as far as the system allows; the hub this tool starts inherits it.
fn raise_fd_limit() {
    use rlimit::Resource;
    let want = 200_000;
    if rlimit::setrlimit(Resource::NOFILE, want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
}

async fn run(s: Scenario) -> Result<Option<(Report, Common)>> {
    Ok(Some(match s {
        Scenario::ConnectStorm { cabinets, common } => (
            scenarios::connect_storm(&ctx(&common)?, bounded(cabinets, "--cabinets")?).await?,
            common,
        ),
        Scenario::SteadyFleet {
            cabinets,
            duration_s,
            common,
        } => (
            scenarios::steady_fleet(
                &ctx(&common)?,
                bounded(cabinets, "--cabinets")?,
                secs(duration_s)?,
            )
            .await?,
            common,
        ),
        Scenario::Ingest {
            mode,
            client,
            publishers,
            window,
            messages,
            rate,
            duration_s,
            mosquitto,
            common,
        } => {
            let m = mosquitto.map(|a| loopback(a, "--mosquitto")).transpose()?;
            let (c, publishers, window) = (
                ctx(&common)?,
                bounded(publishers, "--publishers")?,
                window.clamp(1, 1000),
            );
            let report = match mode {
                ingest::Mode::Gated => {
                    scenarios::ingest(&c, publishers, window, secs(duration_s)?, m).await?
                }
                mode => {
                    ingest::ungated(
                        &c,
                        mode,
                        client,
                        publishers,
                        window,
                        messages.clamp(1, 10_000_000),
                        rate.clamp(1.0, 10_000_000.0),
                        secs(duration_s)?,
                        m,
                    )
                    .await?
                }
            };
            (report, common)
        }
        Scenario::ReconnectFlush {
            cabinets,
            queued,
            window,
            common,
        } => (
            ingest::reconnect_flush(
                &ctx(&common)?,
                bounded(cabinets, "--cabinets")?,
                queued.clamp(3, 1_000_000),
                window.clamp(1, 1000),
            )
            .await?,
            common,
        ),
        Scenario::ShoppingRush {
            cabinets,
            rate,
            duration_s,
            common,
        } => (
            scenarios::shopping_rush(
                &ctx(&common)?,
                bounded(cabinets, "--cabinets")?,
                rate.clamp(0.01, 10_000.0),
                secs(duration_s)?,
            )
            .await?,
            common,
        ),
        Scenario::Cluster {
            cabinets,
            rate,
            duration_s,
            postgres_url,
            redis_url,
            lease_ms,
            common,
        } => (
            cluster::cluster(
                &ctx(&common)?,
                bounded(cabinets, "--cabinets")?,
                rate,
                secs(duration_s)?,
                &cluster::Shared {
                    postgres: postgres_url,
                    redis: redis_url,
                    lease_ms: lease_ms.max(300),
                },
            )
            .await?,
            common,
        ),
        Scenario::Capacity {
            cabinets,
            rates,
            step_s,
            svg,
            common,
        } => {
            let rates: Vec<f64> = rates.into_iter().map(|r| r.clamp(0.01, 10_000.0)).collect();
            (
                capacity::capacity(
                    &ctx(&common)?,
                    bounded(cabinets, "--cabinets")?,
                    &rates,
                    secs(step_s)?,
                    svg.as_deref(),
                )
                .await?,
                common,
            )
        }
        Scenario::AlertStorm { cabinets, common } => (
            scenarios::alert_storm(&ctx(&common)?, bounded(cabinets, "--cabinets")?).await?,
            common,
        ),
        Scenario::Soak {
            cabinets,
            rate,
            duration_s,
            common,
        } => (
            scenarios::soak(
                &ctx(&common)?,
                bounded(cabinets, "--cabinets")?,
                rate.clamp(0.01, 10_000.0),
                secs(duration_s)?,
            )
            .await?,
            common,
        ),
        Scenario::FleetWorker {
            brokers,
            input,
            heartbeat_s,
            ramp_per_s,
            door_open_ms,
        } => {
            cluster::fleet_worker(
                &brokers,
                &input,
                heartbeat_s,
                ramp_per_s,
                Duration::from_millis(door_open_ms),
            )
            .await?;
            return Ok(None);
        }
        Scenario::Report {
            files,
            out,
            criterion,
            notes,
        } => {
            let md = report::markdown(&files, criterion.as_deref(), &notes)?;
            match out {
                Some(p) => std::fs::write(&p, md).with_context(|| p.display().to_string())?,
                None => print!("{md}"),
            }
            return Ok(None);
        }
    }))
}

fn main() -> ExitCode {
    raise_fd_limit();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cabinet-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli.scenario)) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((mut r, common))) => {
            let met = r.check(&common.targets);
            print!("{}", r.human());
            if let Some(p) = &common.json {
                let text = serde_json::to_string_pretty(&r).unwrap_or_default();
                if let Err(e) = std::fs::write(p, text) {
                    eprintln!("cabinet-loadtest: {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            }
            if met {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("cabinet-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
