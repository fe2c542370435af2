//! A map that remembers which entries changed, so a simulator can persist each change as one
//! appended line instead of rewriting its whole state (which made every request O(all orders)).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string-keyed map with a set of keys changed since the last [`Tracked::take_changed`].
#[derive(Debug)]
pub struct Tracked<V> {
    map: HashMap<String, V>,
    dirty: HashSet<String>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            dirty: HashSet::new(),
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
        self.map.insert(k, v)
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.map.iter()
    }

    /// The first entry matching `f`, to change (marked changed).
    pub fn find_mut(&mut self, mut f: impl FnMut(&V) -> bool) -> Option<&mut V> {
        let k = self
            .map
            .iter()
            .find(|(_, v)| f(v))
            .map(|(k, _)| k.clone())?;
        let v = self.map.get_mut(&k)?;
        self.dirty.insert(k);
        Some(v)
    }

    /// The changed entries (cleared).
    pub fn take_changed(&mut self) -> HashMap<&String, &V> {
        let dirty = std::mem::take(&mut self.dirty);
        self.map
            .iter()
            .filter(|(k, _)| dirty.contains(*k))
            .collect()
    }

    /// Takes over every entry of `other` (a later journal line wins).
    pub fn merge(&mut self, other: Tracked<V>) {
        self.map.extend(other.map);
    }
}

impl<V: Serialize> Serialize for Tracked<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Tracked<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            map: HashMap::deserialize(d)?,
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
        if let Some(v) = t.find_mut(|v| *v == 1) {
            *v = 4;
        }
        let changed = t.take_changed();
        assert_eq!(changed.len(), 2);
        assert_eq!(changed.get(&"a".to_owned()), Some(&&4));
    }
}
