//! Read-through caches of the rows every purchase reads and people rarely change: a cabinet,
//! its sellable list, its merchant's promotions and payment terms.
//!
//! Every write to those rows goes through this store, which drops what it changed before it
//! answers, so on one node a change applies from the next read on. A second node's write (or a
//! hand edit of the database) is seen within the time-to-live. A load that raced a write is not
//! kept: each cache has a generation, bumped by every invalidation, and a loaded value is kept
//! only when the generation it was read under is still current.
//!
//! API keys are cached too, for at most [`KEY_TTL`] whatever the setting: every request names
//! one, and a lookup per request was a tenth of a purchase's statements. A revocation or
//! rotation through this store drops the whole key cache before it answers, so on one node no
//! request is served by a revoked key after the revocation answered; a revocation by another
//! node, or by hand in the database, is seen within `KEY_TTL`. Keys that are not found are not
//! kept.
//!
//! With several nodes (Redis), every change is also announced to the others, in order with the
//! node's other events (`cluster::bus`), and they drop the whole cache of that name at once: a
//! revoked key or a changed price stops being served everywhere, not only within the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Told the name of a cache this node changed, so that other nodes drop theirs
/// (`Store::announce_cache_changes`); shared by every cache of a store.
#[derive(Clone, Default)]
pub(crate) struct Announce(Arc<OnceLock<Tell>>);

/// The cache's name and the key changed (`None`: all of them).
type Tell = Box<dyn Fn(&'static str, Option<&str>) + Send + Sync>;

/// A key another node can be told about: a text key as itself; others as "all of them".
pub(crate) trait WireKey {
    fn wire(&self) -> Option<&str>;
}

impl WireKey for String {
    fn wire(&self) -> Option<&str> {
        Some(self)
    }
}

impl WireKey for &str {
    fn wire(&self) -> Option<&str> {
        Some(self)
    }
}

impl WireKey for (String, String) {
    fn wire(&self) -> Option<&str> {
        None
    }
}

impl Announce {
    /// Sets who is told; once.
    pub(crate) fn set(&self, f: Tell) {
        let _ = self.0.set(f);
    }

    fn tell(&self, name: &'static str, key: Option<&str>) {
        if let Some(f) = self.0.get() {
            f(name, key);
        }
    }
}

impl std::fmt::Debug for Announce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Announce(set)"
        } else {
            "Announce"
        })
    }
}

/// More entries than this and the cache starts over: a bound, not an eviction policy, as the
/// working set (cabinets and merchants in use) is far smaller on any real fleet.
const MAX_ENTRIES: usize = 200_000;

/// The longest a key is served from memory (see above).
pub(crate) const KEY_TTL: Duration = Duration::from_secs(5);

/// One cache.
pub(crate) struct Cached<K, V> {
    inner: Mutex<Inner<K, V>>,
    ttl: Duration,
    name: &'static str,
    announce: Announce,
}

impl<K, V> std::fmt::Debug for Cached<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached").field("name", &self.name).finish()
    }
}

#[derive(Debug)]
struct Inner<K, V> {
    map: HashMap<K, (Instant, V)>,
    generation: u64,
}

impl<K: Hash + Eq + Clone + WireKey, V: Clone> Cached<K, V> {
    /// A cache whose entries live `ttl`; zero turns it off.
    #[cfg(test)]
    pub(crate) fn new(ttl: Duration) -> Self {
        Self::named("test", ttl, Announce::default())
    }

    /// A cache whose changes by this node's writes are announced under `name`.
    pub(crate) fn named(name: &'static str, ttl: Duration, announce: Announce) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                generation: 0,
            }),
            ttl,
            name,
            announce,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value for `key`: kept when fresh, else loaded and kept.
    pub(crate) async fn get_or_load<E, F, Fut>(&self, key: &K, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let generation = match self.fresh(key) {
            Some(Ok(v)) => return Ok(v),
            Some(Err(generation)) => generation,
            None => return load().await,
        };
        let loaded_at = Instant::now();
        let v = load().await?;
        self.keep(key, generation, loaded_at, &v);
        Ok(v)
    }

    /// Like [`Cached::get_or_load`] for a lookup that may find nothing: only what is found is
    /// kept, so that lookups of made-up keys (a guessing caller) take no memory.
    pub(crate) async fn get_or_load_found<E, F, Fut>(
        &self,
        key: &K,
        load: F,
    ) -> Result<Option<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        let generation = match self.fresh(key) {
            Some(Ok(v)) => return Ok(Some(v)),
            Some(Err(generation)) => generation,
            None => return load().await,
        };
        let loaded_at = Instant::now();
        let found = load().await?;
        if let Some(v) = &found {
            self.keep(key, generation, loaded_at, v);
        }
        Ok(found)
    }

    /// `key`'s kept value while fresh (`Ok`), else the generation a load must be kept under
    /// (`Err`); `None` when the cache is off.
    fn fresh(&self, key: &K) -> Option<Result<V, u64>> {
        if self.ttl.is_zero() {
            return None;
        }
        let inner = self.lock();
        match inner.map.get(key) {
            Some((at, v)) if at.elapsed() < self.ttl => Some(Ok(v.clone())),
            _ => Some(Err(inner.generation)),
        }
    }

    /// Keeps a value loaded at `loaded_at` under `generation`, unless a write came since.
    fn keep(&self, key: &K, generation: u64, loaded_at: Instant, v: &V) {
        let mut inner = self.lock();
        if inner.generation == generation {
            if inner.map.len() >= MAX_ENTRIES {
                inner.map.clear();
            }
            inner.map.insert(key.clone(), (loaded_at, v.clone()));
        }
    }

    /// Drops `key`, and any load in flight.
    pub(crate) fn invalidate(&self, key: &K) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.map.remove(key);
    }

    /// Drops everything, and any load in flight.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.map.clear();
    }

    /// Drops `key` when the returned guard goes, at the end of the write that holds it: after
    /// the commit, so that no load that read the old row is kept (see [`Cached::invalidate`]),
    /// and on every early return alike.
    pub(crate) fn invalidating(&self, key: K) -> Invalidate<'_, K, V> {
        Invalidate {
            cache: self,
            key: Some(key),
        }
    }

    /// [`Cached::invalidating`] for every key.
    pub(crate) fn clearing(&self) -> Invalidate<'_, K, V> {
        Invalidate {
            cache: self,
            key: None,
        }
    }
}

/// See [`Cached::invalidating`].
pub(crate) struct Invalidate<'a, K: Hash + Eq + Clone + WireKey, V: Clone> {
    cache: &'a Cached<K, V>,
    /// `None`: every key.
    key: Option<K>,
}

impl<K: Hash + Eq + Clone + WireKey, V: Clone> Drop for Invalidate<'_, K, V> {
    fn drop(&mut self) {
        match &self.key {
            Some(k) => self.cache.invalidate(k),
            None => self.cache.clear(),
        }
        self.cache
            .announce
            .tell(self.cache.name, self.key.as_ref().and_then(|k| k.wire()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn load(n: &AtomicU32, v: u32) -> Result<u32, ()> {
        n.fetch_add(1, Ordering::SeqCst);
        Ok(v)
    }

    #[tokio::test]
    async fn a_fresh_value_is_read_once_and_an_invalidated_one_again() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_secs(60));
        let n = AtomicU32::new(0);
        assert_eq!(c.get_or_load(&"a", || load(&n, 1)).await, Ok(1));
        assert_eq!(c.get_or_load(&"a", || load(&n, 2)).await, Ok(1));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        c.invalidate(&"a");
        assert_eq!(c.get_or_load(&"a", || load(&n, 3)).await, Ok(3));
        c.clear();
        assert_eq!(c.get_or_load(&"a", || load(&n, 4)).await, Ok(4));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_load_that_raced_a_write_is_not_kept() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_secs(60));
        let stale = c
            .get_or_load(&"a", || async {
                // The write lands while the old value is on its way back.
                c.invalidate(&"a");
                Ok::<_, ()>(1)
            })
            .await;
        assert_eq!(stale, Ok(1));
        let n = AtomicU32::new(0);
        assert_eq!(c.get_or_load(&"a", || load(&n, 2)).await, Ok(2));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_write_drops_the_row_when_it_ends_not_when_it_starts() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_secs(60));
        let n = AtomicU32::new(0);
        {
            let _w = c.invalidating("a");
            // A read during the write loads the old row; it must not outlive the write.
            assert_eq!(c.get_or_load(&"a", || load(&n, 1)).await, Ok(1));
        }
        assert_eq!(c.get_or_load(&"a", || load(&n, 2)).await, Ok(2));
        {
            let _w = c.clearing();
        }
        assert_eq!(c.get_or_load(&"a", || load(&n, 3)).await, Ok(3));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_expired_value_and_a_zero_ttl_read_storage() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_millis(1));
        let n = AtomicU32::new(0);
        assert_eq!(c.get_or_load(&"a", || load(&n, 1)).await, Ok(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.get_or_load(&"a", || load(&n, 2)).await, Ok(2));
        let off: Cached<&str, u32> = Cached::new(Duration::ZERO);
        assert_eq!(off.get_or_load(&"a", || load(&n, 3)).await, Ok(3));
        assert_eq!(off.get_or_load(&"a", || load(&n, 4)).await, Ok(4));
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn only_what_is_found_is_kept() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_secs(60));
        let n = AtomicU32::new(0);
        let none = || async {
            n.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(None)
        };
        assert_eq!(c.get_or_load_found(&"a", none).await, Ok(None));
        assert_eq!(
            c.get_or_load_found(&"a", || async { Ok::<_, ()>(Some(7)) })
                .await,
            Ok(Some(7))
        );
        assert_eq!(c.get_or_load_found(&"a", none).await, Ok(Some(7)));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(c.lock().map.len(), 1);
        c.clear();
        assert_eq!(c.get_or_load_found(&"a", none).await, Ok(None));
    }

    #[tokio::test]
    async fn errors_are_not_kept() {
        let c: Cached<&str, u32> = Cached::new(Duration::from_secs(60));
        assert_eq!(
            c.get_or_load(&"a", || async { Err("down") }).await,
            Err("down")
        );
        let n = AtomicU32::new(0);
        assert_eq!(c.get_or_load(&"a", || load(&n, 1)).await, Ok(1));
    }
}
