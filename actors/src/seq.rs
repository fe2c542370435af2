//! Per-boot duplicate detection for heartbeat and event sequence numbers.
//!
//! A cabinet's `seq` increases by one per message within a boot, and QoS 1 may redeliver a
//! message. Remembering only the highest `seq` seen would let one message with a huge `seq`
//! (a firmware bug, or anyone holding the cabinet's secret) make every later genuine message
//! look like a redelivery, silencing the cabinet until it reboots. So the hub remembers which of
//! the [`WINDOW`] sequence numbers ending at the highest it has seen, and only those can be
//! duplicates; a `seq` further away in either direction is taken as the cabinet's counter having
//! jumped (reset) and is accepted, and the window restarts there.
//!
//! Memory: one `u64` and a 1024-bit map (136 bytes) per cabinet.

/// How many sequence numbers, ending at the highest seen, are remembered.
pub const WINDOW: u64 = 1024;

const WORDS: usize = (WINDOW / 64) as usize;

/// What to do with a message's `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// New: process it.
    Fresh,
    /// Already processed in this window: drop it.
    Duplicate,
    /// Outside the window (more than [`WINDOW`] above the highest, or below the window): the
    /// counter jumped. Process it; the window restarts at this `seq`.
    Reset {
        /// The highest `seq` before the jump.
        from: u64,
    },
}

/// The highest `seq` seen in the current boot and which of the [`WINDOW`] numbers ending at it
/// were seen. Bit `i` stands for `highest - i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqWindow {
    highest: u64,
    seen: [u64; WORDS],
}

impl SeqWindow {
    /// A window that has seen only `seq`.
    pub fn starting_at(seq: u64) -> Self {
        let mut seen = [0; WORDS];
        seen[0] = 1;
        Self { highest: seq, seen }
    }

    /// The highest `seq` in the window.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    fn bit(&self, back: u64) -> bool {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.seen[w] & (1 << b) != 0
    }

    fn set(&mut self, back: u64) {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.seen[w] |= 1 << b;
    }

    /// Moves the top of the window up by `by` (1..=WINDOW): older numbers slide towards the
    /// bottom and those past it are forgotten.
    fn shift(&mut self, by: u64) {
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let mut next = [0u64; WORDS];
        for (i, slot) in next.iter_mut().enumerate() {
            let Some(src) = i.checked_sub(words) else {
                continue;
            };
            let mut v = self.seen[src] << bits;
            if bits > 0 {
                if let Some(lower) = src.checked_sub(1) {
                    v |= self.seen[lower] >> (64 - bits);
                }
            }
            *slot = v;
        }
        self.seen = next;
    }

    /// Judges `seq` and records it unless it is a duplicate.
    pub fn check(&mut self, seq: u64) -> SeqVerdict {
        if seq > self.highest {
            let ahead = seq - self.highest;
            if ahead > WINDOW {
                let from = self.highest;
                *self = Self::starting_at(seq);
                return SeqVerdict::Reset { from };
            }
            if ahead == WINDOW {
                self.seen = [0; WORDS];
            } else {
                self.shift(ahead);
            }
            self.highest = seq;
            self.set(0);
            return SeqVerdict::Fresh;
        }
        let back = self.highest - seq;
        if back >= WINDOW {
            let from = self.highest;
            *self = Self::starting_at(seq);
            return SeqVerdict::Reset { from };
        }
        if self.bit(back) {
            return SeqVerdict::Duplicate;
        }
        self.set(back);
        SeqVerdict::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_huge_seq_cannot_silence_the_cabinet() {
        let mut w = SeqWindow::starting_at(42);
        assert_eq!(w.check(u64::MAX), SeqVerdict::Reset { from: 42 });
        assert_eq!(w.check(43), SeqVerdict::Reset { from: u64::MAX });
        assert_eq!(w.check(44), SeqVerdict::Fresh);
        assert_eq!(w.check(44), SeqVerdict::Duplicate);
    }

    #[test]
    fn window_edges() {
        let mut w = SeqWindow::starting_at(5000);
        assert_eq!(w.check(5000 - WINDOW + 1), SeqVerdict::Fresh, "lowest in");
        assert_eq!(w.check(5000 - WINDOW + 1), SeqVerdict::Duplicate);
        assert_eq!(w.check(5000 - WINDOW), SeqVerdict::Reset { from: 5000 });

        let mut w = SeqWindow::starting_at(5000);
        assert_eq!(w.check(5000 + WINDOW - 1), SeqVerdict::Fresh);
        assert_eq!(
            w.check(5000),
            SeqVerdict::Duplicate,
            "at the bottom, remembered"
        );
        assert_eq!(w.check(5001), SeqVerdict::Fresh);
        assert_eq!(
            w.check(4999),
            SeqVerdict::Reset {
                from: 5000 + WINDOW - 1
            }
        );

        let mut w = SeqWindow::starting_at(5000);
        assert_eq!(
            w.check(5000 + WINDOW),
            SeqVerdict::Fresh,
            "the furthest step"
        );
        assert_eq!(
            w.check(5000),
            SeqVerdict::Reset {
                from: 5000 + WINDOW
            },
            "slid out"
        );

        let mut w = SeqWindow::starting_at(5000);
        assert_eq!(
            w.check(5000 + WINDOW + 1),
            SeqVerdict::Reset { from: 5000 },
            "just too far ahead"
        );

        let mut w = SeqWindow::starting_at(0);
        assert_eq!(w.check(u64::MAX), SeqVerdict::Reset { from: 0 });
        assert_eq!(w.check(u64::MAX), SeqVerdict::Duplicate);
    }

    proptest! {
        /// Against a model that remembers every seq: within the window the verdicts agree, a
        /// seq is never accepted twice without a reset in between, and nothing panics.
        #[test]
        fn matches_a_model_that_remembers_everything(
            start in any::<u64>(),
            steps in proptest::collection::vec((any::<bool>(), 0u64..1500, any::<u64>(), 0u8..20), 1..300),
        ) {
            let mut w = SeqWindow::starting_at(start);
            let mut highest = start;
            let mut seen: BTreeSet<u64> = BTreeSet::from([start]);
            for (up, delta, wild, pick) in steps {
                let seq = if pick == 0 {
                    wild
                } else if up {
                    highest.saturating_add(delta)
                } else {
                    highest.saturating_sub(delta)
                };
                let in_window = seq <= highest.saturating_add(WINDOW)
                    && seq.saturating_add(WINDOW) > highest;
                let v = w.check(seq);
                if in_window {
                    let expect = if seen.contains(&seq) { SeqVerdict::Duplicate } else { SeqVerdict::Fresh };
                    prop_assert_eq!(v, expect, "seq {} highest {}", seq, highest);
                    seen.insert(seq);
                    highest = highest.max(seq);
                } else {
                    prop_assert_eq!(v, SeqVerdict::Reset { from: highest });
                    seen = BTreeSet::from([seq]);
                    highest = seq;
                }
                prop_assert_eq!(w.highest(), highest);
            }
        }
    }
}
