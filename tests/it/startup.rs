//! The binary's start-up and shutdown, as an operator sees them.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::free_port;

/// How long a start (or a graceful stop) may take on a busy 2-core machine, as for the other
/// tests of the binary (tests/it/node.rs).
const STARTS_WITHIN: Duration = Duration::from_secs(60);

fn hub(data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cabinet-hub"));
    c.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .env_remove("HUB_ENV")
        .env("HUB__LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run_to_exit(mut c: Command) -> (i32, String) {
    let out = c.output().unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ports(c: &mut Command) -> (u16, u16) {
    let (h, m) = (free_port(), free_port());
    c.arg("--http-listen")
        .arg(format!("127.0.0.1:{h}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{m}"));
    (h, m)
}

#[test]
fn a_taken_http_port_names_the_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = taken.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut c = hub(dir.path());
    c.arg("--http-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("http.listen") && err.contains("HUB__HTTP__LISTEN"),
        "{err}"
    );
}

#[test]
fn a_taken_mqtt_port_names_the_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = taken.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut c = hub(dir.path());
    c.arg("--http-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{port}"));
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("mqtt.listen") && err.contains("HUB__MQTT__LISTEN"),
        "{err}"
    );
}

#[test]
fn a_bad_database_url_names_the_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = hub(dir.path());
    ports(&mut c);
    c.env("HUB__DATABASE__URL", "mysql://nobody@nowhere/db");
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("database.url") && err.contains("HUB__DATABASE__URL"),
        "{err}"
    );
    let mut c = hub(dir.path());
    ports(&mut c);
    c.env("HUB__DATABASE__URL", "not a url");
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(err.contains("database.url"), "{err}");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = hub(dir.path());
    ports(&mut c);
    c.env("HUB__HTTP__LISTNE", "127.0.0.1:1");
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(err.contains("listne"), "{err}");
    let mut c = hub(dir.path());
    ports(&mut c);
    c.env("HUB__CABINET__LATCH_TIMEOUT", "5");
    let (code, err) = run_to_exit(c);
    assert_ne!(code, 0);
    assert!(err.contains("latch_timeout"), "{err}");
}

fn wait_healthy(child: &mut Child, http: u16) {
    let start = Instant::now();
    loop {
        // A real answer from /healthz, not just a bound socket: the signal handlers are in
        // place only once the server runs.
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", http)) {
            use std::io::Write;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let _ =
                conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = conn.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("hub exited early ({status}): {err}");
        }
        assert!(start.elapsed() < STARTS_WITHIN, "hub did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child) -> i32 {
    let pid = child.id().to_string();
    let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < STARTS_WITHIN,
            "hub did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn embedded_defaults_print_the_admin_key_once_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = hub(dir.path());
    let (http, _) = ports(&mut c);
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
    wait_healthy(&mut child, http);
    assert_eq!(terminate(&mut child), 0, "graceful stop exits 0");
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    assert!(
        out.contains("chk_"),
        "first start prints the admin key: {out}"
    );
    assert!(
        dir.path().join("hub.db").exists(),
        "SQLite file in the data dir"
    );
    assert!(
        dir.path().join("ca/device-ca.pem").exists(),
        "device CA in the data dir"
    );

    let mut c = hub(dir.path());
    let (http, _) = ports(&mut c);
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
    wait_healthy(&mut child, http);
    assert_eq!(terminate(&mut child), 0);
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    assert!(!out.contains("chk_"), "the key is printed only once: {out}");
}
