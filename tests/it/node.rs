//! The real binary (`cabinet-hub serve`) on free ports with its own data directory, as an
//! operator runs it: configured by environment, killed and restarted on the same data. Its
//! stderr is read continuously (a full pipe would stall the hub) and kept for the test to search.

use std::io::Read;
use std::net::SocketAddr;
use std::ops::Deref;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{free_port, TestHub, ADMIN_KEY};

/// How long a start may take on a busy 2-core machine.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What to start: environment on top of the test defaults, and the listen addresses.
#[derive(Clone, Default)]
pub struct Spec {
    env: Vec<(String, String)>,
    http_listen: Option<String>,
    tls: bool,
}

impl Spec {
    pub fn new() -> Self {
        Self::default()
    }

    /// `HUB__…` (or any) variable; a later value of the same name wins.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    /// `--http-listen` (default `127.0.0.1:<free port>`).
    pub fn http_listen(mut self, addr: &str) -> Self {
        self.http_listen = Some(addr.to_owned());
        self
    }

    /// Certificate mode on a free port (`HUB__MQTT__TLS_LISTEN`).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Starts the hub and waits until it is ready; panics with its stderr when it exits. The
    /// ports `launch` picks are free when picked, but another process (a second copy of the
    /// suite, or any outgoing connection's local port) may take one before the hub binds it, or
    /// a starved broker thread may not listen within the hub's start-up wait: such a start is
    /// made again with fresh ports and a fresh directory, at most twice.
    pub async fn start(self) -> Node {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.clone().launch().await {
                Launched::Ready(n) => return *n,
                Launched::Exited { stderr, .. }
                    if tries < 3 && self.http_listen.is_none() && listen_failed(&stderr) => {}
                Launched::Exited { code, stderr } => panic!("hub exited ({code}): {stderr}"),
            }
        }
    }

    /// Starts the hub: ready, or the exit code and stderr of a refused start.
    pub async fn launch(self) -> Launched {
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let http_port = free_port();
        let http = self
            .http_listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{http_port}"));
        // Readiness and the API are asked on loopback, whatever address the hub listens on.
        let port = http
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(http_port);
        let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let tls = self
            .tls
            .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let log = Arc::new(Mutex::new(String::new()));
        let mut node = Node {
            child: None,
            spec: self,
            http,
            mqtt,
            tls,
            data,
            log,
            api: TestHub::attach(SocketAddr::from(([127, 0, 0, 1], port)), mqtt, tls),
        };
        node.spawn();
        match node.wait_ready().await {
            Ok(()) => Launched::Ready(Box::new(node)),
            Err(code) => Launched::Exited {
                code,
                stderr: node.stderr(),
            },
        }
    }
}

/// Whether a refused start was about one of the listen addresses `Spec::launch` picks.
fn listen_failed(stderr: &str) -> bool {
    [
        "HUB__HTTP__LISTEN",
        "HUB__MQTT__LISTEN",
        "HUB__MQTT__TLS_LISTEN",
    ]
    .iter()
    .any(|key| {
        stderr.lines().any(|l| {
            l.contains(&format!("({key})"))
                && (l.contains("cannot listen there") || l.contains("did not start listening"))
        })
    })
}

pub enum Launched {
    Ready(Box<Node>),
    Exited { code: i32, stderr: String },
}

/// A running hub process. Derefs to the harness's API client, so `merchant`, `cabinet`,
/// `Cabinet::connect(&node, …)` work as for the in-process hub.
pub struct Node {
    child: Option<Child>,
    spec: Spec,
    http: String,
    mqtt: SocketAddr,
    tls: Option<SocketAddr>,
    data: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    api: TestHub,
}

impl Deref for Node {
    type Target = TestHub;

    fn deref(&self) -> &TestHub {
        &self.api
    }
}

/// A failed assertion must not leave the hub running after the test.
impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the binary with the test defaults under `env` (which win). `CABINET_HUB_BIN` names
/// another build to run instead: the build directory is shared by several work trees, and a
/// binary built from one tree can be set aside and run while another tree builds.
pub fn command(env: &[(String, String)]) -> Command {
    let bin = std::env::var_os("CABINET_HUB_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cabinet-hub").into());
    let mut c = Command::new(bin);
    c.env_remove("HUB_ENV")
        .env("HUB__AUTH__ADMIN_KEY", ADMIN_KEY)
        .env("HUB__LOG__LEVEL", "warn")
        .env("HUB__HTTP__WORKERS", "1")
        .env("HUB__ACTORS__THREADS", "2")
        // As in the in-process hub (harness::test_settings): a test's cabinet that acks or
        // latches on a loaded machine is never taken for a silent one.
        .env("HUB__CABINET__UNLOCK_ACK_TIMEOUT_MS", "60000")
        .env("HUB__CABINET__COMMAND_ACK_TIMEOUT_MS", "60000")
        .env("HUB__CABINET__LATCH_TIMEOUT_MS", "60000")
        // A free first year, set explicitly: the default has none.
        .env("HUB__CABINET__INITIAL_SERVICE_DAYS", "365");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

impl Node {
    fn spawn(&mut self) {
        let mut c = command(&self.spec.env);
        c.arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--http-listen")
            .arg(&self.http)
            .arg("--mqtt-listen")
            .arg(self.mqtt.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(tls) = self.tls {
            c.env("HUB__MQTT__TLS_LISTEN", tls.to_string());
        }
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
        if let Some(mut err) = child.stderr.take() {
            let log = self.log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        self.child = Some(child);
    }

    /// Ok once `/readyz` answers 200; Err(exit code) when the process ends first.
    async fn wait_ready(&mut self) -> Result<(), i32> {
        let start = Instant::now();
        let url = self.url("/readyz");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                // Let the reader thread take the last of stderr.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Err(status.code().unwrap_or(-1));
            }
            if self
                .client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            assert!(
                start.elapsed() < READY_WITHIN,
                "hub not ready within {READY_WITHIN:?}: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the process (and its earlier runs) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Its data directory (database, device CA, the simulators' journals).
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }

    pub fn tls_addr(&self) -> SocketAddr {
        self.tls
            .unwrap_or_else(|| panic!("started without Spec::tls"))
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the graceful stop (SIGKILL after a generous while).
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        while matches!(c.try_wait(), Ok(None)) && start.elapsed() < READY_WITHIN {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The same configuration, ports and data directory again.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(code) = self.wait_ready().await {
            panic!("hub exited on restart ({code}): {}", self.stderr());
        }
    }
}
