//! Logging through `tracing`: human text by default, JSON in production; and what the process's
//! memory holds.

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

/// What the process holds, in bytes; `None` where this platform does not tell.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryUse {
    /// Resident set (what the OS counts against the host).
    pub resident: Option<u64>,
    /// Heap handed out by the allocator and not yet freed: what the hub's data takes.
    pub heap_in_use: Option<u64>,
    /// Heap freed but kept by the allocator for reuse. Resident growth with a flat
    /// `heap_in_use` is this, fragmentation, not a leak.
    pub heap_free: Option<u64>,
}

/// Reads [`MemoryUse`] now. The heap figures walk the allocator's free lists under its arena
/// locks: cheap at a scrape's pace, not for a hot path.
pub fn memory_use() -> MemoryUse {
    let mut m = MemoryUse {
        resident: resident_bytes(),
        ..MemoryUse::default()
    };
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // jemalloc's statistics are a snapshot, refreshed by advancing its epoch.
        if epoch::advance().is_ok() {
            let allocated = stats::allocated::read().ok();
            let resident = stats::resident::read().ok();
            m.heap_in_use = allocated.map(|a| a as u64);
            m.heap_free = allocated
                .zip(resident)
                .map(|(a, r)| r.saturating_sub(a) as u64);
        }
    }
    m
}

/// The second field of `/proc/self/statm` (resident pages) in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kb() -> Option<u64> {
        resident_bytes().map(|b| b / 1024)
    }

    #[test]
    fn jemalloc_reports_what_is_allocated_and_freed() {
        const MB: u64 = 1 << 20;
        let before = memory_use();
        let blocks: Vec<Box<[u8; 1024]>> = (0..65_536).map(|_| Box::new([1u8; 1024])).collect();
        let full = memory_use();
        drop(blocks);
        let after = memory_use();
        let (Some(b), Some(f), Some(a)) = (before.heap_in_use, full.heap_in_use, after.heap_in_use)
        else {
            panic!("no heap figures from jemalloc: {before:?}");
        };
        assert!(
            f >= b + 60 * MB,
            "in use {b} before, {f} with 64 MB allocated"
        );
        assert!(f >= a + 60 * MB, "in use {f} allocated, {a} after freeing");
        let (Some(rb), Some(rf)) = (before.resident, full.resident) else {
            panic!("no resident figure: {before:?}");
        };
        assert!(
            rf >= rb + 60 * MB,
            "resident {rb} before, {rf} with 64 MB allocated"
        );
        assert!(full.heap_free.is_some());
    }

    /// What a storm leaves behind goes back to the OS by itself (jemalloc's background thread,
    /// `malloc_conf` in lib.rs): glibc kept it until trimmed. Waited for, not timed: the decay
    /// clock is jemalloc's (10 s).
    #[test]
    fn freed_heap_goes_back_to_the_os_by_itself() {
        let mut blocks: Vec<Box<[u8; 1024]>> =
            (0..131_072).map(|_| Box::new([1u8; 1024])).collect();
        let last = blocks.split_off(blocks.len() - 1);
        let Some(full) = rss_kb() else {
            panic!("no resident figure in /proc/self/statm");
        };
        drop(blocks);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let now = rss_kb().unwrap_or(full);
            if full.saturating_sub(now) > 64 * 1024 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "RSS {full} kB with 128 MB allocated, still {now} kB two minutes after freeing it"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert_eq!(last.len(), 1);
    }
}
