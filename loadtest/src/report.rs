//! Results: figures with units and optional targets, printed for people and written as JSON.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A target given on the command line: `name<=value` or `name>=value`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Target {
    /// Figure name.
    pub figure: String,
    /// `<=` or `>=`.
    pub op: String,
    /// Bound.
    pub bound: f64,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        for op in ["<=", ">="] {
            if let Some((f, b)) = s.split_once(op) {
                let bound = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("{s}: the bound after {op} is not a number"))?;
                return Ok(Target {
                    figure: f.trim().to_owned(),
                    op: op.to_owned(),
                    bound,
                });
            }
        }
        Err(format!(
            "{s}: write a target as figure<=value or figure>=value"
        ))
    }
}

/// One measured figure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    /// Name (what a target refers to).
    pub name: String,
    /// Value.
    pub value: f64,
    /// Unit.
    pub unit: String,
}

/// A scenario's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Scenario.
    pub scenario: String,
    /// When it ran (Unix s).
    pub started_at: u64,
    /// The parameters it ran with.
    pub params: Value,
    /// The figures, in the order measured.
    pub figures: Vec<Figure>,
    /// The targets checked, with their outcome.
    pub targets: Vec<(Target, Option<bool>)>,
    /// What a reader should know.
    pub notes: Vec<String>,
    /// A curve measured step by step (capacity), shown as a table and plotted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
}

/// One step of a capacity curve: an offered session rate and what came of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Sessions a second offered (open loop).
    pub offered_per_s: f64,
    /// Sessions a second unlocked.
    pub unlocked_per_s: f64,
    /// Unlock latency, ms.
    pub p50_ms: f64,
    /// Unlock latency, ms.
    pub p99_ms: f64,
    /// Sessions refused or failed.
    pub refused: u64,
    /// Orders not paid.
    pub orders_missing: u64,
    /// The hub's CPU per unlocked session, ms.
    pub hub_cpu_ms: Option<f64>,
    /// The same less what the connected fleet costs it idle over the step, ms.
    #[serde(default)]
    pub hub_cpu_net_ms: Option<f64>,
    /// Of the hub's CPU, what signing its requests to the provider took, per unlocked session,
    /// ms: the price of the CPU's RSA, not of the design (read from the hub's
    /// `payment_signing_cpu_seconds_total`).
    #[serde(default)]
    pub hub_signing_ms: Option<f64>,
    /// The simulators' CPU per unlocked session, ms (when they run apart).
    pub simulator_cpu_ms: Option<f64>,
}

impl Report {
    /// An empty report.
    pub fn new(scenario: &str, params: Value) -> Self {
        Report {
            scenario: scenario.to_owned(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            params,
            figures: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            curve: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn fig(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
        });
    }

    /// Adds p50/p99/p999/max of a latency histogram recorded in microseconds, in ms.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        self.fig(&format!("{prefix}_p50_ms"), ms(0.5), "ms");
        self.fig(&format!("{prefix}_p99_ms"), ms(0.99), "ms");
        self.fig(&format!("{prefix}_p999_ms"), ms(0.999), "ms");
        self.fig(&format!("{prefix}_max_ms"), h.max() as f64 / 1000.0, "ms");
        self.fig(&format!("{prefix}_samples"), h.len() as f64, "");
    }

    /// A note.
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// The value of a figure.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// Checks the targets; a target naming no figure fails.
    pub fn check(&mut self, targets: &[Target]) -> bool {
        self.targets = targets
            .iter()
            .map(|t| {
                let pass = self.value(&t.figure).map(|v| match t.op.as_str() {
                    "<=" => v <= t.bound,
                    _ => v >= t.bound,
                });
                (t.clone(), pass)
            })
            .collect();
        self.targets.iter().all(|(_, p)| *p == Some(true))
    }

    /// For people.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== {} {}", self.scenario, self.params);
        for f in &self.figures {
            let _ = writeln!(s, "  {:<34} {:>14} {}", f.name, fmt_value(f.value), f.unit);
        }
        for (t, pass) in &self.targets {
            let verdict = match pass {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "MISSED (no such figure)",
            };
            let _ = writeln!(s, "  target {} {} {}: {verdict}", t.figure, t.op, t.bound);
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

/// How the report names a scenario's run: by its scenario, and by its length as well when the
/// report holds the same scenario more than once (the suite's short soak beside a long one).
fn label(r: &Report, all: &[Report]) -> String {
    let same = all.iter().filter(|o| o.scenario == r.scenario).count();
    // Ingest runs differ by how they send (issue 18): mode and client name them.
    if let Some(mode) = r.params.get("mode").and_then(Value::as_str) {
        let client = r
            .params
            .get("client")
            .and_then(Value::as_str)
            .unwrap_or("Own");
        return match r.params.get("publishers").and_then(Value::as_f64) {
            Some(p) => format!(
                "{} ({mode}, {client}, {} publishers)",
                r.scenario,
                fmt_value(p)
            ),
            None => format!("{} ({mode}, {client})", r.scenario),
        };
    }
    match r.params.get("duration_s").and_then(Value::as_f64) {
        Some(d) if same > 1 && d >= 60.0 => format!("{} ({} min)", r.scenario, fmt_value(d / 60.0)),
        Some(d) if same > 1 => format!("{} ({} s)", r.scenario, fmt_value(d)),
        _ => r.scenario.clone(),
    }
}

/// A number as a person reads it.
pub fn fmt_value(v: f64) -> String {
    if (v.fract() == 0.0 && v.abs() < 1e15) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A histogram for latencies in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem}, Linux {}; hub and simulator on the same machine, over loopback",
        kernel.trim()
    )
}

/// Criterion's medians under `dir` (target/criterion): `(group/bench, median ns)`.
fn criterion_medians(dir: &std::path::Path) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let Ok(groups) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut groups: Vec<_> = groups.flatten().map(|e| e.path()).collect();
    groups.sort();
    for g in groups {
        let Ok(benches) = std::fs::read_dir(&g) else {
            continue;
        };
        let mut benches: Vec<_> = benches.flatten().map(|e| e.path()).collect();
        benches.sort();
        for b in benches {
            let est = b.join("new/estimates.json");
            let median = std::fs::read_to_string(&est)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["median"]["point_estimate"].as_f64());
            if let (Some(m), Some(gn), Some(bn)) = (
                median,
                g.file_name().and_then(|n| n.to_str()),
                b.file_name().and_then(|n| n.to_str()),
            ) {
                out.push((format!("{gn}/{bn}"), m));
            }
        }
    }
    out
}

/// The whole of docs/benchmarks.md from JSON reports (and criterion's results, when given).
pub fn markdown(
    files: &[std::path::PathBuf],
    criterion: Option<&std::path::Path>,
    notes: &[String],
) -> anyhow::Result<String> {
    let mut reports = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let r: Report =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        reports.push(r);
    }
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `scripts/bench` (which runs `cabinet-loadtest` and then `cabinet-loadtest report`); \
         do not edit by hand. Every comparison (hub vs Mosquitto, unlock vs the bare MQTT round trip) \
         is measured in the same run, because absolute times on a shared 2-core machine drift.\n"
    );
    let _ = writeln!(s, "**Machine**: {}.\n", machine());
    let _ = writeln!(
        s,
        "**Reproduce**: `scripts/bench` (the standard suite, ≈ 15 min here: 15 min 22 s on 2026-11-22, an incremental build included) or `scripts/bench --soak-minutes 30`; \
         one scenario: `target/release/cabinet-loadtest <scenario> --help`. The hot paths: `cargo bench -p cabinet-actors`.\n"
    );
    for n in notes {
        let _ = writeln!(s, "{n}\n");
    }
    let _ = writeln!(
        s,
        "Why the missed targets are missed, what was fixed on the way and what limits the rest: \
         `docs/architecture.md`, \"Under load\".\n"
    );
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(
        s,
        "| scenario | figure | target | measured | |\n| --- | --- | --- | --- | --- |"
    );
    for r in &reports {
        for (t, pass) in &r.targets {
            let v = r
                .value(&t.figure)
                .map(fmt_value)
                .unwrap_or_else(|| "–".into());
            let verdict = match pass {
                Some(true) => "met",
                _ => "**missed**",
            };
            let _ = writeln!(
                s,
                "| {} | `{}` | {} {} | {v} | {verdict} |",
                label(r, &reports),
                t.figure,
                t.op,
                fmt_value(t.bound)
            );
        }
    }
    if let Some(dir) = criterion {
        let medians = criterion_medians(dir);
        if !medians.is_empty() {
            let _ = writeln!(s, "\n## Hot paths (`cargo bench -p cabinet-actors`)\n");
            let _ = writeln!(
                s,
                "Criterion medians; each group has a baseline measured in the same run (untyped JSON \
                 parsing, parsing alone, a basket without promotions).\n"
            );
            let _ = writeln!(s, "| benchmark | median |\n| --- | ---: |");
            for (name, ns) in medians {
                let _ = writeln!(s, "| `{name}` | {} ns |", fmt_value(ns));
            }
        }
    }
    let storms: Vec<&Report> = reports
        .iter()
        .filter(|r| r.scenario == "connect-storm")
        .collect();
    if storms.len() > 1 {
        let _ = writeln!(s, "\n## Connect storms by size\n");
        let _ = writeln!(
            s,
            "The same storm at several sizes in the same run: linear growth keeps the time per \
             cabinet constant.\n"
        );
        let _ = writeln!(
            s,
            "| cabinets | all online | per 1,000 cabinets | reconnects |\n| ---: | ---: | ---: | ---: |"
        );
        for r in storms {
            let n = r.params["cabinets"].as_f64().unwrap_or(0.0);
            let t = r.value("all_online_s").unwrap_or(f64::NAN);
            let retries = r.value("connect_retries").unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "| {} | {} s | {} s | {} |",
                fmt_value(n),
                fmt_value(t),
                fmt_value(t / n.max(1.0) * 1000.0),
                fmt_value(retries)
            );
        }
    }
    let _ = writeln!(s, "\n## Results\n");
    for r in &reports {
        let _ = writeln!(s, "### {}\n", label(r, &reports));
        let _ = writeln!(s, "Parameters: `{}`.\n", r.params);
        let _ = writeln!(s, "| figure | value | unit |\n| --- | ---: | --- |");
        for f in &r.figures {
            let _ = writeln!(s, "| `{}` | {} | {} |", f.name, fmt_value(f.value), f.unit);
        }
        if !r.notes.is_empty() {
            let _ = writeln!(s);
            for n in &r.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        if !r.curve.is_empty() {
            let _ = writeln!(s, "\n{}", curve_table(&r.curve));
            if let Some(svg) = r.params.get("svg").and_then(Value::as_str) {
                let name = std::path::Path::new(svg)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(svg);
                let _ = writeln!(s, "![unlock latency against offered sessions]({name})");
            }
        }
        let _ = writeln!(s);
    }
    Ok(s)
}

/// The curve as a Markdown table.
pub fn curve_table(curve: &[CurvePoint]) -> String {
    let opt = |v: Option<f64>| v.map(fmt_value).unwrap_or_else(|| "–".into());
    let mut s = String::from(
        "| offered sessions/s | unlocked/s | unlock p50 ms | unlock p99 ms | refused | orders missing | hub CPU ms/session | net of the idle fleet | of it signing | simulator CPU ms/session |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for p in curve {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_value(p.offered_per_s),
            fmt_value(p.unlocked_per_s),
            fmt_value(p.p50_ms),
            fmt_value(p.p99_ms),
            p.refused,
            p.orders_missing,
            opt(p.hub_cpu_ms),
            opt(p.hub_cpu_net_ms),
            opt(p.hub_signing_ms),
            opt(p.simulator_cpu_ms)
        );
    }
    s
}

/// The curve as an SVG plot: unlock p50 and p99 (log scale) against offered sessions a second,
/// with the 50 ms target drawn across.
pub fn curve_svg(curve: &[CurvePoint], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let max_x = curve
        .iter()
        .map(|p| p.offered_per_s)
        .fold(1.0_f64, f64::max)
        * 1.05;
    let (min_ms, max_ms) = (
        1.0_f64,
        curve.iter().map(|p| p.p99_ms).fold(100.0_f64, f64::max) * 1.5,
    );
    let x = |v: f64| left + (w - left - right) * v / max_x;
    let y = |ms: f64| {
        let t = (ms.max(min_ms).ln() - min_ms.ln()) / (max_ms.ln() - min_ms.ln());
        top + (h - top - bottom) * (1.0 - t)
    };
    let line = |f: &dyn Fn(&CurvePoint) -> f64| {
        curve
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.offered_per_s), y(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">{title}</text>\n"
    );
    // Axes, ticks and the target.
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    let mut ms = 1.0;
    while ms <= max_ms {
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{:.1}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 5.0,
            y(ms),
            y(ms),
            left - 8.0,
            y(ms) + 4.0,
            fmt_value(ms)
        );
        ms *= 10.0;
    }
    for p in curve {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(p.offered_per_s),
            h - bottom + 18.0,
            fmt_value(p.offered_per_s)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">offered sessions per second</text><text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">unlock latency, ms (log)</text>",
        (left + w - right) / 2.0,
        h - 12.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-dasharray=\"6 4\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#c00\" text-anchor=\"end\">p99 target 50 ms</text>",
        y(50.0),
        w - right,
        y(50.0),
        w - right,
        y(50.0) - 5.0
    );
    // p99 labelled above its line, p50 below, so that close lines keep legible labels.
    for (name, colour, dy, f) in [
        (
            "p50",
            "#1f77b4",
            16.0,
            (&|p: &CurvePoint| p.p50_ms) as &dyn Fn(&CurvePoint) -> f64,
        ),
        ("p99", "#ff7f0e", -8.0, &|p: &CurvePoint| p.p99_ms),
    ] {
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            line(f)
        );
        for p in curve {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                x(p.offered_per_s),
                y(f(p))
            );
        }
        if let Some(last) = curve.last() {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{name}</text>",
                x(last.offered_per_s) - 24.0,
                y(f(last)) + dy
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_check() {
        let mut r = Report::new("x", Value::Null);
        r.fig("a_ms", 40.0, "ms");
        r.fig("rate", 100.0, "/s");
        let ok: Vec<Target> = ["a_ms<=50", "rate >= 90"]
            .iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert!(r.check(&ok));
        let missed: Target = "a_ms<=30".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.check(&[missed]));
        let unknown: Target = "nope<=1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.check(&[unknown]), "a target naming no figure fails");
        assert!("a_ms=3".parse::<Target>().is_err());
    }

    #[test]
    fn a_scenario_run_twice_is_told_apart_by_its_length() {
        let short = Report::new("soak", serde_json::json!({"duration_s": 180}));
        let long = Report::new("soak", serde_json::json!({"duration_s": 1800}));
        let storm = Report::new("connect-storm", serde_json::json!({"cabinets": 10}));
        let all = vec![short.clone(), long.clone(), storm.clone()];
        assert_eq!(label(&short, &all), "soak (3 min)");
        assert_eq!(label(&long, &all), "soak (30 min)");
        assert_eq!(label(&storm, &all), "connect-storm");
        assert_eq!(label(&short, &all[..1]), "soak", "alone, no length");
    }
}
