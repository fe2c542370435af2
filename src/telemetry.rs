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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no pointers and returns a plain struct by value.
        let i = unsafe { libc::mallinfo2() };
        m.heap_in_use = Some((i.uordblks + i.hblkhd) as u64);
        m.heap_free = Some(i.fordblks as u64);
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
        resident_bytes().map(|b| b / 1024)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn heap_in_use_and_free_follow_what_is_allocated_and_freed() {
        const MB: u64 = 1 << 20;
        let before = memory_use();
        // 64 MB in 1 KiB blocks, touched so that they are resident.
        let mut blocks: Vec<Box<[u8; 1024]>> = (0..65_536).map(|_| Box::new([1u8; 1024])).collect();
        let full = memory_use();
        // The last block keeps the heap's top in use: the rest stays with the allocator.
        let last = blocks.split_off(blocks.len() - 1);
        drop(blocks);
        let after = memory_use();
        let (Some(b), Some(f), Some(a)) = (before.heap_in_use, full.heap_in_use, after.heap_in_use)
        else {
            panic!("no heap figures on glibc: {before:?}");
        };
        assert!(
            f >= b + 60 * MB,
            "in use {b} before, {f} with 64 MB allocated"
        );
        assert!(f >= a + 60 * MB, "in use {f} allocated, {a} after freeing");
        let (Some(fb), Some(fa)) = (full.heap_free, after.heap_free) else {
            panic!("no free-heap figure: {after:?}");
        };
        assert!(fa >= fb + 60 * MB, "free {fb} before freeing, {fa} after");
        let (Some(rb), Some(rf)) = (before.resident, full.resident) else {
            panic!("no resident figure: {before:?}");
        };
        assert!(
            rf >= rb + 60 * MB,
            "resident {rb} before, {rf} with 64 MB allocated"
        );
        assert_eq!(last.len(), 1);
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
            panic!("no resident figure in /proc/self/statm");
        };
        assert!(
            before.saturating_sub(after) > 64 * 1024,
            "RSS {before} kB before the trim, {after} kB after"
        );
        assert_eq!(last.len(), 1);
    }
}
