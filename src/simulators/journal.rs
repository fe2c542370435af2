//! A map that remembers which entries changed, so a simulator can persist each change as one
//! appended line instead of rewriting its whole state (which made every request O(all orders)).

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string-keyed map with a set of keys changed since the last [`Tracked::take_changed`].
#[derive(Debug)]
pub struct Tracked<V> {
    map: HashMap<String, V>,
    dirty: HashSet<String>,
    /// Keys, oldest first, for `evict`.
    age: VecDeque<String>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            dirty: HashSet::new(),
            age: VecDeque::new(),
        }
    }
}

impl<V> Tracked<V> {
    /// An entry.
    pub fn get(&self, k: &str) -> Option<&V> {
        self.map.get(k)
    }

    /// An entry to change (marked changed).
    pub fn get_mut(&mut self, k: &str) -> Option<&mut V> {
        let v = self.map.get_mut(k)?;
        self.dirty.insert(k.to_owned());
        Some(v)
    }

    /// Inserts or replaces (marked changed).
    pub fn insert(&mut self, k: String, v: V) -> Option<V> {
        self.dirty.insert(k.clone());
        let old = self.map.insert(k.clone(), v);
        if old.is_none() {
            self.age.push_back(k);
        }
        old
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.map.iter()
    }

    /// The changed entries (cleared). Looks up the changed keys rather than filtering the whole
    /// map: this runs on every request, and the map holds thousands of orders.
    pub fn take_changed(&mut self) -> HashMap<&String, &V> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .iter()
            .filter_map(|k| self.map.get_key_value(k))
            .collect()
    }

    /// Takes over every entry of `other` (a later journal line wins).
    pub fn merge(&mut self, other: Tracked<V>) {
        for (k, v) in other.map {
            self.insert(k, v);
        }
        self.dirty.clear();
    }

    /// How many entries.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    /// While there are more than `keep` entries, forgets the oldest ones that `done` says are
    /// finished; unfinished ones are kept and looked at again later. Looks at no more than
    /// `budget` entries, so a call stays cheap whatever the size.
    pub fn evict(&mut self, keep: usize, budget: usize, done: impl Fn(&V) -> bool) {
        for _ in 0..budget {
            if self.map.len() <= keep {
                return;
            }
            let Some(k) = self.age.pop_front() else {
                return;
            };
            match self.map.get(&k) {
                Some(v) if done(v) => {
                    self.map.remove(&k);
                    self.dirty.remove(&k);
                }
                Some(_) => self.age.push_back(k),
                None => {}
            }
        }
    }
}

impl<V: Serialize> Serialize for Tracked<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Tracked<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: HashMap<String, V> = HashMap::deserialize(d)?;
        Ok(Self {
            age: map.keys().cloned().collect(),
            map,
            dirty: HashSet::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_entries_are_taken_once() {
        let mut t: Tracked<u32> = Tracked::default();
        t.insert("a".into(), 1);
        t.insert("b".into(), 2);
        assert_eq!(t.take_changed().len(), 2);
        assert!(t.take_changed().is_empty());
        let _ = t.get("a");
        assert!(t.take_changed().is_empty(), "reading changes nothing");
        if let Some(v) = t.get_mut("b") {
            *v = 3;
        }
        if let Some(v) = t.get_mut("a") {
            *v = 4;
        }
        let changed = t.take_changed();
        assert_eq!(changed.len(), 2);
        assert_eq!(changed.get(&"a".to_owned()), Some(&&4));
    }

    #[test]
    fn evicts_the_oldest_finished_entries_only() {
        let mut t: Tracked<u32> = Tracked::default();
        // Even values are finished.
        for (i, v) in [1u32, 2, 4, 5, 6].iter().enumerate() {
            t.insert(format!("k{i}"), *v);
        }
        t.evict(3, 10, |v| v % 2 == 0);
        assert_eq!(t.len(), 3);
        assert!(t.get("k0").is_some(), "unfinished, kept although oldest");
        assert!(
            t.get("k1").is_none() && t.get("k2").is_none(),
            "oldest finished go"
        );
        assert!(t.get("k3").is_some() && t.get("k4").is_some());
        // Nothing more to evict while everything left is unfinished but the newest.
        t.evict(0, 10, |v| *v == 6);
        assert_eq!(t.len(), 2);
        assert!(t.get("k4").is_none());
        // The budget bounds the work of one call.
        let mut big: Tracked<u32> = Tracked::default();
        for i in 0..100 {
            big.insert(format!("b{i}"), 0);
        }
        big.evict(0, 10, |_| true);
        assert_eq!(big.len(), 90);
    }
}
