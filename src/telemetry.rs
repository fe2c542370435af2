//! Logging through `tracing`: human text by default, JSON in production; and heap upkeep.

use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rumqttd=off,actix_server=warn", log.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if log.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// Hands heap pages that are free back to the OS; whether any were. glibc keeps freed memory
/// for reuse and returns only the top of the heap by itself, so pages freed in the middle (a
/// connect storm's set-up, a fleet snapshot's buffers) stay in the RSS until trimmed.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena).
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Calls `release_free_heap` every `interval`, off the async workers (it walks the heap), for
/// as long as the runtime runs.
pub async fn trim_heap_every(interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(release_free_heap).await {
            Ok(released) => tracing::debug!(
                released,
                took_ms = started.elapsed().as_secs_f64() * 1000.0,
                "heap trimmed"
            ),
            Err(e) => tracing::warn!(error = %e, "heap trim failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kb() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_heap_in_the_middle_goes_back_to_the_os_when_trimmed() {
        // 128 MB in 1 KiB blocks, then all but the last freed: the last one keeps the heap's
        // top in use, so glibc cannot give the space back by itself.
        let mut blocks: Vec<Box<[u8; 1024]>> =
            (0..131_072).map(|_| Box::new([1u8; 1024])).collect();
        let last = blocks.split_off(blocks.len() - 1);
        drop(blocks);
        let before = rss_kb();
        assert!(release_free_heap(), "nothing was released");
        let after = rss_kb();
        let (Some(before), Some(after)) = (before, after) else {
            panic!("no VmRSS in /proc/self/status");
        };
        assert!(
            before.saturating_sub(after) > 64 * 1024,
            "RSS {before} kB before the trim, {after} kB after"
        );
        assert_eq!(last.len(), 1);
    }
}
