//! `capacity` (issue 18): the shopping rush at rising offered rates (open loop) on one hub and
//! fleet, step by step, until unlock p99 passes the target or anything is refused or lost; the
//! curve as a table and an SVG plot, with the CPU each session cost the hub and, apart, the
//! payment simulators.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tokio::time::Instant;

use crate::report::{curve_svg, CurvePoint, Report};
use crate::scenarios::{shop, shopping_fleet, wait_orders, Ctx};

/// Unlock p99 at or below this, nothing refused, nothing lost: the step is within capacity.
const P99_TARGET_MS: f64 = 50.0;

/// Runs the steps; writes the plot to `svg` when given.
pub async fn capacity(
    ctx: &Ctx,
    cabinets: usize,
    rates: &[f64],
    step: Duration,
    svg: Option<&std::path::Path>,
) -> Result<Report> {
    let mut r = Report::new(
        "capacity",
        json!({"cabinets": cabinets, "rates": rates, "step_s": step.as_secs(),
               "simulator_apart": ctx.simulator_apart,
               "svg": svg.map(|p| p.display().to_string())}),
    );
    let hub = Arc::new(ctx.hub().await?);
    let (op, cabs, fleet) = shopping_fleet(ctx, &hub, cabinets, &mut r).await?;
    let idle = fleet_idle_cores(&hub, &mut r).await;

    let mut paid_before = 0u64;
    let mut knee: Option<CurvePoint> = None;
    for &rate in rates {
        let cpu0 = (hub.cpu_seconds(), hub.simulator_cpu_seconds());
        let signing0 = hub.metric_sum(SIGNING_CPU).await.ok();
        let t0 = Instant::now();
        let (h, s) = shop(hub.clone(), op.clone(), cabs.clone(), rate, t0 + step).await?;
        let elapsed = t0.elapsed().as_secs_f64();
        let paid = wait_orders(&hub, paid_before + s.ok, Duration::from_secs(60)).await?;
        let step_s = t0.elapsed().as_secs_f64();
        let per_session = |a: Option<f64>, b: Option<f64>| {
            a.zip(b).map(|(a, b)| (b - a) * 1000.0 / s.ok.max(1) as f64)
        };
        let hub_cpu_ms = per_session(cpu0.0, hub.cpu_seconds());
        let point = CurvePoint {
            offered_per_s: rate,
            unlocked_per_s: s.ok as f64 / elapsed.max(1e-3),
            p50_ms: h.total.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.total.value_at_quantile(0.99) as f64 / 1000.0,
            refused: s.refused.values().sum::<u64>() + s.errors,
            orders_missing: (paid_before + s.ok).saturating_sub(paid as u64),
            hub_cpu_ms,
            // What the fleet costs the hub idle over the same time (its heartbeats) is not a
            // purchase's work; the gross figure is reported beside it.
            hub_cpu_net_ms: hub_cpu_ms
                .zip(idle)
                .map(|(ms, cores)| (ms - cores * step_s * 1000.0 / s.ok.max(1) as f64).max(0.0)),
            hub_signing_ms: per_session(signing0, hub.metric_sum(SIGNING_CPU).await.ok()),
            simulator_cpu_ms: per_session(cpu0.1, hub.simulator_cpu_seconds()),
        };
        paid_before = paid as u64;
        for (code, n) in &s.refused {
            r.note(format!("at {rate}/s: {n} sessions refused: {code}"));
        }
        eprintln!(
            "capacity: {rate}/s offered → {:.1}/s, unlock p50 {:.1} ms, p99 {:.1} ms, refused {}, missing {}, hub CPU {:?} ms/session ({:?} net of the idle fleet, {:?} of it signing)",
            point.unlocked_per_s, point.p50_ms, point.p99_ms, point.refused, point.orders_missing, point.hub_cpu_ms, point.hub_cpu_net_ms, point.hub_signing_ms
        );
        let within =
            point.p99_ms <= P99_TARGET_MS && point.refused == 0 && point.orders_missing == 0;
        r.curve.push(point.clone());
        if !within {
            break;
        }
        knee = Some(point);
    }
    fleet.shutdown().await;

    let k = knee.as_ref();
    r.fig(
        "knee_sessions_per_s",
        k.map_or(0.0, |p| p.offered_per_s),
        "sessions/s",
    );
    r.fig("knee_unlock_p50_ms", k.map_or(f64::NAN, |p| p.p50_ms), "ms");
    r.fig("knee_unlock_p99_ms", k.map_or(f64::NAN, |p| p.p99_ms), "ms");
    // The hub's own CPU per session, read at the busiest step within capacity: per-session
    // cost falls with load (fixed costs spread over more sessions), so the knee's is the one
    // that sets the capacity.
    if let Some(cpu) = k.and_then(|p| p.hub_cpu_ms) {
        r.fig("hub_cpu_ms_per_session", cpu, "ms");
        r.fig(
            "hub_sessions_per_s_per_2_cores",
            2000.0 / cpu.max(1e-3),
            "sessions/s",
        );
    }
    if let Some(cpu) = k.and_then(|p| p.hub_cpu_net_ms) {
        r.fig("hub_cpu_ms_per_session_net_of_fleet", cpu, "ms");
    }
    signing_figures(
        &mut r,
        k.and_then(|p| p.hub_cpu_ms),
        k.and_then(|p| p.hub_signing_ms),
    );
    if let Some(cpu) = k.and_then(|p| p.simulator_cpu_ms) {
        r.fig("simulator_cpu_ms_per_session", cpu, "ms");
    }
    if let Some(path) = svg {
        let title = format!(
            "Shopping rush, {cabinets} cabinets, {} s per step (p99 target {P99_TARGET_MS} ms)",
            step.as_secs()
        );
        std::fs::write(path, curve_svg(&r.curve, &title))?;
    }
    Ok(r)
}

/// The hub's counter of the CPU it spent signing its requests to the providers.
pub(crate) const SIGNING_CPU: &str = "payment_signing_cpu_seconds_total";

/// What the provider's mandated RSA signatures took of the hub's CPU a session, and the rest:
/// the signatures' price is set by the CPU (0.3 ms each with AVX-512 IFMA, over 1 ms on some
/// CPUs without it), the rest by the design, so a CPU figure read on one machine is
/// comparable with another's only apart from it.
pub(crate) fn signing_figures(r: &mut Report, cpu: Option<f64>, signing: Option<f64>) {
    if let Some(sign) = signing {
        r.fig("hub_signing_ms_per_session", sign, "ms");
        if let Some(cpu) = cpu {
            r.fig(
                "hub_cpu_ms_per_session_net_of_signing",
                (cpu - sign).max(0.0),
                "ms",
            );
        }
    }
}

/// How long the fleet is watched idle before the first step.
const IDLE_WATCH: Duration = Duration::from_secs(10);

/// The cores the hub spends on the connected fleet with no purchase under way (heartbeats,
/// sweeps), measured over [`IDLE_WATCH`] after it settles.
async fn fleet_idle_cores(hub: &crate::hub::Hub, r: &mut Report) -> Option<f64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = hub.cpu_seconds()?;
    let t0 = Instant::now();
    tokio::time::sleep(IDLE_WATCH).await;
    let cores = (hub.cpu_seconds()? - c0) / t0.elapsed().as_secs_f64();
    r.fig("hub_idle_fleet_cores", cores, "cores");
    Some(cores)
}
