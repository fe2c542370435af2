use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cabinet_hub::config::{Overrides, Settings};
use cabinet_hub::{telemetry, Application};

/// The realtime hub for smart open-door vending cabinets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a hub node.
    Serve {
        /// A TOML file layered over the embedded defaults (else config/$HUB_ENV.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// HTTP and WebSocket address (http.listen).
        #[arg(long)]
        http_listen: Option<String>,
        /// Password-mode MQTT address (mqtt.listen).
        #[arg(long)]
        mqtt_listen: Option<String>,
        /// Data directory (data_dir).
        #[arg(long)]
        data_dir: Option<String>,
        /// sqlite://… or postgres://… (database.url).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Print the OpenAPI document of this build's HTTP API and exit (also served at
    /// `GET /api/openapi.json`).
    Openapi,
    /// Serve the payment providers' simulators (WeChat Pay Score, Alipay) in a process of their
    /// own, for hubs started with `HUB__PAYMENTS__SIMULATOR_URL`: the providers' side only (no
    /// control routes), with the development keys and the `[payments]` simulator settings.
    #[cfg(feature = "simulators")]
    Simulate {
        /// As for serve.
        #[arg(long)]
        config: Option<PathBuf>,
        /// HTTP address; loopback unless `payments.simulator_public`.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// Where the simulators keep their journal (data_dir).
        #[arg(long)]
        data_dir: Option<String>,
    },
    /// Print the effective configuration (every secret as "<redacted>") and exit.
    CheckConfig {
        /// As for serve.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Every cabinet is a socket: raise the soft descriptor limit to the hard one (the usual soft
/// default of 1,024 would refuse the 1,025th cabinet), and say so when even that is too low.
fn raise_fd_limit(max_connections: usize) {
    let want = max_connections as u64 + 1_024;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => tracing::warn!(
            limit = got,
            wanted = want,
            "open-file limit below mqtt.max_connections plus headroom; raise the hard limit (ulimit -Hn, LimitNOFILE=)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Whatever the node writes is its own: the data dir, the database and its journals, keys.
/// The files that matter get explicit modes too (`cabinet_hub::private`); this covers the rest
/// (SQLite's temporary files, a file some later version adds).
fn private_umask() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's file-mode mask; it takes no pointers.
    unsafe {
        libc::umask(0o077);
    }
}

/// glibc's malloc serves only C code here (SQLite; Rust allocates through jemalloc). Left to
/// itself it gives each SQLite worker thread an arena of its own, and each arena keeps what a
/// connection's page cache once held: over a 30-minute soak nine arenas of ~2.4 MB each held
/// 0.3 MB in use (issue 18). One arena shares the freed memory between the connections.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Settings loaded (a bad one is exit code 2, said on stderr), logging on, files private.
fn start(config: Option<&std::path::Path>, overrides: &Overrides) -> Result<Settings, ExitCode> {
    let settings = Settings::load(config, overrides).map_err(|e| {
        eprintln!("cabinet-hub: {e:#}");
        ExitCode::from(2)
    })?;
    telemetry::init(&settings.log);
    private_umask();
    Ok(settings)
}

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve {
            config,
            http_listen,
            mqtt_listen,
            data_dir,
            database_url,
        } => {
            let overrides = Overrides {
                http_listen,
                mqtt_listen,
                data_dir,
                database_url,
            };
            let settings = match start(config.as_deref(), &overrides) {
                Ok(s) => s,
                Err(code) => return code,
            };
            raise_fd_limit(settings.mqtt.max_connections);
            let result = actix_web::rt::System::new().block_on(async move {
                let app = Application::build(settings).await?;
                app.run_until_stopped().await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cabinet-hub: {e:#}");
                    tracing::error!(error = %format!("{e:#}"), "start-up failed");
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "simulators")]
        Cmd::Simulate {
            config,
            listen,
            data_dir,
        } => {
            let overrides = Overrides {
                data_dir,
                ..Overrides::default()
            };
            let settings = match start(config.as_deref(), &overrides) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match actix_web::rt::System::new()
                .block_on(cabinet_hub::simulators::serve(settings, listen))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cabinet-hub: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Openapi => match cabinet_hub::http::openapi().to_pretty_json() {
            Ok(doc) => {
                println!("{doc}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cabinet-hub: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::CheckConfig { config } => {
            match Settings::load_with_view(config.as_deref(), &Overrides::default()) {
                Ok((_, view)) => match serde_json::to_string_pretty(&view) {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("cabinet-hub: {e}");
                        ExitCode::from(1)
                    }
                },
                Err(e) => {
                    eprintln!("cabinet-hub: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
