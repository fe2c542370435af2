//! The hub under test: a `cabinet-hub serve` child process on free loopback ports with a fresh
//! data directory (or an external hub), its HTTP API, its metrics and its resource use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A running hub.
pub struct Hub {
    /// HTTP address.
    pub http: SocketAddr,
    /// Password-mode MQTT address.
    pub mqtt: SocketAddr,
    /// The platform admin key.
    pub admin_key: String,
    client: reqwest::Client,
    child: Option<tokio::process::Child>,
    _data: Option<tempfile::TempDir>,
    /// The payment simulators' own process (`cabinet-hub simulate`), when they run apart.
    sim: Option<(tokio::process::Child, tempfile::TempDir)>,
}

/// Runs in the child between fork and exec: it must not outlive this tool, however it ends (a
/// panic, a kill, Ctrl-C).
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl with PR_SET_PDEATHSIG is async-signal-safe and touches no memory of the
    // parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// `bin simulate` on a free loopback port with `env` (the `[payments]` simulator settings);
/// returns once it answers `/healthz`.
pub(crate) async fn spawn_simulator(
    bin: &Path,
    env: &[(String, String)],
) -> Result<(tokio::process::Child, tempfile::TempDir, SocketAddr)> {
    let data = tempfile::tempdir()?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("simulate")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data.path())
        .env("HUB__LOG__LEVEL", "warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} simulate", bin.display()))?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await {
            if r.status().is_success() {
                return Ok((child, data, addr));
            }
        }
        if Instant::now() > deadline {
            bail!("the payment simulators did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the hub binary is: beside this one (both are built into the same target directory).
pub fn default_hub_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("cabinet-hub")))
        .unwrap_or_else(|| PathBuf::from("cabinet-hub"))
}

/// The started hub's log: beside the other temporary files, kept after the run for a post-mortem
/// (`cabinet-loadtest-hub.log`, or `cabinet-loadtest-hub-<name>.log` for a cluster's nodes).
fn log_file(name: Option<&str>) -> Result<std::process::Stdio> {
    let file = match name {
        Some(n) => format!("cabinet-loadtest-hub-{n}.log"),
        None => "cabinet-loadtest-hub.log".to_owned(),
    };
    let path = std::env::temp_dir().join(file);
    let f = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    Ok(f.into())
}

/// A free TCP port below the ephemeral range (32768–60999): a port the kernel hands out for
/// outgoing connections may be taken again by the fleet's own sockets between this check and the
/// hub's bind, which a port from outside the range cannot be.
pub fn free_port() -> Result<u16> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    for i in 0..2_000u32 {
        let port = 20_000 + ((seed / 7 + i * 7_919) % 12_000) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port between 20000 and 32000")
}

/// One cabinet of the fleet.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FleetCabinet {
    /// Id.
    pub id: String,
    /// MQTT secret.
    pub secret: String,
}

impl Hub {
    /// Starts `bin` on free ports with a fresh SQLite data dir; `env` adds settings
    /// (`HUB__…`). With `sim_apart` the payment simulators run in a process of their own (as the
    /// providers' servers do in the field), else inside the hub. Returns once `/readyz` answers
    /// 200.
    pub async fn spawn(bin: &Path, env: &[(String, String)], sim_apart: bool) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "{}: no hub binary there; build it (cargo build --release) or pass --hub-bin",
                bin.display()
            );
        }
        let sim = if sim_apart {
            Some(spawn_simulator(bin, env).await?)
        } else {
            None
        };
        Self::launch(bin, env, sim, None).await
    }

    /// One node of a cluster: as `spawn`, using the simulators at `sim` (shared by the nodes, as
    /// the providers' servers are) and logging to `cabinet-loadtest-hub-<name>.log`; `env`
    /// names the shared database and Redis.
    pub async fn spawn_node(
        bin: &Path,
        env: &[(String, String)],
        sim: SocketAddr,
        name: &str,
    ) -> Result<Self> {
        let mut env = env.to_vec();
        env.push((
            "HUB__PAYMENTS__SIMULATOR_URL".into(),
            format!("http://{sim}"),
        ));
        env.push(("HUB__NODE__ID".into(), name.to_owned()));
        Self::launch(bin, &env, None, Some(name)).await
    }

    async fn launch(
        bin: &Path,
        env: &[(String, String)],
        sim: Option<(tokio::process::Child, tempfile::TempDir, SocketAddr)>,
        log: Option<&str>,
    ) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        // The broker listens on every loopback address so the fleet can spread its
        // connections over several source addresses.
        let mqtt_port = free_port()?;
        let admin_key = "chk_loadtest_admin_0123456789abcdef".to_owned();
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("serve")
            .env("HUB__HTTP__LISTEN", http.to_string())
            .env("HUB__MQTT__LISTEN", format!("0.0.0.0:{mqtt_port}"))
            .env("HUB__DATA_DIR", data.path())
            .env("HUB__AUTH__ADMIN_KEY", &admin_key)
            .env("HUB__LOG__LEVEL", "warn")
            .env("HUB__MQTT__MAX_CONNECTIONS", "60000")
            // The fleet sells from activation: a free first year, set explicitly (the hub's
            // default has none; service time is bought).
            .env("HUB__CABINET__INITIAL_SERVICE_DAYS", "365")
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(log_file(log)?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some((_, _, addr)) = &sim {
            cmd.env("HUB__PAYMENTS__SIMULATOR_URL", format!("http://{addr}"));
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let hub = Hub {
            http,
            mqtt: format!("127.0.0.1:{mqtt_port}").parse()?,
            admin_key,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(60))
                .build()?,
            child: Some(child),
            _data: Some(data),
            sim: sim.map(|(c, d, _)| (c, d)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = hub.client.get(hub.url("/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(hub);
                }
            }
            if Instant::now() > deadline {
                bail!("the hub did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An already running hub.
    pub fn external(http: SocketAddr, mqtt: SocketAddr, admin_key: String) -> Result<Self> {
        Ok(Hub {
            http,
            mqtt,
            admin_key,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(60))
                .build()?,
            child: None,
            _data: None,
            sim: None,
        })
    }

    /// `kill -9` of the hub this tool started: a node dying.
    pub fn kill9(&mut self) -> Result<()> {
        match self.child.as_mut() {
            Some(c) => Ok(c.start_kill()?),
            None => bail!("not started by this tool"),
        }
    }

    /// The hub's process id when this tool started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// `http://…{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// One `GET /healthz` over the same client as every call: the cheapest answer the hub
    /// gives, i.e. the bare HTTP round trip. Fails on anything but 200.
    pub async fn healthz(&self) -> Result<()> {
        let r = self.client.get(self.url("/healthz")).send().await?;
        let s = r.status().as_u16();
        r.bytes().await?;
        if s != 200 {
            bail!("GET /healthz: {s}");
        }
        Ok(())
    }

    /// A JSON call; returns status and body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let (s, v, _) = self.call_timed(method, path, key, None, body).await?;
        Ok((s, v))
    }

    /// As `call`, with the answer's `Server-Timing` header (where the hub spent the time).
    pub async fn call_timed(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        idempotency_key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value, Option<String>)> {
        let mut rb = self.client.request(method, self.url(path)).bearer_auth(key);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await?;
        let s = r.status().as_u16();
        let timing = r
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((s, r.json().await.unwrap_or(Value::Null), timing))
    }

    /// Follows a session answered 202 with `?wait_s=&until=open` long polls until its door is
    /// open or it ended, as a shopper's mini-program waits for the door; answers its state then
    /// and its view.
    pub async fn follow_session(&self, key: &str, answer: &Value) -> Result<(String, Value)> {
        let id = answer["session"]["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("202 without a session: {answer}"))?;
        let path = format!("/api/v1/sessions/{id}?wait_s=30&until=open");
        let mut state = String::new();
        for _ in 0..20 {
            let (s, v) = self.call(reqwest::Method::GET, &path, key, None).await?;
            if s != 200 {
                bail!("GET {path}: {s} {v}");
            }
            state = v["session"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !matches!(state.as_str(), "confirming" | "unlocking") {
                return Ok((state, v));
            }
        }
        bail!("session {id} still {state} after 20 long polls")
    }

    async fn expect(&self, path: &str, key: &str, body: Value, want: u16) -> Result<Value> {
        let (s, v) = self
            .call(reqwest::Method::POST, path, key, Some(body))
            .await?;
        if s != want {
            bail!("POST {path}: {s} {v}");
        }
        Ok(v)
    }

    /// A merchant with an operator key; returns (merchant_admin key, operator key).
    pub async fn merchant(&self, id: &str) -> Result<(String, String)> {
        self.expect(
            "/api/v1/merchants",
            &self.admin_key,
            json!({"id": id, "name": format!("Loadtest {id}"), "commission_bps": 500}),
            201,
        )
        .await?;
        let admin = self
            .expect(
                "/api/v1/api-keys",
                &self.admin_key,
                json!({"merchant_id": id, "role": "merchant_admin"}),
                201,
            )
            .await?;
        let admin = admin["key"].as_str().unwrap_or_default().to_owned();
        let op = self
            .expect(
                "/api/v1/api-keys",
                &admin,
                json!({"merchant_id": id, "role": "operator"}),
                201,
            )
            .await?;
        Ok((admin, op["key"].as_str().unwrap_or_default().to_owned()))
    }

    /// Registers and activates `n` cabinets `{prefix}{i:06}` (32 requests in flight).
    pub async fn register_fleet(
        &self,
        merchant: &str,
        admin: &str,
        prefix: &str,
        n: usize,
    ) -> Result<Vec<FleetCabinet>> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        stream::iter(0..n)
            .map(|i| async move {
                let id = format!("{prefix}{i:06}");
                let v = self
                    .expect(
                        "/api/v1/cabinets",
                        admin,
                        json!({"id": id, "merchant_id": merchant, "model": "KM-400",
                               "point": format!("Loadtest point {}", i / 50)}),
                        201,
                    )
                    .await?;
                let secret = v["secret"].as_str().unwrap_or_default().to_owned();
                self.expect(
                    &format!("/api/v1/cabinets/{id}/activate"),
                    admin,
                    json!({}),
                    200,
                )
                .await?;
                Ok::<_, anyhow::Error>(FleetCabinet { id, secret })
            })
            .buffered(32)
            .try_collect()
            .await
    }

    /// The Prometheus text. Retried: a pooled connection the hub closed under load is not a
    /// failure of the run.
    pub async fn metrics(&self) -> Result<String> {
        let mut last = None;
        for _ in 0..5 {
            match self.client.get(self.url("/metrics")).send().await {
                Ok(r) => match r.text().await {
                    Ok(t) => return Ok(t),
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("metrics")))
    }

    /// The sum of every series of a metric (all label sets).
    pub async fn metric_sum(&self, name: &str) -> Result<f64> {
        Ok(metric_sum(&self.metrics().await?, name))
    }

    /// Resident memory of the hub process in bytes (Linux).
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// CPU time used by the hub process so far, in seconds (Linux).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.pid()?)
    }

    /// CPU time used by the simulators' own process so far, when they run apart.
    pub fn simulator_cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.sim.as_ref()?.0.id()?)
    }
}

/// CPU time a process used so far, in seconds (Linux).
fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture this runs on.
    100.0
}

/// Sums `name` over its label sets in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_label_sets_only_of_the_named_metric() {
        let t = "a_total{k=\"x\"} 2\na_total{k=\"y\"} 3\na_total_other 7\n# HELP a_total x\na_total 1\n";
        assert_eq!(super::metric_sum(t, "a_total"), 6.0);
    }
}
